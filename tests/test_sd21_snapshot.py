"""Every stage on a snapshot laid out like stabilityai/stable-diffusion-2-1 (``tests/sd21_layout.py``), issue 16.

The snapshot is v-prediction, its VAE config says 768 px while the UNet implies 16 px, and pickle decoys
(``.ckpt`` / ``.bin``, not valid pickles) lie beside the safetensors. Each stage runs one step on it and
must: load it (ignoring the decoys), regress v (``training_target`` sees ``v_prediction``), and train and
sample at the UNet-implied 16 px. The critic of the CRAFT reward / DPO stages is a stand-in (its own code
and tests live in ``craft.models.encoders``); everything else is the real stage code.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import craft.models.diffusion as D
from craft.config import load_stage_config
from craft.sample import sample_controlnet
from craft.train import baselines, controlnet, crafts, reward
from tests.sd21_layout import DECOYS, RESOLUTION, UNET_SAMPLE_SIZE, VAE_DECLARED, build_sd21_dir

torch.set_num_threads(2)

SMALL = ["loop.steps=1", "loop.batch_size=2", "loop.threads=2", "loop.progress=false"]
LATENT = (4, UNET_SAMPLE_SIZE, UNET_SAMPLE_SIZE)  # what every stage must train on (not 768 / 2)


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    return build_sd21_dir(tmp_path_factory.mktemp("hub") / "stable-diffusion-2-1", "v_prediction")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Demo histo tiles at 32 px (neither 16 nor 768: stages resize), with enriched prompts and checklists."""
    from craft.data.demo import DemoConfig, generate
    from craft.data.manifest import read_manifest

    root = tmp_path_factory.mktemp("data")
    ds = root / "histo"
    generate(DemoConfig(modality="histo", n=16, seed=0, resolution=32, images_per_patient=2), ds)
    df = read_manifest(ds)
    ann = root / "ann"
    ann.mkdir()
    pd.DataFrame({"image_id": df["image_id"], "enriched_prompt": [f"{lab}, glands" for lab in df["label"]],
                  "status": "ok"}).to_parquet(ann / "annotations.parquet")  # fmt: skip
    (ann / "checklists.json").write_text(json.dumps({}))  # read by the stages; the stand-in critic ignores it
    return ds, ann


@pytest.fixture
def spy(monkeypatch):
    """Record the prediction type every trainer targets and the tensor shapes each stage hands the loop."""
    seen: dict[str, list] = {"kinds": [], "train": []}
    real_target, real_train = D.training_target, crafts.train

    def target(kind, *args):
        seen["kinds"].append(kind)
        return real_target(kind, *args)

    def train(model, data_, cfg, out, **kw):
        # a column is a tensor or a lazy craft.data.loader column (cached latents, streamed pixels): ask it for row 0
        seen["train"].append({k: tuple((v if isinstance(v, torch.Tensor) else v[[0]]).shape[1:])
                              for k, v in data_.items() if not isinstance(v, list)})  # fmt: skip
        return real_train(model, data_, cfg, out, **kw)

    for mod in (D, crafts, baselines, controlnet):  # reward imports it from D at call time
        monkeypatch.setattr(mod, "training_target", target)
    for mod in (crafts, baselines, reward, controlnet):
        monkeypatch.setattr(mod, "train", train)
    return seen


