"""`craft retrain-if-new-data` against SeaweedFS: dataset versions, claims, concurrency, run reconciliation.

A fake run starter (and a fake ``run_status``) stands in for the pipeline here, so that every state of a
claim can be driven in seconds; the whole pipeline under this check is tested in tests/test_journey.py.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft.config import ConfigError
from craft.retrain import RetrainConfig, _marker_name, dataset_version_of, main, resolve_dataset, run_dataset_uri
from craft.storage import datasets
from craft.storage.cas import get_json_etag, put_json_conditional
from craft.storage.objectstore import ObjectStore, StorageConfig
from craft.storage.registry import Registry


class Runner:
    """A fake run starter: records every start; slow, raising, failing (state "failed") or a KFP submission."""

    def __init__(self, delay: float = 0.0, raises: bool = False, state: str = "succeeded", mode: str = "local"):
        self.calls: list[tuple] = []
        self.delay, self.raises, self.state, self.mode = delay, raises, state, mode
        self.lock = threading.Lock()

    def __call__(self, profile, overrides, dataset_uri, model_name):
        with self.lock:
            self.calls.append((profile, tuple(overrides), dataset_uri, model_name))
            n = len(self.calls)
        time.sleep(self.delay)
        if self.raises:
            raise RuntimeError("pipeline failed: validate-op")
        if self.mode == "kfp":
            return {"run_id": f"run-{n}", "mode": "kfp"}
        return {
            "run_id": f"run-{n}",
            "mode": "local",
            "state": self.state,
            "error": "boom" if self.state == "failed" else None,
        }


class Status:
    """A fake ``run_status``: the state of each Kubeflow run id, as set by the test."""

    def __init__(self, state: str = "running"):
        self.state, self.asked = state, []

    def __call__(self, run_id):
        self.asked.append(run_id)
        return self.state


def make_dataset(root: Path, content: str) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "a.png").write_bytes(content.encode() * 50)
    (root / "dataset.yaml").write_text("name: t\n")
    return root


@pytest.fixture
def registry(s3_env) -> Registry:
    return Registry(ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), f"s3://{s3_env.make_bucket('rt')}")


def put_production(registry: Registry, tmp_path: Path, name: str, dataset_version: str) -> str:
    model = tmp_path / f"model-{name}-{dataset_version}"
    model.mkdir()
    (model / "w.bin").write_bytes(dataset_version.encode())
    lineage = {"dataset": {"name": "t", "version": dataset_version}, "validation": {"ok": True}}
    v = registry.register(name, model, {"cas": 0.6}, lineage)
    registry.promote(name, v)
    return v


def marker(registry: Registry, name: str, version: str) -> dict:
    doc, _ = get_json_etag(registry.store, f"{registry.root}/models/{name}/retrain/{_marker_name(version)}")
    return doc


def test_dataset_versions(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "one")
    local = datasets.local_version(ds)
    assert dataset_version_of(str(ds)) == local and datasets.is_version(local)
    ref = resolve_dataset(str(ds))
    assert ref.source == "local" and run_dataset_uri(ref) == str(ds)  # the data step re-checks the folder
    base = f"{registry.root}/datasets/t"
    datasets.upload(registry.store, ds, base)
    assert dataset_version_of(base, registry.store) == local  # the same id on the store as on disk
    ref = resolve_dataset(base, registry.store)
    assert run_dataset_uri(ref) == f"{base}/{local}"  # the run reads the PINNED version, not the pointer
    datasets.upload(registry.store, make_dataset(tmp_path / "ds2", "two"), base)
    assert dataset_version_of(base, registry.store) not in (local, None)
    with pytest.raises(ValueError, match="no such dataset folder"):
        dataset_version_of(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="empty"):
        dataset_version_of("")


def test_up_to_date_then_new_data(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "one")
    base = f"{registry.root}/datasets/t"
    v1 = datasets.upload(registry.store, ds, base).version
    prod = put_production(registry, tmp_path, "m", v1)
    runner = Runner()
    cfg = RetrainConfig(model="m", dataset=base, overrides=["data.n=64"])
    out = main(cfg, registry, runner)  # production's lineage names the same dataset version
    assert out.action == "up-to-date" and runner.calls == [] and out.production_version == prod
    assert out.dataset_version == out.production_dataset_version == v1

    v2 = datasets.upload(registry.store, make_dataset(tmp_path / "ds2", "two"), base).version  # new data lands
    out = main(cfg, registry, runner)
    assert out.action == "started" and runner.calls == [("demo-histo", ("data.n=64",), f"{base}/{v2}", "m")]
    assert (out.dataset_version, out.production_dataset_version) == (v2, v1)
    m = marker(registry, "m", v2)
    assert m["state"] == "succeeded" and m["run"]["run_id"] == "run-1" and m["dataset_name"] == "t"
    assert [(a["n"], a["state"], a["run_id"]) for a in m["attempts"]] == [(1, "succeeded", "run-1")]
    # The same new version again (say the candidate was not promoted): no second run.
    out = main(cfg, registry, runner)
    assert out.action == "done" and len(runner.calls) == 1
    assert main(RetrainConfig(model="m", dataset=base, force=True), registry, runner).action == "started"
    assert len(runner.calls) == 2 and len(marker(registry, "m", v2)["attempts"]) == 2


def test_no_production_model_starts_a_run(registry, tmp_path):
    runner = Runner()
    out = main(RetrainConfig(model="fresh", dataset=str(make_dataset(tmp_path / "d", "x"))), registry, runner)
    assert out.action == "started" and out.production_version is None and len(runner.calls) == 1
    with pytest.raises(ValueError, match="retrain.model is empty"):
        main(RetrainConfig(dataset=str(tmp_path / "d")), registry, runner)


def test_concurrent_invocations_start_exactly_one_run(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "new")
    put_production(registry, tmp_path, "c", "00000000000000aa")
    runner = Runner(delay=0.5)
    outcomes, errors = [], []

    def go(i):
        try:
            outcomes.append(main(RetrainConfig(model="c", dataset=str(ds)), registry, runner, owner=f"worker{i}"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(runner.calls) == 1
    # the losers saw the winner's claim either in progress or already finished
    actions = sorted(o.action for o in outcomes)
    assert actions.count("started") == 1 and set(actions) - {"started"} <= {"already-claimed", "done"}, actions
    winner = next(o for o in outcomes if o.action == "started")
    assert marker(registry, "c", winner.dataset_version)["owner"] == winner.marker["owner"]


def test_failed_local_runs_are_retried_then_given_up(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "f")
    version = datasets.local_version(ds)
    cfg = RetrainConfig(model="f", dataset=str(ds), max_attempts=3)
    with pytest.raises(RuntimeError, match="validate-op"):  # a starter that raises: recorded, then re-raised
        main(cfg, registry, Runner(raises=True))
    m = marker(registry, "f", version)
    assert m["state"] == "failed" and "validate-op" in m["error"] and m["attempts"][0]["state"] == "failed"
    failing = Runner(state="failed")
    out = main(cfg, registry, failing)
    assert out.action == "failed" and "2/3 attempts" in out.message
    assert marker(registry, "f", version)["takeover"]["reason"].startswith("previous run failed (attempt 1 of 3)")
    assert main(cfg, registry, failing).action == "failed"
    out = main(cfg, registry, failing)  # three runs failed: the schedule stops starting this version
    assert out.action == "gave-up" and len(failing.calls) == 2
    m = marker(registry, "f", version)
    assert m["state"] == "gave-up" and [a["n"] for a in m["attempts"]] == [1, 2, 3]
    assert {a["state"] for a in m["attempts"]} == {"failed"}
    assert main(cfg, registry, failing).action == "gave-up" and len(failing.calls) == 2
    ok = Runner()
    out = main(RetrainConfig(model="f", dataset=str(ds), force=True), registry, ok)  # an operator insists
    assert out.action == "started" and len(marker(registry, "f", version)["attempts"]) == 4


def test_expired_lease_is_taken_over(registry, tmp_path):
    runner = Runner()
    ds = make_dataset(tmp_path / "ds", "g")
    uri = f"{registry.root}/models/f/retrain/{_marker_name(datasets.local_version(ds))}"
    past = datetime.now(UTC) - timedelta(minutes=1)
    put_json_conditional(registry.store, uri, {"state": "started", "owner": "dead", "expires": past.isoformat()})
    assert main(RetrainConfig(model="f", dataset=str(ds)), registry, runner).action == "started"
    assert "expired" in marker(registry, "f", datasets.local_version(ds))["takeover"]["reason"]
    ds2 = make_dataset(tmp_path / "ds2", "h")
    uri = f"{registry.root}/models/f/retrain/{_marker_name(datasets.local_version(ds2))}"
    future = datetime.now(UTC) + timedelta(hours=1)
    put_json_conditional(registry.store, uri, {"state": "started", "owner": "alive", "expires": future.isoformat()})
    assert main(RetrainConfig(model="f", dataset=str(ds2)), registry, runner).action == "already-claimed"
    assert len(runner.calls) == 1


def test_submitted_run_is_reconciled_by_its_run_id(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "k")
    version = datasets.local_version(ds)
    cfg = RetrainConfig(model="k", dataset=str(ds), max_attempts=2)
    runner = Runner(mode="kfp")
    out = main(cfg, registry, runner)
    assert out.action == "submitted" and marker(registry, "k", version)["state"] == "submitted"
    # without a way to ask Kubeflow (no KFP_HOST) the claim stands
    assert main(cfg, registry, runner).action == "already-claimed" and len(runner.calls) == 1

    status = Status("running")
    out = main(cfg, registry, runner, run_status=status)
    assert out.action == "running" and status.asked == ["run-1"] and len(runner.calls) == 1

    status.state = "failed"  # the run failed: start it again, the attempt recorded
    out = main(cfg, registry, runner, run_status=status)
    assert out.action == "submitted" and len(runner.calls) == 2
    m = marker(registry, "k", version)
    assert m["state"] == "submitted" and m["run"]["run_id"] == "run-2"
    assert [(a["n"], a["run_id"]) for a in m["attempts"]] == [(1, "run-1"), (2, "run-2")]

    out = main(cfg, registry, runner, run_status=status)  # failed max_attempts (2) times: give up
    assert out.action == "gave-up" and len(runner.calls) == 2 and status.asked[-1] == "run-2"
    m = marker(registry, "k", version)
    assert m["state"] == "gave-up" and m["attempts"][-1]["state"] == "failed" and m["attempts"][-1]["finished"]
    assert main(cfg, registry, runner, run_status=status).action == "gave-up" and len(runner.calls) == 2

    ds2 = make_dataset(tmp_path / "ds2", "k2")
    cfg2 = RetrainConfig(model="k", dataset=str(ds2))
    assert main(cfg2, registry, runner).action == "submitted"
    out = main(cfg2, registry, runner, run_status=Status("succeeded"))
    assert out.action == "done" and len(runner.calls) == 3
    m = marker(registry, "k", datasets.local_version(ds2))
    assert m["state"] == "succeeded" and m["attempts"][-1]["state"] == "succeeded"
    assert main(cfg2, registry, runner, run_status=Status("failed")).action == "done"  # succeeded is final


def test_a_restarted_kfp_attempt_is_recorded_as_failed(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "r")
    cfg = RetrainConfig(model="r", dataset=str(ds))
    runner = Runner(mode="kfp")
    main(cfg, registry, runner)
    main(cfg, registry, runner, run_status=Status("failed"))
    first = marker(registry, "r", datasets.local_version(ds))["attempts"][0]
    assert first["state"] == "failed" and first.get("finished")


def test_invalid_dataset_version_is_never_started(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "corrupt")
    version = datasets.local_version(ds)
    datasets.record_validation(registry.store, registry.root, "t", version, {"ok": False, "n_failures": 3})
    runner = Runner()
    out = main(RetrainConfig(model="v", dataset=str(ds)), registry, runner)
    assert out.action == "invalid" and runner.calls == [] and "3 failures" in out.message
    assert marker(registry, "v", version) is None  # not even claimed
    assert main(RetrainConfig(model="v", dataset=str(ds)), registry, runner).action == "invalid"
    assert runner.calls == []

    # a run that stops at validation records the verdict; the next check does not start it again
    ds2 = make_dataset(tmp_path / "ds2", "bad-later")
    v2 = datasets.local_version(ds2)

    def validating_runner(profile, overrides, dataset_uri, model_name):
        runner.calls.append(dataset_uri)
        datasets.record_validation(registry.store, registry.root, "t", v2, {"ok": False, "n_failures": 1})
        return {"run_id": "run-v", "mode": "local", "state": "failed", "error": "validate-op failed"}

    assert main(RetrainConfig(model="v", dataset=str(ds2)), registry, validating_runner).action == "invalid"
    assert marker(registry, "v", v2)["state"] == "invalid"
    assert main(RetrainConfig(model="v", dataset=str(ds2)), registry, validating_runner).action == "invalid"
    assert runner.calls == [str(ds2)]

    # a submitted run that failed at validation (the pipeline recorded the verdict) is not restarted
    ds3 = make_dataset(tmp_path / "ds3", "bad-kfp")
    v3 = datasets.local_version(ds3)
    kfp = Runner(mode="kfp")
    assert main(RetrainConfig(model="v", dataset=str(ds3)), registry, kfp).action == "submitted"
    datasets.record_validation(registry.store, registry.root, "t", v3, {"ok": False})
    out = main(RetrainConfig(model="v", dataset=str(ds3)), registry, kfp, run_status=Status("failed"))
    assert out.action == "invalid" and len(kfp.calls) == 1

    # a passed verdict does not block anything
    ds4 = make_dataset(tmp_path / "ds4", "good")
    datasets.record_validation(registry.store, registry.root, "t", datasets.local_version(ds4), {"ok": True})
    assert main(RetrainConfig(model="v", dataset=str(ds4)), registry, Runner()).action == "started"


def test_cli_wires_the_local_starter_without_kfp_host(s3_env, tmp_path, monkeypatch):
    """`craft retrain-if-new-data` without KFP_HOST: the local starter (faked here), exit codes, refused overrides."""
    from craft.cli import app
    from pipelines import client as kc

    monkeypatch.delenv("KFP_HOST", raising=False)
    root = f"s3://{s3_env.make_bucket('rtcli')}"
    reg = Registry(ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), root)
    put_production(reg, tmp_path, "histo", "00000000000000ff")
    data = make_dataset(tmp_path / "data", "cli")
    version = datasets.local_version(data)
    runner, roots = Runner(), []

    def local_run_starter(run_root):
        roots.append(Path(run_root))
        return runner

    monkeypatch.setattr(kc, "local_run_starter", local_run_starter)
    args = ["retrain-if-new-data", "--model", "histo", "--dataset", str(data), "--registry", root,
            "--root", str(tmp_path / "runs"), "validate.min_per_class=1"]  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"started: histo: dataset t {version}")
    assert roots == [tmp_path / "runs"]
    assert runner.calls == [("demo-histo", ("validate.min_per_class=1",), str(data), "histo")]
    m = marker(reg, "histo", version)
    assert m["state"] == "succeeded" and m["dataset"] == str(data) and m["dataset_version"] == version
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0 and res.output.startswith("done: histo"), res.output
    assert len(runner.calls) == 1
    with pytest.raises(ConfigError, match="refused"):
        CliRunner().invoke(app, [*args, "gates.cas.absolute=0.01"], catch_exceptions=False)
    runner.state = "failed"  # a failed run exits 1, so the CronJob's pod shows it
    res = CliRunner().invoke(app, [*args, "--force"], catch_exceptions=False)
    assert res.exit_code == 1 and res.output.startswith("failed: histo"), res.output
