"""Generation: a base pipeline with its adapters and ControlNets, and its seeded samplers (DDIM, DDPM, DPM-Solver++).

The one home of sampling that training (validation grids, DPO pairs) and measuring (``craft.evaluate``,
``craft.promote``, ``craft sample``) share, as diffusers keeps ``pipelines/`` apart from its training
utilities: how a model was trained never changes how it is sampled for its numbers. Nothing here imports
``craft.train``.

``craft sample MODEL_DIR --prompt "adenocarcinoma" --n 8 --out DIR`` writes ``DIR/<prompt-slug>/000.png``
... and ``DIR/grid.png`` (one row per prompt); with ``--controlnet CN --condition IMAGE`` it follows the
condition image (``sample_controlnet``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from craft.io import atomic_write_bytes, atomic_write_json


def default_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_generator(model: str | os.PathLike, adapter: str | os.PathLike | None = None, device=None):
    """The diffusers pipeline at ``model`` (a directory or s3:// prefix) with ``adapter`` loaded: (pipe, adapter meta).

    ``adapter``: a folder written by a training stage (LoRA and/or textual-inversion tokens,
    ``craft.models.adapters``); its ``adapter.json`` comes back so callers can build the class-token prompts.
    """
    from craft.models.adapters import load_adapters, read_adapter_meta
    from craft.models.diffusion import load_pipeline

    pipe = load_pipeline(model)
    meta: dict = {}
    if adapter:
        load_adapters(pipe, adapter)
        meta = read_adapter_meta(adapter)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, meta


Sampler = Literal["ddim", "ddpm", "dpmpp"]
SAMPLERS = ("ddim", "ddpm", "dpmpp")


def set_scheduler(pipe, kind: Sampler) -> None:
    """Swap ``pipe``'s sampler, keeping the trained noise schedule; never clip latents (ENVIRONMENT.md).

    ``from_config`` keeps ``prediction_type`` too, so a v-prediction model (SD 2.1 768 px) samples as one.
    ``dpmpp``: DPM-Solver++(2M), the multistep second-order solver of the probability-flow ODE (Lu et al. 2022,
    "DPM-Solver++", sec. 4, Algorithm 2), deterministic like DDIM at eta 0 and as accurate in about half the
    steps; first order at the last step (``lower_order_final``), which keeps it stable below 15 steps.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "dpmpp":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
            thresholding=False,
        )  # fmt: skip
        return
    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler must be one of {SAMPLERS}, got {kind!r}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, clip_sample=False)


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
             scheduler: Sampler = "ddim", batch: int = 32, eta: float = 0.0,
             precision: Literal["auto", "no", "bf16", "fp16"] = "auto"):  # fmt: skip
    """PIL images for ``prompts`` (one each); the same seed gives the same images.

    Guidance > 1 is classifier-free guidance against the empty prompt (the models are trained
    with caption dropout to ""); guidance <= 1 samples the conditional model alone. Images come at
    ``model_resolution`` (UNet-implied), the size every training stage uses. ``precision``: autocast
    as ``craft.models.accel.resolve_precision`` (auto: bf16 on CUDA, fp32 on CPU); SDPA attention, TF32.
    """
    from craft.models.accel import autocast, configure_kernels, use_sdpa
    from craft.models.adapters import merged_lora
    from craft.models.diffusion import model_resolution, vae_factor

    configure_kernels(pipe.device)
    use_sdpa(pipe.unet, pipe.vae, pipe.text_encoder)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval()  # inference mode, as from_pretrained leaves them (train mode changes pixels)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    res = model_resolution(pipe.unet, pipe.vae)
    side = res // vae_factor(pipe.vae)
    images = []
    with merged_lora(pipe.unet):  # a loaded LoRA folded into its base weights once for the call: one matmul each
        for i in range(0, len(prompts), batch):
            chunk = list(prompts[i : i + batch])
            kwargs = {"eta": eta} if scheduler == "ddim" else {}
            # draw the initial noise on CPU with our generator so results do not depend on the device
            shape = (len(chunk), pipe.unet.config.in_channels, side, side)
            latents = torch.randn(shape, generator=gen).to(pipe.device, pipe.unet.dtype)
            with autocast(pipe.device, precision):
                out = pipe(
                    chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gen, latents=latents,
                    height=res, width=res, output_type="pil", **kwargs,
                )  # fmt: skip
            images.extend(out.images)
    return images


