"""Precision and kernels in one place (craft.models.accel): precision resolution, autocast, TF32 flags, SDPA."""

from __future__ import annotations

import pytest
import torch

from craft.models.accel import autocast, configure_kernels, resolve_precision, use_sdpa
from craft.models.diffusion import ModelConfig, build_components

torch.set_num_threads(2)


def tiny():
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    return build_components(mc, ["adenoma"], seed=0)


def test_resolve_precision_on_cpu():
    assert resolve_precision("auto", "cpu") == "no"  # fp32 on CPU unless asked
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("no", "cpu") == "no"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        resolve_precision("fp32", "cpu")


def test_autocast_context_follows_precision():
    with autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        a = torch.randn(4, 4)
        assert (a @ a).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_configure_kernels_leaves_cpu_alone():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert configure_kernels("cpu") == {"tf32_matmul": False, "tf32_cudnn": False}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_use_sdpa_switches_classic_attention_and_keeps_outputs():
    from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor, AttnProcessor2_0

    comp = tiny()
    unet, vae, te = comp.unet, comp.vae, comp.text_encoder
    unet.set_attn_processor(AttnProcessor())  # the classic path that materialises the attention matrix
    vae.set_attn_processor(AttnProcessor())
    te.set_attn_implementation("eager")
    z, t, states = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 32, 16)
    with torch.no_grad():
        ref = unet(z, t, states).sample
    n = use_sdpa(unet, vae, te, None)
    assert n == len(unet.attn_processors) + len(vae.attn_processors) + 1
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in vae.attn_processors.values()} == {AttnProcessor2_0}
    assert te.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.allclose(unet(z, t, states).sample, ref, atol=1e-5)
    # a custom processor is refused, not silently replaced
    name = next(iter(unet.attn_processors))
    unet.set_attn_processor({k: (AttnAddedKVProcessor() if k == name else p) for k, p in unet.attn_processors.items()})
    with pytest.raises(ValueError, match="AttnAddedKVProcessor"):
        use_sdpa(unet)
    with pytest.raises(TypeError, match="neither a diffusers nor a transformers model"):
        use_sdpa(torch.nn.Linear(2, 2))


def test_generate_samples_under_the_requested_autocast():
    from craft.sample import generate

    comp = tiny()
    pipe = comp.pipeline()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    generate(pipe, ["adenoma"], steps=1, guidance=2.0, seed=0)
    assert seen == [False]  # auto on CPU: fp32
    seen.clear()
    imgs = generate(pipe, ["adenoma"], steps=1, guidance=2.0, seed=0, precision="bf16")
    assert seen == [True] and imgs[0].size == (32, 32)


def test_doctests_pass():
    import doctest

    import craft.models.accel as A

    res = doctest.testmod(A)
    assert res.attempted > 0 and res.failed == 0
