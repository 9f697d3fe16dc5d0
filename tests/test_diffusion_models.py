"""Model factory: presets, offline tokenizer, save/load round trip through the real-checkpoint loader, sampling."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
import torch

from craft.models import diffusion as D
from craft.sample import generate, sample
from tests.crafts_helpers import CLASSES, tiny_model_config

torch.set_num_threads(2)


def test_tokenizer_is_offline_bounded_and_knows_class_phrases(tmp_path):
    tok = D.build_tokenizer(["mucinous carcinoma"], max_length=12)
    assert tok.model_max_length == 12
    ids = tok("mucinous carcinoma, pale glands", padding="max_length", max_length=12, truncation=True).input_ids
    assert len(ids) == 12 and ids[0] == tok.bos_token_id
    for word in ("mucinous", "carcinoma", "normal"):  # known words: BPE pieces, fewer than characters
        w_ids = tok(word).input_ids[1:-1]
        assert len(w_ids) < len(word) and tok.decode(w_ids) == word
    unknown = tok("zzqx").input_ids  # unknown words still tokenize (characters)
    assert tok.unk_token_id not in unknown[1:-1]
    tok.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert (
        again.model_max_length == 12 and again("mucinous carcinoma").input_ids == tok("mucinous carcinoma").input_ids
    )


@pytest.mark.parametrize(("preset", "unet_m"), [("sd15", 859.5), ("sd21", 865.9)])
def test_full_size_presets_match_published_unet_sizes(preset, unet_m):
    with torch.device("meta"):  # no memory: only shapes
        comp = D.build_components(D.ModelConfig(preset=preset, resolution=512))
    n = sum(p.numel() for p in comp.unet.parameters()) / 1e6
    assert n == pytest.approx(unet_m, abs=0.5)
    assert comp.tokenizer.model_max_length == 77
    assert comp.scheduler.config.clip_sample is False


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    comp = D.build_components(tiny_model_config(), CLASSES, seed=3)
    pipe = comp.pipeline()
    a = generate(pipe, ["adenocarcinoma", "normal"], steps=3, guidance=3.0, seed=5)
    D.save_pipeline(pipe, tmp_path / "m", {"parent": None, "dataset": {"name": "tiny"}})
    assert not list((tmp_path / "m").rglob("*.bin")), "weights must be safetensors"
    lin = json.loads((tmp_path / "m" / D.LINEAGE).read_text())
    assert lin["dataset"] == {"name": "tiny"} and lin["code_version"]
    loaded = D.load_pipeline(tmp_path / "m")
    b = generate(loaded, ["adenocarcinoma", "normal"], steps=3, guidance=3.0, seed=5)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    c = generate(loaded, ["adenocarcinoma", "normal"], steps=3, guidance=3.0, seed=6)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))  # the seed matters


def test_loader_ignores_pickles_beside_safetensors_and_refuses_pickle_only_components(tmp_path, caplog):
    import logging

    with pytest.raises(FileNotFoundError, match="model_index.json"):
        D.load_pipeline(tmp_path)
    comp = D.build_components(tiny_model_config(), CLASSES)
    D.save_pipeline(comp.pipeline(), tmp_path / "m")
    # not a valid pickle: a loader that unpickled it would crash
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    (tmp_path / "m" / "model.ckpt").write_bytes(b"not a pickle either")
    with caplog.at_level(logging.INFO, logger="craft.models.diffusion"):
        pipe = D.load_pipeline(tmp_path / "m")
    assert pipe.unet is not None
    assert "ignoring pickle files model.ckpt, unet/diffusion_pytorch_model.bin" in caplog.text
    assert D.pickle_files(tmp_path / "m") == ["model.ckpt", "unet/diffusion_pytorch_model.bin"]
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # the UNet now has pickle weights only
    with pytest.raises(
        ValueError, match=r"component 'unet' has only pickle weights \(unet/diffusion_pytorch_model.bin\)"
    ):
        D.load_pipeline(tmp_path / "m")


def test_doctests_pass():
    res = doctest.testmod(D)
    assert res.attempted >= 3 and res.failed == 0


def test_training_target_and_x0_estimate_match_hand_computation():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction")  # SD 2.1's schedule  # fmt: skip
    t = torch.tensor([10, 500, 990])
    x0 = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1, 1)
    eps = torch.tensor([1.5, 0.25, -0.75]).view(3, 1, 1, 1)
    abar = D.alpha_bar(sched, t)
    assert abar.shape == (3, 1, 1, 1)
    # by hand from the betas: abar_t = prod_{s<=t} (1 - beta_s), beta linear in sqrt between the two ends
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2 for i in range(1000)]
    hand_abar = [math.prod(1 - b for b in betas[: k + 1]) for k in t.tolist()]
    assert abar.flatten().tolist() == pytest.approx(hand_abar, rel=1e-5)
    a, s = [math.sqrt(x) for x in hand_abar], [math.sqrt(1 - x) for x in hand_abar]
    x0l, epsl = x0.flatten().tolist(), eps.flatten().tolist()
    v_hand = [a[i] * epsl[i] - s[i] * x0l[i] for i in range(3)]  # v = alpha_t eps - sigma_t x0 (Salimans & Ho)
    xt_hand = [a[i] * x0l[i] + s[i] * epsl[i] for i in range(3)]
    assert D.prediction_type(sched) == "v_prediction"
    v = D.training_target("v_prediction", x0, eps, abar)
    assert v.flatten().tolist() == pytest.approx(v_hand, rel=1e-5, abs=1e-6)
    assert torch.allclose(v, sched.get_velocity(x0, eps, t), atol=1e-6)  # what diffusers' v models train on
    xt = D.add_noise(x0, eps, abar)
    assert xt.flatten().tolist() == pytest.approx(xt_hand, rel=1e-5, abs=1e-6)
    assert torch.allclose(xt, sched.add_noise(x0, eps, t), atol=1e-6)
    # x0_hat = alpha_t x_t - sigma_t v (v model), (x_t - sigma_t eps) / alpha_t (eps model)
    x0_v = [a[i] * xt_hand[i] - s[i] * v_hand[i] for i in range(3)]
    assert D.predicted_x0("v_prediction", xt, v, abar).flatten().tolist() == pytest.approx(x0_v, rel=1e-4, abs=1e-5)
    assert x0_v == pytest.approx(x0l, rel=1e-6)
    assert torch.allclose(D.predicted_x0("epsilon", xt, eps, abar), x0, atol=1e-4)
    assert torch.equal(D.training_target("epsilon", x0, eps, abar), eps)
    assert torch.equal(D.training_target("sample", x0, eps, abar), x0)
    assert torch.equal(D.predicted_x0("sample", xt, x0, abar), x0)
    with pytest.raises(ValueError, match="flow_prediction"):
        D.training_target("flow_prediction", x0, eps, abar)
    with pytest.raises(ValueError, match="flow_prediction"):
        D.predicted_x0("flow_prediction", xt, eps, abar)
    sched.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="not supported"):
        D.prediction_type(sched)


def test_model_resolution_is_unet_implied_not_the_vae_config():
    comp = D.build_components(tiny_model_config(), CLASSES)  # 32 px, VAE factor 2, UNet sample_size 16
    comp.vae.register_to_config(sample_size=768)  # what every SD 2.x vae/config.json declares
    assert D.vae_factor(comp.vae) == 2 and D.model_resolution(comp.unet, comp.vae) == 32
    img = generate(comp.pipeline(), ["normal"], steps=1, seed=0)[0]
    assert img.size == (32, 32)


def test_sample_cli_function_writes_pngs_and_grid(tmp_path):
    comp = D.build_components(tiny_model_config(), CLASSES)
    D.save_pipeline(comp.pipeline(), tmp_path / "m")
    out = sample(str(tmp_path / "m"), ["normal", "adenocarcinoma"], n=2, out_dir=tmp_path / "s", steps=2,
                 scheduler="ddpm")  # fmt: skip
    assert sorted(p.name for p in (out / "normal").iterdir()) == ["000.png", "001.png"]
    from PIL import Image

    assert Image.open(out / "grid.png").size == (2 * 32, 2 * 32)


def test_load_pipeline_from_s3_prefix(s3_env, tmp_path):
    from craft.storage.objectstore import ObjectStore

    comp = D.build_components(tiny_model_config(), CLASSES, seed=4)
    D.save_pipeline(comp.pipeline(), tmp_path / "m", {"parent": None})
    bucket = s3_env.make_bucket()
    uri = f"s3://{bucket}/models/tiny"
    ObjectStore.from_env().upload_dir(tmp_path / "m", uri)
    a = generate(D.load_pipeline(tmp_path / "m"), ["normal"], steps=2, seed=1)
    b = generate(D.load_pipeline(uri, cache_dir=tmp_path / "cache"), ["normal"], steps=2, seed=1)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert D.read_lineage(D.resolve_model_dir(uri, tmp_path / "cache"))["parent"] is None
