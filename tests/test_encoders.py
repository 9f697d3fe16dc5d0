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


def test_encoder_trained_on_views_is_another_encoder_and_repeats(demo, tmp_path):
    """encoder.<role>.view_*: the role trains on random views of its batches (its own random stream), so the same
    settings give the same weights and views give other weights than the image as decoded; bad values are refused."""
    from safetensors.torch import load_file

    spec = dict(arch="siglip", seed=0, embed_dim=16, width=16, layers=1, heads=2, patch_size=8)
    runs = {}
    for name, views in (("plain", {}), ("views", dict(view_crop=0.8, view_flip=True, view_noise=0.05)),
                        ("again", dict(view_crop=0.8, view_flip=True, view_noise=0.05))):  # fmt: skip
        cfg = EncoderTrainConfig(critic=EncoderSpec(**spec, **views), image_size=16, max_length=24, epochs=2,
                                 batch_size=16, threads=1, checklist="demo-cxr")  # fmt: skip
        train_encoder(cfg, "critic", demo, tmp_path / name, max_steps=3)
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    same = lambda a, b: all(torch.equal(runs[a][k], runs[b][k]) for k in runs[a])  # noqa: E731
    assert same("views", "again") and not same("plain", "views")
    for bad in ("critic.view_crop=0", "critic.view_crop=1.5", "critic.view_noise=-0.1"):
        with pytest.raises(ConfigError, match="view_crop must be in"):
            load_stage_config("encoder", None, [bad])


def test_encoder_config_refuses_equal_seeds():
    with pytest.raises(ConfigError, match="seeds must differ"):
        load_stage_config("encoder", None, ["critic.seed=3", "evaluator.seed=3"])


def test_components_compile_with_optional_annotations(tmp_path):
    from kfp import compiler, dsl

    from components.encoders import encoder_op, probe_op

    @dsl.pipeline(name="enc")
    def pipe(ds: dsl.Input[dsl.Dataset], profile: str = "demo-histo", version: str = "v1"):
        e = encoder_op(dataset=ds, role="critic", profile=profile, overrides=[], dataset_version=version)
        probe_op(encoder=e.outputs["encoder"], dataset=ds, profile=profile, overrides=[], dataset_version=version)

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


# ----------------------------------------------------------------------------------------------
# real-layout SigLIP / MedSigLIP snapshots (tests/real_layout.py): the slow SentencePiece tokenizer path


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """A MedSigLIP-like critic (48 px) and a SigLIP-like evaluator (32 px), both in the real HF snapshot layout."""
    from tests.real_layout import build_siglip_dir

    tmp = tmp_path_factory.mktemp("snap")
    return {"critic": build_siglip_dir(tmp / "medsiglip", seed=0, image_size=48),
            "evaluator": build_siglip_dir(tmp / "siglip", seed=1, image_size=32)}  # fmt: skip


