"""ControlNet on the foundation model: conditioning shapes, frozen base, save/load, conditional sampling, metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from craft.config import load_stage_config
from craft.data.conditions import encode_mask, load_conditions
from craft.data.demo import DemoConfig, generate
from craft.evaluate.controlnet_eval import (
    compare,
    mask_adherence,
    mask_dice,
    otsu_threshold,
    segment_nuclei,
    stain_concentrations,
)
from craft.models.diffusion import (
    PRESETS,
    Components,
    ModelConfig,
    build_components,
    read_lineage,
    save_pipeline,
    vae_factor,
)
from craft.sample import controlnet_pipeline, generate_controlnet, load_controlnet
from craft.train.controlnet import (
    ControlNetConfig,
    ControlNetObjective,
    build_controlnet,
    conditioning_channels,
    train_controlnet,
)
from craft.train.loop import LoopConfig

torch.set_num_threads(2)

SMALL = dict(unet_channels=[16, 32], vae_channels=[8, 16], text_hidden=32, text_layers=1, max_length=16)


def _comp(res: int = 32, seed: int = 0) -> Components:
    return build_components(ModelConfig(preset="tiny", resolution=res, **SMALL), ["normal"], seed=seed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "histo"
    generate(DemoConfig(modality="histo", n=32, seed=0, resolution=32, images_per_patient=2), out)
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    comp = _comp()
    return save_pipeline(comp.pipeline(), tmp_path_factory.mktemp("m") / "base", {"stage": "finetune"})


def _perturb_zero_convs(cn, seed: int = 1) -> None:
    # A fresh ControlNet's zero convolutions make it a no-op; give them small weights so the condition matters.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if "zero_conv" in name or "controlnet_" in name or "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------- conditioning shapes


def test_conditioning_levels_follow_vae_factor():
    assert conditioning_channels(8) == (16, 32, 96, 256)
    assert conditioning_channels(4) == (16, 32, 64)
    assert conditioning_channels(2, [8, 8]) == (8, 8)
    with pytest.raises(ValueError, match="needs 3"):
        conditioning_channels(4, [16, 32, 96, 256])
    with pytest.raises(ValueError, match="power of two"):
        conditioning_channels(6)


@pytest.mark.parametrize("preset", ["tiny", "sd15", "sd21"])
def test_preset_vae_factor_matches_conditioning_embedding(preset):
    # By config only for the full-size presets: the stride-2 count of the embedding equals the VAE factor.
    factor = 2 ** (len(PRESETS[preset]["vae_channels"]) - 1)
    ch = conditioning_channels(factor)
    assert 2 ** (len(ch) - 1) == factor
    if preset == "tiny":  # forward pass: the embedding lands exactly on the latent grid
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

        res = 32
        emb = ControlNetConditioningEmbedding(4, 3, ch)
        assert emb(torch.zeros(1, 3, res, res)).shape == (1, 4, res // factor, res // factor)


def test_built_controlnet_embedding_matches_latents():
    comp = _comp()
    cn = build_controlnet(comp.unet, comp.vae)
    f = vae_factor(comp.vae)
    assert f == 2 and tuple(cn.config.conditioning_embedding_out_channels) == (16, 32)
    out = cn.controlnet_cond_embedding(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, cn.config.block_out_channels[0], 32 // f, 32 // f)
    with pytest.raises(ValueError, match="levels"):
        build_controlnet(comp.unet, comp.vae, [16, 32, 64])


def test_encode_mask_channels():
    m = np.zeros((8, 8), np.uint16)
    m[1:4, 1:7] = 1
    m[4:7, 1:7] = 2  # touching nucleus: the boundary channel separates them
    e = encode_mask(m)
    assert e.dtype == np.uint8 and e.shape == (8, 8, 3)
    assert (e[..., 0] > 0).sum() == 36 and e[..., 2].max() == 0
    assert e[3, 3, 1] == 255 and e[4, 3, 1] == 255  # the shared border is marked on both sides
    assert e[2, 3, 1] == 0 and e[5, 3, 1] == 0  # interiors are not


def test_load_conditions_both_kinds(dataset):
    from craft.data.manifest import read_manifest

    df = read_manifest(dataset).head(3)
    for kind in ("mask", "fluorescence"):
        c = load_conditions(dataset, df, kind, 32)
        assert c.shape == (3, 3, 32, 32) and 0 <= float(c.min()) and float(c.max()) <= 1
    fl = load_conditions(dataset, df, "fluorescence", 32)
    assert torch.equal(fl[:, 0], fl[:, 1])
    bad = df.copy()
    bad["condition_path"] = None
    with pytest.raises(ValueError, match="condition_path"):
        load_conditions(dataset, bad, "fluorescence", 32)


def test_imported_pairs_feed_controlnet_conditions(tmp_path):
    from craft.data.manifest import read_manifest
    from craft.data.paired import PairedImportConfig, main
    from tests.test_paired_import import _consep_tree, _inst

    rng = np.random.default_rng(5)
    _consep_tree(tmp_path / "CoNSeP", rng)
    out = main(PairedImportConfig(layout="consep"), tmp_path / "CoNSeP", tmp_path / "ds")
    c = load_conditions(out, read_manifest(out), "mask", 16)
    assert c.shape == (3, 3, 16, 16) and float(c[0, 0].sum()) == float((_inst() > 0).sum())


# ---------------------------------------------------------------- training


def test_training_step_changes_only_controlnet(tmp_path):
    comp = _comp()
    cn = build_controlnet(comp.unet, comp.vae)
    frozen = {k: copy.deepcopy(m.state_dict()) for k, m in
              (("unet", comp.unet), ("vae", comp.vae), ("text", comp.text_encoder))}  # fmt: skip
    cn_before = copy.deepcopy(cn.state_dict())
    model = ControlNetObjective(cn, comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, 0.0)
    assert set(k.split(".")[0] for k in model.state_dict()) == {"controlnet"}
    from craft.train.loop import train

    n = 4
    data = {"latents": torch.randn(n, 4, 16, 16), "cond": torch.rand(n, 3, 32, 32), "prompt": ["a tissue"] * n}
    loop = LoopConfig(steps=1, batch_size=2, lr=1e-3, progress=False, gradient_checkpointing=True)
    train(model, data, loop, tmp_path)
    for name, m in (("unet", comp.unet), ("vae", comp.vae), ("text", comp.text_encoder)):
        after = m.state_dict()
        assert all(torch.equal(frozen[name][k], after[k]) for k in after), name
    changed = [k for k, v in cn.state_dict().items() if not torch.equal(cn_before[k], v)]
    assert changed and any("zero_conv" in k or "controlnet_" in k for k in changed)


def test_train_controlnet_stage_save_load_and_sample(tmp_path, dataset, base_dir):
    loop = LoopConfig(steps=2, batch_size=2, lr=1e-3, progress=False, checkpoint_every=1)
    cfg = ControlNetConfig(condition="mask", loop=loop, val_images=1, sample_steps=1)
    out = tmp_path / "cn"
    metrics = train_controlnet(cfg, dataset, base_dir, out)
    assert metrics["steps"] == 2.0 and np.isfinite(metrics["loss"])
    assert (out / "diffusion_pytorch_model.safetensors").is_file()
    lin = read_lineage(out)
    assert lin["condition"] == "mask" and lin["base_stage"] == "finetune" and lin["stage"] == "controlnet"
    work = tmp_path / "cn.work" / "controlnet"
    assert (work / "samples" / "step-0000002" / "triplets.png").is_file()
    assert any((work / "tb").iterdir())
    # resume: a finished run does no more steps and saves the same weights again
    from safetensors.torch import load_file

    first = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    again = train_controlnet(cfg, dataset, base_dir, tmp_path / "cn")
    assert again["steps"] == 2.0
    second = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    # sample from the saved model via the CLI-level function
    from craft.data.manifest import read_manifest

    mask = dataset / read_manifest(dataset)["mask_path"].iloc[0]
    from typer.testing import CliRunner

    from craft.cli import app

    s = tmp_path / "s"
    res = CliRunner().invoke(app, ["sample", str(base_dir), "--prompt", "", "--out", str(s), "--n", "2", "--steps", "1",
                                   "--controlnet", str(out), "--condition", str(mask)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (s / "grid.png").is_file() and (s / "001.png").is_file()
    assert read_lineage(out)["prompt"] in (s / "samples.json").read_text()
    assert read_lineage(out)["conditioning_channels"] == [16, 32]


def test_save_load_round_trip_identical_outputs(tmp_path):
    from craft.train.controlnet import save_controlnet

    comp = _comp()
    cn = build_controlnet(comp.unet, comp.vae)
    _perturb_zero_convs(cn)
    save_controlnet(cn, tmp_path / "cn", {"condition": "mask"})
    cn2 = load_controlnet(tmp_path / "cn")
    cn.eval()
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.rand(1, 3, 32, 32)
    h = torch.randn(1, 16, 32)
    sd1, sd2 = cn.state_dict(), cn2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    cn3 = load_controlnet(tmp_path / "cn")
    with torch.no_grad():
        a, b, d = (m(x, t, encoder_hidden_states=h, controlnet_cond=c, return_dict=False) for m in (cn, cn2, cn3))
    for u, v, w in zip(list(a[0]) + [a[1]], list(b[0]) + [b[1]], list(d[0]) + [d[1]]):
        assert torch.equal(v, w)  # two loads: bit-identical
        # vs the in-memory original: equal weights; from_unet leaves some weights non-contiguous, which can
        # pick another conv kernel and differ in the last float bits
        assert torch.allclose(u, v, rtol=0, atol=1e-5)
    assert read_lineage(tmp_path / "cn")["condition"] == "mask"


def test_conditional_sampling_shape_and_condition_dependence():
    comp = _comp()
    cn = build_controlnet(comp.unet, comp.vae)
    _perturb_zero_convs(cn)
    pipe = controlnet_pipeline(comp, cn)
    c1 = torch.zeros(1, 3, 32, 32)
    c2 = torch.zeros(1, 3, 32, 32)
    c2[:, 0, 8:24, 8:24] = 1.0
    kw = dict(steps=2, guidance=1.0, seed=0)
    a = generate_controlnet(pipe, torch.cat([c1, c1]), ["tissue"] * 2, **kw)
    b = generate_controlnet(pipe, torch.cat([c1, c2]), ["tissue"] * 2, **kw)
    assert len(a) == 2 and a[0].size == (32, 32) and a[0].mode == "RGB"
    arr = [np.asarray(im, np.int16) for im in a + b]
    assert np.array_equal(arr[0], arr[2])  # same condition, same seed position -> identical
    assert np.abs(arr[1] - arr[3]).mean() > 0.5  # a different condition changes the image
    with pytest.raises(ValueError, match="prompts"):
        generate_controlnet(pipe, c1, ["a", "b"], **kw)


def test_config_from_profile_and_validation():
    cfg = load_stage_config("controlnet", None, ["condition=fluorescence", "loop.steps=3"])
    assert cfg.condition == "fluorescence" and cfg.loop.steps == 3 and "fluorescence" in cfg.text()
    from craft.config import ConfigError

    with pytest.raises(ConfigError, match="condition"):
        load_stage_config("controlnet", None, ["condition=depth"])
    with pytest.raises(ConfigError, match="conditions"):
        load_stage_config("controlnet", None, ["conditions=[mask,edges]"])
    demo = load_stage_config("controlnet", "demo-histo", [])
    assert demo.enabled and set(demo.conditions) == {"mask", "fluorescence"}


# ---------------------------------------------------------------- metrics


def _blobs(centres, size=32, r=3):
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 170, 210)  # eosin-pink background
    m = np.zeros((size, size), np.uint16)
    for k, (cy, cx) in enumerate(centres, 1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[inside] = (75, 45, 140)  # hematoxylin-purple nucleus
        m[inside] = k
    return img, m


def test_deconvolution_separates_hematoxylin():
    c = stain_concentrations(np.array([[[75, 45, 140], [235, 170, 210], [255, 255, 255]]], np.uint8))
    assert c[0, 0, 0] > c[0, 1, 0] > c[0, 2, 0] - 1e-9  # purple > pink > white in H
    assert abs(c[0, 2]).max() < 1e-6  # white is no stain at all


def test_mask_adherence_hand_made():
    img, m = _blobs([(8, 8), (20, 22), (24, 8)])
    assert mask_adherence(img, m) == pytest.approx(1.0)
    assert mask_dice(img, m) == pytest.approx(1.0)
    elsewhere, _ = _blobs([(8, 24), (22, 14), (4, 16)])
    assert mask_adherence(elsewhere, m) < 0.2
    blank = np.full((32, 32, 3), 235, np.uint8)
    assert np.isnan(mask_adherence(blank, m)) and not segment_nuclei(blank).any()
    assert otsu_threshold([0, 0, 0, 1, 1, 1]) == pytest.approx(0.5, abs=0.01)


def test_compare_writes_table_and_grids(tmp_path, dataset, base_dir):
    from craft.train.controlnet import save_controlnet

    comp = _comp()
    runs = {}
    for name, seed in (("crafts-mask", 1), ("base-mask", 2)):
        cn = build_controlnet(comp.unet, comp.vae)
        _perturb_zero_convs(cn, seed)
        save_controlnet(cn, tmp_path / name, {"condition": "mask", "base_stage": name.split("-")[0]})
        runs[name] = (tmp_path / name, base_dir)
    table = compare(runs, dataset, tmp_path / "cmp", n=3, steps=1)
    assert list(table["run"]) == ["crafts-mask", "base-mask"]
    for col in ("ssim", "mse", "ncc", "psnr", "mask_adherence", "real_mask_adherence"):
        assert col in table.columns
    assert table["real_mask_adherence"].iloc[0] > 0.7  # the segmenter itself agrees with the demo masks
    for f in ("metrics.json", "table.md", "report.html", "triplets-crafts-mask.png", "per_image-base-mask.csv"):
        assert (tmp_path / "cmp" / f).is_file()
    assert "fid" not in table.columns and "fid_note" in table.columns

    # the pipeline step: runs named from lineage, self-contained HTML, domain FID in an evaluator's embedding
    from craft.evaluate.controlnet_eval import compare_step
    from craft.models.diffusion import build_tokenizer
    from craft.models.encoders import save_encoder
    from craft.train.encoder import EncoderSpec, build_model

    tok = build_tokenizer([], 16)
    enc, pre = build_model(EncoderSpec(arch="clip", seed=1, embed_dim=16, width=16, layers=1, heads=2), 32, tok, 16)
    save_encoder(enc, tok, tmp_path / "evaluator", pre)
    flat = compare_step(runs["crafts-mask"][0], base_dir, runs["base-mask"][0], base_dir, dataset,
                        tmp_path / "html" / "triplets.html", None, ["eval_images=3", "sample_steps=1"],
                        evaluator=str(tmp_path / "evaluator"))  # fmt: skip
    assert (tmp_path / "html" / "triplets.html").read_text().count("data:image/png;base64") == 2
    assert np.isfinite(flat["crafts-mask.fid"]) and flat["crafts-mask.fid"] >= 0
    assert {"base-mask.ssim", "base-mask.mask_adherence", "crafts-mask.n"} <= set(flat)


def test_cli_rejects_bad_run_spec(tmp_path):
    from typer.testing import CliRunner

    from craft.cli import app

    res = CliRunner().invoke(app, ["compare-controlnets", str(tmp_path), "--run", "nodirs", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "NAME=CONTROLNET_DIR:BASE_DIR" in str(res.exception or res.output)
    res = CliRunner().invoke(app, ["train", "controlnet", "--help"])
    assert res.exit_code == 0 and "--condition" in res.output
