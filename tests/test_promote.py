"""Promotion gates: the pure decision, then `craft promote` / `craft rollback` / `craft models` against SeaweedFS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft.cli import app
from craft.config import ConfigError, load_stage_config
from craft.promote import GatesConfig, MetricGate, evaluate_gates, gate_view, promote_version
from craft.storage.objectstore import ObjectStore, StorageConfig
from craft.storage.registry import Registry

GOOD = {"cas": 0.62, "low_alignment_rate": 0.20, "oracle_accuracy": 0.90, "near_duplicates": 0,
        "downstream_accuracy": 0.81}  # fmt: skip


def by_name(decision):
    return {r.name: r for r in decision.results}


def test_first_model_only_needs_absolute_bounds():
    d = evaluate_gates(GOOD, None, GatesConfig())
    assert d.passed and not d.failures and d.failure_text() == ""
    assert "no champion" in by_name(d)["cas"].message


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


def test_failure_text_names_value_and_threshold():
    d = evaluate_gates(dict(GOOD, low_alignment_rate=0.766, cas=0.2), None, GatesConfig())
    assert d.failure_text() == "cas 0.2 < min 0.3; low_alignment_rate 0.766 > max 0.5"
    d = evaluate_gates({k: v for k, v in GOOD.items() if k != "cas"}, None, GatesConfig())
    assert d.failure_text() == "cas: candidate does not report this metric"


def test_vs_zero_shot_the_candidate_must_beat_the_untuned_base():
    gates = GatesConfig(cas=MetricGate(absolute=0.3, tolerance=None, vs_zero_shot=0.05))
    d = evaluate_gates(GOOD, None, gates, zero_shot={"cas": 0.60})  # 0.62 < 0.60 + 0.05
    r = by_name(d)["cas"]
    assert not r.passed and r.threshold == pytest.approx(0.65) and "zero-shot 0.6 + 0.05" in r.message
    assert evaluate_gates(GOOD, None, gates, zero_shot={"cas": 0.55}).passed
    d = evaluate_gates(GOOD, None, gates)  # no zero-shot scored: only the floor applies, with a note
    assert d.passed and "no zero-shot value" in by_name(d)["cas"].message
    # lower-is-better: the candidate's rate must sit at least the margin below the base's
    low = GatesConfig(low_alignment_rate=MetricGate(absolute=0.5, tolerance=None, vs_zero_shot=0.1))
    d = evaluate_gates(GOOD, None, low, zero_shot={"low_alignment_rate": 0.25})
    assert [r.name for r in d.failures] == ["low_alignment_rate"]
    assert by_name(d)["low_alignment_rate"].threshold == pytest.approx(0.15)
    # the strictest of floor, champion and zero-shot bounds applies
    both = GatesConfig(cas=MetricGate(absolute=0.3, tolerance=0.01, vs_zero_shot=0.0))
    assert by_name(evaluate_gates(GOOD, {"cas": 0.5}, both, {"cas": 0.61}))["cas"].threshold == pytest.approx(0.61)


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
    # a champion without a metric: only the absolute bound applies
    d = evaluate_gates(GOOD, {"cas": 0.9}, GatesConfig())
    assert [r.name for r in d.failures] == ["cas"]
    assert "no champion value to compare" in by_name(d)["downstream_accuracy"].message
    with pytest.raises(ValueError, match="'cas' must be a number"):
        evaluate_gates(dict(GOOD, cas="high"), None, GatesConfig())
    d = evaluate_gates(dict(GOOD, cas=0.0), GOOD, GatesConfig(cas=MetricGate(enabled=False)))
    assert d.passed and by_name(d)["cas"].skipped


def test_a_required_higher_is_better_gate_needs_a_floor_above_zero():
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match=r"gates.cas: a required gate needs a floor above 0"):
            GatesConfig(cas=MetricGate(absolute=bad)).validate()
    with pytest.raises(ValueError, match="downstream_accuracy"):
        GatesConfig(downstream_accuracy=MetricGate(absolute=0.0)).validate()
    GatesConfig(cas=MetricGate(absolute=0.0, required=False)).validate()  # optional: a floor of 0 is allowed
    GatesConfig(cas=MetricGate(absolute=0.0, enabled=False)).validate()
    GatesConfig(near_duplicates=MetricGate(absolute=0.0, tolerance=None)).validate()  # lower-is-better: max 0
    with pytest.raises(ConfigError, match="floor above 0"):
        load_stage_config("gates", "gates", ["cas.absolute=0"])


def test_gate_view_of_an_evaluation():
    metrics = {"cas": 0.1, "candidate": GOOD, "champion": dict(GOOD, version="0123456789ab"),
               "zero_shot": {"cas": 0.4}, "other": 1}  # fmt: skip
    view = gate_view(metrics)
    assert view["candidate"] == GOOD and view["champion"]["version"] == "0123456789ab"
    assert view["zero_shot"] == {"cas": 0.4}
    flat = gate_view(dict(GOOD, extra="ignored"))  # a flat metrics file: the candidate alone
    assert flat == {"candidate": GOOD, "champion": None, "zero_shot": None}


def test_gates_yaml_loads_strictly():
    cfg = load_stage_config("gates", "gates")
    assert cfg.near_duplicates.absolute == 0 and cfg.near_duplicates.tolerance is None
    assert cfg.oracle_accuracy.required is False and cfg.cas.tolerance == pytest.approx(0.01)
    assert cfg.cas.absolute > 0 and cfg.downstream_accuracy.absolute > 0
    assert load_stage_config("gates", "gates", ["cas.tolerance=0.05"]).cas.tolerance == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="tolerance must be >= 0"):
        load_stage_config("gates", "gates", ["cas.tolerance=-1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_stage_config("gates", "gates", ["cas.tolerence=0.1"])


# ---------------------------------------------------------------------------- against the registry

GATES_YAML = """\
gates:
  cas: {absolute: 0.3, tolerance: 0.01}
  low_alignment_rate: {absolute: 0.5, tolerance: 0.02}
  oracle_accuracy: {absolute: 0.5, tolerance: 0.02, required: false}
  near_duplicates: {absolute: 0, tolerance: null}
  downstream_accuracy: {absolute: 0.5, tolerance: 0.02}
