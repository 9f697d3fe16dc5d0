"""The GPU path on CUDA (``pytest -m gpu tests/test_gpu.py``; skipped without CUDA, never in CI).

bench/gpu_check.sh runs this file on a lent GPU machine. What it checks: TF32 allowed, bf16 autocast, SDPA
attention and the block-checkpointed VAE decode in the DRaFT step on the tiny models, on a snapshot laid out as
stabilityai/stable-diffusion-2-1 (v-prediction) and on Stable Diffusion 2.1's real architecture (random weights);
finite gradients, LoRA parameters change and frozen ones do not; the block-checkpointed decode's peak memory
below the whole decode in the graph; sampling under bf16 autocast; frozen convolutions that save no input
(``craft.models.lean_graph``) under bf16 autocast and channels_last; the DRaFT decode in pieces at 512 px.
"""

from __future__ import annotations

import pytest
import torch

from craft.models.accel import configure_kernels, resolve_precision
from craft.models.diffusion import ModelConfig, build_components
from craft.train.loop import LoopConfig, train
from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora, decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["normal colon mucosa", "adenocarcinoma with crowded glands"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed precision per process; each test starts from a clean state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.cuda.empty_cache()


def toy_reward_recording(seen: list):
    """Mean brightness (differentiable), recording the autocast state the reward runs under."""

    def fn(images, meta):
        seen.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), images.device.type))
        return {"total": images.mean(dim=(1, 2, 3))}

    return fn


def _snapshot(*mods):
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(mods) for n, p in m.named_parameters()}


def _check_changed(before, mods):
    after = {f"{i}.{n}": p.detach() for i, m in enumerate(mods) for n, p in m.named_parameters()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing changed"
    assert all("lora" in k for k in changed), [k for k in changed if "lora" not in k][:3]
    assert any("lora_B" in k for k in changed)
    assert all(p.dtype == torch.float32 for k, p in after.items() if "lora" in k)  # fp32 master weights


def _all_sdpa(*models):
    from diffusers.models.attention_processor import AttnProcessor2_0

    return all(type(p) is AttnProcessor2_0 for m in models for p in m.attn_processors.values())


def test_precision_and_tf32_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    assert configure_kernels("cuda") == {"tf32_matmul": True, "tf32_cudnn": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"  # what the legacy flag means for matmuls
    assert resolve_precision("auto", "cuda") == "bf16"  # Hopper / Ampere have native bf16


def _draft_train_step(comp, c: RewardConfig, tmp_path, latents: bool):
    """One loop step (mixed_precision auto -> bf16 on CUDA, gradient checkpointing -> block decode) on CUDA."""
    seen: list = []
    for part in (comp.unet, comp.vae, comp.text_encoder):
        part.to("cuda")
    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler,
                           toy_reward_recording(seen), c)  # fmt: skip
    assert _all_sdpa(comp.unet, comp.vae) and comp.text_encoder.config._attn_implementation == "sdpa"
    torch.backends.cuda.matmul.allow_tf32 = False
    before = _snapshot(comp.unet, comp.vae, comp.text_encoder)
    side = comp.unet.config.sample_size
    data = {"prompt": PROMPTS, "label": ["normal", "adenocarcinoma"]}
    if latents:
        data["latents"] = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(1))
    loop = LoopConfig(steps=1, batch_size=2, lr=1e-2, progress=False, mixed_precision="auto",
                      gradient_checkpointing=True)  # fmt: skip
    calls = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, b in enumerate(comp.vae.decoder.up_blocks)]  # fmt: skip
    try:
        res = train(model, data, loop, tmp_path / "run")
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(True, torch.bfloat16, "cuda")], seen
    # the checkpointed decode: each up-block ran in the forward and once more in the backward
    assert sorted(calls) == sorted(list(range(len(comp.vae.decoder.up_blocks))) * 2), calls
    assert torch.backends.cuda.matmul.allow_tf32, "the loop did not allow TF32"
    assert torch.isfinite(torch.tensor(res.logs["loss"])) and torch.isfinite(torch.tensor(res.logs["grad_norm"]))
    assert res.logs["grad_norm"] > 0
    _check_changed(before, (comp.unet, comp.vae, comp.text_encoder))
    return res


def test_draft_step_bf16_sdpa_block_decode_tiny(tmp_path):
    mc = ModelConfig(preset="tiny", resolution=64)
    comp = build_components(mc, ["adenocarcinoma"], seed=0)
    add_lora(comp.unet, LoraSettings())
    c = RewardConfig(k=1, n_repeats=2, sample_steps=4, guidance=2.0, diffusion_weight=1.0)
    c.validate()
    res = _draft_train_step(comp, c, tmp_path, latents=True)
    assert "l_diff" in res.logs