@torch.no_grad()
def generate_seeded(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0,
                    scheduler: Sampler = "ddim", batch: int = 16) -> list:  # fmt: skip
    """PIL images, image j from the initial latent seeded by ``seeds[j]``: independent of batching and of
    which other prompts share its batch (what evaluation needs to score every variant on the same noise)."""
    from craft.models.adapters import merged_lora

    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    set_scheduler(pipe, scheduler)
    c = pipe.unet.config
    out = []
    with merged_lora(pipe.unet):  # a loaded LoRA folded into its base weights once for the call (no drift after)
        for s in range(0, len(prompts), batch):
            chunk, sds = prompts[s : s + batch], seeds[s : s + batch]
            lat = torch.stack([torch.randn((c.in_channels, c.sample_size, c.sample_size),
                                           generator=torch.Generator().manual_seed(x)) for x in sds])  # fmt: skip
            kwargs = {"eta": 0.0} if scheduler == "ddim" else {}
            res = pipe(list(chunk), num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                       latents=lat.to(pipe.device, pipe.unet.dtype), generator=torch.Generator().manual_seed(sds[0]),
                       **kwargs)  # fmt: skip
            out.extend(res.images)
    return out


def grid(images, cols: int):
    """Tile PIL images into one image, ``cols`` per row."""
    from PIL import Image

    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        canvas.paste(im.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    return canvas


def _png_bytes(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path: str | os.PathLike, cols: int | None = None):
    """Write a grid PNG of ``images`` atomically; returns the grid image."""
    g = grid(images, cols or len(images))
    atomic_write_bytes(path, _png_bytes(g))
    return g


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:60] or "empty"


def sample(model_dir: str, prompts: list[str], n: int, out_dir: str | os.PathLike, steps: int = 20,
           guidance: float = 4.0, scheduler: Sampler = "ddim", seed: int = 0,
           adapter: str | None = None) -> Path:  # fmt: skip
    """Load ``model_dir`` (local dir or s3:// prefix) and write ``n`` PNGs per prompt plus ``grid.png``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("give at least one --prompt")
    pipe, _ = load_generator(model_dir, adapter)  # TI tokens and/or LoRA written by the training stages
    out = Path(out_dir)
    rows = []
    for p in prompts:
        imgs = generate(pipe, [p] * n, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)
        folder = out / slug(p)
        for k, im in enumerate(imgs):
            atomic_write_bytes(folder / f"{k:03d}.png", _png_bytes(im))
        rows.extend(imgs)
    save_grid(rows, out / "grid.png", cols=n)
    atomic_write_json(out / "samples.json", {
        "model": str(model_dir), "prompts": prompts, "n": n, "steps": steps, "guidance": guidance,
        "scheduler": scheduler, "seed": seed, "folders": [slug(p) for p in prompts], "adapter": adapter,
    })  # fmt: skip
    return out


def to_array(images) -> np.ndarray:
    """PIL images -> uint8 array [N, H, W, 3]."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


# ---------------------------------------------------------------- ControlNet


