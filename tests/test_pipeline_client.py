"""Cluster-facing pipeline code: per-step resources compiled into the YAML, and the KFP client calls.

No Kubeflow Pipelines API server can run here, so the client tests use a recording fake of kfp.Client
(``FakeKfpClient``: it answers like kfp 2.17's client, with the v2beta1 field names) and assert on what is
sent: the pipeline name per profile, the five run parameters, pinned version ids, protected overrides
refused before any request. The local run starter's result mapping uses a stand-in for
``pipelines.local.run_local`` (the real one runs a whole kfp.local pipeline, minutes on these machines);
its real signature is checked. Everything compiled is compiled for real. No `from __future__ import
annotations`: KFP reads the component's real annotations.
"""

import secrets
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from kfp import compiler, dsl
from typer.testing import CliRunner

from pipelines import client as kc
from pipelines.resources import apply_resources, settings_for


@dsl.component(base_image="python:3.11-slim")
def _step(x: int) -> int:
    return x + 1


def _compile(pipeline_func, tmp_path: Path) -> dict:
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline_func, str(out))
    docs = list(yaml.safe_load_all(out.read_text()))  # the pipeline spec, then the platform (kubernetes) spec
    spec = docs[0]
    for extra in docs[1:]:
        spec.update(extra)
    return spec, out.read_text()


@pytest.fixture
def compiled(tmp_path, monkeypatch):
    # Credentials present in the compiling process must never leak into the YAML.
    sentinel = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
        "MLLM_API_KEY": "sk-" + secrets.token_hex(16),
        "KFP_TOKEN": secrets.token_hex(16),
    }
    for k, v in sentinel.items():
        monkeypatch.setenv(k, v)

    @dsl.pipeline(name="tiny")
    def tiny(x: int = 1):
        train = _step(x=x).set_display_name("craft")
        apply_resources(
            train,
            "craft",
            settings_for(
                "craft",
                {
                    "accelerator": {"type": "nvidia.com/gpu", "count": 2},
                    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                    "env": {"CRAFT_LOG_FORMAT": "json"},
                    "timeout_s": 7200,
                },
            ),
        )
        annotate = _step(x=train.output).set_display_name("annotate")
        apply_resources(annotate, "annotate", settings_for("annotate"))

    spec, text = _compile(tiny, tmp_path)
    return spec, text, sentinel


def _executor_for(spec: dict, display: str) -> str:
    tasks = spec["root"]["dag"]["tasks"]
    task = next(t for t in tasks.values() if t["taskInfo"]["name"] == display)
    return task["componentRef"]["name"].replace("comp-", "exec-"), task


