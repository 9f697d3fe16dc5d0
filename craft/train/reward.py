"""CRAFT stage 2: clinical reward finetuning of a LoRA on the UNet with DRaFT-K (CRAFT secs. 3.2-3.3, app. A, I).

One step of ``DraftObjective`` (what the shared loop in ``craft.train.loop`` calls):

1. encode each distinct enriched prompt of the batch once (frozen text encoder, no grad); the
   unconditional embedding for classifier-free guidance is computed once and cached;
2. draw n stochastic trajectories per prompt, batched together as one UNet batch of n*B (x2 with
   guidance): T - K sampler steps without gradient (DDPM by default, as in the paper, app. I);
3. the last K sampler steps keep the graph (each UNet call optionally checkpointed), then the VAE
   decoder (optionally checkpointed block by block) -> images in [0, 1] -> the reward CALLABLE (the frozen critic
   in a real run: ``craft.models.encoders.ClinicalAlignmentModule`` + ``craft.losses.clinical_reward``); the
   decode and reward optionally in pieces of images, each backpropagated to its latents first
   (``RewardConfig.decode_chunk``);
4. rewards averaged over the n repeats of each prompt (eq. 6), then over the batch;
5. plus the standard diffusion loss on the paired real latent conditioned on its enriched prompt
   (eq. 1): loss = diffusion_weight * L_diff - reward_scale * mean R.

Only LoRA matrices on the UNet attention (to_q, to_k, to_v, to_out.0) are trainable; VAE, text
encoder, UNet base weights, critic and probe are frozen. The LoRA is fresh on the base model, or
(``start_dir``, the pipeline's default ``craft_start: ti_lora``) the TI+LoRA baseline's, continued
with its class tokens in front of the enriched prompts. The result is a diffusers LoRA file
(``pytorch_lora_weights.safetensors``) plus ``adapter.json`` and ``lineage.json``; ``load_adapters``
puts it (and textual-inversion embeddings written by ``craft.train.baselines``) into a base pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from craft.config import to_dict
from craft.io import atomic_dir, atomic_write_json
from craft.models.adapters import (  # noqa: F401  (re-exported: the adapter file layout is shared with loading)
    ADAPTER_JSON,
    EMBEDS_FILE,
    LORA_FILE,
    add_tokens,
    class_token_prompt,
    load_adapters,
    merged_lora,
)
from craft.models.lean_graph import lean_saves
from craft.train.loop import LoopConfig, list_checkpoints, train
from craft.train.monitor import MonitorConfig

log = logging.getLogger(__name__)

# A reward callable: (images [N, 3, H, W] in [0, 1], metadata of the N samples) -> {"total": [N], name: [N], ...}
RewardFn = Callable[[torch.Tensor, dict[str, Any]], dict[str, torch.Tensor]]


@dataclass
class LoraSettings:
    """peft LoRA on the UNet attention projections (CRAFT sec. 3.2: only low-rank matrices are trained)."""

    rank: int = 4  # r of the low-rank update
    alpha: float = 4.0  # lora_alpha; the update is scaled by alpha / rank
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # module names
    cross_attention_only: bool = False  # True: only attn2 (cross-attention) layers, as the TI+LoRA baseline

    def validate(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"lora rank must be >= 1 and alpha > 0 (got {self.rank}, {self.alpha})")
        if not self.targets:
            raise ValueError("lora targets must name at least one module")


def _reward_loop() -> LoopConfig:
    # no gradient checkpointing by default: it recomputed the graph step and the VAE decode and made the tiny demo
    # step 2.4x slower (BENCHMARKS.md, "Where the time goes"); RewardConfig.memory_budget_gb turns it on when a step
    # would not fit (by default on CUDA: 80% of the free device memory)
    return LoopConfig(steps=200, batch_size=4, lr=1e-4, max_grad_norm=1.0, checkpoint_every=50, log_every=1)


@dataclass
class RewardAugment:
    """Differentiable views of each decoded image before the critic (issue 21: a reward that must hold across views
    is harder to game than one read off a single rendering). Off by default: the paper's critic reads the image."""

    views: int = 0  # 0 = the critic reads each image as decoded; V > 0 = every reward component averaged over V views
    crop_scale: float = 0.85  # random resized crop: each side keeps a fraction in [crop_scale, 1], resampled back
    flip: bool = True  # random horizontal flip per view
    noise_std: float = 0.02  # Gaussian pixel noise per view, on the [0, 1] scale
    seed: int = 0  # the views' own random stream (independent of the trajectories')

    def validate(self) -> None:
        if self.views < 0:
            raise ValueError(f"augment.views must be >= 0, got {self.views}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"augment.crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.noise_std < 0:
            raise ValueError(f"augment.noise_std must be >= 0, got {self.noise_std}")


def augmented_view(images: torch.Tensor, cfg: RewardAugment, gen: torch.Generator) -> torch.Tensor:
    """One random view of each image (N, C, H, W) in [0, 1]: resized crop (+ flip) by ``grid_sample``, then noise.

    Differentiable in ``images``; the crop box, flip and noise are drawn from ``gen`` (on the CPU).
    """
    n = images.shape[0]
    scale = cfg.crop_scale + (1.0 - cfg.crop_scale) * torch.rand(n, 2, generator=gen)  # kept fraction (x, y)
    shift = (1.0 - scale) * (2.0 * torch.rand(n, 2, generator=gen) - 1.0)  # box centre stays inside the image
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale[:, 0] * sign, scale[:, 1]
    theta[:, :, 2] = shift
    theta = theta.to(images.device, images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.noise_std > 0:
        out = out + cfg.noise_std * torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    return out.clamp(0.0, 1.0)


@dataclass
class RewardConfig:
    """Stage ``reward`` (``craft train reward``): LoRA + DRaFT-K against the frozen critic (CRAFT sec. 3.3)."""

    loop: LoopConfig = field(default_factory=_reward_loop)  # batch_size = prompts per step (paper: 4)
    lora: LoraSettings = field(default_factory=LoraSettings)  # adapter on the UNet attention
    k: int = 1  # DRaFT-K: sampler steps that keep the graph (app. I: K=1 was best)
    n_repeats: int = 2  # stochastic trajectories per prompt, rewards averaged (eq. 6; paper: 2)
    sample_steps: int = 20  # sampler steps T during training (app. I: the peak lies below 50; our copy lost it)
    scheduler: Literal["ddpm", "ddim"] = "ddpm"  # training sampler (app. I: a coarse DDPM SDE suffices)
    # where the T training steps sit on the 1000-step schedule. "leading" (diffusers' default) ends at t=1,
    # so the one step DRaFT-1 differentiates barely changes the image (measured on demo-histo, T=10: reward
    # gradient 0.0004 vs 0.0016 for L_diff, so eq. 1 was mostly diffusion loss); "trailing" ends at
    # t = 1000/T - 1 (Lin et al. 2024), the last step is one T-th of the trajectory (reward gradient 0.022)
    timestep_spacing: Literal["leading", "trailing"] = "trailing"
    eta: float = 1.0  # DDIM stochasticity (only for scheduler=ddim; 1.0 = as random as DDPM)
    guidance: float = 4.0  # classifier-free guidance scale in the sampled trajectories (<= 1: off)
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"vdc": 1.0, "ccs": 1.0, "dd": 0.2, "sfs": 1.0}
    )  # w_k of R = sum w_k R_k (eqs. 1, 6; craft.losses.DEFAULT_REWARD_WEIGHTS)
    reward_scale: float = 1.0  # lambda of eq. 1 (weight of the reward against the diffusion loss)
    diffusion_weight: float = 1.0  # weight of L_diff on the paired real latent (eq. 1; 0 = reward only)
    split: str = "train"  # manifest split of the (real image, enriched prompt) pairs
    missing_prompt: Literal["skip", "error"] = "skip"  # rows without an ok enriched prompt: drop or refuse
    checklist_mode: Literal["mean_items", "joined"] = "mean_items"  # how the critic embeds a checklist
    use_sfs: bool = True  # SFS needs the paired real image (eq. 5); False = prompt-only reward
    # how the VAE decode inside the DRaFT graph is checkpointed: "blocks" = each decoder block separately (backward
    # holds one block's activations), "whole" = the decode as one unit (its recomputation rebuilds them all at
    # once; kept for bench/bench_sd21.py), "off" = in the graph; "auto" = blocks when loop.gradient_checkpointing
    vae_checkpointing: Literal["auto", "blocks", "whole", "off"] = "auto"
    device: str = "auto"  # auto: cuda when available
    # ---- speed that keeps the math (issue 18; measured in BENCHMARKS.md "Where the time goes")
    # GiB the graph part of a step (last K UNet calls, decode, reward) may hold; 0 = no budget. Over it, the decode
    # runs in pieces (decode_chunk) or gradient checkpointing is switched on (measured once on the first step with a
    # one-trajectory probe). -1 (auto) = on CUDA 80% of the device memory free when the first step starts (what the
    # driver has free plus what PyTorch's allocator holds unused), so a step that would not fit fits by itself and
    # one that fits is not slowed; on a CPU no budget. loop.gradient_checkpointing = true checkpoints always
    memory_budget_gb: float = -1.0
    text_cache: int = 4096  # distinct prompts whose frozen text-encoder states are kept across steps (0 = re-encode)
    prefix_inference_mode: bool = True  # the T-K steps without graph under torch.inference_mode (else no_grad)
    # the LoRA folded into its base weights for the no-graph prefix only: W + s*B*A, one matmul per adapted projection
    # instead of three plus an add (the same linear map up to rounding); the base weights are swapped back untouched
    merge_prefix_lora: bool = True
    fuse_diffusion_loss: bool = True  # eq. 1's L_diff UNet call batched into the last graph step's UNet call
    channels_last: Literal["auto", "on", "off"] = "auto"  # UNet/VAE memory format; auto = on CUDA only
    # torch.compile (inductor) of the UNet for the no-graph prefix only (the graph step stays eager); compiled once
    # per mode, no recompile when the LoRA weights change. auto = on CUDA only: on 2 CPU cores it is 1.31-1.35x per
    # prefix call but costs 8-60 s to compile per process (bench/bench_compile.py), more than a demo-length run saves
    compile_prefix: Literal["auto", "on", "off"] = "auto"
    # the prefix's UNet call run as a TorchScript trace (torch.jit.trace, ~1-2 s once per input shape): the same ATen
    # kernels in the same order without Python's per-op dispatch, which dominates at small sizes on a CPU (1.38x per
    # prefix call at the demo size, bit-identical outputs). The trace shares the UNet's parameters, so LoRA updates
    # and the LoRA fold reach it; forward hooks on the UNet do not see its calls. One trace per architecture and shape
    # serves every run in a process, rebound to each run's weights (SharedTrace: TorchScript never frees a trace's
    # types and graph, ~23 MB each at the demo size). auto = on when the prefix is not compiled and no autocast is active
    trace_prefix: Literal["auto", "on", "off"] = "auto"
    # autograd keeps only what backward reads in the graph steps and the decode (craft.models.lean_graph): frozen
    # convolutions save no input (the input's gradient needs only the weight). The same gradients (bit for bit at
    # K=1), no extra work; at the demo size the graph holds 92 MB instead of 130 MB. Parts that are checkpointed
    # keep autograd's own saving (their recomputation runs outside this switch)
    lean_saves: bool = True
    # images decoded and scored per piece inside the graph. Each piece's decode and reward run forward and backward to
    # its latents before the next piece is decoded, so autograd holds one piece's decoder activations beside the graph's
    # UNet call instead of all n*B images'; the UNet call then takes the latents' summed gradient in the loop's
    # backward. The same LoRA gradient (eq. 6's reward is a mean of per-image rewards) and no recomputation. Only with a
    # reward callable marked ``rowwise`` (row i reads image i alone: ``critic_reward`` without augmented views);
    # otherwise the batch is decoded at once. 0 = all at once; N = N images a piece; -1 (auto) = on CUDA pieces of at
    # least 512x512 pixels (one image at 512 px); on a CPU all at once (pieces cost 0-4% of a step there in page
    # faults, glibc returning the smaller peak to the OS and taking it again every step; BENCHMARKS.md), unless a
    # ``memory_budget_gb`` is over: then the largest piece that fits, before checkpointing is considered
    decode_chunk: int = -1
    # ---- harder-to-game rewards (issue 21): the critic reads augmented views of each image and the reward is their mean
    augment: RewardAugment = field(default_factory=RewardAugment)
    # extra critics (encoder roles critic-1..critic-E: the critic's architecture, other seeds) whose CAMs score every
    # image beside the critic; each reward component is the mean over the E + 1 critics (issue 21: a LoRA must please
    # independently trained critics at once, not one critic's quirks). 0 = the paper's single critic
    ensemble: int = 0
    # the saved LoRA is start + update_scale * (trained - start) (issue 21: the LoRA scale as a regulariser; the start
    # is the TI+LoRA adapter CRAFT continues, or the fresh LoRA's zero update). 1 = the trained weights (the paper);
    # 0.5 keeps half of what reward finetuning moved, pulling the generator back toward its start
    update_scale: float = 1.0
    # ---- over-optimisation monitor (issue 21): held-out readings by the critic, its views and a referee; snapshots;
    # checkpoint selection and early stopping on those training-side signals only (craft.train.monitor)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def validate(self) -> None:
        if self.k < 1 or self.k > self.sample_steps:
            raise ValueError(f"k must be in [1, sample_steps={self.sample_steps}], got {self.k}")
        if self.n_repeats < 1:
            raise ValueError(f"n_repeats must be >= 1, got {self.n_repeats}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.reward_scale < 0 or self.diffusion_weight < 0:
            raise ValueError("reward_scale and diffusion_weight must be >= 0")
        bad = sorted(set(self.reward_weights) - {"vdc", "ccs", "dd", "sfs"})
        if bad:
            raise ValueError(f"reward_weights: unknown reward {bad[0]!r} (vdc, ccs, dd, sfs)")
        if self.memory_budget_gb < 0 and self.memory_budget_gb != -1:
            raise ValueError(f"memory_budget_gb must be -1 (auto), 0 (no budget) or GiB, got {self.memory_budget_gb}")
        if self.text_cache < 0:
            raise ValueError(f"text_cache must be >= 0, got {self.text_cache}")
        for name in ("channels_last", "compile_prefix", "trace_prefix"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off, got {getattr(self, name)!r}")
        if not 0.0 < self.update_scale <= 1.0:
            raise ValueError(f"update_scale must be in (0, 1] (1 = the trained weights), got {self.update_scale}")
        if self.ensemble < 0:
            raise ValueError(f"ensemble must be >= 0 (extra critics), got {self.ensemble}")
        self.augment.validate()
        self.monitor.validate()
        if self.decode_chunk < -1:
            raise ValueError(f"decode_chunk must be -1 (auto), 0 (the whole batch) or images a piece, got "
                             f"{self.decode_chunk}")  # fmt: skip
        if self.vae_checkpointing not in ("auto", "blocks", "whole", "off"):
            raise ValueError(f"vae_checkpointing must be auto, blocks, whole or off, got {self.vae_checkpointing!r}")
        self.lora.validate()


# ---------------------------------------------------------------- LoRA and adapters


def add_lora(unet, lora: LoraSettings, seed: int | None = None) -> list[str]:
    """Freeze ``unet`` and add a peft LoRA adapter on its attention projections; returns the LoRA parameter names.

    ``seed``: draw the A matrices' init from this seed (the stages pass ``loop.seed``), so a run's start is a
    function of its seed and not of whatever used the global RNG before it in the process (``craft experiment``
    runs many stages in one process); the global RNG is left as it was. None = draw from the global RNG.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    if lora.cross_attention_only:
        alt = "|".join(t.replace(".", r"\.") for t in lora.targets)
        targets: Any = rf".*attn2\.({alt})$"  # peft: a string is a full-match regex over module names
    else:
        targets = list(lora.targets)
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=True, target_modules=targets)
    dev = next(unet.parameters()).device
    cuda = [dev.index or 0] if dev.type == "cuda" else []  # manual_seed seeds CUDA too: restore that RNG as well
    with torch.random.fork_rng(devices=cuda) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        unet.add_adapter(cfg)  # B = 0 at init: the adapted model starts as the base model
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not names or any("lora" not in n for n in names):
        raise RuntimeError(f"LoRA setup made non-LoRA parameters trainable or none at all: {names[:3]}")
    return names


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in diffusers' file layout (keys without the ``unet.`` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    names = list(getattr(unet, "peft_config", {}))
    if len(names) != 1:
        raise ValueError(f"expected exactly one LoRA adapter on the UNet, found {names}")
    # "default" when added here, "default_0" when loaded with load_lora_weights (DPO continues that one)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=names[0]))


def save_adapters(
    out_dir: str | os.PathLike, unet=None, lora: LoraSettings | None = None,
    embeddings: dict[str, torch.Tensor] | None = None, info: dict[str, Any] | None = None,
    extra: dict[str, Path] | None = None,
) -> Path:  # fmt: skip
    """Write LoRA and/or textual-inversion weights (safetensors) + adapter.json + lineage.json atomically.

    ``extra``: folders copied in under the given names in the same commit (the reward monitor's readings)."""
    import shutil

    from safetensors.torch import save_file

    from craft.models.diffusion import LINEAGE, code_version

    if unet is None and not embeddings:
        raise ValueError("save_adapters: nothing to save (no LoRA UNet and no embeddings)")
    meta = dict(info or {})
    meta.setdefault("code_version", code_version())
    with atomic_dir(out_dir) as tmp:
        tmp = Path(tmp)
        if unet is not None:
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=lora_state_dict(unet), weight_name=LORA_FILE, safe_serialization=True
            )
            meta["lora"] = to_dict(lora) if lora is not None else meta.get("lora")
        if embeddings:
            save_file(
                {k: v.detach().float().cpu().contiguous() for k, v in embeddings.items()}, str(tmp / EMBEDS_FILE)
            )
            meta["tokens"] = sorted(embeddings)
        for name, src in (extra or {}).items():
            shutil.copytree(src, tmp / name)
        atomic_write_json(tmp / ADAPTER_JSON, meta)
        atomic_write_json(tmp / LINEAGE, meta)
    return Path(out_dir)


def continue_adapters(pipe, start_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor] | None, dict[str, str],
                                                               LoraSettings]:  # fmt: skip
    """Load a saved adapter (TI tokens and/or LoRA) into ``pipe`` so that training continues its LoRA.

    Everything in ``pipe`` but the loaded LoRA matrices is frozen (text encoder and TI rows included).
    Returns (the TI embeddings to save again with the result, class -> token, the adapter's LoRA settings).
    """
    from safetensors.torch import load_file

    from craft.models.adapters import read_adapter_meta

    d = Path(start_dir)
    load_adapters(pipe, d)
    info = read_adapter_meta(d)
    embeds = load_file(str(d / EMBEDS_FILE)) if (d / EMBEDS_FILE).is_file() else None
    lora = LoraSettings(**info["lora"]) if info.get("lora") else None
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False)
    for n, p in pipe.unet.named_parameters():
        p.requires_grad_("lora" in n)
    if lora is None or not any(p.requires_grad for p in pipe.unet.parameters()):
        raise ValueError(f"{d}: the adapter has no LoRA to continue")
    return embeds, dict(info.get("class_tokens") or {}), lora


