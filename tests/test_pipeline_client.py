"""Cluster-facing pipeline code: per-step resources compiled into the YAML, and the KFP client calls.

No Kubeflow Pipelines server can run here, so the client tests use a recording fake of kfp.Client (the
one place a fake is allowed); the compiled YAML is checked for real. No `from __future__ import annotations`:
KFP reads the component's real annotations.
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
                    "env": {"CRAFT_S3_ENDPOINT": "minio-service.kubeflow:9000"},
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
    assert k8s["pvcMount"][0]["mountPath"] == "/cache/models"
    assert k8s["pvcMount"][0]["pvcNameParameter"]["runtimeValue"]["constant"] == "craft-model-cache"
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
    assert refs[(train_exec, "AWS_ACCESS_KEY_ID")] == ("mlpipeline-minio-artifact", "accesskey")
    assert refs[(train_exec, "AWS_SECRET_ACCESS_KEY")] == ("mlpipeline-minio-artifact", "secretkey")
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
    assert set(kc.run_params("demo-histo", [])) <= set(params), "client run params must match the pipeline's"


# ------------------------------------------------------------------------------------ KFP client


class FakeKfpClient:
    """Records calls with their arguments; answers like kfp.Client 2.x (objects with *_id fields)."""

    instances: list = []
    server: dict = {}  # state shared by every client, like one KFP API server

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, tuple, dict]] = []
        self.pipelines = self.server.setdefault("pipelines", {})
        self.versions = self.server.setdefault("versions", {})
        self.experiments = self.server.setdefault("experiments", {})
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
        return SimpleNamespace(run_id="run-1")

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        self._rec("create_recurring_run", experiment_id, job_name, **kwargs)
        return SimpleNamespace(recurring_run_id="rr-1")

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def kfp_env(monkeypatch):
    FakeKfpClient.instances.clear()
    FakeKfpClient.server.clear()
    monkeypatch.setenv("KFP_HOST", "http://ml-pipeline.kubeflow.svc.cluster.local:8888")
    monkeypatch.setenv("KFP_NAMESPACE", "team-a")
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    monkeypatch.setattr("kfp.Client", FakeKfpClient)
    return FakeKfpClient


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


def test_upload_then_new_version_then_run_and_schedule(kfp_env, tmp_path):
    package = tmp_path / "p.yaml"
    package.write_text("pipelineInfo: {name: craft}\n")
    client, ns = kc.make_client()
    first = kc.upload(client, package, namespace=ns)
    assert first == {"pipeline_id": "pid-0", "version_id": "pid-0-v0", "created": True}
    assert client.calls[1] == ("upload_pipeline", (str(package),), {"pipeline_name": "craft", "namespace": "team-a"})
    second = kc.upload(client, package, version="craft-0.1.0-test", namespace=ns)
    assert second == {"pipeline_id": "pid-0", "version_id": "pid-0-v1", "created": False}
    assert client.calls[-1][2] == {"pipeline_version_name": "craft-0.1.0-test", "pipeline_id": "pid-0"}

    out = kc.run(client, "demo-cxr", ["data.n=800"], "s3://craft/datasets/cxr", namespace=ns, run_name="r1")
    assert out["run_id"] == "run-1" and out["version_id"] == "pid-0-v1"  # latest version
    name, args, kwargs = client.calls[-1]
    assert name == "run_pipeline" and args == ("exp-craft", "r1")
    assert kwargs["params"] == {"profile": "demo-cxr", "overrides": ["data.n=800"],
                                "dataset_uri": "s3://craft/datasets/cxr"}  # fmt: skip
    assert kwargs["pipeline_id"] == "pid-0" and kwargs["version_id"] == "pid-0-v1"
    assert "create_experiment" in client.names()

    out = kc.schedule(client, "0 3 * * *", "demo-histo", [], namespace=ns, version_id="pid-0-v0")
    name, args, kwargs = client.calls[-1]
    assert name == "create_recurring_run" and out["recurring_run_id"] == "rr-1"
    assert kwargs["cron_expression"] == "0 0 3 * * *" and kwargs["max_concurrency"] == 1
    assert kwargs["no_catchup"] is True and kwargs["version_id"] == "pid-0-v0"
    assert client.names().count("create_experiment") == 1  # found the second time

    with pytest.raises(ValueError, match="cron expression"):
        kc.schedule(client, "every day", "demo-histo")
    with pytest.raises(ValueError, match="stage.key=value"):
        kc.run(client, "demo-histo", ["oops"])
    with pytest.raises(kc.KfpConfigError, match="craft pipeline upload"):
        kc.run(client, "demo-histo", [], name="other")


def test_cli_pipeline_upload_compiles_and_uploads(kfp_env):
    from craft.cli import app

    res = CliRunner().invoke(app, ["pipeline", "upload"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    client = kfp_env.instances[-1]
    name, args, _ = next(c for c in client.calls if c[0] == "upload_pipeline")
    compiled = next(yaml.safe_load_all(Path(args[0]).read_text()))  # pipeline spec (platform spec follows)
    assert compiled["pipelineInfo"]["name"] == "craft"
    res = CliRunner().invoke(app, ["pipeline", "run", "--profile", "demo-histo", "data.n=64"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app, ["pipeline", "schedule", "--cron", "30 2 * * 1", "--profile", "demo-cxr"], catch_exceptions=False
    )
    assert res.exit_code == 0 and '"recurring_run_id": "rr-1"' in res.output


def test_retrain_uses_kfp_when_host_set(kfp_env):
    client_calls = []

    def factory(**kw):
        c = FakeKfpClient(**kw)
        c.pipelines["craft"] = "pid-9"
        c.versions["pid-9"] = ["pid-9-v0"]
        client_calls.append(c)
        return c

    import kfp

    kfp.Client = factory  # restored by monkeypatch in kfp_env
    out = kc.start_run("demo-histo", ["data.n=64"], "s3://craft/datasets/histo")
    assert out["mode"] == "kfp" and out["run_id"] == "run-1"
    run_call = next(c for c in client_calls[-1].calls if c[0] == "run_pipeline")
    assert run_call[2]["params"]["dataset_uri"] == "s3://craft/datasets/histo"


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
        assert "mlpipeline-minio-artifact" in secrets_used, step
        assert ("craft-mllm" in secrets_used) == bool(want.get("mllm_secret")), step
        mounts = [m["mountPath"] for m in k8s.get(label, {}).get("pvcMount", [])]
        assert mounts == (["/cache/models"] if want.get("model_cache") else []), step
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
    from craft.cli import app

    FakeKfpClient.server.update(pipelines={"craft": "pid-7"}, versions={"pid-7": ["pid-7-v0"]})
    bucket = s3_env.make_bucket("kfprt")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "x.png").write_bytes(b"x" * 64)
    args = ["retrain-if-new-data", "--model", "m", "--dataset", str(data), "--registry", f"s3://{bucket}"]
    res = CliRunner().invoke(app, [*args, "data.n=64"], catch_exceptions=False)
    assert res.exit_code == 0 and res.output.startswith("submitted: m: dataset"), res.output
    run_call = next(c for c in kfp_env.instances[-1].calls if c[0] == "run_pipeline")
    assert run_call[2]["params"] == {"profile": "demo-histo", "overrides": ["data.n=64"], "dataset_uri": str(data)}
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.output.startswith("already-claimed: m"), res.output
