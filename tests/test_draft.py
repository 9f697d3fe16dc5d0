"""DRaFT-K reward finetuning (craft.train.reward): LoRA-only gradients, K graph steps, repeat averaging, save/load."""

from __future__ import annotations

import pytest
import torch

from craft.models.adapters import load_adapters
from craft.models.diffusion import ModelConfig, build_components
from craft.train.loop import LoopConfig, train
from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora, save_adapters

torch.set_num_threads(2)
PROMPTS = ["normal colon mucosa", "adenocarcinoma with crowded glands", "adenoma", "mucinous carcinoma"]


def tiny(seed: int = 0):
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    return build_components(mc, ["adenocarcinoma", "adenoma"], seed=seed)


def cfg(**kw) -> RewardConfig:
    base = dict(k=1, n_repeats=2, sample_steps=4, guidance=2.0, diffusion_weight=0.0)
    base.update(kw)
    c = RewardConfig(**base)
    c.validate()
    return c


def mean_brightness(images, meta):
    """A differentiable toy reward: mean pixel value per image."""
    return {"total": images.mean(dim=(1, 2, 3)), "bright": images.mean(dim=(1, 2, 3))}


def objective(c: RewardConfig, reward=mean_brightness, seed: int = 0):
    comp = tiny(seed)
    add_lora(comp.unet, c.lora)
    return comp, DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, c)


