"""ControlNet on the foundation model (CRAFTS, "Structure-controllable image generation based on CRAFTS").

``craft train controlnet BASE_DIR DATASET_DIR --out DIR --condition mask|fluorescence`` trains a diffusers
``ControlNetModel`` initialised from the base model's UNet (``ControlNetModel.from_unet``: the encoder half
and middle block copied, zero convolutions on every residual) on (condition, image, prompt) triples of
the dataset, with the whole base frozen: UNet, VAE and text encoder have ``requires_grad=False`` and only
the ControlNet's parameters enter the optimizer. The loss is the latent diffusion loss (CRAFTS eq. 5)
with the ControlNet's residuals added to the frozen UNet's skip connections and middle block.

Conditions (what the ControlNet sees: ``mask`` or ``fluorescence``) are read by ``craft.data.conditions``;
sampling with a trained ControlNet (``controlnet_pipeline``, ``generate_controlnet``, ``load_controlnet``)
lives in ``craft.sample``, which evaluation uses too.

The ControlNet's conditioning embedding must bring the condition from pixel to latent resolution: its
``conditioning_embedding_out_channels`` has one level per stride-2 step plus one, i.e.
log2(VAE factor) + 1 levels (``conditioning_channels``); a mismatch is refused before training.

Which base: the function takes the base pipeline directory, so the same code trains the CRAFTS ControlNet
(base = stage-2 ``finetune`` model) and the baseline (base = stage-1 ``pretrain`` model, the "plain base
without CRAFTS stage 2", standing in for the paper's Stable Diffusion comparison). The output directory
holds ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``ControlNetModel.save_pretrained``) and
``lineage.json`` naming the base, its stage, the condition and the dataset version.

Training uses the shared loop (``craft.train.loop``): mixed precision, gradient checkpointing, EMA,
checkpoint/resume, NaN detection and TensorBoard event files come from there. Adapter note: the loop
checkpoints ``model.state_dict()``, so the frozen base is held OUTSIDE the trained module's registered
children (``ControlNetObjective._frozen``) and moved to the training device on first use; checkpoints
therefore contain only the ControlNet. Validation writes condition / real / generated triplet grids.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from craft.config import to_dict
from craft.data.conditions import CONDITIONS, PROMPTS, condition_column, load_conditions, load_pil_images
from craft.data.manifest import read_manifest
from craft.io import atomic_dir, atomic_write_json
from craft.models.diffusion import (
    LINEAGE,
    Components,
    add_noise,
    load_pipeline,
    model_resolution,
    prediction_type,
    read_lineage,
    training_target,
    vae_factor,
)
from craft.models.lean_graph import lean_saves
from craft.sample import controlnet_pipeline, generate_controlnet
from craft.train.loop import LoopConfig, train

log = logging.getLogger(__name__)


@dataclass
class ControlNetConfig:
    """Stage ``controlnet``: a ControlNet trained on a frozen foundation model (CRAFTS, Fig. 4)."""

    enabled: bool = False  # pipeline switch: train + evaluate ControlNets in this profile (dsl.If on it)
    conditions: list[str] = field(default_factory=lambda: ["mask", "fluorescence"])  # what the pipeline trains
    condition: Literal["mask", "fluorescence"] = "mask"  # what this run conditions on (see module docstring)
    prompt: str = ""  # text prompt for every triple; "" = the built-in instruction prompt of the condition
    loop: LoopConfig = field(default_factory=LoopConfig)  # optimisation, checkpoints, EMA, precision
    conditioning_channels: list[int] = field(default_factory=list)  # conditioning-embedding widths;
    # [] = derived from the VAE factor (SD's (16, 32, 96, 256) for factor 8)
    cond_dropout: float = 0.1  # share of prompts replaced by "" (keeps classifier-free guidance usable)
    split: str = "train"  # manifest split used for training
    eval_split: str = "test"  # split whose pairs validation triplets and evaluation use
    val_images: int = 4  # validation triplets written at each validation (0 = none)
    sample_steps: int = 20  # DDIM steps for validation / evaluation samples
    sample_guidance: float = 3.0  # classifier-free guidance for validation / evaluation samples
    conditioning_scale: float = 1.0  # multiplier on the ControlNet residuals when sampling
    eval_images: int = 32  # test pairs evaluated by ``craft.evaluate.controlnet_eval`` (0 = all)

    def validate(self) -> None:
        bad = [c for c in self.conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"conditions: {bad[0]!r} is not one of {', '.join(CONDITIONS)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if any(c <= 0 for c in self.conditioning_channels):
            raise ValueError(f"conditioning_channels must be positive, got {self.conditioning_channels}")
        if self.val_images < 0 or self.eval_images < 0 or self.sample_steps < 1:
            raise ValueError("val_images and eval_images must be >= 0, sample_steps >= 1")

    def text(self) -> str:
        return self.prompt or PROMPTS[self.condition]


# ---------------------------------------------------------------- the model


def conditioning_channels(factor: int, requested: list[int] | tuple[int, ...] = ()) -> tuple[int, ...]:
    """Conditioning-embedding widths for a VAE factor: log2(factor) + 1 levels (each later one is stride 2).

    >>> conditioning_channels(8)
    (16, 32, 96, 256)
    >>> conditioning_channels(4)
    (16, 32, 64)
    """
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"VAE factor must be a power of two, got {factor}")
    levels = int(math.log2(factor)) + 1
    if requested:
        if len(requested) != levels:
            raise ValueError(
                f"conditioning_channels {list(requested)} has {len(requested)} levels; the VAE downsamples by "
                f"{factor}, which needs {levels} (one per stride-2 step plus the input level)"
            )
        return tuple(int(c) for c in requested)
    if factor == 8:
        return (16, 32, 96, 256)  # the ControlNet paper's / diffusers' default for SD
    return tuple(16 * 2**i for i in range(levels))


def build_controlnet(unet, vae, channels: list[int] | tuple[int, ...] = ()):
    """A ControlNetModel copied from ``unet`` whose conditioning embedding lands on ``vae``'s latent grid."""
    from diffusers import ControlNetModel

    ch = conditioning_channels(vae_factor(vae), channels)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=ch)


