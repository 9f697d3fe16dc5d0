"""Precision and kernels, configured in one place for every training stage, DRaFT and sampling.

- ``resolve_precision(mixed_precision, device)``: what a stage's ``loop.mixed_precision`` (``auto | no | bf16 |
  fp16``) means on a device. ``auto`` is bf16 autocast on a CUDA device with bf16 support and fp32 elsewhere (on
  the CPUs here bf16 autocast was slower than fp32 at the tiny sizes: ENVIRONMENT.md, 2026-12-02).
- ``autocast(device, mixed_precision)``: ``torch.autocast`` for that precision, a null context for fp32. Weights
  are never cast: autocast casts per operation, so LoRA and other trainable parameters stay fp32 master weights,
  their gradients arrive in fp32 and AdamW updates them in fp32.
- ``configure_kernels(device)``: on CUDA, TF32 for float32 matrix products (cuBLAS) and convolutions (cuDNN), the
  work that stays fp32 under autocast or in an fp32 run. Set through the ``allow_tf32`` flags, the API that
  accelerate and diffusers also use (torch refuses a mix of those and the newer ``fp32_precision`` settings).
- ``use_sdpa(*models)``: every attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash /
  memory-efficient kernels on CUDA): diffusers models get ``AttnProcessor2_0`` (what diffusers 0.42 picks by
  default when torch has SDPA; made explicit here so a pipeline loaded with the classic ``AttnProcessor``, which
  materialises the attention matrix, is switched), transformers models ``attn_implementation="sdpa"``.
  Custom processors (IP-Adapter, custom diffusion, ...) are refused, never silently replaced.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")  # the values of LoopConfig.mixed_precision
_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(mixed_precision: str, device: str | torch.device) -> str:
    """``no``, ``bf16`` or ``fp16``: the autocast precision ``mixed_precision`` stands for on ``device``.

    >>> resolve_precision("auto", "cpu"), resolve_precision("bf16", "cpu")
    ('no', 'bf16')
    """
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {mixed_precision!r}")
    dev = torch.device(device)
    native_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if mixed_precision == "auto":
        return "bf16" if native_bf16 else "no"
    if mixed_precision == "fp16" and dev.type != "cuda":
        raise ValueError(f"mixed_precision=fp16 needs a CUDA device (got {dev}); use bf16 or no")
    if mixed_precision == "bf16" and dev.type == "cuda" and not native_bf16:
        raise ValueError(f"mixed_precision=bf16: {torch.cuda.get_device_name(dev)} has no native bf16; use fp16 or no")
    return mixed_precision


def autocast_dtype(mixed_precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device`` (None: fp32, no autocast)."""
    return _DTYPES[resolve_precision(mixed_precision, device)]


def autocast(device: str | torch.device, mixed_precision: str = "auto") -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` for ``mixed_precision`` (resolved as ``resolve_precision``); fp32: no-op."""
    dev = torch.device(device)
    dtype = autocast_dtype(mixed_precision, dev)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


def configure_kernels(device: str | torch.device) -> dict[str, bool]:
    """Allow TF32 matmuls and convolutions on CUDA (process-wide); returns the flags as read back.

    On other devices nothing is changed (TF32 is an NVIDIA tensor-core format) and the flags are False.
    """
    if torch.device(device).type != "cuda":
        return {"tf32_matmul": False, "tf32_cudnn": False}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {"tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}  # fmt: skip


def use_sdpa(*models: Any) -> int:
    """Route every attention of ``models`` through torch's SDPA; returns how many layers / models were set.

    ``None`` entries are skipped (a pipeline without a text encoder). Raises on a diffusers model with an
    attention processor other than ``AttnProcessor`` / ``AttnProcessor2_0`` and on an object that is neither a
    diffusers nor a transformers model.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    n = 0
    for m in models:
        if m is None:
            continue
        procs = getattr(m, "attn_processors", None)
        if procs is not None:  # a diffusers ModelMixin (UNet, VAE, ControlNet)
            odd = {k: type(p).__name__ for k, p in procs.items() if type(p) not in (AttnProcessor, AttnProcessor2_0)}
            if odd:
                name, kind = next(iter(odd.items()))
                raise ValueError(f"{type(m).__name__}: attention processor {kind} at {name} is not plain attention; "
                                 f"refusing to replace it with SDPA ({len(odd)} such layers)")  # fmt: skip
            if procs:
                m.set_attn_processor(AttnProcessor2_0())
            n += len(procs)
        elif hasattr(m, "set_attn_implementation"):  # a transformers PreTrainedModel (CLIP text encoder)
            if m.config._attn_implementation != "sdpa":
                m.set_attn_implementation("sdpa")
            n += 1
        else:
            raise TypeError(f"use_sdpa: {type(m).__name__} is neither a diffusers nor a transformers model")
    return n