def test_gpu_step_requests_accelerator_cpu_memory(compiled):
    spec, _, _ = compiled
    exec_name, task = _executor_for(spec, "craft")
    container = spec["deploymentSpec"]["executors"][exec_name]["container"]
    res = container["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "2"
    assert res["resourceCpuRequest"] == "8" and res["resourceMemoryLimit"] == "64Gi"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CRAFT_NPROC_PER_NODE"] == "2" and env["CRAFT_MODEL_CACHE"] == "/cache/models"
    assert task["retryPolicy"]["maxRetryCount"] == 1
    assert task["cachingOptions"].get("enableCache", False) is False  # sampling is stochastic
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"][exec_name]
    assert k8s["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s["tolerations"]
    mounts = {m["volumeName"]: m["mountPath"] for m in k8s["emptyDirMounts"]}
    assert mounts["model-cache"] == "/cache/models"  # one cache per pod, fed from the store
    assert mounts["dshm"] == "/dev/shm"  # 2 GPUs: torchrun's processes share memory through it
    assert k8s["activeDeadlineSeconds"] == "7200"


def test_secrets_are_references_only(compiled):
    spec, text, sentinel = compiled
    execs = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    refs = {}
    for name, ex in execs.items():
        for s in ex.get("secretAsEnv", []):
            for kv in s["keyToEnv"]:
                refs[(name, kv["envVar"])] = (s["secretName"], kv["secretKey"])
    train_exec, _ = _executor_for(spec, "craft")
    annotate_exec, _ = _executor_for(spec, "annotate")
    assert refs[(train_exec, "AWS_ACCESS_KEY_ID")] == ("craft-s3-writer", "accesskey")
    assert refs[(train_exec, "AWS_SECRET_ACCESS_KEY")] == ("craft-s3-writer", "secretkey")
    assert (annotate_exec, "AWS_SECRET_ACCESS_KEY") not in refs  # the annotate pod holds no object-store key
    assert refs[(annotate_exec, "MLLM_API_KEY")] == ("craft-mllm", "api-key")
    assert (train_exec, "MLLM_API_KEY") not in refs  # only the annotate step gets the MLLM key
    for value in sentinel.values():
        assert value not in text


def test_bad_settings_are_refused():
    # @dsl.pipeline runs the body when it decorates it, so the error surfaces at definition time.
    with pytest.raises(ValueError, match="unknown key"):

        @dsl.pipeline(name="bad")
        def bad():
            apply_resources(_step(x=1), "craft", {"gpus": 1})

    with pytest.raises(ValueError, match="looks like a credential"):

        @dsl.pipeline(name="leak")
        def leak():
            apply_resources(_step(x=1), "annotate", {"env": {"MLLM_API_KEY": "sk-123"}})


def test_settings_for_unknown_step_is_an_error():
    with pytest.raises(ValueError, match="no resource settings for step 'trian'"):
        settings_for("trian")
    a = settings_for("craft")
    a["tolerations"].append({"key": "x"})
    assert len(settings_for("craft")["tolerations"]) == 1  # callers get copies


def test_real_pipeline_compiles_without_credential_values(tmp_path, monkeypatch):
    from pipelines.craft_pipeline import craft_pipeline

    secret = secrets.token_hex(20)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("MLLM_API_KEY", secret[::-1])
    spec, text = _compile(craft_pipeline, tmp_path)
    assert secret not in text and secret[::-1] not in text
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(kc.run_params("demo-histo", [])) == set(params), "a run must pass every pipeline parameter"


# ------------------------------------------------------------------------------------ KFP client


class FakeKfpClient:
    """Records calls with their arguments; answers like kfp.Client 2.17 (objects with v2beta1 *_id fields)."""

    instances: list = []
    server: dict = {}  # state shared by every client, like one KFP API server

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, tuple, dict]] = []
        self.pipelines = self.server.setdefault("pipelines", {})
        self.versions = self.server.setdefault("versions", {})
        self.experiments = self.server.setdefault("experiments", {})
        self.runs = self.server.setdefault("runs", {})  # run id -> state
        FakeKfpClient.instances.append(self)

    def _rec(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))

    def get_pipeline_id(self, name):
        self._rec("get_pipeline_id", name)
        return self.pipelines.get(name)

    def upload_pipeline(self, path, pipeline_name=None, description=None, namespace=None):
        self._rec("upload_pipeline", path, pipeline_name=pipeline_name, namespace=namespace)
        pid = f"pid-{len(self.pipelines)}"
        self.pipelines[pipeline_name] = pid
        self.versions[pid] = [f"{pid}-v0"]
        return SimpleNamespace(pipeline_id=pid)

    def upload_pipeline_version(
        self, path, pipeline_version_name, pipeline_id=None, pipeline_name=None, description=None
    ):
        self._rec(
            "upload_pipeline_version", path, pipeline_version_name=pipeline_version_name, pipeline_id=pipeline_id
        )
        vid = f"{pipeline_id}-v{len(self.versions[pipeline_id])}"
        self.versions[pipeline_id].append(vid)
        return SimpleNamespace(pipeline_version_id=vid)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        self._rec("list_pipeline_versions", pipeline_id, sort_by=sort_by, page_size=page_size)
        assert sort_by == "created_at desc"
        vs = list(reversed(self.versions.get(pipeline_id, [])))[:page_size]
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id=v) for v in vs])

    def get_pipeline_version(self, pipeline_id, pipeline_version_id):
        from kfp_server_api.exceptions import ApiException

        self._rec("get_pipeline_version", pipeline_id, pipeline_version_id)
        owner = next((p for p, vs in self.versions.items() if pipeline_version_id in vs), None)
        if owner is None:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(pipeline_id=owner, pipeline_version_id=pipeline_version_id)

    def get_experiment(self, experiment_id=None, experiment_name=None, namespace=None):
        self._rec("get_experiment", experiment_name=experiment_name, namespace=namespace)
        if experiment_name not in self.experiments:
            raise ValueError(f"No experiment is found with name {experiment_name}.")
        return SimpleNamespace(experiment_id=self.experiments[experiment_name])

    def create_experiment(self, name, description=None, namespace=None):
        self._rec("create_experiment", name, namespace=namespace)
        self.experiments[name] = f"exp-{name}"
        return SimpleNamespace(experiment_id=self.experiments[name])

    def run_pipeline(self, experiment_id, job_name, **kwargs):
        self._rec("run_pipeline", experiment_id, job_name, **kwargs)
        run_id = f"run-{len(self.runs) + 1}"
        self.runs[run_id] = "PENDING"
        return SimpleNamespace(run_id=run_id)

    def get_run(self, run_id):
        self._rec("get_run", run_id)
        return SimpleNamespace(run_id=run_id, state=self.runs[run_id])

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def kfp_env(monkeypatch):
    FakeKfpClient.instances.clear()
    FakeKfpClient.server.clear()
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow.svc.cluster.local:8888")
    monkeypatch.setenv("KFP_NAMESPACE", "team-a")
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    monkeypatch.delenv("KFP_EXPERIMENT", raising=False)
    monkeypatch.delenv("CRAFT_BASE_URI", raising=False)
    monkeypatch.setattr("kfp.Client", FakeKfpClient)
    return FakeKfpClient


