"""The pipeline's register step records a candidate and never moves production; only `craft promote` does,
and only on an evaluation that scored the model in production NOW as its champion.

Real SeaweedFS registry; the model export (merging a LoRA into a diffusers pipeline) is replaced by a
small folder because it is exercised by the journey test and tests/test_promote.py.
"""

from __future__ import annotations

import json

import pytest

from craft import promote as P
from craft.storage.registry import CANDIDATE, open_registry

GOOD = {"cas": 0.6, "low_alignment_rate": 0.2, "oracle_accuracy": None, "near_duplicates": 0,
        "downstream_accuracy": 0.8}  # fmt: skip


def _results(tmp_path, name, candidate, champion=None):
    d = tmp_path / name
    d.mkdir()
    metrics = {**candidate, "candidate": {"name": "craft", **candidate}, "champion": champion,
               "zero_shot": {"name": "zero_shot", **GOOD, "cas": 0.3}}  # fmt: skip
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _lineage(version="0123456789abcdef"):
    return {"dataset": {"name": "toy", "version": version}, "validation": {"ok": True}, "profile": "demo-histo"}


@pytest.fixture
def registry(s3_env, monkeypatch, tmp_path):
    bucket = s3_env.make_bucket("cand")
    monkeypatch.setenv("CRAFT_REGISTRY", f"s3://{bucket}")

    def fake_export(base_dir, adapter_dir, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "model_index.json").write_text(json.dumps({"base": str(base_dir), "adapter": str(adapter_dir)}))
        return out_dir

    monkeypatch.setattr(P, "export_model", fake_export)
    return open_registry()


def test_register_sets_candidate_and_promote_moves_production(registry, tmp_path, capsys):
    res = _results(tmp_path, "r1", GOOD)
    P.register_step(tmp_path / "base", tmp_path / "lora", res, "demo-histo", [], "m", _lineage(), out_dir=tmp_path)
    v1 = registry.get_alias("m", CANDIDATE)["version"]
    assert registry.get_production("m") is None  # the pipeline never moves production
    line = json.loads((tmp_path / "registered.json").read_text())["line"]
    assert f"registered version {v1} as candidate" in line and "production unchanged" in line

    out = P.promote_version("m", v1, registry, actor="ci", reason="test")
    assert out.promoted and registry.get_production("m")["version"] == v1
    entry = registry.history("m")[-1]
    assert entry["actor"] == "ci" and entry["reason"] == "test"
    assert entry["details"]["gates"]["file"].endswith("demo-histo.yaml") and entry["details"]["gates"]["gates_sha256"]

    # a candidate evaluated without a champion while v1 is in production: the comparison is stale
    stale = _results(tmp_path, "r2", {**GOOD, "cas": 0.7})
    P.register_step(tmp_path / "base", tmp_path / "lora2", stale, "demo-histo", [], "m", _lineage("1" * 16))
    v2 = registry.get_alias("m", CANDIDATE)["version"]
    out = P.promote_version("m", v2, registry)
    assert not out.promoted and "champion" in out.decision.failure_text()
    assert registry.get_production("m")["version"] == v1

    # evaluated beside v1 and worse than it beyond the tolerance: not even registered, naming the gate
    worse = _results(tmp_path, "r3", {**GOOD, "cas": 0.55}, champion={"name": "champion", **GOOD, "version": v1})
    with pytest.raises(RuntimeError, match="cas 0.55 < min 0.59"):
        P.register_step(tmp_path / "base", tmp_path / "lora3", worse, "demo-histo", [], "m", _lineage("2" * 16))
    # and better than it: promoted
    better = _results(tmp_path, "r4", {**GOOD, "cas": 0.65}, champion={"name": "champion", **GOOD, "version": v1})
    P.register_step(tmp_path / "base", tmp_path / "lora4", better, "demo-histo", [], "m", _lineage("3" * 16))
    v4 = registry.get_alias("m", CANDIDATE)["version"]
    assert P.promote_version("m", v4, registry).promoted and registry.get_production("m")["version"] == v4


def test_register_refuses_a_failing_candidate_and_protected_overrides(registry, tmp_path):
    bad = _results(tmp_path, "bad", {**GOOD, "near_duplicates": 2})
    with pytest.raises(RuntimeError, match="near_duplicates"):
        P.register_step(tmp_path / "b", tmp_path / "l", bad, "demo-histo", [], "m", _lineage())
    from craft.config import ConfigError

    good = _results(tmp_path, "good", GOOD)
    with pytest.raises(ConfigError, match="refused"):
        P.register_step(tmp_path / "b", tmp_path / "l", good, "demo-histo", ["gates.cas.absolute=0.9"], "m",
                        _lineage())  # fmt: skip
    assert registry.list_versions("m") == []


def test_gate_floors_are_meaningful():
    from craft.config import ConfigError, load_stage_config

    cfg = load_stage_config("gates", "gates")
    assert cfg.cas.absolute > 0 and cfg.downstream_accuracy.absolute > 0
    with pytest.raises(ValueError, match="floor above 0"):
        P.GatesConfig(cas=P.MetricGate(absolute=0.0)).validate()
    with pytest.raises(ConfigError):
        load_stage_config("gates", "gates", ["gates.cas.absolute=0"])
