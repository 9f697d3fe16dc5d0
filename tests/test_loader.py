"""Streaming columns and the latent / text-state caches (craft.data.loader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from craft.data import loader
from craft.data.manifest import read_manifest
from craft.models.diffusion import build_components
from craft.train.loop import LoopConfig, StepBatches, take, train
from tests.crafts_helpers import CLASSES, make_dataset, tiny_model_config

torch.set_num_threads(2)


@pytest.fixture
def ds(tmp_path):
    root = make_dataset(tmp_path / "ds", n=12, res=32)
    # one image stored at another size: the column resizes it like the eager loader did
    Image.fromarray(np.full((40, 24, 3), 90, np.uint8)).save(root / "images/003.png")
    return root


@pytest.fixture
def vae():
    return build_components(tiny_model_config(), CLASSES, seed=0).vae.eval()


def count_encodes(vae) -> list[int]:
    calls = [0]
    orig = vae.encode

    def counted(x, *a, **k):
        calls[0] += 1
        return orig(x, *a, **k)

    vae.encode = counted
    return calls


def eager_images(root: Path, df, res: int) -> torch.Tensor:
    """The pre-streaming loader (crafts.load_images before this module), kept here as the reference."""
    out = np.empty((len(df), res, res, 3), dtype=np.uint8)
    for i, rel in enumerate(df["image_path"].tolist()):
        with Image.open(root / rel) as im:
            im = im.convert("RGB")
            if im.size != (res, res):
                im = im.resize((res, res), Image.BICUBIC)
            out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def eager_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The pre-streaming encode (crafts.encode_latents before this module)."""
    outs = [
        vae.encode(pixels[i : i + 64]).latent_dist.mean * vae.config.scaling_factor for i in range(0, len(pixels), 64)
    ]
    return torch.cat(outs)


def test_columns_yield_the_eager_tensors(ds, vae, tmp_path):
    df = read_manifest(ds)
    pix = eager_images(ds, df, 32)
    col = loader.image_column(ds, df, 32)
    assert torch.equal(col[list(range(len(df)))], pix)
    assert torch.equal(col[torch.tensor([5, 0, 3])], pix[[5, 0, 3]])
    assert torch.equal(loader.image_column(ds, df, 32, "unit")[[3]], (pix[[3]] + 1) / 2)
    vae.register_to_config(scaling_factor=0.7)
    lat = loader.cached_latents(vae, ds, df, 32, root=tmp_path / "c")
    want = eager_latents(vae, pix)
    assert torch.equal(lat[list(range(len(df)))], want)
    assert torch.equal(lat.select_ids(["img007", "img002"])[[0, 1]], want[[7, 2]])
    # through the loop's DataLoader (one worker process too): the batches the in-memory dict gives
    eager = {"latents": want, "pixels": pix, "caption": df["caption"].tolist()}
    lazy = {"latents": lat, "pixels": col, "caption": df["caption"].tolist()}
    sampler = StepBatches(len(df), 5, seed=3, rank=0, world=1, start=2, end=6)
    for workers in (0, 1):
        got = list(loader.batch_loader(lazy, sampler, workers=workers))
        assert len(got) == 4
        for b, idx in zip(got, sampler):
            ref = take(eager, torch.tensor(idx))
            assert torch.equal(b["latents"], ref["latents"]) and torch.equal(b["pixels"], ref["pixels"])
            assert b["caption"] == ref["caption"]


def test_second_run_hits_the_cache_and_keys_miss(ds, vae, tmp_path):
    df = read_manifest(ds)
    root = tmp_path / "c"
    calls = count_encodes(vae)
    first = loader.cached_latents(vae, ds, df, 32, batch_size=5, root=root)
    assert calls[0] == 3  # 12 rows, 5 at a time
    again = loader.cached_latents(vae, ds, df, 32, batch_size=5, root=root)
    assert calls[0] == 3 and again.entry == first.entry  # hit: the encoder did not run
    # the scaling factor is applied on read, so the entry serves the VAE before and after it is set
    vae.register_to_config(scaling_factor=2.0)
    scaled = loader.cached_latents(vae, ds, df, 32, root=root)
    assert calls[0] == 3 and torch.equal(scaled[[1]], 2.0 * first[[1]])
    # misses: another resolution, another dataset version, other VAE weights
    loader.cached_latents(vae, ds, df, 16, root=root)
    assert calls[0] == 4
    (ds / "dataset_ref.json").write_text(json.dumps({"version": "0123456789abcdef"}))
    loader.cached_latents(vae, ds, df, 32, root=root)
    assert calls[0] == 5
    (ds / "dataset_ref.json").write_text(json.dumps({"version": "fedcba9876543210"}))
    loader.cached_latents(vae, ds, df, 32, root=root)
    assert calls[0] == 6
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    loader.cached_latents(vae, ds, df, 32, root=root)
    assert calls[0] == 7
    assert len([p for p in (root / "latents").iterdir() if p.is_dir()]) == 5


