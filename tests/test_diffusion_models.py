"""Model factory: presets, offline tokenizer, save/load round trip through the real-checkpoint loader, sampling."""

from __future__ import annotations

import json

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


def test_loader_refuses_pickles_and_non_pipelines(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        D.load_pipeline(tmp_path)
    comp = D.build_components(tiny_model_config(), CLASSES)
    D.save_pipeline(comp.pipeline(), tmp_path / "m")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not allowed")
    with pytest.raises(ValueError, match="safetensors only"):
        D.load_pipeline(tmp_path / "m")


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
    assert D.read_lineage(next((tmp_path / "cache").iterdir()))["parent"] is None