@pytest.fixture
def critic(monkeypatch):
    """A stand-in frozen critic: reward components from pixel statistics; checks SFS references match the samples."""
    import craft.models.encoders as E

    class Critic:
        identity = "stand-in"

        def eval(self):
            return self

        def requires_grad_(self, flag=True):
            return self

    class CAM:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, images, labels, prompts, references=None):
            assert images.shape[-2:] == (RESOLUTION, RESOLUTION), images.shape
            m = images.mean(dim=(1, 2, 3))
            out = {"vdc": m, "ccs": -m, "dd": m - 1.0}
            if references is not None:  # the paired real image x_i at the size DRaFT samples (CRAFT eq. 5)
                assert references.shape == images.shape, (references.shape, images.shape)
                out["sfs"] = -(images - references).abs().mean(dim=(1, 2, 3))
            return out

    monkeypatch.setattr(E, "load_encoder", lambda *a, **k: Critic())
    monkeypatch.setattr(E, "load_probe", lambda *a, **k: None)
    monkeypatch.setattr(E, "ClinicalAlignmentModule", CAM)


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon"])
def test_snapshot_loads_ignoring_pickle_decoys(tmp_path, caplog, kind):
    d = build_sd21_dir(tmp_path / "sd21", kind)
    index = json.loads((d / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["safety_checker"] == [None, None]
    with caplog.at_level(logging.INFO, logger="craft.models.diffusion"):
        pipe = D.load_pipeline(d)  # the decoys are not pickles: touching one would crash
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and D.prediction_type(pipe.scheduler) == kind
    assert pipe.vae.config.sample_size == VAE_DECLARED and D.model_resolution(pipe.unet, pipe.vae) == RESOLUTION
    assert all(rel in caplog.text for rel in DECOYS if not rel.endswith(".safetensors"))
    shutil.copytree(d, tmp_path / "broken")
    (tmp_path / "broken" / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"'text_encoder' has only pickle weights \(text_encoder/pytorch_model.bin"):
        D.load_pipeline(tmp_path / "broken")


def test_crafts_stages_train_v_at_unet_size(sd21, data, tmp_path, spy):
    ds, _ = data
    pre = load_stage_config("pretrain", None, SMALL + ["sample_per_class=1", "sample_steps=1"])
    crafts.pretrain(pre, ds, tmp_path / "pre", base=str(sd21))
    samples = tmp_path / "pre.work" / "denoiser" / "samples" / "step-0000001"
    assert {_size(p) for p in samples.glob("*.png")} == {(RESOLUTION, RESOLUTION)}
    ft = load_stage_config("finetune", None, SMALL + ["sample_per_class=0", "aux_min_abar=0.0"])
    m = crafts.finetune(ft, ds, tmp_path / "ft", base=str(tmp_path / "pre"))
    assert "l_cate" in m and "l_corr" in m
    assert [s["latents"] for s in spy["train"]] == [LATENT, LATENT]
    assert spy["kinds"] and set(spy["kinds"]) == {"v_prediction"}
    out = D.load_pipeline(tmp_path / "ft")  # the saved model keeps the base's parameterisation and sizes
    assert D.prediction_type(out.scheduler) == "v_prediction" and D.model_resolution(out.unet, out.vae) == RESOLUTION


def test_baselines_train_v_at_unet_size(sd21, data, tmp_path, spy, critic):
    ds, ann = data
    baselines.ti_main(load_stage_config("ti", None, SMALL), ds, sd21, tmp_path / "ti")
    baselines.ti_lora_main(
        load_stage_config("ti_lora", None, SMALL), ds, sd21, tmp_path / "tl", ti_dir=tmp_path / "ti"
    )
    d = baselines.dpo_main(load_stage_config("dpo", None, SMALL + ["n_pairs=2", "sample_steps=2"]), ds, ann,
                           "critic", "probe", sd21, tmp_path / "dpo", start_dir=tmp_path / "tl")  # fmt: skip
    assert np.isfinite(d["loss"]) and "implicit_acc" in d
    ti, tl, dpo = spy["train"]
    assert ti["latents"] == LATENT and tl["latents"] == LATENT and dpo["z_w"] == dpo["z_l"] == LATENT
    assert spy["kinds"] and set(spy["kinds"]) == {"v_prediction"}


def test_craft_reward_then_evaluation_and_sample_at_unet_size(sd21, data, tmp_path, spy, critic):
    from typer.testing import CliRunner

    from craft.cli import app
    from craft.evaluate.run import EvaluateConfig, VariantSpec, generate, load_variant_pipeline

    ds, ann = data
    m = reward.main(load_stage_config("reward", None, SMALL + ["sample_steps=2"]), ds, ann, "critic", "probe", sd21,
                    tmp_path / "craft")  # fmt: skip
    assert {"reward", "reward_sfs", "l_diff"} <= set(m)
    (shapes,) = spy["train"]
    assert shapes["latents"] == LATENT and shapes["reference"] == (3, RESOLUTION, RESOLUTION)
    assert spy["kinds"] and set(spy["kinds"]) == {"v_prediction"}  # eq. 1's diffusion term regresses v
    # evaluation's generation of the CRAFT variant
    pipe, meta = load_variant_pipeline(VariantSpec(str(sd21), str(tmp_path / "craft")), torch.device("cpu"))
    imgs = generate(pipe, ["normal, glands"], [1], EvaluateConfig(steps=2))
    assert meta["stage"] == "reward" and imgs[0].size == (RESOLUTION, RESOLUTION)
    # `craft sample` on the snapshot, with and without the adapter
    for extra in ([], ["--adapter", str(tmp_path / "craft")]):
        out = tmp_path / f"s{len(extra)}"
        res = CliRunner().invoke(app, ["sample", str(sd21), "--prompt", "normal", "--out", str(out), "--n", "2",
                                       "--steps", "2", *extra])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert _size(out / "normal" / "000.png") == (RESOLUTION, RESOLUTION)
        assert _size(out / "grid.png") == (2 * RESOLUTION, RESOLUTION)


def test_controlnet_trains_v_at_unet_size_and_samples(sd21, data, tmp_path, spy):
    from craft.data.manifest import read_manifest

    ds, _ = data
    cfg = controlnet.ControlNetConfig(condition="mask", val_images=1, sample_steps=1,
                                      loop=load_stage_config("controlnet", None, SMALL).loop)  # fmt: skip
    controlnet.train_controlnet(cfg, ds, sd21, tmp_path / "cn")
    (shapes,) = spy["train"]
    assert shapes["latents"] == LATENT and shapes["cond"] == (3, RESOLUTION, RESOLUTION)
    assert spy["kinds"] and set(spy["kinds"]) == {"v_prediction"}
    assert D.read_lineage(tmp_path / "cn")["resolution"] == RESOLUTION
    triplets = tmp_path / "cn.work" / "controlnet" / "samples" / "step-0000001" / "triplets.png"
    assert _size(triplets)[1] == RESOLUTION  # one row: condition | real | generated, each 16 px high
    mask = ds / read_manifest(ds)["mask_path"].iloc[0]
    out = sample_controlnet(str(sd21), str(tmp_path / "cn"), mask, tmp_path / "s", n=1, steps=1)
    assert _size(out / "000.png") == (RESOLUTION, RESOLUTION)
    # evaluation reads conditions and generates at the UNet-implied size too, not the VAE config's 768
    from craft.evaluate.controlnet_eval import evaluate

    res = evaluate(tmp_path / "cn", sd21, ds, split="test", n=1, steps=1)
    assert res["metrics"]["n"] == 1 and res["triplets"][0].size == (3 * RESOLUTION, RESOLUTION)


def test_stages_save_ema_weights_and_the_critic_reads_plain_prompts(sd21, data, tmp_path, monkeypatch, critic):
    """loop.ema_decay > 0: TI, TI+LoRA, CRAFT and DPO save the EMA weights, not the last step's (issue 16); CRAFT
    continuing TI+LoRA conditions on "<token>, prompt" but its critic scores the plain enriched prompt."""
    from safetensors.torch import load_file

    import craft.models.encoders as E
    from craft.models.adapters import EMBEDS_FILE

    ds, ann = data
    saved: dict[str, dict[str, torch.Tensor]] = {}
    real_save = reward.save_adapters

    def spy_save(out_dir, unet=None, **kw):
        if unet is not None:
            saved[str(out_dir)] = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora" in n}
        return real_save(out_dir, unet=unet, **kw)

    monkeypatch.setattr(reward, "save_adapters", spy_save)
    monkeypatch.setattr(baselines, "save_adapters", spy_save)
    prompts_seen: list[str] = []
    cam_cls = E.ClinicalAlignmentModule

    class RecordingCAM(cam_cls):
        def __call__(self, images, labels, prompts, references=None):
            prompts_seen.extend(prompts)
            return super().__call__(images, labels, prompts, references)

    monkeypatch.setattr(E, "ClinicalAlignmentModule", RecordingCAM)
    ema = ["loop.steps=3", "loop.ema_decay=0.5", "loop.lr=0.05"]

    def final_ema(work: Path) -> dict[str, torch.Tensor]:
        (ck,) = sorted(work.glob("checkpoints/step-*"))[-1:]
        raw, avg = load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors"))
        assert any(not torch.equal(raw[k].float(), avg[k]) for k in avg), "EMA equals the raw weights"
        return avg

    def check_lora(out: Path, work: Path) -> None:
        avg = final_ema(work)
        got = saved[str(out)]
        assert got and all(torch.equal(got[n].float(), avg["unet." + n]) for n in got), out

    baselines.ti_main(load_stage_config("ti", None, SMALL + ema), ds, sd21, tmp_path / "ti")
    table = final_ema(tmp_path / "ti.work" / "ti")
    (row,) = [v for k, v in table.items() if k.endswith("token_embedding.weight")]
    embeds = load_file(str(tmp_path / "ti" / EMBEDS_FILE))
    assert any(torch.allclose(embeds[t], r) for t in embeds for r in row), "saved TI vectors are not the EMA rows"
    baselines.ti_lora_main(load_stage_config("ti_lora", None, SMALL + ema), ds, sd21, tmp_path / "tl",
                           ti_dir=tmp_path / "ti")  # fmt: skip
    check_lora(tmp_path / "tl", tmp_path / "tl.work" / "lora")
    reward.main(load_stage_config("reward", None, SMALL + ema + ["sample_steps=2"]), ds, ann, "critic", "probe",
                sd21, tmp_path / "craft", start_dir=tmp_path / "tl")  # fmt: skip
    check_lora(tmp_path / "craft", tmp_path / "craft.work" / "draft")
    assert prompts_seen and all(p.endswith(", glands") and "<" not in p for p in prompts_seen), prompts_seen[:4]
    prompts_seen.clear()
    baselines.dpo_main(load_stage_config("dpo", None, SMALL + ema + ["n_pairs=2", "sample_steps=2"]), ds, ann,
                       "critic", "probe", sd21, tmp_path / "dpo", start_dir=tmp_path / "tl")  # fmt: skip
    check_lora(tmp_path / "dpo", tmp_path / "dpo.work" / "dpo")
    assert prompts_seen and all("<" not in p for p in prompts_seen), prompts_seen[:4]


def test_snapshot_from_s3_skips_the_pickle_decoys(s3_env, tmp_path, caplog):
    """An SD 2.1 snapshot on the object store: its .ckpt/.bin copies (GBs in a real one) are never downloaded."""
    from craft.storage.objectstore import ObjectStore

    d = build_sd21_dir(tmp_path / "sd21", "v_prediction")
    uri = f"s3://{s3_env.make_bucket()}/checkpoints/sd21"
    ObjectStore.from_env().upload_dir(d, uri)
    with caplog.at_level(logging.INFO, logger="craft.models.diffusion"):
        pipe = D.load_pipeline(uri, cache_dir=tmp_path / "cache")
    assert D.prediction_type(pipe.scheduler) == "v_prediction"
    local = D.resolve_model_dir(uri, tmp_path / "cache")  # the cached folder (a cache hit: nothing downloaded)
    fetched = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    decoys = {rel for rel in DECOYS if not rel.endswith(".safetensors")}
    assert decoys and not decoys & fetched, sorted(decoys & fetched)
    assert "not downloading pickle files" in caplog.text
    # a component with pickle weights only still arrives, so loading names it instead of missing weights
    shutil.copytree(d, tmp_path / "broken")
    (tmp_path / "broken" / "text_encoder" / "model.safetensors").unlink()
    ObjectStore.from_env().upload_dir(tmp_path / "broken", uri + "-broken")
    with pytest.raises(ValueError, match=r"'text_encoder' has only pickle weights"):
        D.load_pipeline(uri + "-broken", cache_dir=tmp_path / "cache2")
