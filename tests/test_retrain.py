"""`craft retrain-if-new-data` against SeaweedFS: version comparison, claims, concurrency, local run."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from craft.retrain import RetrainConfig, _marker_name, dataset_version_of, main, run_dataset_uri
from craft.storage.cas import get_json_etag, put_json_conditional
from craft.storage.dvc import dataset_version
from craft.storage.objectstore import ObjectStore, StorageConfig
from craft.storage.registry import Registry


class Runner:
    """Records every start; optionally slow, failing or reporting a KFP submission."""

    def __init__(self, delay: float = 0.0, fail: bool = False, mode: str = "local"):
        self.calls: list[tuple] = []
        self.delay, self.fail, self.mode = delay, fail, mode
        self.lock = threading.Lock()

    def __call__(self, profile, overrides, dataset_uri):
        with self.lock:
            self.calls.append((profile, tuple(overrides), dataset_uri))
            n = len(self.calls)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("pipeline failed: validate-op")
        return {"run_id": f"run-{n}", "mode": self.mode}


def make_dataset(root: Path, content: str) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "a.png").write_bytes(content.encode() * 50)
    (root / "dataset.yaml").write_text(f"name: t\nnote: {content}\n")
    return root


@pytest.fixture
def registry(s3_env) -> Registry:
    return Registry(ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), f"s3://{s3_env.make_bucket('rt')}")


def put_production(registry: Registry, tmp_path: Path, name: str, dataset_version: str) -> str:
    model = tmp_path / f"model-{dataset_version[:6]}"
    model.mkdir()
    (model / "w.bin").write_bytes(dataset_version.encode())
    v = registry.register(name, model, {"cas": 0.6}, {"dataset_version": dataset_version})
    registry.promote(name, v)
    return v


def marker(registry: Registry, name: str, version: str) -> dict:
    doc, _ = get_json_etag(registry.store, f"{registry.root}/models/{name}/retrain/{_marker_name(version)}")
    return doc


def test_dataset_versions(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "one")
    assert dataset_version_of(str(ds)) == dataset_version(ds) and dataset_version_of(str(ds)).endswith(".dir")
    dvc = tmp_path / "data.dvc"
    dvc.write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  path: data\n")
    assert dataset_version_of(str(dvc)) == "0123456789abcdef0123456789abcdef.dir"
    assert run_dataset_uri(str(dvc)) == str(tmp_path / "data") and run_dataset_uri(str(ds)) == str(ds)
    uri = f"{registry.root}/datasets/histo"
    registry.store.upload_dir(ds, uri)
    v1 = dataset_version_of(uri, registry.store)
    assert v1.startswith("sha256:") and dataset_version_of(uri, registry.store) == v1
    registry.store.upload_dir(make_dataset(tmp_path / "ds2", "two"), uri)
    assert dataset_version_of(uri, registry.store) != v1
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        dataset_version_of(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="empty"):
        dataset_version_of("")


def test_up_to_date_then_new_data(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "one")
    put_production(registry, tmp_path, "m", dataset_version(ds))
    runner = Runner()
    cfg = RetrainConfig(model="m", dataset=str(ds), overrides=["data.n=64"])
    out = main(cfg, registry, runner)
    assert out.action == "up-to-date" and runner.calls == []

    make_dataset(ds, "two")  # new data lands
    out = main(cfg, registry, runner)
    assert out.action == "started" and runner.calls == [("demo-histo", ("data.n=64",), str(ds))]
    assert out.production_dataset_version != out.dataset_version
    m = marker(registry, "m", out.dataset_version)
    assert m["state"] == "succeeded" and m["run"]["run_id"] == "run-1"
    # The same new version again (say the candidate was rejected by the gates): no second run.
    out = main(cfg, registry, runner)
    assert out.action == "already-claimed" and len(runner.calls) == 1
    assert main(RetrainConfig(model="m", dataset=str(ds), force=True), registry, runner).action == "started"
    assert len(runner.calls) == 2


def test_no_production_model_starts_a_run(registry, tmp_path):
    runner = Runner()
    out = main(RetrainConfig(model="fresh", dataset=str(make_dataset(tmp_path / "d", "x"))), registry, runner)
    assert out.action == "started" and out.production_version is None and len(runner.calls) == 1


def test_concurrent_invocations_start_exactly_one_run(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "new")
    put_production(registry, tmp_path, "c", "old-version.dir")
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
    assert sorted(o.action for o in outcomes) == ["already-claimed"] * 5 + ["started"]
    winner = next(o for o in outcomes if o.action == "started")
    assert marker(registry, "c", winner.dataset_version)["owner"] == winner.marker["owner"]


def test_failed_run_is_retried_and_expired_lease_taken_over(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "f")
    version = dataset_version(ds)
    with pytest.raises(RuntimeError, match="validate-op"):
        main(RetrainConfig(model="f", dataset=str(ds)), registry, Runner(fail=True))
    m = marker(registry, "f", version)
    assert m["state"] == "failed" and "validate-op" in m["error"]
    runner = Runner()
    assert main(RetrainConfig(model="f", dataset=str(ds)), registry, runner).action == "started"
    assert marker(registry, "f", version)["takeover"]["reason"] == "previous run failed"

    # A holder that died mid-run: its lease protects the claim until it expires.
    ds2 = make_dataset(tmp_path / "ds2", "g")
    uri = f"{registry.root}/models/f/retrain/{_marker_name(dataset_version(ds2))}"
    past = datetime.now(UTC) - timedelta(minutes=1)
    put_json_conditional(registry.store, uri, {"state": "started", "owner": "dead", "expires": past.isoformat()})
    assert main(RetrainConfig(model="f", dataset=str(ds2)), registry, runner).action == "started"
    assert "expired" in marker(registry, "f", dataset_version(ds2))["takeover"]["reason"]
    ds3 = make_dataset(tmp_path / "ds3", "h")
    uri = f"{registry.root}/models/f/retrain/{_marker_name(dataset_version(ds3))}"
    future = datetime.now(UTC) + timedelta(hours=1)
    put_json_conditional(registry.store, uri, {"state": "started", "owner": "alive", "expires": future.isoformat()})
    assert main(RetrainConfig(model="f", dataset=str(ds3)), registry, runner).action == "already-claimed"


def test_kfp_submission_is_recorded(registry, tmp_path):
    ds = make_dataset(tmp_path / "ds", "k")
    runner = Runner(mode="kfp")
    out = main(RetrainConfig(model="k", dataset=str(ds)), registry, runner)
    assert out.action == "submitted" and marker(registry, "k", out.dataset_version)["state"] == "submitted"
    assert main(RetrainConfig(model="k", dataset=str(ds)), registry, runner).action == "already-claimed"


def test_cli_runs_the_real_pipeline_locally_without_kfp_host(s3_env, tmp_path, monkeypatch):
    """End to end: no KFP_HOST -> `craft retrain-if-new-data` runs the KFP pipeline with kfp.local."""
    from craft.cli import app

    monkeypatch.delenv("KFP_HOST", raising=False)
    monkeypatch.chdir(tmp_path)
    root = f"s3://{s3_env.make_bucket('rtcli')}"
    reg = Registry(ObjectStore.from_env(StorageConfig(retries=2, backoff_s=0.01)), root)
    put_production(reg, tmp_path, "histo", "trained-on-older-data.dir")
    from craft.data.demo import DemoConfig, generate

    data = tmp_path / "data"
    generate(DemoConfig(modality="histo", n=64, seed=0), data)
    version = dataset_version(data)
    args = ["retrain-if-new-data", "--model", "histo", "--dataset", str(data), "--registry", root,
            "--root", str(tmp_path / "runs"), "validate.min_per_class=1", "pipeline.until=validate"]  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "started: histo: dataset" in res.output
    m = marker(reg, "histo", version)
    assert m["state"] == "succeeded" and m["run"]["ok"] is True
    run_dir = Path(m["run"]["run_id"])
    assert (run_dir / "validate-op" / "executor_output.json").is_file()
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0 and "already-claimed: histo" in res.output, res.output
    assert m["dataset"] == str(data) and m["dataset_version"] == version