"""


def gates_file(root: Path, text: str = GATES_YAML, name: str = "reviewed-gates.yaml") -> Path:
    path = root / name
    path.write_text(text)
    return path


def evaluation(candidate: dict, champion: dict | None = None, champion_version: str | None = None) -> dict:
    """An evaluation's metrics.json as the register step stores it: flat candidate keys plus the blocks."""
    champ = None if champion is None else dict(champion, version=champion_version)
    return {**candidate, "candidate": candidate, "champion": champ, "zero_shot": None}


def register(reg: Registry, root: Path, seed: int, metrics: dict, profile: str = "") -> str:
    model = root / f"model{seed}"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes([seed]) * 2048)
    lineage = {"dataset": {"name": "d", "version": f"{seed:016x}"}, "validation": {"ok": True}, "profile": profile,
               "evaluation_uri": f"s3://eval/{seed}"}  # fmt: skip
    return reg.register("histo", model, metrics, lineage)


@pytest.fixture
def reg(s3_env) -> Registry:
    return Registry(
        ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), f"s3://{s3_env.make_bucket('promo')}"
    )


def test_promote_version_reads_the_stored_evaluation(reg, tmp_path):
    gates = str(gates_file(tmp_path))
    v1 = register(reg, tmp_path, 1, evaluation(GOOD), profile=gates)
    out = promote_version("histo", v1, reg, dry_run=True)  # gates default to the profile the version ran with
    assert out.decision.passed and not out.promoted and reg.get_production("histo") is None
    assert out.gates["file"] == gates and len(out.gates["gates_sha256"]) == 16
    out = promote_version("histo", v1, reg, actor="ci", reason="first model")
    assert out.promoted and out.production_before is None
    prod = reg.get_production("histo")
    assert prod["version"] == v1 and prod["actor"] == "ci" and prod["reason"] == "first model"
    assert prod["details"]["gates"]["file"] == gates and prod["details"]["evaluation_uri"] == "s3://eval/1"
    assert prod["details"]["gates"]["gates_sha256"] == out.gates["gates_sha256"]
    assert prod["details"]["decision"]["passed"] is True

    # stricter reviewed gates refuse what the profile's own gates would pass; nothing moves
    strict = gates_file(tmp_path, GATES_YAML.replace("absolute: 0.3", "absolute: 0.7"), "strict.yaml")
    v2 = register(reg, tmp_path, 2, evaluation(dict(GOOD, cas=0.65), GOOD, v1), profile=gates)
    assert promote_version("histo", v2, reg, dry_run=True).decision.passed
    out = promote_version("histo", v2, reg, gates=str(strict))
    assert not out.promoted and out.decision.failure_text() == "cas 0.65 < min 0.7"
    assert reg.get_production("histo")["version"] == v1


def test_promoting_the_production_version_again_is_a_no_op(reg, tmp_path):
    gates = str(gates_file(tmp_path))
    v1 = register(reg, tmp_path, 1, evaluation(GOOD), profile=gates)
    assert promote_version("histo", v1, reg).promoted
    again = promote_version("histo", v1, reg)  # a re-run of the CI job: passes, moves nothing
    assert again.decision.passed and not again.promoted and len(reg.history("histo")) == 1


