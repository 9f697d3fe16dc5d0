"""craft evaluate wiring: protocol, role check, outputs and the gate schema, on tiny seeded models and demo data."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from craft.evaluate import run as ev
from craft.promote import GATE_ORDER, GatesConfig, evaluate_gates

torch.set_num_threads(2)


def _encoder(arch: str, seed: int, out: Path) -> Path:
    from craft.models.diffusion import build_tokenizer
    from craft.models.encoders import save_encoder
    from craft.train.encoder import EncoderSpec, build_model

    tok = build_tokenizer(["adenocarcinoma", "adenoma", "mucinous", "carcinoma", "normal"], 16)
    spec = EncoderSpec(arch=arch, seed=seed, embed_dim=16, width=16, layers=1, heads=2, patch_size=8)
    model, pre = build_model(spec, 32, tok, 16)
    return save_encoder(model, tok, out, pre, {"test": True})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo histo data (n=32, 32 px), offline annotations, critic + evaluator + probe, a tiny base and a LoRA on it."""
    from craft.annotate.run import AnnotateConfig
    from craft.annotate.run import main as annotate
    from craft.data.demo import DemoConfig, generate
    from craft.models.diffusion import ModelConfig, build_components, save_pipeline
    from craft.train.probe import ProbeConfig, train_probe
    from craft.train.reward import LoraSettings, add_lora, save_adapters

    tmp = tmp_path_factory.mktemp("eval")
    ds = generate(DemoConfig(modality="histo", n=32, seed=0, resolution=32), tmp / "demo-histo")
    ann = tmp / "ann"
    annotate(AnnotateConfig(backend="offline", checklist="demo-histo", progress=False), ds, ann)
    critic = _encoder("siglip", 0, tmp / "critic")
    evaluator = _encoder("clip", 1, tmp / "evaluator")
    probe = tmp / "probe"
    train_probe(ProbeConfig(epochs=20, lr=1e-2, threads=2), evaluator, ds, probe)
    critic_probe = tmp / "critic_probe"
    train_probe(ProbeConfig(epochs=5, lr=1e-2, threads=2), critic, ds, critic_probe)
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    comp = build_components(mc, ["adenocarcinoma", "adenoma"], seed=0)
    base = save_pipeline(comp.pipeline(), tmp / "base", {"test": True})
    add_lora(comp.unet, LoraSettings(rank=2, alpha=2.0))
    lora = save_adapters(tmp / "lora", unet=comp.unet, lora=LoraSettings(rank=2, alpha=2.0), info={"base": str(base)})
    return dict(
        tmp=tmp,
        ds=ds,
        ann=ann,
        critic=critic,
        evaluator=evaluator,
        probe=probe,
        base=base,
        lora=lora,
        critic_probe=critic_probe,
    )


def cfg(tmp: Path, **kw) -> ev.EvaluateConfig:
    c = ev.EvaluateConfig(candidate="craft", max_prompts=4, samples_per_prompt=2, steps=2, guidance=2.0,
                          batch_size=8, grid_per_class=2)  # fmt: skip
    c.downstream = ev.DownstreamSettings(prompts=4, scales=[1.0], epochs=1)
    # wiring: thresholds no tiny oracle can fail, so it scores (tests/test_oracle_calibration.py checks refusals)
    c.oracle = ev.OracleSettings(n=64, epochs=1, n_check=16, min_accuracy=None, cache_dir=str(tmp / "oracle"),
                                 calibration=ev.CalibrationThresholds(0.0, 0.0, 1.0))  # fmt: skip
    c.preferences = ev.PreferenceSettings(bootstrap=20)
    for k, v in kw.items():
        setattr(c, k, v)
    c.validate()
    return c


def first_item_judge(image, target, checklist):
    """A scripted audit judge: only the first checklist attribute passes (pass rate 1/len exactly)."""
    assert np.asarray(image).dtype == np.uint8
    return {a["attribute"]: i == 0 for i, a in enumerate(checklist)}