def _uploaded(*profiles_versions):
    """Server state: pipeline craft-<profile> with n versions, ids pid-<i> / pid-<i>-v<j>."""
    for i, (profile, n) in enumerate(profiles_versions):
        FakeKfpClient.server.setdefault("pipelines", {})[f"craft-{profile}"] = f"pid-{i}"
        FakeKfpClient.server.setdefault("versions", {})[f"pid-{i}"] = [f"pid-{i}-v{j}" for j in range(n)]


def _runs():
    calls = [c for inst in FakeKfpClient.instances for c in inst.calls]
    return [c for c in calls if c[0] == "run_pipeline"]


def test_make_client_from_environment(kfp_env, monkeypatch):
    client, ns = kc.make_client()
    assert ns == "team-a"
    assert client.kwargs == {"host": "http://ml-pipeline.kubeflow.svc.cluster.local:8888", "namespace": "team-a",
                             "existing_token": "tok-123"}  # fmt: skip
    monkeypatch.delenv("KFP_TOKEN")  # in-cluster: kfp.Client reads the projected SA token itself
    assert "existing_token" not in kc.make_client()[0].kwargs
    monkeypatch.delenv("KFP_HOST")
    with pytest.raises(kc.KfpConfigError, match="KFP_HOST is not set"):
        kc.make_client()


def test_names_per_profile_match_the_compiled_pipeline_and_the_registry_default():
    from pipelines.craft_pipeline import pipeline_name

    for profile in ("demo-histo", "chexpert", "/opt/craft/configs/site-a.yaml"):
        assert kc.pipeline_name(profile) == pipeline_name(profile) == f"craft-{Path(profile).stem}"
        assert kc.default_model_name(profile) == Path(profile).stem
    with pytest.raises(ValueError, match="profile"):
        kc.pipeline_name("")


