"""Keep out of the autograd graph what backward does not read: the inputs of frozen convolutions.

When only adapters train (DRaFT's LoRA on the attention projections, through a frozen UNet and a frozen VAE
decoder; textual inversion, TI+LoRA and Diffusion-DPO through a frozen UNet; a ControlNet's residuals through its
frozen UNet), autograd still saves every convolution's input: PyTorch's derivative formula for ``convolution`` covers
input, weight and bias at once, so the input is kept for a weight gradient nobody asks for. The input's gradient
needs only the weight (a linear layer with a frozen weight already saves nothing else). ``_FrozenConv2d`` saves the
weight alone and computes the input's gradient as the transposed convolution of the output's gradient, the kernel
autograd's own backward runs.

Same forward values and the same gradients (``tests/test_lean_graph.py``, ``tests/test_fast_path.py``): bit for bit
through one DRaFT graph step; through several, autograd may sum a tensor's multi-path gradients in another order
(~1e-11 relative). No extra work: the transposed convolution is as fast as autograd's input gradient (0.9-1.0x its
time at the demo's shapes). At the demo size the DRaFT graph step keeps 92 MB for backward instead of 130 MB, and the
step's peak RSS falls by 30-36 MB (BENCHMARKS.md, 2026-12-07).

``lean_saves(*models)`` switches it on for the frozen zero-padded ``Conv2d`` layers of ``models`` while inside
(instance-level ``forward`` wrappers that take the lean path only when autograd is recording, the input takes a
gradient and the layer's own weights do not; everything else runs the layer's own forward). Layers whose ``forward``
is already replaced on the instance (accelerate's offload hooks, another ``lean_saves``) are left alone, and so is a
model that checkpoints its own blocks (diffusers' ``is_gradient_checkpointing``). Not for modules inside a
``torch.utils.checkpoint`` region either: its recomputation in backward runs outside the context and would save
another set of tensors than the forward did (``DraftObjective`` leaves its checkpointed UNet or decode out).

Tried and left out: SiLU after GroupNorm recomputing GroupNorm's output from GroupNorm's own saved input (another
36 MB of saved tensors at the demo size) moved the step's peak RSS by only 4 MB for 2% of its time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


class _FrozenConv2d(torch.autograd.Function):
    """``conv2d`` whose weight and bias take no gradient: saves only the weight (the input's gradient needs no more)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        # the input's gradient is the transposed convolution of the output's; output_padding restores the rows and
        # columns a strided convolution dropped. (torch.nn.grad.conv2d_input computes the same through an expanded
        # dummy input, which sends this CPU build down a path 15% slower than autograd's.)
        size = [(g - 1) * s - 2 * p + d * (k - 1) + 1 for g, s, p, d, k in
                zip(grad.shape[2:], stride, padding, dilation, weight.shape[2:])]  # fmt: skip
        extra = tuple(want - got for want, got in zip(shape[2:], size))
        gx = F.conv_transpose2d(grad, weight.to(grad.dtype), None, stride, padding, extra, groups, dilation)
        return (gx, *[None] * 6)


def _frozen(module: torch.nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def _conv_forward(conv: torch.nn.Conv2d):
    own = conv.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and _frozen(conv):
            return _FrozenConv2d.apply(
                x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
            )
        return own(x)

    return forward


@contextlib.contextmanager
def lean_saves(*models: torch.nn.Module) -> Iterator[int]:
    """Inside: frozen zero-padded ``Conv2d`` layers of ``models`` save no input (module doc). Yields how many layers
    were switched; every one is put back on exit."""
    switched = []
    try:
        for model in models:
            if getattr(model, "is_gradient_checkpointing", False):
                continue  # its blocks are recomputed in backward, outside this context
            for m in model.modules():
                if type(m) is not torch.nn.Conv2d or "forward" in m.__dict__:
                    continue
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    continue  # padded by F.pad first, or padding given by name: autograd's own path
                m.forward = _conv_forward(m)
                switched.append(m)
        yield len(switched)
    finally:
        for m in switched:
            del m.forward