def test_dataset_version_follows_the_files_without_a_ref(ds):
    from craft.storage.datasets import local_version

    v1 = loader.dataset_version(ds)
    assert v1 == local_version(ds)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(ds / "images/000.png")
    v2 = loader.dataset_version(ds)
    assert v1 != v2 and loader.dataset_version(ds) == v2


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta", "other_key"])
def test_damaged_entry_is_detected_and_recomputed(ds, vae, tmp_path, damage, caplog):
    df = read_manifest(ds)
    root = tmp_path / "c"
    good = loader.cached_latents(vae, ds, df, 32, root=root)
    want = good[list(range(len(df)))]
    data, meta = good.entry / "data.npy", good.entry / "meta.json"
    key = json.loads(meta.read_text())["key"]
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "flip":  # same size, one byte of the latents altered
        raw = bytearray(data.read_bytes())
        raw[-7] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "no_meta":
        meta.unlink()
    else:
        m = json.loads(meta.read_text())
        m["key"]["resolution"] = 99
        meta.write_text(json.dumps(m))
    loader._VERIFIED.clear()  # as in a new process
    with pytest.raises(loader.CorruptCacheError):
        loader.check_entry(good.entry, key)
    calls = count_encodes(vae)
    with caplog.at_level("WARNING", logger="craft.data.loader"):
        again = loader.cached_latents(vae, ds, df, 32, root=root)
    assert calls[0] == 1 and "recomputing" in caplog.text
    assert torch.equal(again[list(range(len(df)))], want)
    assert loader.check_entry(again.entry, key)["n"] == len(df)


def test_stage_subsets_share_one_entry(ds, vae, tmp_path, monkeypatch):
    from craft.train.crafts import stage_latents

    monkeypatch.setenv("CRAFT_CACHE_DIR", str(tmp_path / "env-cache"))
    df = read_manifest(ds)
    train_rows = df[df["split"] == "train"].reset_index(drop=True)
    calls = count_encodes(vae)
    full = stage_latents(vae, ds, train_rows, 32, LoopConfig(encode_batch=64))
    subset = stage_latents(vae, ds, train_rows.iloc[[4, 1]], 32, LoopConfig())
    assert calls[0] == 1 and full.entry == subset.entry and full.entry.parent == tmp_path / "env-cache" / "latents"
    assert torch.equal(subset[[0, 1]], full[[4, 1]])


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("CRAFT_CACHE_DIR", raising=False)
    monkeypatch.setenv("CRAFT_MODEL_CACHE", str(tmp_path / "models"))
    assert loader.cache_root() == tmp_path / "models" / "data-cache"
    monkeypatch.setenv("CRAFT_CACHE_DIR", str(tmp_path / "x"))
    assert loader.cache_root() == tmp_path / "x"


def test_text_states_cached_once_and_equal_to_the_encoder(tmp_path):
    from craft.models.diffusion import encode_text

    comp = build_components(tiny_model_config(), CLASSES, seed=0)
    te = comp.text_encoder.eval()
    calls = [0]
    orig = te.forward

    def counted(*a, **k):
        calls[0] += 1
        return orig(*a, **k)

    te.forward = counted
    prompts = ["normal tissue", "adenocarcinoma", "normal tissue", "adenocarcinoma", "glands"]
    col = loader.cached_text_states(comp.tokenizer, te, prompts, batch_size=2, root=tmp_path)
    assert calls[0] == 2 and len(col) == 5  # 3 distinct prompts, 2 at a time
    again = loader.cached_text_states(comp.tokenizer, te, prompts, root=tmp_path)
    assert calls[0] == 2 and again.entry == col.entry
    with torch.no_grad():
        want, _ = encode_text(comp.tokenizer, te, prompts)
    assert torch.allclose(col[list(range(5))], want, atol=1e-6)


def test_loop_trains_the_same_on_lazy_and_eager_columns(ds, vae, tmp_path):
    """A run on cached latents + streamed pixels ends at the weights of the same run on in-memory tensors."""
    df = read_manifest(ds)
    lat = loader.cached_latents(vae, ds, df, 32, root=tmp_path / "c")

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, batch, generator):
            feats = torch.stack([batch["latents"].mean(dim=(1, 2, 3)), batch["pixels"].mean(dim=(1, 2, 3))], 1)
            return {"loss": ((feats @ self.w - 1.0) ** 2).mean()}

    cfg = dict(steps=6, batch_size=5, lr=0.05, progress=False, seed=1)
    eager = {"latents": lat[list(range(len(df)))], "pixels": eager_images(ds, df, 32)}
    lazy = {"latents": lat, "pixels": loader.image_column(ds, df, 32)}
    weights = []
    for i, (data, workers) in enumerate(((eager, 0), (lazy, 0), (lazy, 2))):
        torch.manual_seed(0)
        m = Probe()
        train(m, data, LoopConfig(**cfg, data_workers=workers), tmp_path / f"run{i}")
        weights.append(m.w.detach().clone())
    assert not torch.equal(weights[0], torch.zeros(2))
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])


def test_lora_objectives_take_cached_states(tmp_path):
    """TI+LoRA / DPO train on cached states of their frozen text encoder: the same loss as encoding per batch."""
    from craft.train.baselines import LoRADiffusionObjective

    comp = build_components(tiny_model_config(), CLASSES, seed=0)
    model = LoRADiffusionObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler)
    prompts = ["normal tissue", "adenocarcinoma", "normal tissue"]
    z0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    states = loader.cached_text_states(comp.tokenizer, comp.text_encoder, prompts, root=tmp_path)
    with torch.no_grad():
        plain = model({"latents": z0, "prompt": prompts}, torch.Generator().manual_seed(1))["loss"]
        cached = model({"latents": z0, "prompt": prompts, "states": states[[0, 1, 2]]},
                       torch.Generator().manual_seed(1))["loss"]  # fmt: skip
    assert torch.allclose(plain, cached, rtol=1e-5)