def test_siglip_snapshot_loads_with_its_sentencepiece_tokenizer(snapshots):
    import numpy as np
    import sentencepiece as spm
    from PIL import Image
    from transformers import AutoProcessor, SiglipTokenizer

    from craft.annotate.checklists import checklist_text, load_checklist
    from tests.real_layout import SIGLIP_FILES, SIGLIP_MAX_LENGTH, canonical

    d = snapshots["evaluator"]
    assert sorted(p.name for p in d.iterdir()) == sorted(SIGLIP_FILES)  # no tokenizer.json: the slow tokenizer only
    enc = load_encoder(d)
    assert isinstance(enc.tokenizer, SiglipTokenizer) and enc.family == "siglip"
    assert enc.max_length == SIGLIP_MAX_LENGTH and enc.image_size == (32, 32)
    item = load_checklist("demo-cxr", list(CHECKLIST), "cxr")["pleural_effusion"][0]
    sentence = checklist_text([item])
    pieces = spm.SentencePieceProcessor(model_file=str(d / "spiece.model")).encode(canonical(sentence))
    assert 2 not in pieces  # <unk>: the sentence is covered by the trained vocabulary
    ids = enc.tokenize([sentence])
    assert set(ids) == {"input_ids"}  # SigLIP: max-length padded ids, no attention mask
    eos = enc.tokenizer.eos_token_id
    assert eos == enc.tokenizer.pad_token_id == 1
    assert ids["input_ids"][0].tolist() == pieces + [eos] * (SIGLIP_MAX_LENGTH - len(pieces))
    # the HF reference usage (SiglipProcessor + SiglipModel.forward) gives the same unit embeddings
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    texts = [sentence, "an enlarged heart"]
    with torch.no_grad():
        ref = enc.model(**proc(text=texts, images=[Image.fromarray(arr)] * 2, padding="max_length",
                               return_tensors="pt"))  # fmt: skip
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(enc.encode_images(x)[0], ref.image_embeds[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.encode_texts(texts), ref.text_embeds, rtol=0, atol=1e-5)
    # resized inputs: our differentiable torch bicubic stays close to the PIL processor
    big = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    hf = proc.image_processor(images=Image.fromarray(big), return_tensors="pt")["pixel_values"]
    ours = enc.preprocess(torch.from_numpy(big).permute(2, 0, 1)[None].float() / 255)
    assert hf.shape == ours.shape and (hf - ours).abs().mean() < 0.01
    # the identity is the weights': stable across loads, different for another seed
    assert load_encoder(d).identity == enc.identity != load_encoder(snapshots["critic"]).identity


def test_siglip_snapshots_in_both_roles_local_and_s3(snapshots, s3_env, tmp_path):
    from craft.storage.objectstore import ObjectStore

    uri = f"s3://{s3_env.make_bucket('enc')}/models/encoders/medsiglip"
    ObjectStore.from_env().upload_dir(snapshots["critic"], uri)
    cfg = EncodersConfig(critic=uri, evaluator=str(snapshots["evaluator"]), cache_dir=str(tmp_path / "cache"))
    roles = load_role_encoders(cfg)
    local = load_encoder(snapshots["critic"])
    assert type(roles["critic"].tokenizer).__name__ == "SiglipTokenizer" and roles["critic"].source == uri
    assert roles["critic"].identity == local.identity != roles["evaluator"].identity
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(roles["critic"].encode_images(x), local.encode_images(x), rtol=0, atol=0)
    copy = tmp_path / "copy-of-medsiglip"
    shutil.copytree(snapshots["critic"], copy)
    with pytest.raises(ValueError, match="same weights"):  # MedSigLIP is never the evaluator too
        load_role_encoders(EncodersConfig(critic=uri, evaluator=str(copy), cache_dir=str(tmp_path / "cache")))


def test_cli_probe_and_evaluate_on_siglip_snapshots(snapshots, demo, tmp_path, monkeypatch, capsys):
    import json
    import sys

    import yaml

    from craft import cli
    from craft.annotate.run import AnnotateConfig
    from craft.annotate.run import main as annotate
    from craft.data.manifest import read_meta
    from craft.models.diffusion import ModelConfig, build_components, save_pipeline

    def run(*args) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["craft", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            cli.main()
        return e.value.code, capsys.readouterr().out

    probes = {}
    for role, d in snapshots.items():
        probes[role] = tmp_path / f"{role}-probe"
        code, out = run("train", "probe", d, demo, "-o", probes[role], "epochs=30", "lr=0.05", "threads=1")
        assert code == 0, out
        assert json.loads(out)["n_train"] == 32
        assert load_probe(probes[role], load_encoder(d)).classes == list(CHECKLIST)
    ann = tmp_path / "ann"
    annotate(AnnotateConfig(backend="offline", checklist="demo-cxr", progress=False), demo, ann)
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    base = save_pipeline(build_components(mc, list(read_meta(demo).classes), seed=0).pipeline(), tmp_path / "base")
    off = {"enabled": False}
    profile = tmp_path / "tiny-eval.yaml"
    profile.write_text(yaml.safe_dump({"evaluate": {
        "max_prompts": 4, "samples_per_prompt": 1, "steps": 2, "guidance": 2.0, "batch_size": 4, "grid_per_class": 1,
        "device": "cpu", "threads": 1, "memorization": off, "downstream": off, "oracle": off, "preferences": off}}))  # fmt: skip
    common = [demo, "--annotations", ann, "--variant", f"craft={base}", "--critic", snapshots["critic"], "-c", profile]
    code, _ = run("evaluate", *common, "--evaluator", snapshots["critic"], "--evaluator-probe", probes["critic"],
                  "--out", tmp_path / "refused")  # fmt: skip
    assert code == 2 and not (tmp_path / "refused" / "metrics.json").exists()  # MedSigLIP never scores
    code, out = run("evaluate", *common, "--critic-probe", probes["critic"], "--evaluator", snapshots["evaluator"],
                    "--evaluator-probe", probes["evaluator"], "--out", tmp_path / "eval")  # fmt: skip
    assert code == 0, out
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(m["variants"]) == {"real", "craft"} and m["candidate"]["name"] == "craft"
    assert 0 <= m["variants"]["real"]["dd"] <= 1 and m["variants"]["real"]["critic_reward"]["sfs"] == pytest.approx(1)
