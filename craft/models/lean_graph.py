"""Keep out of the autograd graph what backward does not read: frozen convolutions' inputs, SiLU's GroupNorm output.

When only adapters train (DRaFT's LoRA on the attention projections, through a frozen UNet and a frozen VAE
decoder), most of what autograd saves for backward is never read:

- A convolution saves its input whether or not its weight takes a gradient (PyTorch's derivative formula for
  ``convolution`` covers input, weight and bias at once), but the gradient of its input needs only the weight. A
  linear layer with a frozen weight already saves nothing but the weight; a convolution does not.
  ``_FrozenConv2d`` saves the weight alone and computes the input's gradient with the transposed convolution.
- ``SiLU(GroupNorm(x))``, the head of every diffusers ResNet block and of both output heads: GroupNorm saves ``x``
  (and its statistics), SiLU saves its own input, GroupNorm's output, a second activation of the same size.
  ``_SiLUOfGroupNorm`` saves ``x`` instead (already held by GroupNorm, so no new bytes) and recomputes the
  normalisation in backward, one elementwise pass.

Same forward values and the same gradients (``tests/test_lean_graph.py``, ``tests/test_fast_path.py``): the same
kernels on the same tensors, bit for bit through one graph step; through several, autograd may sum a tensor's
multi-path gradients in another order (~1e-11 relative). No extra matrix work. At the demo size the DRaFT graph step
keeps 130 MB for backward with autograd's defaults and ~64 MB with these (BENCHMARKS.md, 2026-12-07).

``lean_saves(*models)`` switches both on for the modules of ``models`` while inside (instance-level ``forward``
wrappers that take the lean path only when autograd is recording, the input takes a gradient and the layer's own
weights do not; everything else runs the module's own forward). Modules whose ``forward`` is already replaced on the
instance (accelerate's offload hooks, another ``lean_saves``) are left alone. Not for modules inside a
``torch.utils.checkpoint`` region: its recomputation in backward runs outside the context and would save another set
of tensors than the forward did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


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
        # columns a strided convolution dropped (the same call autograd's own ConvolutionBackward makes)
        return (
            torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, stride, padding, dilation, groups),
            *[None] * 6,
        )


class _SiLUOfGroupNorm(torch.autograd.Function):
    """``silu(h)`` for ``h = group_norm(x)``: saves ``x`` (GroupNorm holds it already) instead of ``h``."""

    @staticmethod
    def forward(ctx, h, x, weight, bias, groups, eps):
        ctx.save_for_backward(x, weight, bias)
        ctx.conf = (groups, eps, x.device.type, _autocast_state(x.device.type))
        return F.silu(h)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        groups, eps, device_type, (enabled, dtype) = ctx.conf
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):  # h as the forward made it
            h = F.group_norm(x, groups, weight, bias, eps)
        # the kernel autograd's SiluBackward runs, on the same h: the same bits
        return torch.ops.aten.silu_backward(grad, h), *[None] * 5


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


_GN_INPUT = "_craft_group_norm_input"  # on a GroupNorm output inside lean_saves: (its input, the GroupNorm)


def _group_norm_forward(gn: torch.nn.GroupNorm):
    own = gn.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = own(x)
        if torch.is_grad_enabled() and h.requires_grad and h is not x:
            setattr(h, _GN_INPUT, (x, gn))
        return h

    return forward


def _silu_forward(act: torch.nn.SiLU):
    own = act.forward

    def forward(h: torch.Tensor) -> torch.Tensor:
        src = getattr(h, _GN_INPUT, None)
        if src is not None and torch.is_grad_enabled() and not act.inplace:
            x, gn = src
            return _SiLUOfGroupNorm.apply(h, x, gn.weight, gn.bias, gn.num_groups, gn.eps)
        return own(h)

    return forward


@contextlib.contextmanager
def lean_saves(*models: torch.nn.Module) -> Iterator[int]:
    """Inside: frozen zero-padded ``Conv2d`` layers save no input, ``SiLU`` after ``GroupNorm`` saves no GroupNorm
    output (module doc). Yields how many modules were switched; every one is put back on exit."""
    wrap = {torch.nn.Conv2d: _conv_forward, torch.nn.GroupNorm: _group_norm_forward, torch.nn.SiLU: _silu_forward}
    switched = []
    try:
        for model in models:
            for m in model.modules():
                make = wrap.get(type(m))
                if make is None or "forward" in m.__dict__:
                    continue
                if isinstance(m, torch.nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                    continue  # padded by F.pad first, or padding given by name: autograd's own path
                m.forward = make(m)
                switched.append(m)
        yield len(switched)
    finally:
        for m in switched:
            del m.forward