def test_promote_refuses_a_stale_champion(reg, tmp_path):
    """The evaluation must have scored the model in production NOW; a champion that changed is refused."""
    gates = str(gates_file(tmp_path))
    v1 = register(reg, tmp_path, 1, evaluation(GOOD), profile=gates)
    alone = register(reg, tmp_path, 2, evaluation(dict(GOOD, cas=0.9)), profile=gates)  # scored with no champion
    reg.promote("histo", v1)
    out = promote_version("histo", alone, reg)
    assert not out.promoted and [r.name for r in out.decision.failures] == ["champion"]
    assert "evaluated against champion (none), but production is now " + v1 in out.decision.failure_text()
    v3 = register(reg, tmp_path, 3, evaluation(dict(GOOD, cas=0.7), GOOD, v1), profile=gates)
    v4 = register(reg, tmp_path, 4, evaluation(dict(GOOD, cas=0.8), GOOD, v1), profile=gates)
    assert promote_version("histo", v3, reg).promoted
    out = promote_version("histo", v4, reg)  # better numbers, but compared with v1, no longer in production
    assert not out.promoted and [r.name for r in out.decision.failures] == ["champion"]
    assert reg.get_production("histo")["version"] == v3


def test_promote_reject_and_rollback_with_the_cli(reg, tmp_path):
    """`craft promote NAME --version V --gates FILE`, `craft rollback NAME`, `craft models NAME`, as CI runs them."""
    root, gates = reg.root, str(gates_file(tmp_path))
    runner = CliRunner()

    def craft(*args):
        return runner.invoke(app, [*args, "--registry", root], catch_exceptions=False)

    # 1. the first version: passes the absolute bounds, production moves
    v1 = register(reg, tmp_path, 1, evaluation(GOOD))
    res = craft("promote", "histo", "--version", v1, "--gates", gates, "--reason", "ci run 1")
    assert res.exit_code == 0, res.output
    assert f"production (none) -> {v1}" in res.output and gates in res.output
    assert reg.get_production("histo")["version"] == v1

    # 2. a worse, memorizing candidate scored beside v1: refused, each failing gate named, production stays
    v2 = register(reg, tmp_path, 2, evaluation(dict(GOOD, cas=0.55, near_duplicates=3), GOOD, v1))
    report = tmp_path / "decision.json"
    res = craft("promote", "histo", "--version", v2, "--gates", gates, "--report", str(report))
    assert res.exit_code == 1
    assert f"version {v2} refused: cas 0.55 < min 0.61; near_duplicates 3 > max 0" in res.output
    decision = json.loads(report.read_text())
    assert decision["promoted"] is False and decision["decision"]["passed"] is False
    assert decision["gates"]["file"] == gates
    assert reg.get_production("histo")["version"] == v1

    # 3. dry run of a better candidate: passes, moves nothing; then for real
    v3 = register(reg, tmp_path, 3, evaluation(dict(GOOD, cas=0.70, downstream_accuracy=0.84), GOOD, v1))
    res = craft("promote", "histo", "--version", v3, "--gates", gates, "--dry-run")
    assert res.exit_code == 0 and "production unchanged (dry run)" in res.output, res.output
    assert reg.get_production("histo")["version"] == v1
    res = craft("promote", "histo", "--version", v3, "--gates", gates)
    assert res.exit_code == 0 and f"production {v1} -> {v3}" in res.output, res.output
    details = reg.history("histo")[-1]["details"]
    assert details["gates"]["file"] == gates and details["decision"]["passed"] is True

    # 4. v2 again: its evaluation compared it with v1, which is no longer production
    res = craft("promote", "histo", "--version", v2, "--gates", gates, "--dry-run")
    assert res.exit_code == 1 and "champion" in res.output and "re-run the pipeline" in res.output

    # 5. roll back, then inspect: aliases, versions with their datasets, the history
    reg.set_alias("histo", "candidate", v2)
    res = craft("rollback", "histo")
    assert res.exit_code == 0, res.output
    assert reg.get_production("histo")["version"] == v1 and f"{v3} -> {v1}" in res.output
    res = craft("models", "histo")
    listing = json.loads(res.output)
    assert listing["production"]["version"] == v1
    assert {k: a["version"] for k, a in listing["aliases"].items()} == {"production": v1, "candidate": v2}
    assert {v["version"] for v in listing["versions"]} == {v1, v2, v3}
    by_version = {v["version"]: v for v in listing["versions"]}
    assert by_version[v3]["champion"] == v1 and by_version[v3]["dataset"]["version"] == f"{3:016x}"
    assert by_version[v3]["candidate_metrics"]["cas"] == 0.70
    moves = [(h["alias"], h["action"]) for h in listing["history"]]
    assert moves == [("production", "promote"), ("production", "promote"), ("candidate", "set"),
                     ("production", "rollback")]  # fmt: skip

    # 6. explicit rollback target, and a version that is not an id
    res = craft("rollback", "histo", "--to", v3)
    assert res.exit_code == 0 and reg.get_production("histo")["version"] == v3
    res = runner.invoke(app, ["promote", "histo", "--version", "nope", "--registry", root])
    assert res.exit_code != 0