def batch(b: int = 2, latents: bool = False):
    out = {"prompt": PROMPTS[:b], "label": ["normal", "adenocarcinoma", "adenoma", "mucinous"][:b]}
    if latents:
        out["latents"] = torch.randn(b, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return out


def test_gradients_reach_lora_only():
    comp, model = objective(cfg(diffusion_weight=1.0))
    res = model(batch(2, latents=True), torch.Generator().manual_seed(0))
    res["loss"].backward()
    mods = {"unet": comp.unet, "vae": comp.vae, "text_encoder": comp.text_encoder}
    lora_grads = 0
    for mname, m in mods.items():
        for n, p in m.named_parameters():
            if "lora" in n:
                assert p.grad is not None, f"{mname}.{n} got no gradient"
                lora_grads += 1
            else:
                assert p.grad is None, f"frozen parameter {mname}.{n} received a gradient"
    assert lora_grads > 0
    # B starts at zero, so the reward gradient reaches lora_B (and lora_A only after B moves)
    assert any(p.grad.abs().sum() > 0 for n, p in comp.unet.named_parameters() if "lora_B" in n)


def _count_grad_unet_calls(model, c: RewardConfig, b: int = 2, latents: bool = False) -> tuple[int, int]:
    calls = {"grad": 0, "nograd": 0}

    def hook(mod, args, kwargs):
        calls["grad" if torch.is_grad_enabled() else "nograd"] += 1

    model.trace_prefix = False  # the hook counts eager calls: a TorchScript trace of the prefix runs no module hooks
    h = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(batch(b, latents=latents), torch.Generator().manual_seed(0))
    finally:
        h.remove()
    return calls["grad"], calls["nograd"]


def test_k_sets_number_of_unet_calls_in_graph():
    for k in (1, 2):
        c = cfg(k=k, sample_steps=4)
        _, model = objective(c)
        grad, nograd = _count_grad_unet_calls(model, c)
        assert (grad, nograd) == (k, 4 - k), (k, grad, nograd)
    # the diffusion loss on the paired real latent (eq. 1) is one more UNet call in the graph, or (fused, the
    # default) more rows of the last graph step's call
    for fuse, expect in ((False, (2, 3)), (True, (1, 3))):
        c = cfg(k=1, sample_steps=4, diffusion_weight=1.0, fuse_diffusion_loss=fuse)
        _, model = objective(c)
        assert _count_grad_unet_calls(model, c, latents=True) == expect, fuse


def test_timestep_spacing_sets_which_step_keeps_the_graph():
    seen = {}

    def hook(mod, args, kwargs):
        if torch.is_grad_enabled():
            seen.setdefault("t", []).append(int(args[1]))

    for spacing, last in (("leading", 1), ("trailing", 249)):  # 4 steps on the 1000-step schedule
        seen.clear()
        c = cfg(k=1, sample_steps=4, timestep_spacing=spacing)
        _, model = objective(c)
        assert int(model.sched.timesteps[-1]) == last
        h = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(batch(2), torch.Generator().manual_seed(0))
        finally:
            h.remove()
        assert seen["t"] == [last], (spacing, seen)


def test_n_repeats_are_batched_and_averaged():
    seen = {}

    def by_repeat(images, meta):
        seen["n_images"] = images.shape[0]
        seen["prompts"] = list(meta["prompt"])
        # reward r+1 for repeat r (plus a zero-valued differentiable term)
        return {"total": meta["repeat"].float() + 1.0 + 0.0 * images.mean(dim=(1, 2, 3))}

    for n, expect in ((1, 1.0), (2, 1.5), (3, 2.0)):
        _, model = objective(cfg(n_repeats=n), reward=by_repeat)
        res = model(batch(2), torch.Generator().manual_seed(0))
        assert seen["n_images"] == 2 * n
        assert seen["prompts"] == PROMPTS[:2] * n
        assert torch.isclose(res["loss"], torch.tensor(-expect)), (n, res["loss"])
        assert torch.isclose(res["reward"], torch.tensor(expect))


def test_repeats_are_different_trajectories():
    imgs = {}

    def keep(images, meta):
        imgs["x"] = images.detach()
        return {"total": images.mean(dim=(1, 2, 3))}

    _, model = objective(cfg(n_repeats=2), reward=keep)
    model(batch(1), torch.Generator().manual_seed(0))
    assert not torch.allclose(imgs["x"][0], imgs["x"][1])


def test_train_step_changes_lora_only(tmp_path):
    comp, model = objective(cfg(diffusion_weight=1.0))
    before = {f"{m}.{n}": p.detach().clone() for m, mod in (("unet", comp.unet), ("vae", comp.vae),
              ("te", comp.text_encoder)) for n, p in mod.named_parameters()}  # fmt: skip
    data = {"prompt": PROMPTS, "label": ["a", "b", "c", "d"], "latents": torch.randn(4, 4, 16, 16)}
    loop = LoopConfig(steps=2, batch_size=4, lr=1e-2, threads=2, progress=False, log_every=1)
    res = train(model, data, loop, tmp_path / "run")
    after = {f"{m}.{n}": p.detach() for m, mod in (("unet", comp.unet), ("vae", comp.vae),
             ("te", comp.text_encoder)) for n, p in mod.named_parameters()}  # fmt: skip
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing changed"
    assert all("lora" in k for k in changed), [k for k in changed if "lora" not in k][:3]
    assert any("lora_B" in k for k in changed)
    assert {"reward", "reward_bright", "l_diff", "loss"} <= set(res.logs)
    # the checkpoint holds the LoRA weights only (the frozen base is not copied each time)
    from safetensors.torch import load_file

    sd = load_file(str(res.checkpoint / "model.safetensors"))
    assert sd and all("lora" in k for k in sd)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    data = {"prompt": PROMPTS, "label": ["a", "b", "c", "d"], "latents": torch.randn(4, 4, 16, 16)}

    def run(out, stop_after=None, resume=True):
        comp, model = objective(cfg(diffusion_weight=1.0))
        loop = LoopConfig(steps=3, batch_size=2, lr=1e-2, threads=2, progress=False, checkpoint_every=1)
        train(model, data, loop, out, stop_after=stop_after, resume=resume)
        return {n: p.detach().clone() for n, p in comp.unet.named_parameters() if "lora" in n}

    full = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "b")
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6) for k in full)


