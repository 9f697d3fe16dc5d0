"""Training loop + CRAFTS stages on tiny seeded models: params move, exact resume, NaN stop, outputs."""

from __future__ import annotations

import json

import pytest
import torch

from craft.models.diffusion import build_components, load_pipeline, read_lineage
from craft.train import crafts
from craft.train.loop import LoopConfig, NonFiniteLossError, list_checkpoints, train
from tests.crafts_helpers import CLASSES, make_dataset, tiny_model_config

torch.set_num_threads(2)


def _objective(cfg: crafts.CraftsConfig, seed: int = 0):
    comp = build_components(cfg.model, CLASSES, seed=seed)
    model = crafts.DenoiserObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, cfg, 0.8, 0.2)
    return comp, model


def _data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    labels = [CLASSES[i % 2] for i in range(n)]
    return {
        "latents": torch.randn(n, 4, 16, 16, generator=g),
        "caption": [f"{lab}, tile {i}" for i, lab in enumerate(labels)],
        "class_prompt": labels,
    }


def _cfg(**loop) -> crafts.FinetuneConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, progress=False, checkpoint_every=3, ema_decay=0.9)
    base.update(loop)
    return crafts.FinetuneConfig(
        model=tiny_model_config(), loop=LoopConfig(**base), corr_weight=0.5, cate_weight=0.5, cond_dropout=0.25,
        train_text_encoder=False, sample_per_class=0, aux_min_abar=0.0,
    )  # fmt: skip


def test_crafts_losses_only_see_low_noise_samples():
    cfg = _cfg()
    cfg.aux_min_abar = 0.5
    _, model = _objective(cfg)
    batch, gen = _data(), torch.Generator().manual_seed(0)
    model.abar = torch.full_like(model.abar, 0.3)  # every timestep too noisy: x0_hat is no image estimate
    out = model(batch, gen)
    assert "l_corr" not in out and "l_cate" not in out
    model.abar = torch.full_like(model.abar, 0.9)
    out = model(batch, torch.Generator().manual_seed(0))
    assert out["l_corr"] > 0 and out["l_cate"] > 0
    assert torch.isfinite(out["loss"]) and out["loss"] > out["l_diff"]


def test_l_cate_uses_the_typicality_fixed_before_training():
    cfg = _cfg()
    _, model = _objective(cfg)  # mu = 0.8, sigma = 0.2
    model.abar = torch.full_like(model.abar, 0.9)
    batch = _data()
    low = model({**batch, "typicality": torch.full((8,), -5.0)}, torch.Generator().manual_seed(0))["l_cate"]
    high = model({**batch, "typicality": torch.full((8,), 5.0)}, torch.Generator().manual_seed(0))["l_cate"]
    assert low < 1e-10 < high  # W_ij = sigmoid((s_i + s_j - mu) / sigma): ~0 at s = -5, ~1 at s = 5


def test_stage_two_fixes_typicality_scores_once(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=8)
    loop = LoopConfig(steps=1, batch_size=4, progress=False, threads=2)
    pre = crafts.PretrainConfig(model=tiny_model_config(), loop=loop, sample_per_class=0, corr_weight=0.0)
    pre.autoencoder.steps = 0
    crafts.pretrain(pre, data, tmp_path / "pre")
    seen = {}
    real_train = crafts.train

    def spy(model, data_, cfg_, out, validate=None):
        seen.update(data_)
        return real_train(model, data_, cfg_, out, validate=validate)

    monkeypatch.setattr(crafts, "train", spy)
    m = crafts.finetune(crafts.FinetuneConfig(loop=loop, sample_per_class=0), data, tmp_path / "ft",
                        base=str(tmp_path / "pre"))  # fmt: skip
    s = seen["typicality"]
    assert s.shape == (len(seen["caption"]),) and torch.all(s.abs() <= 1.0 + 1e-6)
    mu, sigma = crafts.typicality_stats(s)
    assert m["typicality_mu"] == pytest.approx(mu) and m["typicality_sigma"] == pytest.approx(sigma)