def test_gate_step_decides_from_the_profile_and_moves_nothing(tmp_path):
    from craft.promote import gate_step

    gates = str(gates_file(tmp_path))
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text(json.dumps(evaluation(dict(GOOD, cas=0.55), GOOD, "0123456789ab")))
    passed, ui = gate_step(results, tmp_path / "gate.html", gates, [], "histo", decision_dir=tmp_path / "d")
    assert passed is False and ui["n_failing_gates"] == 1.0 and ui["candidate_cas"] == 0.55
    decision = json.loads((tmp_path / "d" / "decision.json").read_text())
    assert decision["champion"] == "0123456789ab" and decision["failures"] == "cas 0.55 < min 0.61"
    assert "REFUSED" in (tmp_path / "gate.html").read_text()
    with pytest.raises(ConfigError, match="refused"):  # a run form cannot loosen the gates
        gate_step(results, tmp_path / "gate.html", gates, ["gates.cas.tolerance=1"], "histo")


def test_register_step_sets_the_candidate_never_production(reg, tmp_path, monkeypatch):
    """The pipeline's register step (export stubbed: it merges a diffusers pipeline, see test_pipeline)."""
    import craft.promote as p

    def fake_export(base_dir, adapter_dir, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "model.bin").write_bytes(Path(base_dir, "w.bin").read_bytes())
        return out

    monkeypatch.setattr(p, "export_model", fake_export)
    profile = gates_file(tmp_path, GATES_YAML + f"registry:\n  root: {reg.root}\n", "profile.yaml")
    prod = register(reg, tmp_path, 9, evaluation(GOOD))
    reg.promote("histo", prod)
    lineage = {"dataset": {"name": "d", "version": "0123456789abcdef"}, "validation": {"ok": True}, "run": {"id": "r"}}
    base = tmp_path / "base"
    base.mkdir()
    (base / "w.bin").write_bytes(b"weights")
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text(json.dumps(evaluation(dict(GOOD, cas=0.7), GOOD, prod)))
    p.register_step(base, None, results, str(profile), [], "histo", lineage, out_dir=tmp_path / "out")
    registered = json.loads((tmp_path / "out" / "registered.json").read_text())
    version = registered["version"]
    assert reg.get_alias("histo", "candidate")["version"] == version
    assert reg.get_production("histo")["version"] == prod  # only `craft promote` moves production
    assert f"craft promote histo --version {version}" in registered["line"]
    stored = reg.get_version("histo", version)["metrics"]
    assert stored["cas"] == 0.7 and stored["champion"]["version"] == prod  # what promote_version re-checks
    # a failing candidate is refused here too; so is an unaudited lineage
    (results / "metrics.json").write_text(json.dumps(evaluation(dict(GOOD, near_duplicates=2), GOOD, prod)))
    with pytest.raises(RuntimeError, match="near_duplicates 2 > max 0"):
        p.register_step(base, None, results, str(profile), [], "histo", lineage)
    (results / "metrics.json").write_text(json.dumps(evaluation(dict(GOOD, cas=0.71), GOOD, prod)))
    with pytest.raises(Exception, match="passed validation"):
        p.register_step(base, None, results, str(profile), [], "histo", {**lineage, "validation": {"ok": False}})
    assert len(reg.list_versions("histo")) == 2


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
    assert any(r.startswith('craft promote "$MODEL" --version "$VERSION" --gates "$GATES" --dry-run') for r in runs)
    assert any(r.startswith('craft promote "$MODEL" --version "$VERSION"') and "--dry-run" not in r for r in runs)
    for r in runs:
        assert not re.search(r"\$\{\{\s*(github\.event\.)?inputs\.", r), f"input interpolated into a script: {r}"
    assert "secrets." in job["env"]["AWS_SECRET_ACCESS_KEY"]
    assert load_stage_config("gates", str(path.parents[2] / "configs" / "gates.yaml")) == load_stage_config(
        "gates", "gates"
    )