class ControlNetObjective(torch.nn.Module):
    """L_diff (CRAFTS eq. 5) of the frozen UNet + trainable ControlNet residuals (ControlNet, Zhang et al. 2023).

    Only ``self.controlnet`` is a registered child: the loop optimises and checkpoints just it.
    """

    def __init__(self, controlnet, unet, text_encoder, tokenizer, scheduler, cond_dropout: float = 0.1):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.controlnet = controlnet
        for m in (unet, text_encoder):
            m.requires_grad_(False)
            m.eval()
        unet.set_attn_processor(AttnProcessor2_0())
        controlnet.set_attn_processor(AttnProcessor2_0())
        controlnet.requires_grad_(True)
        # Not registered as children (plain dict): excluded from state_dict, parameters() and the optimizer.
        object.__setattr__(self, "_frozen", {"unet": unet, "text_encoder": text_encoder})
        self.tokenizer = tokenizer
        self.cond_dropout = cond_dropout
        self.num_t = scheduler.config.num_train_timesteps
        self.kind = prediction_type(scheduler)  # the frozen base's parameterisation: eps, or v for SD 2.1 768 px
        self.register_buffer("abar", scheduler.alphas_cumprod.clone().float(), persistent=False)

    @property
    def unet(self):
        return self._frozen["unet"]

    @property
    def text_encoder(self):
        return self._frozen["text_encoder"]

    def enable_gradient_checkpointing(self) -> None:
        self.controlnet.enable_gradient_checkpointing()
        self.unet.enable_gradient_checkpointing()  # activations of the frozen UNet still sit on the grad path

    def _to(self, device) -> None:
        for m in self._frozen.values():
            if next(m.parameters()).device != device:
                m.to(device)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        z0, cond = batch["latents"], batch["cond"]
        b, dev = z0.shape[0], z0.device
        self._to(dev)
        keep = torch.rand(b, generator=generator) >= self.cond_dropout
        prompts = [p if k else "" for p, k in zip(batch["prompt"], keep.tolist())]
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(dev)  # fmt: skip
        with torch.no_grad():
            states = self.text_encoder(ids).last_hidden_state
        noise = torch.randn(z0.shape, generator=generator).to(dev, z0.dtype)
        t = torch.randint(0, self.num_t, (b,), generator=generator).to(dev)
        abar = self.abar.to(dev)[t].view(b, 1, 1, 1)
        zt = add_noise(z0, noise, abar)  # eq. 3
        # the frozen UNet's convolutions keep no input (craft.models.lean_graph): the residuals' gradient does not
        # need it; the ControlNet's own convolutions train and keep autograd's saving
        with lean_saves(self.controlnet, self.unet):
            down, mid = self.controlnet(zt, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
            pred = self.unet(zt, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample  # fmt: skip
        # eq. 5 against the base's own target (noise, or v: Salimans & Ho 2022), else the ControlNet would fight it
        loss = F.mse_loss(pred.float(), training_target(self.kind, z0.float(), noise.float(), abar))
        return {"loss": loss, "l_diff": loss.detach()}


# ---------------------------------------------------------------- training


def save_controlnet(controlnet, out_dir: str | os.PathLike, lineage: dict[str, Any]) -> Path:
    """``ControlNetModel.save_pretrained`` (safetensors) + ``lineage.json``, atomically replacing ``out_dir``."""
    from craft.models.diffusion import code_version

    lineage = dict(lineage)
    lineage.setdefault("code_version", code_version())
    with atomic_dir(out_dir) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(Path(tmp) / LINEAGE, lineage)
    return Path(out_dir)


def pair_table(dataset_dir, split: str, kind: str):
    """Rows of ``split`` that carry the condition column ``kind`` needs; refuses an empty result."""
    df = read_manifest(dataset_dir)
    df = df[df["split"] == split].reset_index(drop=True)
    if len(df) == 0:
        raise ValueError(f"{dataset_dir}/manifest.parquet: no rows with split={split!r}")
    return df


def _triplet_validation(comp: Components, cfg: ControlNetConfig, val: dict[str, Any]):
    """Loop callback: condition / real / generated triplets of ``val`` into OUT/samples/step-N/ and TensorBoard."""

    def run(model: ControlNetObjective, step: int, out: Path, writer) -> None:
        if cfg.val_images <= 0 or len(val["cond"]) == 0:
            return
        from craft.evaluate.controlnet_eval import triplet_grid
        from craft.sample import save_grid

        dev = next(model.controlnet.parameters()).device
        model._to(dev)
        comp.vae.to(dev)  # the frozen VAE decodes the samples on the training device
        pipe = controlnet_pipeline(comp, model.controlnet)
        gen = generate_controlnet(pipe, val["cond"], [cfg.text()] * len(val["cond"]), steps=cfg.sample_steps,
                                  guidance=cfg.sample_guidance, seed=cfg.loop.seed,
                                  conditioning_scale=cfg.conditioning_scale)  # fmt: skip
        rows = triplet_grid(val["cond"], val["real"], gen)
        grid = save_grid(rows, out / "samples" / f"step-{step:07d}" / "triplets.png", cols=1)
        if writer is not None:
            writer.add_image("triplets", np.asarray(grid).transpose(2, 0, 1), step)

    return run


def train_controlnet(cfg: ControlNetConfig, dataset_dir, base_dir, out_dir, work_dir=None) -> dict[str, float]:
    """Train a ControlNet for ``cfg.condition`` on the frozen ``base_dir`` pipeline; write it to ``out_dir``."""
    from craft.train.crafts import _dataset_version, stage_latents

    t0 = time.time()
    cfg.validate()
    if cfg.loop.threads > 0:
        torch.set_num_threads(cfg.loop.threads)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    base = load_pipeline(base_dir)
    comp = Components.from_pipeline(base)
    res = model_resolution(
        comp.unet, comp.vae
    )  # UNet-implied (not vae.config.sample_size, 768 in every SD 2.x snapshot)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        m.requires_grad_(False)
        m.eval()
    df = pair_table(dataset_dir, cfg.split, cfg.condition)
    cond = condition_column(dataset_dir, df, cfg.condition, res)  # read from disk per batch
    comp.vae.to(_device())
    latents = stage_latents(comp.vae, dataset_dir, df, res, cfg.loop)  # the frozen VAE's targets, cached
    torch.manual_seed(cfg.loop.seed)
    controlnet = build_controlnet(comp.unet, comp.vae, cfg.conditioning_channels)
    model = ControlNetObjective(controlnet, comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler,
                                cfg.cond_dropout)  # fmt: skip
    val: dict[str, Any] = {"cond": torch.zeros(0, 3, res, res), "real": []}
    if cfg.val_images > 0:
        vdf = pair_table(dataset_dir, cfg.eval_split, cfg.condition).head(cfg.val_images)
        val = {"cond": load_conditions(dataset_dir, vdf, cfg.condition, res),
               "real": load_pil_images(dataset_dir, vdf, res)}  # fmt: skip
    n_tok = len(comp.tokenizer(cfg.text()).input_ids)
    if n_tok > comp.tokenizer.model_max_length:
        log.warning("controlnet prompt has %d tokens; the text encoder keeps the first %d", n_tok,
                    comp.tokenizer.model_max_length)  # fmt: skip
    data = {"latents": latents, "cond": cond, "prompt": [cfg.text()] * len(df)}
    result = train(model, data, cfg.loop, work / "controlnet", validate=_triplet_validation(comp, cfg, val))
    metrics = {k: v for k, v in result.logs.items() if k != "lr"}
    metrics["steps"] = float(result.step)
    metrics["train_seconds"] = time.time() - t0
    metrics["trainable_params"] = float(sum(p.numel() for p in controlnet.parameters()))
    if int(os.environ.get("RANK", "0")) == 0:
        base_lin = read_lineage(base_dir)
        lineage = {
            "stage": "controlnet", "condition": cfg.condition, "prompt": cfg.text(), "base": str(base_dir),
            "base_stage": base_lin.get("stage"), "parent": str(base_dir), "dataset": _dataset_version(dataset_dir),
            "config": to_dict(cfg), "metrics": metrics, "resolution": res,
            "conditioning_channels": list(controlnet.config.conditioning_embedding_out_channels),
        }  # fmt: skip
        controlnet.eval()
        save_controlnet(controlnet.to("cpu"), out_dir, lineage)
    log.info("controlnet (%s) on %s: %s", cfg.condition, base_dir, metrics)
    return metrics


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(cfg: ControlNetConfig, dataset_dir, base_dir, out_dir, work_dir=None) -> dict[str, float]:
    """Stage entry point (``craft train controlnet``): see ``train_controlnet``."""
    return train_controlnet(cfg, dataset_dir, base_dir, out_dir, work_dir)


def step(dataset_dir, base_dir, out_dir, condition: str, profile: str, overrides: list[str]) -> dict[str, float]:
    """Pipeline step (KFP ``controlnet_op``): the profile's ``controlnet`` section + overrides, for ``condition``."""
    from craft.config import load_stage_config

    cfg = load_stage_config("controlnet", profile, list(overrides) + [f"controlnet.condition={condition}"])
    return train_controlnet(cfg, dataset_dir, base_dir, out_dir)


def pipeline_plan(profile: str, overrides: list[str] = ()) -> dict[str, Any]:
    """What the pipeline wires for this profile: ``{"enabled": bool, "conditions": [...]}`` (read at compile time)."""
    from craft.config import load_stage_config

    cfg = load_stage_config("controlnet", profile, list(overrides))
    return {"enabled": bool(cfg.enabled), "conditions": list(cfg.conditions)}
