"""Dual encoders, role separation, encoder training and the DD probe (CRAFT sec. 3.2, 4.1.4, A.1-A.2)."""

import shutil
from pathlib import Path

import pytest
import torch

from craft.config import ConfigError, load_stage_config
from craft.models.diffusion import build_tokenizer
from craft.models.encoders import (
    ClinicalAlignmentModule,
    EncodersConfig,
    LinearProbe,
    check_distinct,
    load_encoder,
    load_probe,
    load_role_encoders,
    save_encoder,
    save_probe,
)
from craft.train.encoder import EncoderSpec, EncoderTrainConfig, build_model, train_encoder
from craft.train.probe import ProbeConfig, fit_probe, train_probe

torch.set_num_threads(1)

CHECKLIST = {
    c: [{"attribute": a, "description": f"{c} {a} look"} for a in ("Location", "Lesion Type", "Color")]
    for c in ("no_finding", "cardiomegaly", "pleural_effusion", "pneumonia")
}


def tiny(arch: str, seed: int, tmp: Path, size: int = 16) -> Path:
    tok = build_tokenizer(["pleural effusion"], 16)
    model, pre = build_model(EncoderSpec(arch=arch, seed=seed, embed_dim=16, width=16, layers=1, heads=2,
                                         patch_size=8), size, tok, 16)  # fmt: skip
    return save_encoder(model, tok, tmp / f"{arch}-{seed}", pre, {"test": True})


@pytest.fixture(scope="module")
def encs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("enc")
    return {a: tiny(a, s, tmp) for a, s in (("siglip", 0), ("clip", 1))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from craft.data.demo import DemoConfig, generate

    return generate(DemoConfig(modality="cxr", n=48, seed=0, resolution=32), tmp_path_factory.mktemp("d") / "cxr")


@pytest.mark.parametrize("arch", ["siglip", "clip"])
def test_round_trip_gives_identical_embeddings(encs, arch, tmp_path):
    enc = load_encoder(encs[arch])
    assert enc.family == arch and enc.image_size == (16, 16)
    copy = tmp_path / "copy"
    save_encoder(enc.model, enc.tokenizer, copy, {**_pre(encs[arch])})
    again = load_encoder(copy)
    x = torch.rand(3, 3, 24, 24)
    torch.testing.assert_close(enc.encode_images(x), again.encode_images(x), rtol=0, atol=0)
    texts = ["pleural effusion", "a small heart"]
    torch.testing.assert_close(enc.encode_texts(texts), again.encode_texts(texts), rtol=0, atol=0)
    assert enc.identity == again.identity
    e = enc.encode_images(x)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    assert enc.encode_texts(texts).shape == (2, enc.embed_dim) == (2, e.shape[1])


def _pre(d: Path) -> dict:
    import json

    return json.loads((d / "preprocessor_config.json").read_text())


def test_gradients_reach_pixels_not_encoder(encs):
    enc = load_encoder(encs["siglip"])
    assert all(not p.requires_grad for p in enc.model.parameters())
    assert not enc.model.training
    x = torch.rand(2, 1, 20, 20, requires_grad=True)  # grayscale, resized inside
    probe = LinearProbe(enc.embed_dim, list(CHECKLIST), enc.identity)
    cam = ClinicalAlignmentModule(enc, probe, CHECKLIST)
    r = cam(x, ["pneumonia", "no_finding"], ["lung opacity", "clear lungs"], references=torch.rand(2, 3, 16, 16))
    assert set(r) == {"vdc", "ccs", "dd", "sfs"} and all(v.shape == (2,) for v in r.values())
    from craft.losses import clinical_reward

    clinical_reward(r).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.model.parameters())
    assert all(p.grad is None for p in probe.parameters())
    with pytest.raises(ValueError, match="frozen"):
        enc.requires_grad_(True)


def test_cam_accuracy_mode_and_checks(encs):
    enc = load_encoder(encs["clip"])
    probe = LinearProbe(enc.embed_dim, list(CHECKLIST), enc.identity)
    cam = ClinicalAlignmentModule(enc, probe, CHECKLIST, checklist_mode="joined", dd="accuracy")
    r = cam(torch.rand(2, 3, 16, 16), ["pneumonia", "no_finding"], ["a", "b"])
    assert "sfs" not in r and set(r["dd"].tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="not a probe class"):
        cam(torch.rand(1, 3, 16, 16), ["fracture"], ["a"])
    with pytest.raises(ValueError, match="no checklist"):
        ClinicalAlignmentModule(enc, probe, {"pneumonia": CHECKLIST["pneumonia"]})
    other = LinearProbe(enc.embed_dim, list(CHECKLIST), "f" * 64)
    with pytest.raises(ValueError, match="trained on encoder"):
        ClinicalAlignmentModule(enc, other, CHECKLIST)


