"""Promotion gates: the pure decision, then `craft promote` / `craft rollback` against SeaweedFS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft.cli import app
from craft.config import ConfigError, load_stage_config
from craft.promote import GatesConfig, MetricGate, evaluate_gates
from craft.storage.objectstore import ObjectStore, StorageConfig
from craft.storage.registry import Registry

GOOD = {"cas": 0.62, "low_alignment_rate": 0.20, "oracle_accuracy": 0.90, "near_duplicates": 0,
        "downstream_accuracy": 0.81}  # fmt: skip


def by_name(decision):
    return {r.name: r for r in decision.results}


def test_first_model_only_needs_absolute_bounds():
    d = evaluate_gates(GOOD, None, GatesConfig())
    assert d.passed and not d.failures
    assert "no production model" in by_name(d)["cas"].message


def test_each_gate_can_fail_alone():
    prod = dict(GOOD)
    worse = {
        "cas": 0.60,  # more than 0.01 below 0.62
        "low_alignment_rate": 0.23,  # more than 0.02 above 0.20
        "oracle_accuracy": 0.87,  # more than 0.02 below 0.90
        "near_duplicates": 1,  # memorization
        "downstream_accuracy": 0.78,  # more than 0.02 below 0.81
    }
    for key, bad in worse.items():
        cand = dict(GOOD, **{key: bad})
        d = evaluate_gates(cand, prod, GatesConfig())
        assert not d.passed and [r.name for r in d.failures] == [key], key
    within = {"cas": 0.611, "low_alignment_rate": 0.219, "oracle_accuracy": 0.881, "downstream_accuracy": 0.791}
    assert evaluate_gates(dict(GOOD, **within), prod, GatesConfig()).passed


def test_thresholds_and_absolute_bounds():
    d = evaluate_gates(dict(GOOD, cas=0.5), {"cas": 0.3}, GatesConfig(cas=MetricGate(absolute=0.55, tolerance=0.01)))
    r = by_name(d)["cas"]
    assert not r.passed and r.threshold == pytest.approx(0.55) and r.production == 0.3
    d = evaluate_gates(dict(GOOD, low_alignment_rate=0.6), None, GatesConfig())
    assert [r.name for r in d.failures] == ["low_alignment_rate"] and by_name(d)["low_alignment_rate"].threshold == 0.5


def test_missing_metrics():
    no_oracle = {k: v for k, v in GOOD.items() if k != "oracle_accuracy"}
    d = evaluate_gates(no_oracle, GOOD, GatesConfig())
    assert d.passed and by_name(d)["oracle_accuracy"].skipped
    d = evaluate_gates(dict(GOOD, oracle_accuracy=None), GOOD, GatesConfig())
    assert d.passed and by_name(d)["oracle_accuracy"].skipped
    d = evaluate_gates({k: v for k, v in GOOD.items() if k != "cas"}, GOOD, GatesConfig())
    assert [r.name for r in d.failures] == ["cas"] and "does not report" in d.failures[0].message
    d = evaluate_gates(dict(GOOD, cas=float("nan")), None, GatesConfig())
    assert [r.name for r in d.failures] == ["cas"]
    # production without a metric: only the absolute bound applies
    d = evaluate_gates(GOOD, {"cas": 0.9}, GatesConfig())
    assert [r.name for r in d.failures] == ["cas"]
    assert "no production value" in by_name(d)["downstream_accuracy"].message
    with pytest.raises(ValueError, match="'cas' must be a number"):
        evaluate_gates(dict(GOOD, cas="high"), None, GatesConfig())
    d = evaluate_gates(dict(GOOD, cas=0.0), GOOD, GatesConfig(cas=MetricGate(enabled=False)))
    assert d.passed and by_name(d)["cas"].skipped


def test_gates_yaml_loads_strictly():
    cfg = load_stage_config("gates", "gates")
    assert cfg.near_duplicates.absolute == 0 and cfg.near_duplicates.tolerance is None
    assert cfg.oracle_accuracy.required is False and cfg.cas.tolerance == pytest.approx(0.01)
    assert load_stage_config("gates", "gates", ["cas.tolerance=0.05"]).cas.tolerance == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="tolerance must be >= 0"):
        load_stage_config("gates", "gates", ["cas.tolerance=-1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_stage_config("gates", "gates", ["cas.tolerence=0.1"])


# ---------------------------------------------------------------------------- end to end


def write_candidate(root: Path, seed: int, metrics: dict) -> tuple[Path, Path]:
    model = root / f"model{seed}"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes([seed]) * 2048)
    (model / "lineage.json").write_text(json.dumps({"dataset_version": f"ds{seed}.dir", "parent": None}))
    metrics_file = root / f"metrics{seed}.json"
    metrics_file.write_text(json.dumps(metrics))
    return model, metrics_file


def test_promote_reject_and_rollback_end_to_end(s3_env, tmp_path):
    bucket = s3_env.make_bucket("promo")
    root = f"s3://{bucket}"
    reg = Registry(ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), root)
    runner = CliRunner()

    def craft(*args):
        return runner.invoke(app, [*args], catch_exceptions=False)

    # 1. first candidate: passes the absolute bounds, is registered and promoted
    m1, f1 = write_candidate(tmp_path, 1, GOOD)
    res = craft("promote", str(f1), "--model", "histo", "--register", str(m1), "--registry", root)
    assert res.exit_code == 0, res.output
    v1 = reg.get_production("histo")["version"]
    assert reg.get_version("histo", v1)["lineage"]["dataset_version"] == "ds1.dir"

    # 2. a worse, memorizing candidate: refused, each failing gate named, nothing registered or moved
    bad = dict(GOOD, cas=0.55, near_duplicates=3)
    m2, f2 = write_candidate(tmp_path, 2, bad)
    report = tmp_path / "decision.json"
    res = craft(
        "promote", str(f2), "--model", "histo", "--register", str(m2), "--registry", root, "--report", str(report)
    )
    assert res.exit_code == 1
    assert "cas" in res.output and "near_duplicates" in res.output and "rejected" in res.output
    assert "downstream_accuracy (" not in res.output.split("rejected by gate(s):")[1]
    assert json.loads(report.read_text())["decision"]["passed"] is False
    assert reg.get_production("histo")["version"] == v1
    assert [v["version"] for v in reg.list_versions("histo")] == [v1]

    # 3. a better candidate passes and moves the pointer; the gate results travel with the history entry
    m3, f3 = write_candidate(tmp_path, 3, dict(GOOD, cas=0.70, downstream_accuracy=0.84))
    res = craft("promote", str(f3), "--model", "histo", "--register", str(m3), "--registry", root)
    assert res.exit_code == 0, res.output
    v3 = reg.get_production("histo")["version"]
    assert v3 != v1 and f"{v1} -> {v3}" in res.output
    assert reg.history("histo")[-1]["details"]["gates"]["passed"] is True

    # 4. gating a registered version by id (the CI path), dry run: nothing moves
    res = craft("promote", v1, "--model", "histo", "--registry", root, "--dry-run")
    assert res.exit_code == 1 and "cas" in res.output  # v1 is now worse than production v3

    # 5. roll back to the previous production, then inspect
    res = craft("rollback", "--model", "histo", "--registry", root)
    assert res.exit_code == 0, res.output
    assert reg.get_production("histo")["version"] == v1 and f"{v3} -> {v1}" in res.output
    res = craft("models", "histo", "--registry", root)
    listing = json.loads(res.output)
    assert [h["action"] for h in listing["history"]] == ["promote", "promote", "rollback"]

    # 6. a candidate that is neither a file nor a version id
    res = runner.invoke(app, ["promote", "nope", "--model", "histo", "--registry", root])
    assert res.exit_code != 0


def test_ci_workflow_runs_the_same_gate_safely():
    """.github/workflows/promote.yml: manual trigger with model/version, `craft promote`, no input injection."""
    import re

    import yaml

    path = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "promote.yml"
    wf = yaml.safe_load(path.read_text())
    trigger = wf.get("on") or wf.get(True)  # YAML 1.1 reads the key `on` as true
    inputs = trigger["workflow_dispatch"]["inputs"]
    assert {"model", "version", "gates", "dry_run"} <= set(inputs)
    assert wf["permissions"] == {"contents": "read"}
    (job,) = wf["jobs"].values()
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any(r.startswith('craft promote "$VERSION" --model "$MODEL" --gates "$GATES" --dry-run') for r in runs)
    assert any(r.startswith('craft promote "$VERSION"') and "--dry-run" not in r for r in runs)
    for r in runs:
        assert not re.search(r"\$\{\{\s*(github\.event\.)?inputs\.", r), f"input interpolated into a script: {r}"
    assert "secrets." in job["env"]["AWS_SECRET_ACCESS_KEY"]
    assert load_stage_config("gates", str(path.parents[2] / "configs" / "gates.yaml")) == load_stage_config(
        "gates", "gates"
    )