@pytest.fixture(scope="module")
def result(world):
    from craft.models.encoders import load_encoder

    w = world
    out = w["tmp"] / "out"
    variants = {"real": "real", "zero_shot": str(w["base"]), "craft": ev.VariantSpec(str(w["base"]), str(w["lora"]))}
    crit_id = load_encoder(w["critic"]).identity
    metrics = ev.main(cfg(w["tmp"]), w["ds"], w["ann"], variants, w["evaluator"], w["probe"], out,
                      critic_identity=crit_id, audit_judge=first_item_judge, critic_dir=w["critic"],
                      critic_probe_dir=w["critic_probe"])  # fmt: skip
    return out, metrics


def test_every_output_file_and_the_gate_schema(result):
    out, metrics = result
    for name in ("metrics.json", "per_image.parquet", "report.html"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in GATE_ORDER:  # the keys craft.promote reads, at the top level, numbers
        assert isinstance(on_disk[key], int | float) and not isinstance(on_disk[key], bool), key
        assert on_disk["candidate"][key] == on_disk[key]
    assert on_disk["candidate"]["name"] == "craft"
    assert on_disk["cas"] == pytest.approx(on_disk["variants"]["craft"]["cas"])
    decision = evaluate_gates(on_disk, None, GatesConfig())  # the gate accepts the schema (pass or fail)
    assert {r.name for r in decision.results} == set(GATE_ORDER)
    assert set(on_disk["variants"]) == {"real", "zero_shot", "craft"}
    audit = on_disk["checklist_audit"]
    assert audit["status"] == "done" and set(audit["variants"]) == {"real", "zero_shot", "craft"}
    for v in audit["variants"].values():
        assert v["pass_rate"] == pytest.approx(1 / 5) and v["all_pass_rate"] == 0.0
    impl = on_disk["implementations"]  # issue 22: which library (and version) computed each reported metric
    assert set(on_disk["variants"]["craft"]["fidelity"]) <= set(impl) and "bradley_terry" in impl
    page = (out / "report.html").read_text()
    assert "Metric implementations" in page and impl["silhouette"] in page


def test_per_image_rows_and_primitives(result, world):
    out, metrics = result
    pi = pd.read_parquet(out / "per_image.parquet")
    for col in ("variant", "image_id", "label", "vdc", "ccs", "dd", "sfs", "cas", "oracle_correct",
                "oracle_nuclear_density", "oracle_gland_regularity", "oracle_mucin_fraction"):  # fmt: skip
        assert col in pi.columns, col
    o = metrics["oracle"]  # issue 20: the calibration table travels with the scores
    assert o["status"] == "scored" and o["calibration"]["rows"][0]["row"] == "clean"
    assert set(metrics["variants"]["craft"]["oracle_findings"]["mean_abs_z"]) == {
        "nuclear_density", "gland_regularity", "mucin_fraction"}  # fmt: skip
    counts = pi["variant"].value_counts().to_dict()
    assert counts == {"real": 4, "zero_shot": 8, "craft": 8}  # 4 prompts x 2 samples per generator
    np.testing.assert_allclose(pi[["vdc", "ccs", "dd", "sfs"]].mean(1), pi["cas"], atol=1e-9)
    assert set(pi["dd"].unique()) <= {0.0, 1.0}
    real = pi[pi["variant"] == "real"]
    np.testing.assert_allclose(real["sfs"], 1.0, atol=1e-5)  # each real image against itself
    # the prompts follow the held-out split's classes (app. N): 4 prompts, 1 per class here
    assert metrics["label_distribution"]["adenoma"]["prompts"] == 1
    # the LoRA starts at B = 0, so with the same seeds "craft" reproduces the base model image for image
    z, c = pi[pi["variant"] == "zero_shot"], pi[pi["variant"] == "craft"]
    np.testing.assert_allclose(z["cas"].to_numpy(), c["cas"].to_numpy(), atol=1e-6)
    # the tail: strictly below the real P25
    tau = metrics["real_p25"]
    assert metrics["variants"]["craft"]["low_alignment_rate"] == pytest.approx(float((c["cas"] < tau).mean()))


def test_critic_reward_is_reported_beside_the_evaluator(result):
    from craft.losses import DEFAULT_REWARD_WEIGHTS

    out, metrics = result
    assert metrics["critic_reward"]["weights"] == DEFAULT_REWARD_WEIGHTS
    for v in ("real", "zero_shot", "craft"):
        d = metrics["variants"][v]["critic_reward"]
        assert set(d) == {"vdc", "ccs", "dd", "sfs", "total", "weights"}
        # the mean of the weighted sum is the weighted sum of the means
        assert d["total"] == pytest.approx(sum(w * d[k] for k, w in DEFAULT_REWARD_WEIGHTS.items()), abs=1e-6)
        assert d["dd"] < 0  # log p(y | x) of the critic's probe, not an accuracy
    assert metrics["variants"]["real"]["critic_reward"]["sfs"] == pytest.approx(1.0, abs=1e-5)
    # the LoRA starts at B = 0: the candidate's images, hence its reward, equal the base model's
    z, c = metrics["variants"]["zero_shot"]["critic_reward"], metrics["variants"]["craft"]["critic_reward"]
    assert c["total"] == pytest.approx(z["total"], abs=1e-5)
    assert "CRITIC" in (out / "report.html").read_text()


def test_report_holds_tables_and_inline_images(result):
    out, _ = result
    html = (out / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64," in html
    for word in ("CAS", "craft", "zero_shot", "real", "Oracle calibration on fresh renders", "Which finding"):
        assert word in html


def test_critic_as_evaluator_is_refused(world, tmp_path):
    from craft.models.encoders import load_encoder

    w = world
    crit_id = load_encoder(w["critic"]).identity
    with pytest.raises(ValueError, match="critic"):
        ev.main(cfg(w["tmp"]), w["ds"], w["ann"], {"craft": str(w["base"])}, w["critic"], w["probe"], tmp_path,
                critic_identity=crit_id)  # fmt: skip
    assert not (tmp_path / "metrics.json").exists()


def test_seeds_are_per_case_not_per_batch():
    assert ev.sample_seed(0, "img1", 0) == ev.sample_seed(0, "img1", 0)
    assert ev.sample_seed(0, "img1", 0) != ev.sample_seed(0, "img1", 1)
    assert ev.sample_seed(0, "img1", 0) != ev.sample_seed(1, "img1", 0)


def test_parse_variant_and_stratified_cap():
    assert ev.parse_variant("real") == ("real", "real")
    assert ev.parse_variant("b=/x") == ("b", ev.VariantSpec("/x", ""))
    assert ev.parse_variant("c=s3://a/b:s3://c/d") == ("c", ev.VariantSpec("s3://a/b", "s3://c/d"))
    with pytest.raises(ValueError):
        ev.parse_variant("nothing")
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(20)], "label": ["a"] * 10 + ["b"] * 6 + ["c"] * 4})
    capped = ev.stratified_cap(df, 10, 0)
    assert capped["label"].value_counts().to_dict() == {"a": 5, "b": 3, "c": 2}
    with pytest.raises(ValueError, match="classes"):
        ev.stratified_cap(df, 2, 0)