def controlnet_pipeline(comp, controlnet):
    """``StableDiffusionControlNetPipeline`` over the base components and ``controlnet`` (no safety checker)."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=comp.vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer, unet=comp.unet,
        controlnet=controlnet, scheduler=comp.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_controlnet(pipe, conditions: torch.Tensor, prompts: list[str], steps: int = 20, guidance: float = 3.0,
                        seed: int = 0, conditioning_scale: float = 1.0, scheduler: str = "ddim", batch: int = 16):  # fmt: skip
    """PIL images, one per (condition [N, 3, H, W] in [0, 1], prompt); the same seed gives the same images."""
    if conditions.ndim != 4 or conditions.shape[1] != 3:
        raise ValueError(f"conditions must be [N, 3, H, W], got {tuple(conditions.shape)}")
    if len(prompts) != len(conditions):
        raise ValueError(f"{len(prompts)} prompts for {len(conditions)} conditions")
    from craft.models.diffusion import vae_factor

    set_scheduler(pipe, scheduler)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h, w = conditions.shape[-2:]
    f = vae_factor(pipe.vae)
    images = []
    for i in range(0, len(prompts), batch):
        c = conditions[i : i + batch]
        shape = (len(c), pipe.unet.config.in_channels, h // f, w // f)
        latents = torch.randn(shape, generator=gen).to(pipe.device, pipe.unet.dtype)
        out = pipe(
            list(prompts[i : i + batch]), image=c.to(pipe.device, pipe.unet.dtype), height=h, width=w,
            num_inference_steps=steps, guidance_scale=guidance, generator=gen, latents=latents,
            controlnet_conditioning_scale=conditioning_scale, output_type="pil",
            **({"eta": 0.0} if scheduler == "ddim" else {}),
        )  # fmt: skip
        images.extend(out.images)
    return images


def load_controlnet(path: str | os.PathLike, dtype=None):
    """A ControlNetModel saved by ``save_controlnet`` (safetensors only, offline)."""
    from diffusers import ControlNetModel

    d = Path(path)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a ControlNet directory (no config.json)")
    kwargs: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    return ControlNetModel.from_pretrained(str(d), **kwargs)


def sample_controlnet(model_dir: str, controlnet_dir: str, condition: str | os.PathLike, out_dir: str | os.PathLike,
                      n: int = 4, prompt: str = "", kind: str = "", steps: int = 20, guidance: float = 3.0,
                      seed: int = 0, conditioning_scale: float = 1.0, scheduler: str = "ddim") -> Path:  # fmt: skip
    """``craft sample MODEL --controlnet CN --condition IMAGE``: ``n`` images following the condition image.

    ``kind`` (mask | fluorescence) and ``prompt`` default to what the ControlNet was trained with
    (its lineage). Writes ``OUT/000.png ...``, ``OUT/grid.png`` (condition first) and ``samples.json``.
    """
    from PIL import Image

    from craft.data.conditions import CONDITIONS, PROMPTS, condition_from_file
    from craft.models.diffusion import Components, load_pipeline, model_resolution, read_lineage

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    lin = read_lineage(controlnet_dir)
    kind = kind or lin.get("condition", "")
    if kind not in CONDITIONS:
        raise ValueError(f"{controlnet_dir}: condition kind unknown (lineage has none); pass mask or fluorescence")
    prompt = prompt or lin.get("prompt") or PROMPTS[kind]
    pipe = load_pipeline(model_dir)
    cond = condition_from_file(condition, kind, model_resolution(pipe.unet, pipe.vae))
    cpipe = controlnet_pipeline(Components.from_pipeline(pipe), load_controlnet(controlnet_dir)).to(default_device())
    imgs = generate_controlnet(cpipe, cond.repeat(n, 1, 1, 1), [prompt] * n, steps=steps, guidance=guidance,
                               seed=seed, conditioning_scale=conditioning_scale, scheduler=scheduler)  # fmt: skip
    out = Path(out_dir)
    for k, im in enumerate(imgs):
        atomic_write_bytes(out / f"{k:03d}.png", _png_bytes(im))
    cond_img = Image.fromarray((cond[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    save_grid([cond_img] + imgs, out / "grid.png")
    atomic_write_json(out / "samples.json", {
        "model": str(model_dir), "controlnet": str(controlnet_dir), "condition": str(condition), "kind": kind,
        "prompt": prompt, "n": n, "steps": steps, "guidance": guidance, "seed": seed,
        "conditioning_scale": conditioning_scale, "scheduler": scheduler,
    })  # fmt: skip
    return out
