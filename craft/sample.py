"""Sampling from a saved text-to-image model: DDIM or DDPM, classifier-free guidance, seeded.

``craft sample MODEL_DIR --prompt "adenocarcinoma" --n 8 --out DIR`` writes ``DIR/<prompt-slug>/000.png``
... and ``DIR/grid.png`` (one row per prompt).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from craft.io import atomic_write_bytes, atomic_write_json


def set_scheduler(pipe, kind: Literal["ddim", "ddpm"]) -> None:
    """Swap ``pipe``'s sampler, keeping the trained noise schedule; never clip latents (ENVIRONMENT.md).

    ``from_config`` keeps ``prediction_type`` too, so a v-prediction model (SD 2.1 768 px) samples as one.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler must be ddim or ddpm, got {kind!r}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, clip_sample=False)


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
             scheduler: Literal["ddim", "ddpm"] = "ddim", batch: int = 32, eta: float = 0.0,
             precision: Literal["auto", "no", "bf16", "fp16"] = "auto"):  # fmt: skip
    """PIL images for ``prompts`` (one each); the same seed gives the same images.

    Guidance > 1 is classifier-free guidance against the empty prompt (the models are trained
    with caption dropout to ""); guidance <= 1 samples the conditional model alone. Images come at
    ``model_resolution`` (UNet-implied), the size every training stage uses. ``precision``: autocast
    as ``craft.models.accel.resolve_precision`` (auto: bf16 on CUDA, fp32 on CPU); SDPA attention, TF32.
    """
    from craft.models.accel import autocast, configure_kernels, use_sdpa
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
           guidance: float = 4.0, scheduler: Literal["ddim", "ddpm"] = "ddim", seed: int = 0,
           adapter: str | None = None) -> Path:  # fmt: skip
    """Load ``model_dir`` (local dir or s3:// prefix) and write ``n`` PNGs per prompt plus ``grid.png``."""
    from craft.models.diffusion import load_pipeline

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("give at least one --prompt")
    pipe = load_pipeline(model_dir)
    if adapter:  # TI tokens and/or LoRA written by craft.train.reward / craft.train.baselines
        from craft.train.reward import load_adapters

        load_adapters(pipe, adapter)
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