def test_draft_step_on_sd21_layout_snapshot_v_prediction(tmp_path):
    from craft.models.diffusion import Components, load_pipeline, prediction_type
    from tests.sd21_layout import build_sd21_dir

    pipe = load_pipeline(build_sd21_dir(tmp_path / "sd21", "v_prediction"))
    assert prediction_type(pipe.scheduler) == "v_prediction"
    comp = Components.from_pipeline(pipe)
    add_lora(comp.unet, LoraSettings())
    c = RewardConfig(k=1, n_repeats=2, sample_steps=4, guidance=2.0, diffusion_weight=1.0)
    c.validate()
    _draft_train_step(comp, c, tmp_path, latents=True)


def test_draft_step_on_sd21_architecture():
    """SD 2.1's real sizes (UNet 865M, linear projections, 5/10/20/20 heads, 1024-d cross-attention), 256 px."""
    from craft.models.accel import autocast

    comp = build_components(ModelConfig(preset="sd21", resolution=256), ["adenocarcinoma"], seed=0)
    assert list(comp.unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert comp.unet.config.cross_attention_dim == 1024 and comp.unet.config.use_linear_projection
    add_lora(comp.unet, LoraSettings(rank=4))
    dev = torch.device("cuda")
    for part in (comp.unet, comp.vae, comp.text_encoder):
        part.to(dev)
    c = RewardConfig(k=1, n_repeats=2, sample_steps=2, guidance=4.0, diffusion_weight=0.0)
    c.validate()
    seen: list = []
    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler,
                           toy_reward_recording(seen), c)  # fmt: skip
    model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = _snapshot(comp.unet, comp.vae, comp.text_encoder)
    with autocast(dev, "auto"):
        res = model({"prompt": PROMPTS[:1], "label": ["x"]}, torch.Generator().manual_seed(0))
    res["loss"].backward()
    assert seen == [(True, torch.bfloat16, "cuda")]
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    for m in (comp.unet, comp.vae, comp.text_encoder):
        assert all(p.grad is None for n, p in m.named_parameters() if "lora" not in n)
    opt.step()
    _check_changed(before, (comp.unet, comp.vae, comp.text_encoder))
    # SDPA runs these attention shapes (64-d heads, 77 text tokens) on the flash kernel under bf16: forcing that
    # backend alone must work (the VAE's one 512-d head is beyond flash and uses the other SDPA kernels)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    side = comp.unet.config.sample_size
    with torch.no_grad(), autocast(dev, "bf16"), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        states = torch.randn(2, 77, 1024, device=dev)
        out = comp.unet(torch.randn(2, 4, side, side, device=dev), torch.tensor([500, 20], device=dev), states).sample
    assert torch.isfinite(out).all()


def _decode_peak(vae, z, weight, mode: str) -> tuple[int, torch.Tensor]:
    """Peak bytes allocated above the starting point during decode + backward, and the input gradient."""
    from torch.utils.checkpoint import checkpoint

    z = z.detach().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if mode == "whole":
        x = checkpoint(decode, vae, z, use_reentrant=False)
    else:
        x = decode(vae, z, checkpoint_blocks=mode == "blocks")
    (x * weight).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grad = z.grad.detach().clone()
    del x, z
    return peak, grad


def test_block_checkpointed_decode_peak_memory_below_whole_decode():
    """SD 2.1's VAE (128/256/512/512, 2 layers per block) at 512 px, batch 2, fp32 (TF32)."""
    from diffusers import AutoencoderKL

    configure_kernels("cuda")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    ).to("cuda").eval().requires_grad_(False)  # fmt: skip
    z = torch.randn(2, 4, 64, 64, device="cuda")
    weight = torch.randn(2, 3, 512, 512, device="cuda")
    peaks, grads = {}, {}
    for mode in ("off", "whole", "blocks"):
        peaks[mode], grads[mode] = _decode_peak(vae, z, weight, mode)
    print({k: f"{v / 2**30:.2f} GiB" for k, v in peaks.items()})
    assert peaks["blocks"] < 0.9 * peaks["off"], peaks
    assert peaks["blocks"] < 0.9 * peaks["whole"], peaks
    for mode in ("whole", "blocks"):
        rel = (grads[mode] - grads["off"]).norm() / grads["off"].norm()
        assert rel < 1e-3, (mode, float(rel))