def test_upload_creates_then_adds_versions(kfp_env, tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text("pipelineInfo: {name: craft-demo-cxr}\n")
    client, ns = kc.make_client()
    first = kc.upload(client, package, "craft-demo-cxr", namespace=ns)
    assert first == {"pipeline_id": "pid-0", "version_id": "pid-0-v0", "created": True}
    assert client.calls[1] == (
        "upload_pipeline", (str(package),), {"pipeline_name": "craft-demo-cxr", "namespace": "team-a"}
    )  # fmt: skip
    second = kc.upload(client, package, "craft-demo-cxr", version="craft-demo-cxr-0.1.1", namespace=ns)
    assert second == {"pipeline_id": "pid-0", "version_id": "pid-0-v1", "created": False}
    assert client.calls[-1][2] == {"pipeline_version_name": "craft-demo-cxr-0.1.1", "pipeline_id": "pid-0"}
    kc.upload(client, package, "craft-demo-cxr", namespace=ns)
    from components.images import VERSION

    auto = client.calls[-1][2]["pipeline_version_name"]
    assert auto.startswith(f"craft-demo-cxr-{VERSION}-"), auto  # the code version is in the version name
    with pytest.raises(FileNotFoundError, match="compiled pipeline not found"):
        kc.upload(client, tmp_path / "missing.yaml", "craft-demo-cxr")


def test_cli_upload_compiles_each_profiles_own_plan(kfp_env, tmp_path):
    from craft.cli import app

    runner = CliRunner()
    for profile in ("demo-histo", "chexpert"):
        res = runner.invoke(app, ["pipeline", "upload", "--profile", profile], catch_exceptions=False)
        assert res.exit_code == 0, res.output
    uploads = [c for c in kfp_env.instances[-1].calls + kfp_env.instances[0].calls if c[0] == "upload_pipeline"]
    by_name = {kw["pipeline_name"]: args[0] for _, args, kw in uploads}
    assert set(by_name) == {"craft-demo-histo", "craft-chexpert"}
    histo, cxr = kc.task_names(by_name["craft-demo-histo"]), kc.task_names(by_name["craft-chexpert"])
    assert {"pretrain", "finetune", "critic"} <= histo and "import-foundation" not in histo
    assert "import-foundation" in cxr and not {"pretrain", "finetune", "critic"} & cxr  # chexpert imports them
    spec = next(yaml.safe_load_all(Path(by_name["craft-chexpert"]).read_text()))
    assert spec["pipelineInfo"]["name"] == "craft-chexpert"

    # the same profile again: a new version of ITS pipeline, named with the code version
    res = runner.invoke(app, ["pipeline", "upload", "--profile", "chexpert"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _, _, kw = next(c for c in kfp_env.instances[-1].calls if c[0] == "upload_pipeline_version")
    assert kw["pipeline_id"] == FakeKfpClient.server["pipelines"]["craft-chexpert"]
    assert kw["pipeline_version_name"].startswith("craft-chexpert-0.1.0-")

    # a package compiled from another profile's plan is not uploaded under this profile's name
    other = kc.compile_package("demo-histo", tmp_path / "histo.yaml")
    res = runner.invoke(app, ["pipeline", "upload", "--profile", "chexpert", "--package", str(other)])
    assert res.exit_code == 2 and "was not compiled from profile 'chexpert'" in res.output, res.output
    assert not [c for c in kfp_env.instances[-1].calls if c[0].startswith("upload")]


def test_run_sends_all_five_parameters_to_the_profiles_pipeline(kfp_env):
    _uploaded(("demo-histo", 2), ("chexpert", 2))
    client, ns = kc.make_client()
    out = kc.run(client, "chexpert", ["data.n=800"], "s3://craft/datasets/chexpert", "s3://craft/models/base/sd21",
                 "cxr-site-a", namespace=ns, run_name="r1")  # fmt: skip
    name, args, kwargs = client.calls[-1]
    assert name == "run_pipeline" and args == ("exp-craft", "r1")
    assert kwargs["params"] == {"profile": "chexpert", "overrides": ["data.n=800"],
                                "dataset_uri": "s3://craft/datasets/chexpert",
                                "base_uri": "s3://craft/models/base/sd21", "model_name": "cxr-site-a"}  # fmt: skip
    assert kwargs["pipeline_id"] == "pid-1" and kwargs["version_id"] == "pid-1-v1"  # craft-chexpert, latest
    assert out == {"run_id": "run-1", "mode": "kfp", "pipeline_id": "pid-1", "version_id": "pid-1-v1", "name": "r1",
                   "pipeline_name": "craft-chexpert"}  # fmt: skip
    assert "create_experiment" in client.names()

    kc.run(client, "demo-histo", [], namespace=ns)  # defaults: demo data, no base, model = the profile's name
    _, args, kwargs = client.calls[-1]
    assert kwargs["params"] == {"profile": "demo-histo", "overrides": [], "dataset_uri": "", "base_uri": "",
                                "model_name": "demo-histo"}  # fmt: skip
    assert kwargs["pipeline_id"] == "pid-0" and args[1].startswith("craft-demo-histo-")
    assert client.names().count("create_experiment") == 1  # found the second time

    kc.run(client, "chexpert", [], version_id="pid-1-v0", namespace=ns)  # pinned
    assert client.calls[-1][2]["version_id"] == "pid-1-v0"
    with pytest.raises(kc.KfpConfigError, match="belongs to pipeline pid-0"):
        kc.run(client, "chexpert", [], version_id="pid-0-v1")  # demo-histo's DAG under a chexpert run
    with pytest.raises(kc.KfpConfigError, match="has no version 'nope'"):
        kc.run(client, "chexpert", [], version_id="nope")
    with pytest.raises(kc.KfpConfigError, match=r"never uploaded; run `craft pipeline upload --profile demo-cxr`"):
        kc.run(client, "demo-cxr", [])
    with pytest.raises(ValueError, match="stage.key=value"):
        kc.run(client, "demo-histo", ["oops"])


@pytest.mark.parametrize(
    "override", ["gates.cas.enabled=false", "gates.cas.absolute=0", "registry.root=s3://elsewhere",
                 "annotate.api_key_env=OTHER_KEY"],
)  # fmt: skip
def test_protected_overrides_are_refused_before_the_host_is_contacted(kfp_env, override):
    from craft.cli import app
    from craft.config import ConfigError

    _uploaded(("demo-histo", 1))
    with pytest.raises(ConfigError, match="refused"):
        kc.run_params("demo-histo", ["data.n=64", override])
    res = CliRunner().invoke(app, ["pipeline", "run", "--profile", "demo-histo", "data.n=64", override])
    assert res.exit_code == 2 and "refused" in res.output, res.output
    assert FakeKfpClient.instances == []  # no client was even made
    sched = ["pipeline", "schedule", "--profile", "demo-histo", "--cron", "0 3 * * *",
             "--dataset", "s3://craft/datasets/histo", override]  # fmt: skip
    res = CliRunner().invoke(app, sched)
    assert res.exit_code == 2 and "refused" in res.output, res.output


def test_cli_run_passes_every_option_and_refuses_a_profile_never_uploaded(kfp_env):
    from craft.cli import app

    _uploaded(("demo-histo", 1), ("chexpert", 3))
    runner = CliRunner()
    args = ["pipeline", "run", "--profile", "chexpert", "--dataset-uri", "s3://craft/datasets/chexpert",
            "--base-uri", "s3://craft/models/base/sd21-base", "--model-name", "cxr-site-a",
            "--version-id", "pid-1-v1", "--run-name", "nightly", "data.n=800", "reward.loop.steps=10"]  # fmt: skip
    res = runner.invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (_, run_args, kw), *_ = _runs()
    assert run_args[1] == "nightly" and kw["pipeline_id"] == "pid-1" and kw["version_id"] == "pid-1-v1"
    assert kw["params"] == {"profile": "chexpert", "overrides": ["data.n=800", "reward.loop.steps=10"],
                            "dataset_uri": "s3://craft/datasets/chexpert",
                            "base_uri": "s3://craft/models/base/sd21-base", "model_name": "cxr-site-a"}  # fmt: skip
    assert '"run_id": "run-1"' in res.output

    res = runner.invoke(app, ["pipeline", "run", "--profile", "demo-cxr"])
    assert res.exit_code == 2, res.output
    assert "no pipeline 'craft-demo-cxr'" in res.output and "craft pipeline upload --profile demo-cxr" in res.output
    res = runner.invoke(app, ["pipeline", "run", "--profile", "chexpert", "--version-id", "pid-0-v0"])
    assert res.exit_code == 2 and "belongs to pipeline pid-0" in res.output, res.output
    assert len(_runs()) == 1  # neither refusal started a run


def test_schedule_renders_a_cronjob_and_creates_no_kfp_recurring_run(kfp_env):
    from craft.cli import app

    _uploaded(("demo-histo", 1))
    args = ["pipeline", "schedule", "--profile", "demo-histo", "--cron", "30 2 * * 1",
            "--dataset", "s3://craft/datasets/histo"]  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(res.output)
    assert doc["kind"] == "CronJob" and doc["spec"]["schedule"] == "30 2 * * 1"
    assert FakeKfpClient.instances == []  # the check for new data runs in the CronJob, not as a KFP recurring run
    assert not hasattr(kc, "schedule") and not hasattr(kc, "normalize_cron")


def test_start_run_is_the_retrain_starter_for_kfp(kfp_env, monkeypatch):
    _uploaded(("demo-histo", 2))
    monkeypatch.setenv("KFP_EXPERIMENT", "nightly")
    monkeypatch.setenv("CRAFT_BASE_URI", "s3://craft/models/base/histo-foundation")  # set by the CronJob
    out = kc.start_run("demo-histo", ["data.n=64"], "s3://craft/datasets/histo/9c0d1e4b", "histo-site-a")
    assert {k: out[k] for k in ("run_id", "mode", "pipeline_id", "version_id")} == {
        "run_id": "run-1", "mode": "kfp", "pipeline_id": "pid-0", "version_id": "pid-0-v1"}  # fmt: skip
    assert out["name"].startswith("craft-demo-histo-")
    client = FakeKfpClient.instances[-1]
    (_, run_args, kw), *_ = _runs()
    assert run_args[0] == "exp-nightly" and client.kwargs["namespace"] == "team-a"
    assert kw["params"] == {"profile": "demo-histo", "overrides": ["data.n=64"],
                            "dataset_uri": "s3://craft/datasets/histo/9c0d1e4b",
                            "base_uri": "s3://craft/models/base/histo-foundation",
                            "model_name": "histo-site-a"}  # fmt: skip
    kc.start_run("demo-histo", [], "s3://craft/datasets/histo/9c0d1e4b", "", base_uri="")
    assert _runs()[-1][2]["params"]["model_name"] == "demo-histo"
    assert _runs()[-1][2]["params"]["base_uri"] == ""
    with pytest.raises(kc.KfpConfigError, match="craft pipeline upload --profile chexpert"):
        kc.start_run("chexpert", [], "s3://craft/datasets/chexpert", "chexpert")


def test_run_status_maps_every_kfp_runtime_state(kfp_env):
    from kfp_server_api.models import V2beta1Run, V2beta1RuntimeState

    assert "state" in V2beta1Run.openapi_types  # the attribute kc.run_status reads (kfp 2.17, v2beta1)
    want = {"RUNTIME_STATE_UNSPECIFIED": "running", "PENDING": "running", "RUNNING": "running",
            "PAUSED": "running", "CANCELING": "running", "SUCCEEDED": "succeeded", "SKIPPED": "succeeded",
            "FAILED": "failed", "CANCELED": "failed"}  # fmt: skip
    assert set(want) == set(V2beta1RuntimeState.allowable_values)
    client, _ = kc.make_client()
    FakeKfpClient.server["runs"].update({f"r-{s}": s for s in want})
    assert {s: kc.run_status(f"r-{s}", client) for s in want} == want
    assert kc.run_state("Error") == "failed" and kc.run_state("Succeeded") == "succeeded"  # v1 API spellings
    assert kc.run_state(None) == "running" and kc.run_state("SOMETHING_NEW") == "running"  # wait, never rerun
    FakeKfpClient.server["runs"]["r-x"] = "FAILED"
    assert kc.run_status("r-x") == "failed"  # without a client: one from the environment
    assert FakeKfpClient.instances[-1].calls == [("get_run", ("r-x",), {})]


def test_local_run_starter_reports_success_and_failure_without_raising(tmp_path, monkeypatch):
    import inspect

    import pipelines.local

    params = inspect.signature(pipelines.local.run_local).parameters
    assert {"dataset_uri", "model_name", "base_uri"} <= set(params)  # the keywords the starter passes
    calls = []

    def fake_run_local(profile, overrides, root, **kwargs):
        calls.append((profile, overrides, Path(root), kwargs))
        run_dir = Path(root) / f"craft-{profile}-{len(calls)}"
        run_dir.mkdir()
        if kwargs["dataset_uri"] == "s3://craft/datasets/broken":
            raise RuntimeError(
                "Pipeline 'craft-demo-histo' finished with status FAILURE. Inner task failed: 'validate'."
            )
        return {"run_dir": str(run_dir), "ok": True, "wall_s": 12.5, "decision": "registered"}

    monkeypatch.setattr(pipelines.local, "run_local", fake_run_local)
    monkeypatch.setenv("CRAFT_BASE_URI", "s3://craft/models/base/x")
    start = kc.local_run_starter(tmp_path / "runs")
    ok = start("demo-histo", ["data.n=64"], "s3://craft/datasets/histo", "histo-a")
    assert ok == {"run_id": str(tmp_path / "runs" / "craft-demo-histo-1"), "mode": "local", "state": "succeeded",
                  "ok": True, "wall_s": 12.5, "error": None, "decision": "registered"}  # fmt: skip
    assert calls[0] == ("demo-histo", ["data.n=64"], (tmp_path / "runs").resolve(),
                        {"dataset_uri": "s3://craft/datasets/histo", "model_name": "histo-a",
                         "base_uri": "s3://craft/models/base/x"})  # fmt: skip
    bad = start("demo-histo", [], "s3://craft/datasets/broken", "histo-a", base_uri="")
    assert bad["state"] == "failed" and bad["ok"] is False and bad["mode"] == "local"
    assert "Inner task failed: 'validate'" in bad["error"] and bad["run_id"].endswith("craft-demo-histo-2")
    assert isinstance(bad["wall_s"], float) and calls[-1][3]["base_uri"] == ""


def _all_tasks(spec: dict):
    """Every task of the compiled pipeline, nested dsl.If / ParallelFor groups included."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    for dag in dags:
        yield from dag.get("tasks", {}).values()


def test_real_pipeline_steps_carry_their_resources(tmp_path):
    """Each step of the real pipeline compiles with its DEFAULT_RESOURCES: requests, GPUs, secrets, PVC."""
    from pipelines.craft_pipeline import RESOURCE_STEP, craft_pipeline
    from pipelines.resources import DEFAULT_RESOURCES

    spec, _ = _compile(craft_pipeline, tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    k8s = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    seen = set()
    for task in _all_tasks(spec):
        comp = spec["components"][task["componentRef"]["name"]]
        if "executorLabel" not in comp:
            continue  # a group (dsl.If / ParallelFor), its tasks come from its own dag
        step = RESOURCE_STEP.get(task["taskInfo"]["name"], task["taskInfo"]["name"])
        assert step in DEFAULT_RESOURCES, f"task {step!r} has no resource settings"
        want = settings_for(step)
        label = comp["executorLabel"]
        res = executors[label]["container"]["resources"]
        assert res["resourceCpuRequest"] == want["cpu"] and res["resourceMemoryRequest"] == want["memory"], step
        assert "resourceCpuLimit" in res and "resourceMemoryLimit" in res, step
        if want.get("accelerator"):
            assert res["accelerator"]["resourceType"] == want["accelerator"]["type"], step
        else:
            assert "accelerator" not in res, step
        secrets_used = {s["secretName"] for s in k8s.get(label, {}).get("secretAsEnv", [])}
        assert (want["object_store_secret"] in secrets_used) if want.get("object_store_secret") else (
            not secrets_used & {"craft-s3-reader", "craft-s3-writer"}), step  # fmt: skip
        assert ("craft-mllm" in secrets_used) == bool(want.get("mllm_secret")), step
        mounts = {m["volumeName"]: m["mountPath"] for m in k8s.get(label, {}).get("emptyDirMounts", [])}
        assert (mounts.get("model-cache") == "/cache/models") == bool(want.get("model_cache")), step
        assert ("craft-scratch" in mounts) == bool(want.get("ephemeral_storage")), step  # the disk budget
        seen.add(step)
    assert {"data", "validate"} <= seen


def test_deploy_doc_lists_every_ui_parameter(tmp_path):
    """docs/DEPLOY.md documents each run parameter the Kubeflow UI shows for the compiled pipeline."""
    from pipelines.craft_pipeline import craft_pipeline

    spec, _ = _compile(craft_pipeline, tmp_path)
    params = spec["root"]["inputDefinitions"]["parameters"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "DEPLOY.md").read_text()
    missing = [p for p in params if f"| `{p}` |" not in doc]
    assert not missing, f"docs/DEPLOY.md section 6 does not describe pipeline parameter(s) {missing}"


def test_cli_retrain_submits_to_kfp_when_host_set(kfp_env, s3_env, tmp_path):
    """`craft retrain-if-new-data` with KFP_HOST: one run of the profile's pipeline, for the model it watches."""
    from craft.cli import app

    _uploaded(("demo-histo", 1))
    bucket = s3_env.make_bucket("kfprt")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "x.png").write_bytes(b"x" * 64)
    args = ["retrain-if-new-data", "--model", "m", "--dataset", str(data), "--registry", f"s3://{bucket}"]
    res = CliRunner().invoke(app, [*args, "data.n=64"], catch_exceptions=False)
    assert res.exit_code == 0 and res.output.startswith("submitted: m: dataset"), res.output
    (_, _, kw), *_ = _runs()
    assert kw["pipeline_id"] == "pid-0"  # craft-demo-histo
    assert kw["params"] == {"profile": "demo-histo", "overrides": ["data.n=64"], "dataset_uri": str(data),
                            "base_uri": "", "model_name": "m"}  # fmt: skip
    res = CliRunner().invoke(app, args, catch_exceptions=False)  # the run is still PENDING on the server
    assert res.output.startswith("running: m"), res.output
    assert len(_runs()) == 1