def test_save_load_into_base_pipeline_gives_same_samples(tmp_path):
    from craft.sample import generate, to_array

    c = cfg(lora=LoraSettings(rank=4, alpha=8.0))
    comp = tiny()
    base = comp.pipeline()
    from craft.models.diffusion import save_pipeline

    save_pipeline(base, tmp_path / "base", {"stage": "test"})
    add_lora(comp.unet, c.lora)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in comp.unet.named_parameters():
            if "lora" in n:
                p.add_(0.05 * torch.randn_like(p))
    ref = to_array(generate(comp.pipeline(), ["adenoma", "normal"], steps=3, guidance=2.0, seed=5))
    save_adapters(tmp_path / "lora", unet=comp.unet, lora=c.lora, info={"stage": "test"})
    from craft.models.diffusion import load_pipeline

    pipe = load_adapters(load_pipeline(tmp_path / "base"), tmp_path / "lora")
    got = to_array(generate(pipe, ["adenoma", "normal"], steps=3, guidance=2.0, seed=5))
    plain = to_array(generate(load_pipeline(tmp_path / "base"), ["adenoma", "normal"], steps=3, guidance=2.0, seed=5))
    assert abs(plain.astype(int) - ref.astype(int)).max() > 5, "the LoRA perturbation should change samples"
    # same adapted UNet: identical LoRA tensors and noise predictions; samples equal up to uint8 rounding
    mine = sorted((n.replace(".default", ""), p) for n, p in comp.unet.named_parameters() if "lora" in n)
    theirs = sorted((n.replace(".default_0", ""), p) for n, p in pipe.unet.named_parameters() if "lora" in n)
    assert [n for n, _ in mine] == [n for n, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(mine, theirs))
    z, t, states = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 32, 16)
    with torch.no_grad():
        assert torch.allclose(comp.unet(z, t, states).sample, pipe.unet(z, t, states).sample, atol=1e-5)
    assert abs(got.astype(int) - ref.astype(int)).max() <= 3


def test_config_validation():
    with pytest.raises(ValueError, match="k must be"):
        RewardConfig(k=5, sample_steps=4).validate()
    with pytest.raises(ValueError, match="unknown reward"):
        RewardConfig(reward_weights={"vdc": 1.0, "fid": 1.0}).validate()


def test_critic_scores_the_plain_prompt_while_the_generator_reads_class_tokens():
    """craft_start=ti_lora: "<token>, <enriched prompt>" conditions the UNet; the critic's VDC reads the enriched
    prompt alone, as evaluation scores it (issue 16)."""
    seen, encoded = {}, []

    def spy(images, meta):
        seen["prompts"] = list(meta["prompt"])
        seen["keys"] = set(meta)
        return {"total": images.mean(dim=(1, 2, 3))}

    _, model = objective(cfg(n_repeats=2), reward=spy)
    real_encode = model.encode_prompts
    model.encode_prompts = lambda ps: encoded.append(list(ps)) or real_encode(ps)
    b = batch(2) | {"gen_prompt": [f"<tok{i}>, {p}" for i, p in enumerate(PROMPTS[:2])]}
    model(b, torch.Generator().manual_seed(0))
    assert seen["prompts"] == PROMPTS[:2] * 2 and "gen_prompt" not in seen["keys"]
    assert encoded[0] == b["gen_prompt"]


# ---------------------------------------------------------------- GPU path pieces that run on CPU too


def _count_calls(modules) -> tuple[dict[str, int], list]:
    calls: dict[str, int] = {}
    hooks = []
    for name, m in modules:
        calls[name] = 0

        def hook(mod, args, name=name):
            calls[name] += 1

        hooks.append(m.register_forward_pre_hook(hook))
    return calls, hooks


def test_block_checkpointed_decode_matches_plain_decode(monkeypatch):
    import torch.utils.checkpoint as tuc

    from craft.train.reward import decode

    vae = tiny().vae
    blocks = [("mid", vae.decoder.mid_block)] + [(f"up{i}", b) for i, b in enumerate(vae.decoder.up_blocks)]
    weight = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    real = tuc.checkpoint
    n_ckpt = {"n": 0}

    def counting(*a, **k):
        n_ckpt["n"] += 1
        return real(*a, **k)

    for ckpt in (False, True):
        n_ckpt["n"] = 0

        monkeypatch.setattr(tuc, "checkpoint", counting)
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        calls, hooks = _count_calls(blocks)
        try:
            x = decode(vae, z, checkpoint_blocks=ckpt)
            (x * weight).sum().backward()
        finally:
            for h in hooks:
                h.remove()
        results[ckpt] = (x.detach(), z.grad)
        # checkpointed: one segment per block plus head and output conv; each block recomputed once in backward
        assert n_ckpt["n"] == (len(vae.decoder.up_blocks) + 2 if ckpt else 0)
        assert set(calls.values()) == {2 if ckpt else 1}, calls
    (x0, g0), (x1, g1) = results[False], results[True]
    assert torch.equal(x0, x1)
    assert g0.abs().max() > 0 and torch.allclose(g0, g1, rtol=1e-5, atol=1e-7)


