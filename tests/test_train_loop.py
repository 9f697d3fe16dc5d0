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