def test_trainable_params_change_and_frozen_ones_do_not(tmp_path):
    cfg = _cfg(steps=3, checkpoint_every=0, ema_decay=0.0)
    comp, model = _objective(cfg)
    before_unet = {k: v.clone() for k, v in comp.unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in comp.text_encoder.state_dict().items()}
    res = train(model, _data(), cfg.loop, tmp_path)
    assert res.step == 3 and {"l_diff", "l_corr", "l_cate"} <= set(res.logs)
    changed = [k for k, v in comp.unet.state_dict().items() if not torch.equal(v, before_unet[k])]
    assert len(changed) > 0.5 * len(before_unet)
    assert all(torch.equal(v, before_text[k]) for k, v in comp.text_encoder.state_dict().items())
    assert list((tmp_path / "tb").glob("events.out.tfevents.*")), "TensorBoard event file missing"


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    cfg = _cfg()
    comp_a, model_a = _objective(cfg)
    res_a = train(model_a, _data(), cfg.loop, tmp_path / "a")
    assert res_a.step == 6

    comp_b, model_b = _objective(cfg)
    part = train(model_b, _data(), cfg.loop, tmp_path / "b", stop_after=4)  # "crash" after step 4
    assert part.step == 4 and [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-0000003"]
    comp_c, model_c = _objective(cfg)  # a fresh process: new model, same seed
    res_c = train(model_c, _data(), cfg.loop, tmp_path / "b")
    assert res_c.resumed_from == 3 and res_c.step == 6
    for (k, va), (_, vc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(va, vc), f"parameter {k} differs after resume"
    for k in res_a.ema:
        assert torch.equal(res_a.ema[k], res_c.ema[k]), f"EMA {k} differs after resume"
    assert res_a.logs["loss"] == res_c.logs["loss"]


def test_ema_weights_are_the_result(tmp_path):
    """With ema_decay > 0 the model leaves train() holding the EMA weights; the raw ones stay in the checkpoint."""
    from safetensors.torch import load_file

    cfg = _cfg(steps=4, checkpoint_every=0, ema_decay=0.5)
    _, model = _objective(cfg)
    res = train(model, _data(), cfg.loop, tmp_path)
    assert res.ema_applied
    params = dict(model.named_parameters())
    raw = load_file(str(res.checkpoint / "model.safetensors"))
    moved = 0
    for k, v in res.ema.items():
        assert torch.equal(params[k].detach().float(), v), k
        moved += int(not torch.equal(raw[k].float(), v))
    assert moved > 0, "EMA equals the raw weights: the test cannot tell them apart"


class _Blowup(torch.nn.Module):
    def __init__(self, at: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls, self.at = 0, at

    def forward(self, batch, generator):
        self.calls += 1
        loss = ((self.w * batch["x"]) ** 2).mean()
        return {"loss": loss * float("nan") if self.calls >= self.at else loss}


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    model = _Blowup(at=4)
    cfg = LoopConfig(steps=10, batch_size=2, checkpoint_every=2, progress=False)
    with pytest.raises(NonFiniteLossError, match=r"step 4: loss is nan.*step-0000002"):
        train(model, {"x": torch.ones(4, 3)}, cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    assert torch.isfinite(model.w).all()


def test_pretrain_then_finetune_writes_loadable_models(tmp_path):
    data = make_dataset(tmp_path / "data")
    loop = LoopConfig(steps=2, batch_size=4, progress=False, checkpoint_every=1)
    pre = crafts.PretrainConfig(model=tiny_model_config(), loop=loop, sample_per_class=1, sample_steps=2,
                                aux_min_abar=0.0)  # every sample, so 2 steps of 4 surely log l_corr  # fmt: skip
    pre.autoencoder.steps = 2
    pre.autoencoder.batch_size = 4
    m1 = crafts.pretrain(pre, data, tmp_path / "pre")
    assert m1["steps"] == 2 and "l_corr" in m1 and "ae_recon_mse" in m1
    assert (tmp_path / "pre.work" / "denoiser" / "samples" / "step-0000002" / "adenocarcinoma.png").is_file()
    ft = crafts.FinetuneConfig(loop=loop, sample_per_class=0, aux_min_abar=0.0)
    m2 = crafts.finetune(ft, data, tmp_path / "ft", base=str(tmp_path / "pre"))
    assert "l_cate" in m2 and m2["typicality_sigma"] > 0
    lin = read_lineage(tmp_path / "ft")
    assert lin["parent"] == str(tmp_path / "pre") and lin["stage"] == "finetune"
    assert lin["dataset"]["manifest_sha256"] and lin["config"]["captions"] == "class+weak"
    assert json.loads((tmp_path / "ft" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline(tmp_path / "ft")
    assert pipe.unet.config.block_out_channels == [8, 16] or tuple(pipe.unet.config.block_out_channels) == (8, 16)


def test_autoencoder_trains_on_random_crops_and_still_reads_whole_images(tmp_path):
    from craft.models.diffusion import build_components

    vae = build_components(tiny_model_config(), ["normal", "tumor"], seed=0).vae
    seen = []
    vae.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x = torch.randn(3, 3, 32, 32)
    objective = crafts.AutoencoderObjective(vae, 1e-6, crop=16)
    objective({"pixels": x}, torch.Generator().manual_seed(0))
    objective({"pixels": x}, torch.Generator().manual_seed(0))
    assert seen[0].shape == (3, 3, 16, 16) and torch.equal(seen[0], seen[1])  # reproducible from the generator
    where = []  # each patch is a 16 x 16 window of its own image, at its own place
    for i in range(3):
        hits = [
            (r, c) for r in range(17) for c in range(17) if torch.equal(x[i, :, r : r + 16, c : c + 16], seen[0][i])
        ]
        assert len(hits) == 1, i
        where.append(hits[0])
    assert len(set(where)) > 1
    crafts.AutoencoderObjective(vae, 1e-6)({"pixels": x}, torch.Generator().manual_seed(0))
    assert seen[-1].shape == (3, 3, 32, 32)  # crop 0: whole images

    data = make_dataset(tmp_path / "data")
    loop = LoopConfig(steps=1, batch_size=4, progress=False)
    pre = crafts.PretrainConfig(model=tiny_model_config(), loop=loop, sample_per_class=0)
    pre.autoencoder.steps, pre.autoencoder.batch_size, pre.autoencoder.crop = 2, 4, 16
    m = crafts.pretrain(pre, data, tmp_path / "pre")
    assert 0 < m["ae_recon_mse"] < 1  # read on whole 32 px images through the crop-trained VAE
    assert read_lineage(tmp_path / "pre")["config"]["autoencoder"]["crop"] == 16
    for bad in (5, 48):  # not a multiple of the VAE's factor 2; larger than the 32 px images
        pre.autoencoder.crop = bad
        with pytest.raises(ValueError, match=f"autoencoder.crop={bad}: must be a multiple"):
            crafts.pretrain(pre, data, tmp_path / f"bad{bad}")
        assert not (tmp_path / f"bad{bad}").exists()


def test_weak_captions_required_for_stage_one(tmp_path):
    import pandas as pd

    from craft.data.manifest import read_manifest, write_manifest

    data = make_dataset(tmp_path / "data")
    df = read_manifest(data)
    df.loc[3, "caption"] = None
    write_manifest(data, pd.DataFrame(df))
    cfg = crafts.PretrainConfig(model=tiny_model_config(), loop=LoopConfig(steps=1, batch_size=2, progress=False))
    cfg.autoencoder.steps = 0
    with pytest.raises(ValueError, match="image_id=img003: no caption"):
        crafts.pretrain(cfg, data, tmp_path / "pre")


def test_checkpoints_mirror_to_object_store_with_gradient_checkpointing(s3_env, tmp_path):
    from craft.storage.objectstore import ObjectStore

    bucket = s3_env.make_bucket()
    uri = f"s3://{bucket}/runs/r1"
    cfg = _cfg(steps=2, checkpoint_every=1, ema_decay=0.0, gradient_checkpointing=True, upload_uri=uri)
    comp, model = _objective(cfg)
    res = train(model, _data(), cfg.loop, tmp_path)
    assert res.step == 2 and torch.isfinite(torch.tensor(res.logs["loss"]))
    store = ObjectStore.from_env()
    for step in (1, 2):
        assert store.is_committed(f"{uri}/checkpoints/step-{step:07d}")
    got = store.download_dir(f"{uri}/checkpoints/step-0000002", tmp_path / "dl")
    assert json.loads((got / "state.json").read_text())["step"] == 2


# ---------------------------------------------------------------- v-prediction targets (issue 16)

TRAINERS = ["crafts_stage1", "crafts_stage2", "ti", "ti_lora", "dpo", "craft_reward", "controlnet"]


def _v_components():
    from diffusers import DDPMScheduler

    comp = build_components(tiny_model_config(), CLASSES, seed=0)  # 32 px, latents 4 x 16 x 16
    comp.scheduler = DDPMScheduler.from_config(comp.scheduler.config, prediction_type="v_prediction")
    return comp


def _capture(module, into: list):
    """Record (x_t, t, output) of every forward call of ``module``."""

    def hook(mod, args, kwargs, out):
        into.append((args[0].detach().float(), args[1].detach(), out.sample.detach().float()))

    return module.register_forward_hook(hook, with_kwargs=True)


def _eps_and_v(sched, x0, xt, t):
    """The noise that made x_t from x0, and v = alpha_t eps - sigma_t x0, by hand from alphas_cumprod."""
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    eps = (xt - abar.sqrt() * x0) / (1 - abar).sqrt()
    return eps, abar.sqrt() * eps - (1 - abar).sqrt() * x0, abar


def _run_trainer(name: str, comp, z0, prompts):
    """One loss evaluation of trainer ``name``; returns (result dict, calls of the trained UNet, calls of others)."""
    import copy

    from craft.train.baselines import DPOObjective, LoRADiffusionObjective, TIObjective, add_class_tokens
    from craft.train.controlnet import ControlNetObjective, build_controlnet
    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    gen = torch.Generator().manual_seed(0)
    calls, ref_calls = [], []
    hooks = [_capture(comp.unet, calls)]
    try:
        if name.startswith("crafts"):
            stage = crafts.PretrainConfig if name == "crafts_stage1" else crafts.FinetuneConfig
            cfg = stage(model=tiny_model_config(), corr_weight=0.5, cond_dropout=0.0, aux_min_abar=0.0,
                        train_text_encoder=False, sample_per_class=0)  # fmt: skip
            model = crafts.DenoiserObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, cfg,
                                             0.8, 0.2)  # fmt: skip
            batch = {"latents": z0, "caption": prompts, "class_prompt": [p.split(",")[0] for p in prompts],
                     "typicality": torch.full((len(prompts),), 0.5)}  # fmt: skip
            return model(batch, gen), calls, ref_calls
        if name == "ti":
            ids = add_class_tokens(comp.tokenizer, comp.text_encoder, {"<adenoma>": "adenoma"})
            model = TIObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, ids)
            return model({"latents": z0, "prompt": ["<adenoma>"] * len(z0)}, gen), calls, ref_calls
        if name == "ti_lora":
            add_lora(comp.unet, LoraSettings(cross_attention_only=True))
            model = LoRADiffusionObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler)
            return model({"latents": z0, "prompt": prompts}, gen), calls, ref_calls
        if name == "dpo":
            add_lora(comp.unet, LoraSettings(cross_attention_only=True))
            hooks.pop().remove()  # deepcopy would copy the hook into the reference
            ref = copy.deepcopy(comp.unet)
            hooks.append(_capture(comp.unet, calls))
            with torch.no_grad():  # model != reference, so the implicit reward depends on the target
                for n, p in comp.unet.named_parameters():
                    if "lora_B" in n:
                        p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            hooks.append(_capture(ref, ref_calls))
            model = DPOObjective(comp.unet, ref, comp.text_encoder, comp.tokenizer, comp.scheduler, beta=50.0)
            b = len(z0) // 2
            return model({"z_w": z0[:b], "z_l": z0[b:], "prompt": prompts[:b]}, gen), calls, ref_calls
        if name == "craft_reward":
            add_lora(comp.unet, LoraSettings())
            model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler,
                                   lambda im, meta: {"total": im.mean(dim=(1, 2, 3))}, RewardConfig(sample_steps=2))  # fmt: skip
            l_diff = model.diffusion_loss(z0, model.encode_prompts(prompts), gen)  # the eq. 1 diffusion term
            return {"loss": l_diff, "l_diff": l_diff}, calls, ref_calls
        if name == "controlnet":
            cn = build_controlnet(comp.unet, comp.vae)
            model = ControlNetObjective(cn, comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, 0.0)
            return model({"latents": z0, "cond": torch.rand(len(z0), 3, 32, 32), "prompt": prompts}, gen), calls, []
    finally:
        for h in hooks:
            h.remove()
    raise AssertionError(name)


@pytest.mark.parametrize("name", TRAINERS)
def test_v_prediction_trainers_regress_v_not_the_noise(name):
    """With a v_prediction scheduler, every trainer's diffusion term is MSE(model output, v), not MSE(output, eps)."""
    import torch.nn.functional as F

    from craft.losses import category_guidance_loss, semantic_consistency_loss
    from craft.train.baselines import diffusion_dpo_loss

    comp = _v_components()
    z0 = 3.0 * torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))  # large x0: v and eps differ
    prompts = ["normal, pale glands", "adenocarcinoma, dark glands"] * 2
    res, calls, ref_calls = _run_trainer(name, comp, z0, prompts)
    assert len(calls) == 1, f"{name}: expected one UNet call in the graph, got {len(calls)}"
    xt, t, out = calls[0]
    x0 = z0 if name != "dpo" else torch.cat([z0[:2], z0[2:]])
    eps, v, abar = _eps_and_v(comp.scheduler, x0, xt, t)
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-5)
    if name == "dpo":
        _, _, ref_out = ref_calls[0]
        err = (out - v).pow(2).mean(dim=(1, 2, 3))
        ref_err = (ref_out - v).pow(2).mean(dim=(1, 2, 3))  # the reference is scored against the same v
        assert torch.allclose(res["err_w"], err[:2], rtol=1e-4) and torch.allclose(res["err_l"], err[2:], rtol=1e-4)
        want, _ = diffusion_dpo_loss(err[:2], err[2:], ref_err[:2], ref_err[2:], 50.0)
        eps_err = (out - eps).pow(2).mean(dim=(1, 2, 3))
        assert float(res["loss"]) == pytest.approx(float(want), rel=1e-4)
        assert not torch.allclose(res["err_w"], eps_err[:2], rtol=1e-2)
        return
    l_diff = res["l_diff"]
    assert float(l_diff) == pytest.approx(float(F.mse_loss(out, v)), rel=1e-4)
    assert abs(float(l_diff) - float(F.mse_loss(out, eps))) > 0.05 * float(l_diff)
    if name.startswith("crafts"):
        # L_corr (eq. 10) / L_cate (eq. 13) see x0_hat = alpha_t x_t - sigma_t v_hat (Salimans & Ho 2022, app. D)
        x0_hat = (abar.sqrt() * xt - (1 - abar).sqrt() * out).flatten(1)
        with torch.no_grad():
            pooled = comp.text_encoder(comp.tokenizer(prompts, padding="max_length", truncation=True,
                                                      max_length=comp.tokenizer.model_max_length,
                                                      return_tensors="pt").input_ids).pooler_output  # fmt: skip
        assert float(res["l_corr"]) == pytest.approx(float(semantic_consistency_loss(x0_hat, pooled)), rel=1e-4)
        eps_x0 = ((xt - (1 - abar).sqrt() * out) / abar.sqrt()).flatten(1)  # the epsilon formula: not used
        assert float(res["l_corr"]) != pytest.approx(float(semantic_consistency_loss(eps_x0, pooled)), rel=1e-3)
        if name == "crafts_stage2":
            with torch.no_grad():
                ids = comp.tokenizer([p.split(",")[0] for p in prompts], padding="max_length", truncation=True,
                                     max_length=comp.tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
                cfeat = comp.text_encoder(ids).pooler_output
            want = category_guidance_loss(x0_hat, pooled, cfeat, 0.8, 0.2, s=torch.full((4,), 0.5))
            assert float(res["l_cate"]) == pytest.approx(float(want), rel=1e-4)


class _Quadratic(torch.nn.Module):
    """A tiny seeded model that records its raw weights at every forward (= after the previous step's update)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.seen: list[torch.Tensor] = []

    def forward(self, batch, generator):
        self.seen.append(self.w.detach().clone())
        return {"loss": ((self.w * batch["x"] - 1.0) ** 2).mean()}


def _reference_ema(trajectory, decay, min_decay=0.0, after=0, warmup=False, power=2 / 3):
    """The EMA recursion written from diffusers' documented schedule (not from EMAModel's code):
    t = step - after - 1; decay 0 while t <= 0 (a copy), else min(ceiling, (1 + t) / (10 + t)) or, with
    warm-up, min(ceiling, 1 - (1 + t)^-power); never below min_decay."""
    e = trajectory[0].clone()
    for step, p in enumerate(trajectory[1:], start=1):
        t = step - after - 1
        if t <= 0:
            d = 0.0
        else:
            d = min(decay, 1 - (1 + t) ** -power if warmup else (1 + t) / (10 + t))
            d = max(d, min_decay)
        e = d * e + (1 - d) * p
    return e


@pytest.mark.parametrize(
    "ema",
    [
        dict(ema_decay=0.9),
        dict(ema_decay=0.95, ema_warmup=True, ema_power=0.75, ema_update_after_step=2),
        dict(ema_decay=0.8, ema_min_decay=0.8),  # constant decay after the first update
    ],
)
def test_ema_follows_the_documented_schedule(tmp_path, ema):
    from safetensors.torch import load_file

    model = _Quadratic()
    cfg = LoopConfig(steps=7, batch_size=2, lr=0.1, progress=False, **ema)
    res = train(model, {"x": torch.linspace(0.5, 2.0, 8)[:, None].repeat(1, 3)}, cfg, tmp_path)
    raw_last = load_file(str(res.checkpoint / "model.safetensors"))["w"]
    trajectory = [*model.seen, raw_last]  # the weights before step 1 .. after step 7
    assert len(trajectory) == 8 and not torch.equal(trajectory[-1], trajectory[-2])
    want = _reference_ema(trajectory, ema["ema_decay"], ema.get("ema_min_decay", 0.0),
                          ema.get("ema_update_after_step", 0), ema.get("ema_warmup", False),
                          ema.get("ema_power", 2 / 3))  # fmt: skip
    assert torch.allclose(res.ema["w"], want, atol=1e-6), (res.ema["w"], want)
    assert torch.equal(model.w.detach(), res.ema["w"]) and res.ema_applied  # _swap_in_ema left the EMA in the model
    assert torch.equal(load_file(str(res.checkpoint / "ema.safetensors"))["w"], res.ema["w"])


def test_ema_warmup_resume_is_exact(tmp_path):
    """Resuming restores the EMA's step count too, so the warm-up schedule continues where it stopped."""
    cfg = LoopConfig(steps=6, batch_size=2, lr=0.1, progress=False, checkpoint_every=3, ema_decay=0.99,
                     ema_warmup=True)  # fmt: skip
    data = {"x": torch.linspace(0.5, 2.0, 8)[:, None].repeat(1, 3)}
    full = train(_Quadratic(), data, cfg, tmp_path / "a")
    train(_Quadratic(), data, cfg, tmp_path / "b", stop_after=4)
    resumed = train(_Quadratic(), data, cfg, tmp_path / "b")
    assert resumed.resumed_from == 3 and torch.equal(full.ema["w"], resumed.ema["w"])


def test_ema_settings_are_validated():
    with pytest.raises(ValueError, match="ema_min_decay must be in"):
        LoopConfig(ema_decay=0.9, ema_min_decay=0.95).validate()
    with pytest.raises(ValueError, match="ema_update_after_step must be >= 0"):
        LoopConfig(ema_decay=0.9, ema_update_after_step=-1).validate()