def test_draft_step_decodes_in_pieces_on_cuda_at_512_px():
    """reward.decode_chunk at auto on CUDA: at 512 px each image is decoded, scored and backpropagated to its latents
    alone (a rowwise reward), so the step's peak memory is below the whole batch's decode in the graph; the LoRA
    gradient is the same up to TF32 rounding."""
    configure_kernels("cuda")
    comp = build_components(ModelConfig(preset="tiny", resolution=512), ["adenocarcinoma"], seed=0)
    add_lora(comp.unet, LoraSettings())
    dev = torch.device("cuda")
    for part in (comp.unet, comp.vae, comp.text_encoder):
        part.to(dev)

    def reward(images, meta):
        return {"total": -((images - 0.4) ** 2).mean(dim=(1, 2, 3))}

    reward.rowwise = True
    sizes: list[int] = []
    comp.vae.decoder.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[0]))
    peaks, grads = {}, {}
    for chunk in (0, -1):
        # no budget (no probe: its one-image decode would join `sizes`)
        c = RewardConfig(k=1, n_repeats=2, sample_steps=2, guidance=2.0, diffusion_weight=0.0, decode_chunk=chunk,
                         memory_budget_gb=0.0)  # fmt: skip
        c.validate()
        model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, c)
        model.train()
        comp.unet.zero_grad(set_to_none=True)
        sizes.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model({"prompt": PROMPTS, "label": ["x", "x"]}, torch.Generator().manual_seed(0))["loss"].backward()
        torch.cuda.synchronize()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base
        grads[chunk] = torch.cat([p.grad.flatten() for n, p in comp.unet.named_parameters() if "lora" in n])
        assert sizes == ([4] if chunk == 0 else [1, 1, 1, 1]), (chunk, sizes)
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert peaks[-1] < 0.8 * peaks[0], peaks
    cos = torch.nn.functional.cosine_similarity(grads[-1], grads[0], dim=0)
    assert cos > 0.999, float(cos)


def test_the_auto_memory_budget_probes_on_cuda():
    """memory_budget_gb at its default (-1, auto): on CUDA the first step measures the graph against 80% of the free
    device memory; the tiny model's graph fits, so nothing is checkpointed."""
    comp = build_components(ModelConfig(preset="tiny", resolution=64), ["adenocarcinoma"], seed=0)
    add_lora(comp.unet, LoraSettings())
    for part in (comp.unet, comp.vae, comp.text_encoder):
        part.to("cuda")
    c = RewardConfig(k=1, n_repeats=2, sample_steps=2, guidance=2.0, diffusion_weight=0.0)
    c.validate()
    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler,
                           toy_reward_recording([]), c).train()  # fmt: skip
    model({"prompt": PROMPTS, "label": ["x", "x"]}, torch.Generator().manual_seed(0))["loss"].backward()
    free, _ = torch.cuda.mem_get_info()
    assert model.memory_budget_gb is not None and 0 < model.memory_budget_gb <= free / 2**30
    assert model.graph_gb_estimate is not None and model.graph_gb_estimate < model.memory_budget_gb
    assert not model.checkpointing


def test_generate_bf16_on_cuda():
    from craft.sample import generate, to_array

    comp = build_components(ModelConfig(preset="tiny", resolution=64), ["adenoma"], seed=0)
    pipe = comp.pipeline().to("cuda")
    seen = []

    def hook(mod, args):
        seen.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)

    pipe.unet.register_forward_pre_hook(hook)
    a16 = to_array(generate(pipe, ["adenoma", "normal"], steps=4, guidance=2.0, seed=0))
    assert set(seen) == {torch.bfloat16}
    a32 = to_array(generate(pipe, ["adenoma", "normal"], steps=4, guidance=2.0, seed=0, precision="no"))
    assert a16.shape == a32.shape == (2, 64, 64, 3)
    assert abs(a16.astype(int) - a32.astype(int)).mean() < 4  # the same images up to bf16 rounding (CPU: 0.5)


def test_frozen_convolutions_save_no_input_on_cuda_bf16_channels_last():
    """craft.models.lean_graph on CUDA: under bf16 autocast and channels_last, the input's gradient through frozen
    convolutions matches autograd's own, and the graph holds less device memory."""
    from craft.models.lean_graph import lean_saves

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
        torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 1),
    ).cuda().to(memory_format=torch.channels_last).requires_grad_(False)  # fmt: skip
    x0 = torch.randn(8, 64, 129, 128, device="cuda").to(memory_format=torch.channels_last)
    runs = []
    for lean in (False, True):
        x = x0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16), lean_saves(net) if lean else torch.enable_grad():
            y = net(x)
        held = torch.cuda.memory_allocated() - base  # what the graph keeps, the output included
        (g,) = torch.autograd.grad(y.float().square().mean(), x)
        runs.append((held, g))
    (held_plain, g_plain), (held_lean, g_lean) = runs
    assert torch.isfinite(g_lean).all()
    assert torch.nn.functional.cosine_similarity(g_lean.flatten(), g_plain.flatten(), dim=0) > 0.999
    assert held_lean < 0.75 * held_plain, (held_lean, held_plain)