def test_same_model_refused_in_both_roles(encs, tmp_path):
    with pytest.raises(ValueError, match="same model"):
        EncodersConfig(critic=str(encs["siglip"]), evaluator=str(encs["siglip"]) + "/").validate()
    with pytest.raises(ConfigError, match="same model"):
        load_stage_config("encoders", None, [f"critic={encs['clip']}", f"evaluator={encs['clip']}"])
    copy = tmp_path / "copy-of-critic"
    shutil.copytree(encs["siglip"], copy)
    cfg = EncodersConfig(critic=str(encs["siglip"]), evaluator=str(copy))
    cfg.validate()  # different paths pass the config check ...
    with pytest.raises(ValueError, match="same weights"):  # ... the loaded weights do not
        load_role_encoders(cfg)
    ok = load_role_encoders(EncodersConfig(critic=str(encs["siglip"]), evaluator=str(encs["clip"])))
    assert set(ok) == {"critic", "evaluator"}
    check_distinct(ok)


def test_load_encoder_refuses_bad_dirs(encs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(tmp_path)
    bad = tmp_path / "pickled"
    shutil.copytree(encs["clip"], bad)
    (bad / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        load_encoder(bad)


def test_probe_easy_case_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.arange(90) % 3
    emb = torch.nn.functional.normalize(centers[y] + 0.1 * torch.randn(90, 8, generator=g), dim=1)
    labels = [("a", "b", "c")[i] for i in y]
    probe = fit_probe(emb, labels, ["a", "b", "c"], ProbeConfig(lr=0.05, batch_size=32), "idx")
    assert (probe(emb).argmax(1) == y).float().mean() > 0.95
    save_probe(probe, tmp_path / "p")
    back = load_probe(tmp_path / "p")
    assert back.classes == ["a", "b", "c"] and back.encoder_identity == "idx"
    torch.testing.assert_close(back(emb), probe(emb))
    assert not any(p.requires_grad for p in back.parameters())


def test_encoder_training_reduces_loss_and_probe_learns(demo, tmp_path):
    cfg = EncoderTrainConfig(
        critic=EncoderSpec(arch="siglip", seed=0, embed_dim=32, width=32, layers=1, heads=2, patch_size=8),
        evaluator=EncoderSpec(arch="clip", seed=1, embed_dim=32, width=32, layers=1, heads=2, patch_size=8),
        image_size=16, max_length=24, epochs=30, batch_size=16, lr=3e-3, threads=1, checklist="demo-cxr",
    )  # fmt: skip
    m = train_encoder(cfg, "critic", demo, tmp_path / "critic", max_steps=24)
    assert m["steps"] == 24 and m["loss_last"] < m["loss_first"]
    assert m["n_checklist_texts"] == 20  # 4 classes x 5 checklist items as extra class texts
    enc = load_encoder(tmp_path / "critic")
    assert enc.family == "siglip"
    pm = train_probe(ProbeConfig(lr=0.1, epochs=100, threads=1), enc, demo, tmp_path / "probe")
    assert pm["train_acc"] > 0.4 and pm["n_train"] == 32  # 4 classes: chance is 0.25; real train images only
    probe = load_probe(tmp_path / "probe", enc)
    assert probe.classes == ["no_finding", "cardiomegaly", "pleural_effusion", "pneumonia"]
    m2 = train_encoder(cfg, "evaluator", demo, tmp_path / "evaluator", max_steps=4)
    assert m2["steps"] == 4
    ev = load_encoder(tmp_path / "evaluator")
    assert ev.family == "clip" and ev.identity != enc.identity
    with pytest.raises(ValueError, match="trained on encoder"):
        load_probe(tmp_path / "probe", ev)


def test_encoder_config_refuses_equal_seeds():
    with pytest.raises(ConfigError, match="seeds must differ"):
        load_stage_config("encoder", None, ["critic.seed=3", "evaluator.seed=3"])


def test_components_compile_with_optional_annotations(tmp_path):
    from kfp import compiler, dsl

    from components.encoders import encoder_op, probe_op

    @dsl.pipeline(name="enc")
    def pipe(ds: dsl.Input[dsl.Dataset], profile: str = "demo-histo"):
        e = encoder_op(dataset=ds, role="critic", profile=profile, overrides=[])
        probe_op(encoder=e.outputs["encoder"], dataset=ds, profile=profile, overrides=[])

    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipe, str(out))
    text = out.read_text()
    assert "encoder_step" in text and "probe_step" in text and "isOptional: true" in text


def test_cli_resolves_stage_configs():
    from typer.testing import CliRunner

    from craft.cli import app

    res = CliRunner().invoke(app, ["show-config", "encoder", "-c", "demo-cxr", "critic.seed=7"])
    assert res.exit_code == 0, res.output
    assert '"seed": 7' in res.output and '"arch": "clip"' in res.output