def _perturbed_lora(seed: int = 3):
    """Tiny components with a LoRA moved off its zero init (so lora_A gets a gradient too)."""
    comp = tiny()
    add_lora(comp.unet, LoraSettings())
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in comp.unet.named_parameters():
            if "lora" in n:
                p.add_(0.05 * torch.randn_like(p))
    return comp


def _lora_grads(comp, c: RewardConfig, checkpointing: bool, precision: str = "no"):
    """LoRA gradients of one DRaFT step on ``comp`` (same batch and noise every call) and the step's outputs."""
    from craft.models.accel import autocast

    comp.unet.zero_grad(set_to_none=True)
    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, mean_brightness, c)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    with autocast("cpu", precision):
        res = model(batch(2, latents=True), torch.Generator().manual_seed(0))
    res["loss"].backward()
    lora = [(n, p) for n, p in comp.unet.named_parameters() if "lora" in n]
    return torch.cat([p.grad.flatten() for _, p in lora]), lora, res


def test_vae_checkpointing_modes_give_the_same_lora_gradients():
    comp = _perturbed_lora()
    ref, _, _ = _lora_grads(comp, cfg(sample_steps=2, vae_checkpointing="off"), checkpointing=False)
    assert ref.abs().max() > 0
    for mode, ckpt in (("blocks", False), ("whole", False), ("auto", True)):
        g, _, _ = _lora_grads(comp, cfg(sample_steps=2, vae_checkpointing=mode), checkpointing=ckpt)
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-8), (mode, (g - ref).abs().max())
    with pytest.raises(ValueError, match="vae_checkpointing"):
        cfg(vae_checkpointing="tiles")


@pytest.mark.skipif(not torch.amp.autocast_mode.is_autocast_available("cpu"), reason="no CPU autocast in this torch")
def test_bf16_autocast_step_matches_fp32_gradient_direction():
    comp = _perturbed_lora()
    c = cfg(diffusion_weight=1.0)
    g32, _, _ = _lora_grads(comp, c, checkpointing=True, precision="no")
    g16, lora, r16 = _lora_grads(comp, c, checkpointing=True, precision="bf16")
    assert torch.isfinite(g16).all() and torch.isfinite(r16["loss"])
    # master weights and their gradients stay fp32 under autocast; only the arithmetic is bf16
    assert {p.dtype for _, p in lora} == {torch.float32} and {p.grad.dtype for _, p in lora} == {torch.float32}
    cos = torch.nn.functional.cosine_similarity(g32, g16, dim=0)
    assert cos >= 0.99, float(cos)
    assert not torch.equal(g32, g16), "bf16 autocast changed nothing: it did not run in bf16"


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps ONE mixed precision per process (a second Accelerator with another one raises); the test
    session shares a process with fp32 loop runs, so reset its state around a bf16 run (as accelerate's tests do)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_loop_with_bf16_runs_the_step_under_autocast(tmp_path, fresh_accelerate_state):
    seen = []

    def reward(images, meta):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return mean_brightness(images, meta)

    comp, model = objective(cfg(diffusion_weight=1.0), reward=reward)
    before = {n: p.detach().clone() for n, p in comp.unet.named_parameters()}
    data = {"prompt": PROMPTS[:2], "label": ["a", "b"], "latents": torch.randn(2, 4, 16, 16)}
    loop = LoopConfig(steps=1, batch_size=2, lr=1e-2, threads=2, progress=False, mixed_precision="bf16",
                      gradient_checkpointing=True)  # fmt: skip
    res = train(model, data, loop, tmp_path / "run")
    assert seen == [(True, torch.bfloat16)]
    assert torch.isfinite(torch.tensor(res.logs["loss"]))
    changed = [n for n, p in comp.unet.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all("lora" in n for n in changed)
    assert all(p.dtype == torch.float32 for n, p in comp.unet.named_parameters() if "lora" in n)