def _profile(tmp: Path) -> Path:
    """A profile file whose evaluate section is the tiny config above."""
    import yaml

    from craft.config import to_dict

    p = tmp / "tiny-eval.yaml"
    p.write_text(yaml.safe_dump({"evaluate": to_dict(cfg(tmp))}))
    return p


def test_component_compiles_with_optional_variants(tmp_path):
    import yaml
    from kfp import compiler

    from components.evaluate import evaluate_op

    compiler.Compiler().compile(evaluate_op, str(tmp_path / "c.yaml"))
    comp = yaml.safe_load((tmp_path / "c.yaml").read_text())["components"]["comp-evaluate-op"]
    ins = comp["inputDefinitions"]["artifacts"]
    assert {k for k, v in ins.items() if v.get("isOptional")} == {
        "ti",
        "ti_lora",
        "dpo",
        "stage1",
        "critic_probe",
        "champion",
    }
    outs = comp["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outs.items()} == {
        "metrics": "system.Metrics", "report": "system.HTML", "probe_confusion": "system.ClassificationMetrics",
        "results": "system.Dataset"}  # fmt: skip


@pytest.mark.slow
def test_component_runs_in_kfp_local(world, tmp_path):
    """evaluate_op inside a pipeline under kfp.local, artifacts brought in by importers, optional variants unset."""
    from kfp import dsl, local

    from components.evaluate import evaluate_op

    w = world
    profile = str(_profile(w["tmp"]))

    def imp(path, cls):
        return dsl.importer(artifact_uri=str(path), artifact_class=cls, reimport=False).output

    @dsl.pipeline(name="eval-only")
    def pipe():
        evaluate_op(dataset=imp(w["ds"], dsl.Dataset), annotations=imp(w["ann"], dsl.Dataset),
                    evaluator=imp(w["evaluator"], dsl.Model), evaluator_probe=imp(w["probe"], dsl.Model),
                    critic=imp(w["critic"], dsl.Model), base=imp(w["base"], dsl.Model), craft=imp(w["lora"], dsl.Model),
                    profile=profile, overrides=[], dataset_version="test")  # fmt: skip

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipe()
    found = list((tmp_path / "root").rglob("metrics.json"))
    assert found, "no metrics.json under the pipeline root"
    m = json.loads(found[0].read_text())
    assert set(m["variants"]) == {"real", "zero_shot", "craft"} and m["candidate"]["name"] == "craft"
    assert m["checklist_audit"]["status"] == "skipped"  # no MLLM judge offline: said so, not faked
    assert (found[0].parent / "per_image.parquet").is_file()
    html = [p for p in (tmp_path / "root").rglob("*") if p.is_file() and p.read_bytes()[:15] == b"<!doctype html>"]
    assert html, "no report in the HTML output artifact"


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the ``craft`` entry point in-process; (exit code, stderr)."""
    import sys

    from craft import cli

    monkeypatch.setattr(sys, "argv", ["craft", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def test_cli_refuses_the_critic_as_evaluator(world, tmp_path, monkeypatch, capsys):
    w = world
    code, err = _cli(monkeypatch, capsys, "evaluate", w["ds"], "--annotations", w["ann"], "--variant",
                     f"craft={w['base']}:{w['lora']}", "--evaluator", w["critic"], "--evaluator-probe", w["probe"],
                     "--critic", w["critic"], "--out", tmp_path)  # fmt: skip
    assert code == 2, err
    assert "critic" in err and "separate evaluator" in err
    code, err = _cli(monkeypatch, capsys, "evaluate", w["ds"], "--annotations", w["ann"], "--variant", "nonsense",
                     "--evaluator", "e", "--evaluator-probe", "p", "--out", tmp_path)  # fmt: skip
    assert code == 2 and "name=MODEL_DIR" in err


@pytest.mark.parametrize("profile", ["demo-histo", "demo-cxr"])
def test_demo_profiles_have_a_demo_scale_evaluate_section(profile):
    from craft.config import load_stage_config

    c = load_stage_config("evaluate", profile)
    assert c.candidate == "craft" and 0 < c.max_prompts <= 64 and c.steps <= 20
    assert c.oracle.enabled and c.downstream.enabled


def test_textual_inversion_prompts_carry_the_class_token():
    meta = {"tokens": ["<adenoma>", "<normal>"], "class_tokens": {"adenoma": "<adenoma>", "normal": "<normal>"}}
    assert ev.variant_prompt("crowded glands", "adenoma", meta) == "<adenoma>, crowded glands"
    assert ev.variant_prompt("crowded glands", "adenoma", {"lora": {"rank": 4}}) == "crowded glands"
    with pytest.raises(ValueError, match="class_tokens"):
        ev.variant_prompt("x", "adenoma", {"tokens": ["<adenoma>"]})


def test_samples_are_cached_per_model_content(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "w.safetensors").write_bytes(b"1")
    calls = []

    def make():
        calls.append(1)
        return np.full((2, 4, 4, 3), len(calls), np.uint8)

    spec = ev.VariantSpec(str(model))
    a = ev._cached_samples(tmp_path / "work", "v", {"spec": spec.key()}, make)
    b = ev._cached_samples(tmp_path / "work", "v", {"spec": spec.key()}, make)
    assert len(calls) == 1 and np.array_equal(a, b)  # resumed, not redone
    (model / "w.safetensors").write_bytes(b"22")  # the model was rewritten in place
    c = ev._cached_samples(tmp_path / "work", "v", {"spec": spec.key()}, make)
    assert len(calls) == 2 and c[0, 0, 0, 0] == 2


def test_a_generator_may_not_be_called_real(world, tmp_path):
    w = world
    with pytest.raises(ValueError, match="reserved"):
        ev.main(cfg(w["tmp"]), w["ds"], w["ann"], {"real": str(w["base"])}, w["evaluator"], w["probe"], tmp_path)