def token_prompts(prompts, labels: list[str], tokens: dict[str, str]) -> list[str]:
    """ "<class token>, <prompt>" for labels with a textual-inversion token, the prompt alone otherwise.

    The generator's conditioning only (as evaluation samples a TI variant); the critic reads the plain prompt.
    """
    return [class_token_prompt(str(p), lab, {"class_tokens": tokens}) for lab, p in zip(labels, prompts)]


# ---------------------------------------------------------------- sampling pieces


def make_scheduler(base_scheduler, kind: str, steps: int, spacing: str | None = None):
    """A DDPM or DDIM sampler over the base model's noise schedule, never clipping latents (ENVIRONMENT.md).

    ``spacing`` sets diffusers' ``timestep_spacing`` (None keeps the base model's, usually "leading").
    ``from_config`` carries the base's ``prediction_type`` over, so a v-prediction model samples as one.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}.get(kind)
    if cls is None:
        raise ValueError(f"scheduler must be ddpm or ddim, got {kind!r}")
    extra = {"timestep_spacing": spacing} if spacing else {}
    s = cls.from_config(base_scheduler.config, clip_sample=False, **extra)
    s.set_timesteps(steps)
    return s


class Denoiser:
    """UNet output with classifier-free guidance on a doubled batch (uncond first).

    The output is whatever the model predicts (noise, or v for SD 2.1 768 px); guidance is linear in it
    either way, and the sampler's ``step`` reads it per the ``prediction_type`` its config carries.
    """

    def __init__(self, unet, guidance: float):
        self.unet, self.guidance = unet, guidance

    def __call__(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        if self.guidance > 1.0:
            states = torch.cat([uncond.expand(z.shape[0], -1, -1), cond])
            out = self.unet(torch.cat([z, z]).to(dtype), t, encoder_hidden_states=states.to(dtype)).sample.float()
            eu, ec = out.chunk(2)
            return eu + self.guidance * (ec - eu)
        return self.unet(z.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()


def _sched_step(sched, model_out, t, z, generator, eta: float):
    from diffusers import DDIMScheduler

    kw = {"eta": eta} if isinstance(sched, DDIMScheduler) else {}
    return sched.step(model_out, t, z, generator=generator, **kw).prev_sample


@torch.no_grad()
def sample_latents(unet, sched, cond, uncond, generator, guidance: float, eta: float = 1.0) -> torch.Tensor:
    """Full no-grad trajectory from Gaussian noise to a clean latent (for preference pairs and checks)."""
    den = Denoiser(unet, guidance)
    c = unet.config
    z = torch.randn((cond.shape[0], c.in_channels, c.sample_size, c.sample_size), generator=generator)
    z = z.to(cond.device) * sched.init_noise_sigma
    for t in sched.timesteps:
        z = _sched_step(sched, den(sched.scale_model_input(z, t), t, cond, uncond), t, z, generator, eta)
    return z


def decode(vae, z: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
    """Latents -> images in [0, 1] (differentiable).

    ``checkpoint_blocks``: run the decoder as separately checkpointed segments (conv_in + mid-block, each
    up-block, the output head), so backward recomputes one segment at a time and keeps only the segment
    boundaries alive; the whole decode in the graph (or checkpointed as one unit, whose recomputation
    rebuilds every activation at once) holds all of them. Same values and gradients (``tests/test_draft.py``).
    """
    z = (z / vae.config.scaling_factor).to(vae.dtype)
    if checkpoint_blocks and torch.is_grad_enabled():
        x = _decode_by_blocks(vae, z).float()
    else:
        x = vae.decode(z).sample.float()
    return (x / 2 + 0.5).clamp(0, 1)


def _decode_by_blocks(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKL.decode(z).sample`` (diffusers 0.42 ``_decode`` + ``Decoder.forward``), one checkpoint per block.

    diffusers' own ``vae.enable_gradient_checkpointing()`` checkpoints the mid- and up-blocks too but leaves
    the output head (GroupNorm, SiLU, conv at full resolution and 128 channels for SD) in the graph.
    """
    from diffusers.models.autoencoders.vae import Decoder
    from torch.utils.checkpoint import checkpoint

    dec = vae.decoder
    if type(dec) is not Decoder or dec.conv_norm_out.__class__ is not torch.nn.GroupNorm:
        raise TypeError(f"block checkpointing supports diffusers' AutoencoderKL Decoder, got {type(dec).__name__}")
    if vae.use_tiling or vae.use_slicing:
        raise ValueError("block-checkpointed decode does not tile or slice; disable vae tiling/slicing")

    def head(a):  # conv_in and the mid-block (attention at the lowest resolution)
        if vae.post_quant_conv is not None:
            a = vae.post_quant_conv(a)
        return dec.mid_block(dec.conv_in(a), None)

    def tail(a):
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(a)))

    x = checkpoint(head, z, use_reentrant=False)
    for block in dec.up_blocks:
        x = checkpoint(block, x, None, use_reentrant=False)
    return checkpoint(tail, x, use_reentrant=False)


class _FlatUNetCall(torch.nn.Module):
    """``unet(x, t, encoder_hidden_states=states).sample`` as a module with tensor arguments and output, every UNet
    tensor as its own attribute and no submodules: what ``trace_unet_call`` traces.

    Its slots ``t0 .. tN`` hold the UNet's own parameter and buffer tensors (``_unet_tensors`` order; the same tensor
    objects, so in-place updates and ``merged_lora``'s swaps reach the trace), and the UNet is called through a plain
    reference, so the trace records one flat graph reading those slots. A trace of a module holding the UNet builds a
    TorchScript module type and graph per submodule (the demo UNet has ~900), which TorchScript keeps for the life of
    the process: 68 MB of RSS against 26-28 MB for the flat trace at the demo size, the same speed
    (BENCHMARKS.md, 2026-12-07).
    """

    def __init__(self, unet):
        super().__init__()
        object.__setattr__(self, "unet", unet)  # not a submodule: its modules must not become TorchScript types
        for i, (_, v) in enumerate(_unet_tensors(unet)):
            self._buffers[f"t{i}"] = v  # the tensor itself (a Parameter too), not a copy; never saved

    def forward(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=states, return_dict=False)[0]


def _trace_matches(unet, traced, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> str | None:
    """Why ``traced`` does not compute ``unet``'s eager call on these inputs (None when it does), both under one seed."""

    def call(x, t, states):
        return unet(x, t, encoder_hidden_states=states, return_dict=False)[0]

    outs = []
    for net in (call, partial(run_trace, traced)):  # the same random numbers for both (dropout draws from them)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(0)
            outs.append(net(x, t, states))
    want, got = outs
    if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        return None
    return f"max |diff| {float((got - want).abs().max()):.3g}"


def run_trace(traced, *args: torch.Tensor) -> torch.Tensor:
    """Call a trace from ``trace_unet_call`` with TorchScript's optimising passes off (a thread-local switch).

    On this graph (ATen convolutions, GEMMs and SDPA, no fusible chains the CPU fuser takes) the optimised plan runs
    no faster than the plain interpreted one (1 thread 0.0837 vs 0.0854 s a call, 2 threads 0.0551 vs 0.0555 s,
    outputs equal), but the profiling executor keeps its profiled and optimised copies of the graph for the life of
    the process: 47 MB of RSS a trace against 33 MB (BENCHMARKS.md, 2026-12-07 04:15 UTC).
    """
    with torch.jit.optimized_execution(False):
        return traced(*args)


@torch.no_grad()
def trace_unet_call(unet, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor):
    """A TorchScript trace of one no-graph UNet call at these input shapes, checked against the eager call.

    The trace records the Python branches taken at these shapes (and peft's merged / unmerged LoRA state), so it is
    only reused for the same shapes and state (``DraftObjective._prefix_net`` keys it). It holds the UNet's own
    parameter tensors: weights changed in place or swapped by ``merged_lora`` are what it computes with. A trace whose
    output differs from the eager call is refused (set ``reward.trace_prefix=off``), never used.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(_FlatUNetCall(unet), (x, t, states), check_trace=False)
    problem = _trace_matches(unet, traced, x, t, states)
    if problem:
        raise RuntimeError(f"the traced prefix UNet differs from the eager one ({problem}); "
                           "set reward.trace_prefix=off")  # fmt: skip
    return traced


def _unet_tensors(unet) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer slot of ``unet`` by name, shared tensors once per slot (what a trace's slots hold)."""
    return [*unet.named_parameters(remove_duplicate=False), *unet.named_buffers(remove_duplicate=False)]


def unet_signature(unet) -> str:
    """What a trace of ``unet`` bakes in besides its tensors' values: module tree and hyperparameters (extra_repr),
    peft's scalings and adapter state, attention processors, config, and every parameter / buffer's shape and dtype."""
    import hashlib

    parts = [type(unet).__qualname__, json.dumps(dict(getattr(unet, "config", {})), sort_keys=True, default=str)]
    for name, m in unet.named_modules():
        extra = [getattr(m, k, None) for k in ("scaling", "active_adapters", "disable_adapters", "merged_adapters")]
        parts.append(f"{name}|{type(m).__qualname__}|{m.extra_repr()}|{extra!r}|{m.training}")
    procs = getattr(unet, "attn_processors", {})
    parts += [f"{k}={type(v).__qualname__}" for k, v in sorted(procs.items())]
    parts += [f"{n}:{tuple(v.shape)}:{v.dtype}:{v.device}" for n, v in _unet_tensors(unet)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class SharedTrace:
    """A traced UNet call shared by every UNet of one architecture in this process, rebound to the one that calls it.

    TorchScript keeps the types and graph a trace creates for the life of the process, whether the trace is deleted or
    not (pytorch/pytorch#35600; about 23 MB per flat trace of the demo UNet, 45 MB when it was traced as a module
    tree). A new trace per reward run would so grow a process that runs many (``craft experiment`` runs dozens)
    without bound. One trace per signature, input shapes and thread is made instead (one thread's rebinding must not
    land under another's call), and ``bind`` points its parameter and buffer slots at the calling UNet's tensors
    (milliseconds); the first call with each UNet is checked against that UNet's eager call, as a new trace is. When
    the bound UNet is garbage-collected its slots are emptied, so the trace does not keep its weights alive.
    """

    def __init__(self, traced, unet):
        import weakref

        self.traced = traced
        self.slots = len(_unet_tensors(unet))
        self.bound = weakref.ref(unet)
        self.checked = weakref.WeakSet([unet])
        weakref.finalize(unet, SharedTrace._release, weakref.ref(self))

    def _set(self, tensors) -> None:
        for i, tensor in enumerate(tensors):  # _FlatUNetCall's slots, in _unet_tensors order
            self.traced._c.setattr(f"t{i}", tensor)

    @staticmethod
    def _release(ref) -> None:
        self = ref()
        if self is not None and self.bound() is None:  # the UNet it was bound to is gone: drop its tensors
            self._set([torch.empty(0)] * self.slots)

    def bind(self, unet, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> str | None:
        """Point the trace at ``unet``; why it does not compute ``unet``'s call (None when it does, or was checked)."""
        import weakref

        if self.bound() is not unet:
            self._set([v for _, v in _unet_tensors(unet)])
            self.bound = weakref.ref(unet)
            if unet not in self.checked:  # once per UNet
                weakref.finalize(unet, SharedTrace._release, weakref.ref(self))
        if unet in self.checked:
            return None
        with torch.no_grad():
            problem = _trace_matches(unet, self.traced, x, t, states)
        if problem is None:
            self.checked.add(unet)
        return problem


_SHARED_TRACES: dict[tuple, SharedTrace] = {}  # (unet_signature, DraftObjective's trace key incl. thread)


class TrainableOnly(torch.nn.Module):
    """Adapter for ``craft.train.loop``: its checkpoints hold only the trainable (adapter) weights.

    The loop saves ``model.state_dict()`` and loads it back; the frozen base (UNet, VAE, text encoder)
    would otherwise be copied into every checkpoint (1.3 GB for SD 2.1).
    """

    def state_dict(self, *args, **kwargs):  # noqa: D102
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):  # noqa: D102
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        with torch.no_grad():
            for n in set(params) & set(state):
                params[n].copy_(state[n])
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


@torch.no_grad()
def encode_unique(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Token states [B, L, D] of ``prompts``, running each distinct prompt through the text encoder once."""
    from craft.models.diffusion import encode_text

    uniq = list(dict.fromkeys(prompts))
    states, _ = encode_text(tokenizer, text_encoder, uniq)
    pos = {p: i for i, p in enumerate(uniq)}
    return states[torch.tensor([pos[p] for p in prompts], device=states.device)]


def denoising_loss(unet, train_sched, z0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator, ckpt=None):
    """The standard diffusion loss E ||target - f_theta(z_t, t, c)||^2 at a uniform random t (CRAFTS eq. 5).

    The target follows the base model's parameterisation (``craft.models.diffusion.training_target``): the
    noise for an epsilon model, v for a v-prediction one (SD 2.1 768 px; Salimans & Ho 2022, app. D).
    """
    from craft.models.diffusion import add_noise, alpha_bar, prediction_type, training_target

    b, dev = z0.shape[0], z0.device
    noise = torch.randn(z0.shape, generator=generator).to(dev, torch.float32)
    t = torch.randint(0, train_sched.config.num_train_timesteps, (b,), generator=generator).to(dev)
    abar = alpha_bar(train_sched, t, z0.ndim)
    zt = add_noise(z0.float(), noise, abar)  # CRAFTS eq. 3
    target = training_target(prediction_type(train_sched), z0.float(), noise, abar)
    dtype = next(unet.parameters()).dtype

    def f(a):
        return unet(a.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample.float()

    pred = ckpt(f, zt) if ckpt is not None else f(zt)
    return F.mse_loss(pred, target)


# ---------------------------------------------------------------- the DRaFT-K objective


class DraftObjective(TrainableOnly):
    """One DRaFT-K step (CRAFT eqs. 1 and 6) as a loop model: ``forward(batch, generator) -> {"loss", ...}``.

    ``batch`` holds ``prompt`` (list of enriched prompts: the text the critic scores against, as the
    evaluator does), optionally ``gen_prompt`` (what the generator is conditioned on when it differs:
    "<class token>, <enriched prompt>" for a TI+LoRA start; default ``prompt``), optionally ``latents``
    (paired real latents for L_diff), and any metadata the reward callable reads (``label``, ``reference``
    images in [0, 1]).
    ``reward_fn(images, meta)`` gets the n*B decoded images (repeat r of prompt i at row r*B + i) and
    the metadata repeated accordingly plus ``repeat`` (the repeat index per row); it returns per-sample
    tensors with ``"total"`` the reward to maximise. A callable whose row i reads image i alone may say so with
    an attribute ``rowwise = True``; it may then be called on pieces of the batch (``RewardConfig.decode_chunk``).

    Speed (``RewardConfig`` fields; each keeps the math, ``tests/test_fast_path.py`` checks the LoRA gradient):
    frozen text states cached across steps, the no-graph prefix under ``inference_mode`` with the LoRA folded into
    its base weights (``merged_lora``) and its UNet call run as a TorchScript trace (``trace_unet_call``; compiled
    instead where ``compile_prefix`` says), the guidance states
    concatenated once per step instead of once per sampler step, eq. 1's UNet call batched into the last graph
    step's UNet call (per-row timesteps; the UNet treats rows independently), checkpointing only when asked or
    when the graph would exceed ``memory_budget_gb`` (by default on CUDA 80% of the device memory free at the first
    step; none on a CPU), after decoding in pieces (``decode_chunk``, which needs no recomputation: on CUDA at 512 px
    and more it is the default). The noise and t of L_diff are drawn right after the
    initial latents, in every mode, so fused and separate L_diff see the same random numbers.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, reward_fn: RewardFn, cfg: RewardConfig):
        super().__init__()
        from craft.models.accel import use_sdpa
        from craft.models.diffusion import prediction_type

        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.cfg = tokenizer, cfg
        self.__dict__["reward_fn"] = reward_fn  # not a submodule: the critic stays out of state_dict / optimizer
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        use_sdpa(unet, vae, text_encoder)  # flash / memory-efficient attention kernels on CUDA
        self.sched = make_scheduler(scheduler, cfg.scheduler, cfg.sample_steps, cfg.timestep_spacing)
        self.train_sched = scheduler  # the training noise schedule for L_diff
        self.kind = prediction_type(scheduler)  # refuse a parameterisation L_diff cannot target before the first step
        self.checkpointing = False
        self._budget_checked = False  # the first step resolves the budget on the device it runs on
        self.memory_budget_gb: float | None = None  # the budget the probe used (auto resolved)
        self.graph_gb_estimate: float | None = None  # what the budget probe measured (GiB for a full step)
        self.graph_gb_parts: tuple[float, float] | None = None  # of it: the UNet calls', the decode's and reward's
        self.decode_pieces: int | None = None  # images a piece the budget chose for the decode (decode_chunk=-1)
        self._uncond: torch.Tensor | None = None
        self._text: dict[str, torch.Tensor] = {}
        dev = next(unet.parameters()).device
        if cfg.channels_last == "on" or (cfg.channels_last == "auto" and dev.type == "cuda"):
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
        compiled = cfg.compile_prefix == "on" or (cfg.compile_prefix == "auto" and dev.type == "cuda")
        # not a submodule (the compiled wrapper shares the UNet's parameters; state_dict and the optimizer see them once)
        self.__dict__["prefix_unet"] = torch.compile(unet, dynamic=False) if compiled else unet
        self.trace_prefix = cfg.trace_prefix == "on" or (cfg.trace_prefix == "auto" and not compiled)
        self.__dict__["_traces"] = {}  # (shapes, dtype, mode, fold) -> SharedTrace; not submodules

    def enable_gradient_checkpointing(self) -> None:
        self.checkpointing = True
        self._budget_checked = True  # asked for explicitly: no probe needed

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Token states [B, L, D]: each distinct prompt through the frozen text encoder once (cached across steps
        up to ``cfg.text_cache`` prompts; the encoder is frozen and in eval mode, so a cached state is the state)."""
        if self.cfg.text_cache <= 0:
            return encode_unique(self.tokenizer, self.text_encoder, prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            states = encode_unique(self.tokenizer, self.text_encoder, new)
            if len(self._text) + len(new) > self.cfg.text_cache:
                self._text.clear()  # a bounded cache: start over rather than grow past the limit
            self._text.update(zip(new, states))
            if len(new) > self.cfg.text_cache:  # more distinct prompts in one batch than the cache holds
                return states[torch.tensor([new.index(p) for p in prompts], device=states.device)]
        return torch.stack([self._text[p] for p in prompts])

    @torch.no_grad()
    def sample_images(self, prompts: list[str], seed: int, per_prompt: int = 1, batch: int = 32) -> torch.Tensor:
        """Full no-graph trajectories with the training sampler and guidance -> images [N * per_prompt, 3, H, W] in
        [0, 1] (sample j of prompt i at i * per_prompt + j); the noise comes from ``seed`` alone (the monitor's
        readings start every reading from the same noise)."""
        dev = next(self.unet.parameters()).device
        g = torch.Generator().manual_seed(seed)
        rows = [p for p in prompts for _ in range(per_prompt)]
        out = []
        with merged_lora(self.unet) if self.cfg.merge_prefix_lora else nullcontext():
            for i in range(0, len(rows), batch):
                cond = self.encode_prompts(rows[i : i + batch]).to(dev)
                z = sample_latents(self.unet, self.sched, cond, self.uncond(dev), g, self.cfg.guidance, self.cfg.eta)
                out.append(decode(self.vae, z).float())
        return torch.cat(out)

    def uncond(self, device) -> torch.Tensor:
        if self._uncond is None or self._uncond.device != torch.device(device):
            self._uncond = encode_unique(self.tokenizer, self.text_encoder, [""]).to(device)
        return self._uncond

    def _maybe_ckpt(self, fn, *args):
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The graph's VAE decode, checkpointed as ``cfg.vae_checkpointing`` says."""
        mode = self._decode_mode()
        if mode == "whole" and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(decode, self.vae, z, use_reentrant=False)
        return decode(self.vae, z, checkpoint_blocks=mode == "blocks")

    def _unet(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, model=None) -> torch.Tensor:
        dtype = next(self.unet.parameters()).dtype
        net = self.unet if model is None else model
        if isinstance(net, torch.jit.ScriptModule):  # a traced call (trace_unet_call): tensors in, the sample out
            return run_trace(net, x.to(dtype), t, states.to(dtype)).float()
        return net(x.to(dtype), t, encoder_hidden_states=states.to(dtype)).sample.float()

    def _prefix_net(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor):
        """The module the no-graph prefix calls: the compiled UNet, the UNet, or its trace for these input shapes."""
        if not self.trace_prefix or self.prefix_unet is not self.unet or torch.is_autocast_enabled(x.device.type):
            return self.prefix_unet
        dtype = next(self.unet.parameters()).dtype
        # per thread: a shared trace is rebound to the UNet calling it, so two threads must not share one
        key = (tuple(x.shape), tuple(t.shape), tuple(states.shape), dtype, x.device, self.unet.training,
               self.cfg.merge_prefix_lora, threading.get_ident())  # fmt: skip
        x, states = x.to(dtype), states.to(dtype)
        shared = self._traces.get(key)
        if shared is None:  # first call at these shapes: the process's trace for this architecture, or a new one
            skey = (unet_signature(self.unet), *key)
            shared = _SHARED_TRACES.get(skey)
            if shared is not None and shared.bind(self.unet, x, t, states) is not None:
                shared = None  # the signature missed something the trace baked in: trace this UNet afresh
            if shared is None:
                shared = _SHARED_TRACES[skey] = SharedTrace(trace_unet_call(self.unet, x, t, states), self.unet)
            self._traces[key] = shared
        elif shared.bind(self.unet, x, t, states) is not None:  # checked at first bind: cannot differ now
            raise RuntimeError("a shared prefix trace stopped matching its UNet; set reward.trace_prefix=off")
        return shared.traced

    def _guided(self, out: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance on the doubled batch (uncond rows first), as ``Denoiser``."""
        if self.cfg.guidance > 1.0:
            eu, ec = out.chunk(2)
            return eu + self.cfg.guidance * (ec - eu)
        return out

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        from torch.profiler import record_function

        from craft.models.diffusion import add_noise, alpha_bar, training_target

        cfg = self.cfg
        prompts = list(batch.get("gen_prompt", batch["prompt"]))  # the generator's conditioning
        b, n = len(prompts), cfg.n_repeats
        dev = next(self.unet.parameters()).device
        guided = cfg.guidance > 1.0
        with record_function("draft/text"):
            cond_b = self.encode_prompts(prompts).to(dev)
            cond = cond_b.repeat(n, 1, 1)  # row r*B + i = repeat r of prompt i: n repeats in one UNet batch
            # the guidance batch's text states, built once per step (uncond rows first, as Denoiser)
            states = torch.cat([self.uncond(dev).expand(n * b, -1, -1), cond]) if guided else cond
        c = self.unet.config
        z = torch.randn((n * b, c.in_channels, c.sample_size, c.sample_size), generator=generator).to(dev)
        z = z * self.sched.init_noise_sigma
        diff = None  # eq. 1's L_diff inputs: (z_t, t, target), drawn here so every mode uses the same numbers
        if cfg.diffusion_weight > 0 and "latents" in batch:
            z0 = batch["latents"].float()
            noise = torch.randn(z0.shape, generator=generator).to(dev, torch.float32)
            t_d = torch.randint(0, self.train_sched.config.num_train_timesteps, (b,), generator=generator).to(dev)
            abar = alpha_bar(self.train_sched, t_d, z0.ndim)
            diff = (add_noise(z0, noise, abar), t_d, training_target(self.kind, z0, noise, abar))  # CRAFTS eq. 3
        if not self._budget_checked:
            if has_graph_budget(cfg.memory_budget_gb, torch.device(dev)):
                self._check_budget(batch, prompts, generator.initial_seed(), dev)
            self._budget_checked = True  # no budget (0, or auto off CUDA): no probe
        ts = self.sched.timesteps
        split = len(ts) - cfg.k
        prefix = torch.inference_mode if cfg.prefix_inference_mode else torch.no_grad
        fold = merged_lora(self.unet) if cfg.merge_prefix_lora else nullcontext()
        with record_function("draft/prefix"), fold, prefix():  # DRaFT-K: steps T .. K+1 without graph
            for t in ts[:split]:
                zin = self.sched.scale_model_input(z, t)
                x = torch.cat([zin, zin]) if guided else zin
                out = self._unet(x, t, states, self._prefix_net(x, t, states))
                z = _sched_step(self.sched, self._guided(out), t, z, generator, cfg.eta)
        z = z.clone() if cfg.prefix_inference_mode else z.detach()  # clone: a normal tensor autograd may save
        fuse = diff is not None and cfg.fuse_diffusion_loss
        pred_d = None
        with self._lean():  # what autograd records: keep only what backward reads
            with record_function("draft/graph_steps"):
                for i, t in enumerate(ts[split:]):  # the last K steps keep the graph into the LoRA weights
                    zin = self.sched.scale_model_input(z, t)
                    x = torch.cat([zin, zin]) if guided else zin
                    tt, st = t, states
                    if fuse and i == cfg.k - 1:  # the L_diff rows ride along in the last graph step's UNet batch
                        tt = torch.cat([t.to(dev).expand(x.shape[0]), diff[1]])
                        x, st = torch.cat([x, diff[0]]), torch.cat([states, cond_b])
                    out = self._maybe_ckpt(lambda a, tt=tt, st=st: self._unet(a, tt, st), x)
                    if fuse and i == cfg.k - 1:
                        out, pred_d = out[:-b], out[-b:]
                    z = _sched_step(self.sched, self._guided(out), t, z, generator, cfg.eta)
            meta = {k: _repeat(v, n) for k, v in batch.items() if k not in ("latents", "gen_prompt")}
            meta["repeat"] = torch.arange(n, device=dev).repeat_interleave(b)
            chunk = self._piece_rows(z) if z.requires_grad else 0
            pieces = 0 < chunk < n * b
            if pieces:
                rewards, grad_z = self._reward_by_pieces(z, meta, chunk)
            else:
                with record_function("draft/decode"):
                    images = self.decode(z)
                with record_function("draft/reward"):
                    rewards = self.reward_fn(images, meta)
                _check_total(rewards, n * b)
            per_prompt = rewards["total"].float().view(n, b).mean(0)  # eq. 6: average over the n repeats
            reward = per_prompt.mean()
            if pieces:  # the reward's value, and its gradient into the graph's UNet call through z
                through = (z * grad_z).sum()
                reward = reward.detach() + (through - through.detach())
            out = {f"reward_{k}": v.detach().float() for k, v in rewards.items() if k != "total"}
            out["reward"] = reward.detach()
            loss = -cfg.reward_scale * reward
            if diff is not None:
                with record_function("draft/l_diff"):
                    if pred_d is None:  # separate UNet call (fuse_diffusion_loss=False)
                        pred_d = self._maybe_ckpt(lambda a: self._unet(a, diff[1], cond_b), diff[0])
                    l_diff = F.mse_loss(pred_d, diff[2])  # the standard diffusion loss (eq. 1; CRAFTS eq. 5)
                loss = loss + cfg.diffusion_weight * l_diff
                out["l_diff"] = l_diff.detach()
            out["loss"] = loss
            return out

    @property
    def _rowwise_reward(self) -> bool:
        """The reward callable says its row i reads image i alone (``rowwise``): it may be called on pieces."""
        return bool(getattr(self.reward_fn, "rowwise", False))

    def _piece_rows(self, z: torch.Tensor) -> int:
        """Images a piece for the graph's decode and reward (``cfg.decode_chunk`` resolved; 0 = all at once)."""
        if not self._rowwise_reward:
            return 0  # a reward that may compare rows must see the whole batch
        if self.cfg.decode_chunk >= 0:
            return self.cfg.decode_chunk
        if self.decode_pieces is not None:  # chosen by the memory budget's probe
            return self.decode_pieces
        if z.device.type != "cuda":
            return 0
        from craft.models.diffusion import vae_factor

        side = z.shape[-1] * vae_factor(self.vae)  # the decoded image's side
        return max(1, -(-(512 * 512) // (side * side)))  # pieces of at least 512 x 512 pixels

    def _reward_by_pieces(self, z: torch.Tensor, meta: dict[str, Any], chunk: int):
        """Decode and score the graph's latents ``chunk`` images at a time (``cfg.decode_chunk``): each piece runs
        forward and backward from its latents (a leaf cut off the UNet's graph) to the mean reward, and its
        decoder activations are freed before the next piece. Returns the per-image rewards (detached) and
        d(mean reward)/dz, which the caller feeds into the UNet call's graph. The decoder and critic are frozen,
        so backward here reaches no parameter (nothing for DDP to reduce)."""
        from torch.profiler import record_function

        rows = z.shape[0]
        pieces, grads = [], []
        for s in range(0, rows, chunk):
            e = min(s + chunk, rows)
            zc = z[s:e].detach().requires_grad_()
            sub = {k: v[s:e] if isinstance(v, torch.Tensor | list) else v for k, v in meta.items()}
            with record_function("draft/decode"):
                images = self.decode(zc)
            with record_function("draft/reward"):
                r = self.reward_fn(images, sub)
            _check_total(r, e - s)
            total = r["total"].float().sum() / rows  # eq. 6's mean over all n*B rows
            g = torch.autograd.grad(total, zc, allow_unused=True)[0] if total.requires_grad else None
            grads.append(torch.zeros_like(zc) if g is None else g)  # a reward with no gradient moves nothing
            pieces.append({k: v.detach() for k, v in r.items()})
            del images, r
        rewards = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
        return rewards, torch.cat(grads)

    def _decode_mode(self) -> str:
        """``cfg.vae_checkpointing`` resolved: ``auto`` checkpoints the decode by blocks when the step checkpoints."""
        mode = self.cfg.vae_checkpointing
        return ("blocks" if self.checkpointing else "off") if mode == "auto" else mode

    def _lean(self):
        """``lean_saves`` over the graph's UNet and VAE, each unless gradient-checkpointed (``cfg.lean_saves``)."""
        if not self.cfg.lean_saves:
            return nullcontext()
        vae = [self.vae] if self._decode_mode() == "off" else []
        return lean_saves(*([] if self.checkpointing else [self.unet]), *vae)

    def _check_budget(self, batch: dict[str, Any], prompts: list[str], seed: int, dev) -> None:
        """Fit the graph of a step into ``cfg.memory_budget_gb``: decode in pieces, or checkpoint, or neither.

        Measured, not guessed: one trajectory of the first prompt runs the graph part (the last K UNet calls,
        the decode, the reward) while a saved-tensor hook adds up the bytes autograd keeps for backward, the UNet
        calls' and the decode's and reward's apart; those times the step's n*B trajectories (plus the L_diff rows
        for the UNet) is the estimate. Over the budget, with ``decode_chunk`` at auto and a rowwise reward, the
        decode runs in the largest pieces that fit (no recomputation); when even one image a piece does not fit,
        gradient checkpointing is switched on. The probe's graph is dropped without a backward, and it uses its
        own generator (the training noise stays untouched).
        """
        from torch.autograd.graph import saved_tensors_hooks

        cfg, total = self.cfg, {"bytes": 0}
        # weights saved for backward exist once, whatever the batch: only activations scale with the rows
        seen = {p.untyped_storage().data_ptr() for m in (self.unet, self.vae) for p in m.parameters()}

        def pack(x: torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key not in seen and not isinstance(x, torch.nn.Parameter):  # a tensor saved twice is held once
                seen.add(key)
                total["bytes"] += x.untyped_storage().nbytes()
            return x

        guided = cfg.guidance > 1.0
        gen = torch.Generator().manual_seed(seed + 1)
        c = self.unet.config
        cond = self.encode_prompts(prompts[:1]).to(dev)
        states = torch.cat([self.uncond(dev), cond]) if guided else cond
        z = torch.randn((1, c.in_channels, c.sample_size, c.sample_size), generator=gen).to(dev)
        sub = {k: (v[:1] if isinstance(v, torch.Tensor | list) else v) for k, v in batch.items()}
        lean = lean_saves(self.unet, self.vae) if cfg.lean_saves else nullcontext()  # as an unchecked step runs
        with saved_tensors_hooks(pack, lambda x: x), lean:
            for t in self.sched.timesteps[-cfg.k :]:
                zin = self.sched.scale_model_input(z, t)
                out = self._unet(torch.cat([zin, zin]) if guided else zin, t, states)
                z = _sched_step(self.sched, self._guided(out), t, z, gen, cfg.eta)
            unet_bytes = total["bytes"]
            images = decode(self.vae, z)
            meta = {k: v for k, v in sub.items() if k not in ("latents", "gen_prompt")}
            meta["repeat"] = torch.zeros(1, dtype=torch.long, device=dev)
            self.reward_fn(images, meta)["total"].sum()
        decode_bytes = total["bytes"] - unet_bytes
        b = len(prompts)  # L_diff adds b UNet rows: b / 2 trajectories' worth of UNet rows with guidance
        images_n = cfg.n_repeats * b
        rows = images_n + (b / (2 if guided else 1) if cfg.diffusion_weight > 0 and "latents" in batch else 0)
        self.memory_budget_gb = graph_budget_gb(cfg.memory_budget_gb, torch.device(dev))
        budget = self.memory_budget_gb * 2**30
        self.graph_gb_parts = (unet_bytes * rows / 2**30, decode_bytes * images_n / 2**30)
        self.graph_gb_estimate = sum(self.graph_gb_parts)
        rowwise = self._rowwise_reward
        decoded = min(cfg.decode_chunk, images_n) if cfg.decode_chunk > 0 and rowwise else images_n  # a fixed piece
        self.checkpointing = unet_bytes * rows + decode_bytes * decoded > budget
        if self.checkpointing and cfg.decode_chunk == -1 and rowwise:
            fits = int((budget - unet_bytes * rows) // max(decode_bytes, 1))  # images a piece within the budget
            if fits >= 1:
                self.decode_pieces, self.checkpointing = min(fits, images_n), False
        self._budget_checked = True
        log.info(
            "DRaFT graph estimate %.3f GiB (UNet calls %.3f, decode and reward %.3f) against a budget of %.3f GiB: "
            "decode %s, gradient checkpointing %s",
            self.graph_gb_estimate,
            *self.graph_gb_parts,
            self.memory_budget_gb,
            f"{self.decode_pieces} images a piece" if self.decode_pieces else "at once",
            "on" if self.checkpointing else "off",
        )

    def diffusion_loss(self, z0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L_diff of eq. 1 on the paired real latent, conditioned on its enriched prompt (target: ``denoising_loss``)."""
        ckpt = self._maybe_ckpt if self.checkpointing else None
        return denoising_loss(self.unet, self.train_sched, z0, cond, generator, ckpt)


AUTO_BUDGET_SHARE = 0.8  # memory_budget_gb=-1 on CUDA: this share of the memory free at the first step


def has_graph_budget(setting: float, device: torch.device) -> bool:
    """Whether ``RewardConfig.memory_budget_gb`` sets a budget on ``device`` (auto sets one on CUDA only)."""
    return setting > 0 or (setting < 0 and device.type == "cuda")


def graph_budget_gb(setting: float, device: torch.device) -> float:
    """``RewardConfig.memory_budget_gb`` resolved for ``device``: a positive setting as given, 0 = no budget (0.0);
    -1 (auto) = on CUDA ``AUTO_BUDGET_SHARE`` of what the device has free now (the driver's free memory plus what
    PyTorch's caching allocator holds unused), elsewhere no budget."""
    if not has_graph_budget(setting, device):
        return 0.0
    if setting > 0:
        return float(setting)
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return AUTO_BUDGET_SHARE * (free + unused) / 2**30


def _check_total(rewards: dict[str, torch.Tensor], rows: int) -> None:
    if "total" not in rewards or rewards["total"].shape != (rows,):
        raise ValueError(f"reward callable must return 'total' of shape [{rows}], got "
                         f"{ {k: tuple(v.shape) for k, v in rewards.items()} }")  # fmt: skip


def _repeat(v: Any, n: int) -> Any:
    if isinstance(v, torch.Tensor):
        return v.repeat(n, *([1] * (v.ndim - 1)))
    return list(v) * n


# ---------------------------------------------------------------- the stage


def critic_reward(cams, weights: dict[str, float], augment: RewardAugment | None = None) -> RewardFn:
    """The CRAFT reward callable: CAM components (VDC, CCS, DD, SFS; eqs. 2-5) and their weighted sum (eq. 6).

    ``cams``: one ClinicalAlignmentModule (the paper's critic) or a list of them (the critic and its ensemble
    members, ``reward.ensemble``): every component is then the mean over the critics before eq. 6 weighs them.
    With ``augment.views`` = V > 0 every component is also the mean over V random views of the image
    (``augmented_view``; each critic reads the same views), so a LoRA is rewarded only for what the critic sees
    across crops, flips and noise (issue 21).
    """
    from craft.losses import clinical_reward

    cams = list(cams) if isinstance(cams, (list, tuple)) else [cams]
    gen = torch.Generator().manual_seed(augment.seed) if augment is not None and augment.views > 0 else None

    def read(images: torch.Tensor, meta: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        out = []
        for cam in cams:
            comps = cam(images, meta["label"], meta["prompt"], references=meta.get("reference"))
            out.append({k: v for k, v in comps.items() if k in weights})
        return out

    def fn(images: torch.Tensor, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        views = [images] if gen is None else [augmented_view(images, augment, gen) for _ in range(augment.views)]
        reads = [r for v in views for r in read(v, meta)]
        comps = reads[0] if len(reads) == 1 else {k: torch.stack([r[k] for r in reads]).mean(0) for k in reads[0]}
        comps["total"] = clinical_reward(comps, weights)
        return comps

    # row i reads image i alone (each CAM embeds images one by one; SFS pairs image i with reference i), so the
    # graph may decode and score the batch in pieces (RewardConfig.decode_chunk). Augmented views draw their crops
    # for the rows of a call together: in pieces they would draw other crops, so that reward sees the whole batch
    fn.rowwise = gen is None
    return fn


def paired_table(dataset_dir, annotations_dir, split: str, missing: str = "skip"):
    """(meta, rows of ``split`` joined with their ok enriched prompts, number dropped)."""
    from craft.annotate.run import with_enriched_prompts

    meta, merged, ann_path = with_enriched_prompts(dataset_dir, annotations_dir, split)
    lacking = merged["enriched_prompt"].isna()
    if lacking.any() and missing == "error":
        raise ValueError(f"{ann_path}: no ok enriched prompt for image_id={merged.loc[lacking, 'image_id'].iloc[0]!r}")
    merged = merged[~lacking].reset_index(drop=True)
    if len(merged) == 0:
        raise ValueError(f"{ann_path}: no {split} image has an ok enriched prompt")
    return meta, merged, int(lacking.sum())


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def main(cfg: RewardConfig, dataset_dir, annotations_dir, critic_dir, probe_dir, base, out_dir, start_dir=None,
         work_dir=None, referee_dir=None, referee_probe_dir=None, ensemble=None) -> dict[str, float]:  # fmt: skip
    """Train the CRAFT LoRA on ``base`` against the critic and write the adapter to ``out_dir``; returns metrics.

    ``start_dir``: an adapter (the TI+LoRA baseline) whose LoRA the reward finetuning continues instead
    of a fresh one; its class tokens stay in the generator's prompts ("<token>, <enriched prompt>") and in
    the output, while the critic scores against the plain enriched prompt (as the evaluator does).
    ``referee_dir`` / ``referee_probe_dir``: the monitor's referee (``cfg.monitor``; never the evaluator).
    ``ensemble``: ``cfg.ensemble`` (encoder dir, probe dir) pairs, the extra critics the reward averages over.
    """
    from craft.data.loader import image_column
    from craft.models.diffusion import load_pipeline, model_resolution, read_lineage
    from craft.models.encoders import ClinicalAlignmentModule, load_encoder, load_probe
    from craft.train.crafts import stage_latents

    cfg.validate()
    t0 = time.time()
    if cfg.loop.threads > 0:
        torch.set_num_threads(cfg.loop.threads)
    dev = _device(cfg.device)
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir else out_dir.with_name(out_dir.name + ".work")
    meta, df, dropped = paired_table(dataset_dir, annotations_dir, cfg.split, cfg.missing_prompt)
    held = None
    if cfg.monitor.enabled:  # the monitor's held-out rows leave the reward training set
        from craft.train.monitor import holdout_rows

        idx = holdout_rows(df["label"].astype(str).tolist(), cfg.monitor.prompts, cfg.monitor.seed)
        held = df.iloc[idx].reset_index(drop=True)
        df = df.drop(index=df.index[idx]).reset_index(drop=True)
    pipe = load_pipeline(base)
    embeds, tokens, lora = None, {}, cfg.lora
    if start_dir:
        embeds, tokens, lora = continue_adapters(pipe, start_dir)
    else:
        add_lora(pipe.unet, cfg.lora, seed=cfg.loop.seed)
    unet, vae, te = pipe.unet.to(dev), pipe.vae.to(dev), pipe.text_encoder.to(dev)
    res = model_resolution(unet, vae)  # the size DRaFT samples at (UNet-implied), not vae.config.sample_size
    latents = stage_latents(vae, dataset_dir, df, res, cfg.loop)  # eq. 1's real latents, from the latent cache
    critic = load_encoder(critic_dir, device=str(dev)).eval().requires_grad_(False)
    probe = load_probe(probe_dir, critic)
    checklists = json.loads((Path(annotations_dir) / "checklists.json").read_text())
    cam = ClinicalAlignmentModule(critic, probe, checklists, cfg.checklist_mode, dd="loglik")
    members = ensemble_cams(cfg, ensemble, critic, checklists, dev)
    weights = dict(cfg.reward_weights)
    if not cfg.use_sfs:
        weights.pop("sfs", None)
    labels = df["label"].astype(str).tolist()
    enriched = df["enriched_prompt"].astype(str).tolist()
    # The critic's VDC reads the plain enriched prompt, as evaluation scores it; class tokens condition the generator
    data: dict[str, Any] = {"latents": latents, "prompt": enriched, "label": labels}
    if tokens:
        data["gen_prompt"] = token_prompts(enriched, labels, tokens)
    if cfg.use_sfs:
        data["reference"] = image_column(dataset_dir, df, res, "unit")  # paired real image x_i in [0, 1] (eq. 5),
        # read from disk per batch
    model = DraftObjective(
        unet, vae, te, pipe.tokenizer, pipe.scheduler, critic_reward([cam, *members], weights, cfg.augment), cfg
    )
    mon, loop, selected = None, cfg.loop, None
    if held is not None:
        mon = _monitor(cfg, model, held, tokens, dataset_dir, res, cam, weights, checklists, critic, work, dev,
                       referee_dir, referee_probe_dir, lora, embeds)  # fmt: skip
        done = list_checkpoints(work / "draft")
        mon.forget_after(int(done[-1].name.split("-")[1]) if done else 0)  # readings past the resume point repeat
        loop = LoopConfig(**{**vars(cfg.loop), "validate_every": cfg.monitor.every})
        if mon.stopped_at is not None:  # stopped early before: the run is finished at that step
            loop.steps = mon.stopped_at
        if not mon.rows:
            model.eval()
            mon(model, 0)  # the starting point of every curve
    start_state = trainable_state(model) if cfg.update_scale != 1.0 else None  # before train() loads a checkpoint
    result = train(model, data, loop, work / "draft", validate=mon)
    metrics = {k: v for k, v in result.logs.items() if k != "lr"}
    metrics.update(steps=float(result.step), train_seconds=time.time() - t0, dropped_rows=float(dropped))
    if mon is not None:
        selected = mon.restore_selected(model)  # the weights the selection signal picked (None: the last step's)
        if selected is not None and selected["step"] == 0:
            log.warning("reward: monitor.select=%s kept step 0, the start (%s): no held-out reading after it passed "
                        "the selection, so this adapter is the start's weights", cfg.monitor.select,
                        start_dir or "a fresh LoRA")  # fmt: skip
        metrics.update(monitor_readings=float(len(mon.rows)), stopped_early=float(mon.stopped_at is not None),
                       selected_step=float(selected["step"] if selected else result.step))  # fmt: skip
    if start_state is not None:
        metrics["update_norm_kept"] = scale_update(model, start_state, cfg.update_scale)
    lineage = {"stage": "reward", "kind": "lora", "base": str(base), "base_lineage": read_lineage(base),
               "config": to_dict(cfg), "critic": str(critic_dir), "critic_identity": critic.identity,
               "probe": str(probe_dir), "ensemble": [[str(e), str(p)] for e, p in ensemble or []],
               "ensemble_identities": [m.encoder.identity for m in members], "dataset": str(dataset_dir),
               "annotations": str(annotations_dir),
               "start": str(start_dir) if start_dir else None, "class_tokens": tokens, "metrics": metrics}  # fmt: skip
    if mon is not None:
        lineage["monitor"] = {"held_out_image_ids": held["image_id"].astype(str).tolist(), "referee": str(referee_dir)
                              if referee_dir else None, "select": cfg.monitor.select,
                              "selected_step": int(selected["step"]) if selected else result.step}  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        from craft.train.monitor import MONITOR_DIR

        extra = {MONITOR_DIR: mon.dir} if mon is not None else None
        save_adapters(out_dir, unet=unet, lora=lora, embeddings=embeds, info=lineage, extra=extra)
    return metrics


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s trainable tensors (the LoRA, and TI embeddings when they train), by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def scale_update(model, start: dict[str, torch.Tensor], scale: float) -> float:
    """Set every trainable tensor to ``start + scale * (now - start)`` (``reward.update_scale``); returns the norm of
    the update that is kept (``scale`` times the trained update's norm)."""
    params = dict(model.named_parameters())
    missing = sorted(set(start) - set(params))
    if missing:
        raise ValueError(f"update_scale: the start state names {missing[0]!r}, not a parameter of the model")
    sq = 0.0
    for n, s0 in start.items():
        p = params[n]
        p.copy_(s0 + scale * (p - s0))
        sq += float((p - s0).float().pow(2).sum())
    return sq**0.5


def ensemble_cams(cfg: RewardConfig, ensemble, critic, checklists, dev) -> list:
    """The extra critics' CAMs (``reward.ensemble``): exactly ``cfg.ensemble`` (encoder, probe) folders, each an
    encoder other than the critic and other than each other (independently trained members), loaded frozen."""
    from craft.models.encoders import ClinicalAlignmentModule, load_encoder, load_probe

    pairs = [(str(e), str(p)) for e, p in (ensemble or [])]
    if len(pairs) != cfg.ensemble:
        raise ValueError(f"reward.ensemble={cfg.ensemble} needs {cfg.ensemble} extra critic (encoder, probe) folders, "
                         f"got {len(pairs)}: train them with the encoder roles critic-1..critic-{cfg.ensemble} "
                         "(pipeline: reward.ensemble trains them; CLI: --ensemble ENCODER_DIR,PROBE_DIR)")  # fmt: skip
    seen, cams = {critic.identity: "the critic"}, []
    for enc_dir, probe_dir in pairs:
        enc = load_encoder(enc_dir, device=str(dev)).eval().requires_grad_(False)
        if enc.identity in seen:
            raise ValueError(f"ensemble critic {enc_dir} has the same weights as {seen[enc.identity]}: every member "
                             "must be trained independently (another seed)")  # fmt: skip
        seen[enc.identity] = enc_dir
        cams.append(ClinicalAlignmentModule(enc, load_probe(probe_dir, enc), checklists, cfg.checklist_mode,
                                            dd="loglik"))  # fmt: skip
    return cams


def _monitor(cfg: RewardConfig, model, held, tokens, dataset_dir, res, cam, weights, checklists, critic, work, dev,
             referee_dir, referee_probe_dir, lora, embeds):  # fmt: skip
    """The reward stage's ``RewardMonitor``: held-out rows, the critic's and the referee's judges, snapshots."""
    from craft.data.loader import image_column
    from craft.models.encoders import ClinicalAlignmentModule, load_encoder, load_probe
    from craft.train.monitor import Judge, RewardMonitor

    labels = held["label"].astype(str).tolist()
    prompts = held["enriched_prompt"].astype(str).tolist()
    meta: dict[str, Any] = {"prompt": prompts, "label": labels}
    if tokens:
        meta["gen_prompt"] = token_prompts(prompts, labels, tokens)
    if "sfs" in weights:
        col = image_column(dataset_dir, held, res, "unit")
        meta["reference"] = col[list(range(len(held)))].to(dev)
    referee = None
    if referee_dir:
        renc = load_encoder(referee_dir, device=str(dev)).eval().requires_grad_(False)
        if renc.identity == critic.identity:
            raise ValueError(f"referee {referee_dir} has the critic's weights ({critic.source}): the referee must be "
                             "trained independently (the encoder stage's referee role)")  # fmt: skip
        rcam = ClinicalAlignmentModule(renc, load_probe(referee_probe_dir, renc), checklists, cfg.checklist_mode,
                                       dd="loglik")  # fmt: skip
        referee = Judge(rcam, weights)
    elif referee_probe_dir:
        raise ValueError("referee_probe_dir given without referee_dir")

    def snapshot(d: Path) -> None:
        info = {"stage": "reward-monitor", "step": int(d.name.split("-")[1]), "class_tokens": tokens}
        save_adapters(d, unet=model.unet, lora=lora, embeddings=embeds, info=info)  # loadable alone, like the adapter

    return RewardMonitor(cfg.monitor, meta, Judge(cam, weights), referee, cfg.augment, work, snapshot)


def step(dataset_dir, annotations_dir, critic_dir, probe_dir, base, model_dir, profile: str,
         overrides: list[str], start_dir=None, referee_dir=None, referee_probe_dir=None, ensemble=None,
         critic_1_dir=None, critic_1_probe_dir=None, critic_2_dir=None,
         critic_2_probe_dir=None) -> dict[str, float]:  # fmt: skip
    """Pipeline step: config from profile + overrides, then ``main`` (the KFP component calls this).

    The reward ensemble's extra critics come as ``ensemble`` ((encoder dir, probe dir) pairs) or, from the KFP
    component (whose artifacts are top-level arguments), as ``critic_K_dir`` / ``critic_K_probe_dir``; unconnected
    members are dropped, so ``main`` names a missing one against ``reward.ensemble``."""
    from craft.config import load_stage_config

    cfg = load_stage_config("reward", profile, overrides)
    pairs = list(ensemble or [])
    for k, (e, p) in enumerate(((critic_1_dir, critic_1_probe_dir), (critic_2_dir, critic_2_probe_dir)), 1):
        if (e is None) != (p is None):
            raise ValueError(f"ensemble critic {k}: needs both an encoder and its probe (encoder={e!r}, probe={p!r})")
        if e is not None:
            pairs.append((e, p))
    return main(cfg, dataset_dir, annotations_dir, critic_dir, probe_dir, base, model_dir, start_dir,
                referee_dir=referee_dir, referee_probe_dir=referee_probe_dir, ensemble=pairs)  # fmt: skip
