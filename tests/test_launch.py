"""Scale-out: the profile's `resources` section, the multi-node job manifests (built and validated through the
Kubeflow Trainer API's typed models), and submit / wait against a fake Kubernetes API.

There is no cluster here: :class:`FakeCluster` stands in for the Kubernetes API server (the
``CustomObjectsApi`` methods the step calls) and plays a scripted sequence of job statuses.
"""

from __future__ import annotations

import json

import pytest
from kubeflow_trainer_api import models as m

from craft.config import ConfigError, load_stage_config
from craft.launch import DDP_STEPS, STEPS, Artifact, LaunchError, ResourcesConfig, checkpoint_prefix, run_step
from craft.trainjob import KINDS, ScaleOut, build_trainjob, job_name, manifest, node_env, submit_and_wait
from pipelines.resources import DEFAULT_RESOURCES, profile_settings, settings_for

H100 = "NVIDIA-H100-80GB-HBM3"


def _scale(**kw) -> ScaleOut:
    base = dict(
        engine="trainjob", nodes=2, gpus_per_node=4, image="ghcr.io/craft-ml/craft-gpu:0.1.0", cpu="32",
        memory="256Gi", ephemeral_storage="400Gi", node_selector={"nvidia.com/gpu.product": H100},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        secrets=[{"name": "mlpipeline-minio-artifact",
                  "keys": {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}}],
        timeout_s=86400,
    )  # fmt: skip
    base.update(kw)
    return ScaleOut(**base)


COMMAND = ["python", "-m", "craft.launch", "node", "s3://craft/checkpoints/r1/pretrain-op/spec.json"]
ENV = {"CRAFT_S3_ENDPOINT": "seaweedfs.kubeflow:8333", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- the `resources` section


def test_resources_section_covers_every_pipeline_step():
    cfg = ResourcesConfig()
    assert set(STEPS) == set(DEFAULT_RESOURCES)
    for step in STEPS:
        assert cfg.step(step).gpus is None  # nothing asked: the step's defaults stand
        assert profile_settings(cfg, step).keys() <= {"scratch_mount", "checkpoints"}
    with pytest.raises(ValueError, match="unknown pipeline step 'trainer'"):
        cfg.step("trainer")


def test_pipeline_wide_overrides_of_other_stages_pass_the_resources_section_by():
    """``data.n=48`` or ``validate.min_per_class=2`` belong to those stages, not to resources.steps.data."""
    cfg = load_stage_config("resources", "demo-histo", ["data.n=48", "validate.min_per_class=2", "probe.epochs=3",
                                                       "resources.steps.dataset-version.cpu=2"])  # fmt: skip
    assert cfg.step("dataset-version").cpu == "2" and cfg.step("data").cpu is None


def test_resources_overrides_reach_the_step_settings():
    cfg = load_stage_config("resources", None, [
        "resources.steps.craft.gpus=4", f"resources.steps.craft.gpu_product={H100}",
        "resources.steps.craft.memory=200Gi", "resources.steps.craft.timeout=12h", "resources.steps.pretrain.gpus=4",
        "resources.steps.pretrain.nodes=2", "resources.steps.register.memory=32Gi",
        "resources.steps.validate.ephemeral_storage=80Gi", "resources.steps.probe.gpus=0",
    ])  # fmt: skip
    craft = settings_for("craft", profile_settings(cfg, "craft"))
    assert craft["accelerator"] == {"type": "nvidia.com/gpu", "count": 4}
    assert craft["node_selector"] == {"nvidia.com/gpu.product": H100}
    assert craft["memory"] == craft["memory_limit"] == "200Gi" and craft["timeout_s"] == 12 * 3600
    assert craft["cpu"] == DEFAULT_RESOURCES["craft"]["cpu"]  # not asked: the default stands
    pretrain = settings_for("pretrain", profile_settings(cfg, "pretrain"))
    assert pretrain["nodes"] == 2 and pretrain["scale_out"] == {"engine": "trainjob", "runtime": "torch-distributed"}
    assert settings_for("register", profile_settings(cfg, "register"))["memory"] == "32Gi"
    assert settings_for("validate", profile_settings(cfg, "validate"))["ephemeral_storage"] == "80Gi"
    probe = settings_for("probe", profile_settings(cfg, "probe"))
    assert probe["accelerator"] is None and probe["tolerations"] == []  # gpus: 0 = a CPU pod


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resources.steps.probe.gpus=2", "runs as one process"),
        ("resources.steps.baselines.gpus=1 resources.steps.baselines.nodes=2", "runs as one process"),  # TI/DPO
        ("resources.steps.gate.gpus=1", "runs on the CPU image"),
        ("resources.steps.craft.nodes=2", "needs gpus >= 1 per node"),
        ("resources.steps.craft.memory=lots", "not a Kubernetes quantity"),
        ("resources.steps.craft.timeout=soon", "not a positive duration"),
        ("resources.steps.trainer.gpus=1", "unknown step 'trainer'"),
        ("resources.scale_out=mpi", "is not one of"),
        ("resources.checkpoints=/tmp/ckpt", "s3:// prefix"),
    ],
)
def test_resources_refuses_what_a_step_cannot_do(override, message):
    with pytest.raises(ConfigError, match=message):
        load_stage_config("resources", None, override.split())


def test_only_loop_stages_that_write_from_rank_zero_may_scale():
    assert DDP_STEPS == {"pretrain", "finetune", "craft", "controlnet"}


# ---------------------------------------------------------------- manifests


def test_trainjob_for_two_nodes_of_four_gpus_through_the_typed_models():
    body = manifest(_scale(), "craft-pretrain-op-1a2b3c4d", COMMAND, ENV, labels={"craft/task": "pretrain-op"})
    # the JSON round-trips through the Trainer API's typed model unchanged (no unknown or mistyped field)
    typed = m.TrainerV1alpha1TrainJob.from_dict(json.loads(json.dumps(body)))
    assert typed.to_dict() == body
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime",
                                  "apiGroup": "trainer.kubeflow.org"}  # fmt: skip
    assert spec["activeDeadlineSeconds"] == 86400
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["command"] == COMMAND and trainer["image"] == "ghcr.io/craft-ml/craft-gpu:0.1.0"
    assert trainer["resourcesPerNode"] == {
        "requests": {"nvidia.com/gpu": "4", "cpu": "32", "memory": "256Gi", "ephemeral-storage": "400Gi"},
        "limits": {"nvidia.com/gpu": "4", "cpu": "32", "memory": "256Gi"},
    }
    env = {e["name"]: e for e in trainer["env"]}
    assert env["CRAFT_S3_ENDPOINT"]["value"] == "seaweedfs.kubeflow:8333"
    # credentials by reference only: the manifest holds the secret's name and key, never a value
    assert env["AWS_SECRET_ACCESS_KEY"] == {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {
        "secretKeyRef": {"name": "mlpipeline-minio-artifact", "key": "secretkey"}}}  # fmt: skip
    [patch] = spec["runtimePatches"]
    [node] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["nodeSelector"] == {"nvidia.com/gpu.product": H100}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_typed_models_refuse_a_mistyped_field():
    with pytest.raises(ValueError):  # pydantic: numNodes must be an int, not "two"
        m.TrainerV1alpha1Trainer(numNodes="two")
    good = build_trainjob(_scale(), "craft-x-00000000", COMMAND, ENV).to_dict()
    good["spec"]["trainer"]["numProcPerNode"] = "4"  # StrictInt: a string is refused
    with pytest.raises(ValueError):
        m.TrainerV1alpha1TrainJob.from_dict(good)


def test_pytorchjob_where_trainer_is_absent():
    body = manifest(_scale(engine="pytorchjob"), "craft-pretrain-op-1a2b3c4d", COMMAND, ENV)
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    spec = body["spec"]
    assert spec["nprocPerNode"] == "4" and spec["runPolicy"]["activeDeadlineSeconds"] == 86400
    reps = spec["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 1  # 2 nodes
    pod = reps["Worker"]["template"]
    m.IoK8sApiCoreV1PodTemplateSpec.from_dict(pod)  # the pod template is the typed Kubernetes model's
    [c] = pod["spec"]["containers"]
    assert c["name"] == "pytorch" and c["command"] == COMMAND
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": H100}


def test_scale_out_spec_is_refused_when_incomplete():
    with pytest.raises(ValueError, match="nodes >= 2"):
        manifest(_scale(nodes=1), "n", COMMAND, ENV)
    with pytest.raises(LaunchError, match="not a scale-out spec"):
        ScaleOut.from_json('{"engine": "trainjob"}')
    assert ScaleOut.from_json(_scale().to_json()) == _scale()


def test_job_name_is_stable_per_run_and_task_and_a_valid_name():
    a, b = job_name("run-1", "controlnet-op-2"), job_name("run-2", "controlnet-op-2")
    assert a == job_name("run-1", "controlnet-op-2") and a != b
    long = job_name("r", "x" * 200)
    assert len(long) <= 40 and long[0].isalpha()


def test_nodes_get_settings_by_value_and_never_credentials():
    env = node_env({"CRAFT_S3_ENDPOINT": "s:1", "CRAFT_REGISTRY": "s3://craft", "HF_HUB_OFFLINE": "1",
                    "AWS_SECRET_ACCESS_KEY": "x", "AWS_ACCESS_KEY_ID": "y", "CRAFT_SCALE_OUT": "{}",
                    "CRAFT_NPROC_PER_NODE": "4", "MLLM_API_KEY": "z", "PATH": "/bin", "CRAFT_API_TOKEN": "t"})  # fmt: skip
    assert env == {"CRAFT_S3_ENDPOINT": "s:1", "CRAFT_REGISTRY": "s3://craft", "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- submit and wait (fake API server)


class ApiException(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


def _status(*conds: tuple[str, str, str, str], jobs=None) -> dict:
    """A TrainJob status as the Trainer controller writes it, through the typed model."""
    st = m.TrainerV1alpha1TrainJobStatus(
        conditions=[m.IoK8sApimachineryPkgApisMetaV1Condition(type=t, status=s, reason=r, message=msg,
                                                              lastTransitionTime="2026-12-03T10:00:00Z")
                    for t, s, r, msg in conds],
        jobsStatus=[m.TrainerV1alpha1JobStatus(name="node", **j) for j in jobs or []] or None,
    )  # fmt: skip
    return st.model_dump(mode="json", by_alias=True, exclude_none=True)  # as the API server sends it


class FakeCluster:
    """Stands in for the Kubernetes API server (no cluster here): the CustomObjectsApi calls the step makes.

    The first ``get`` shows a job as it is (an earlier attempt's, or none); each later one moves the job to
    the next scripted status, and it stays in the last one."""

    def __init__(self, script: list[dict], existing: dict | None = None):
        self.script, self.objects, self.calls, self.started = list(script), {}, [], False
        if existing is not None:
            self.objects[existing["metadata"]["name"]] = existing

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", group, version, namespace, plural, body["metadata"]["name"]))
        self.objects[body["metadata"]["name"]] = dict(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        if name not in self.objects:
            self.started = True
            raise ApiException(404)
        obj = self.objects[name]
        if self.started and self.script:
            obj["status"] = self.script.pop(0)
        self.started = True
        return obj

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", name))
        self.objects.pop(name, None)


def _wait(api, body, **kw):
    lines: list[str] = []
    out = submit_and_wait(api, "craft", body, KINDS["trainjob"], timeout_s=kw.pop("timeout_s", 3600), poll_s=1,
                          log=lines.append, sleep=lambda s: None, **kw)  # fmt: skip
    return out, lines


def test_submit_then_stream_conditions_until_complete():
    body = manifest(_scale(), "craft-pretrain-op-1a2b3c4d", COMMAND, ENV)
    created = ("Created", "True", "JobSetCreated", "the JobSet was created")
    api = FakeCluster([
        _status(created),
        _status(created, jobs=[{"active": 2, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]),
        _status(created, jobs=[{"active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}]),
        _status(created, ("Complete", "True", "JobSetCompleted", "all nodes finished"),
                jobs=[{"active": 0, "ready": 0, "succeeded": 2, "failed": 0, "suspended": 0}]),
    ])  # fmt: skip
    final, lines = _wait(api, body)
    assert final["status"]["conditions"][-1]["type"] == "Complete"
    assert api.calls[1] == (
        "create",
        "trainer.kubeflow.org",
        "v1alpha1",
        "craft",
        "trainjobs",
        body["metadata"]["name"],
    )
    text = "\n".join(lines)
    assert "created (2 nodes x 4 processes, runtime torch-distributed)" in text
    assert "Created=True (JobSetCreated: the JobSet was created)" in text
    assert "node: active 2" in text and "node: active 2, ready 2" in text and "node: succeeded 2" in text
    assert text.count("Created=True") == 1  # each condition printed once, not at every poll


def test_a_failed_job_fails_the_step_with_its_reason():
    body = manifest(_scale(), "craft-craft-op-1a2b3c4d", COMMAND, ENV)
    api = FakeCluster(
        [_status(("Failed", "True", "BackoffLimitExceeded", "node-1 exited with 1: CUDA out of memory"))]
    )
    with pytest.raises(LaunchError, match="failed: Failed=True .BackoffLimitExceeded: node-1 exited with 1: CUDA"):
        _wait(api, body)


def test_a_job_still_running_at_the_deadline_is_deleted():
    body = manifest(_scale(), "craft-craft-op-1a2b3c4d", COMMAND, ENV)
    api = FakeCluster([_status(("Created", "True", "JobSetCreated", ""))])
    ticks = iter(range(0, 10_000, 600))
    with pytest.raises(LaunchError, match="not finished after 3600 s; deleted it"):
        _wait(api, body, timeout_s=3600, clock=lambda: next(ticks))
    assert api.calls[-1] == ("delete", body["metadata"]["name"])


def test_a_retried_step_replaces_the_failed_job_of_its_earlier_attempt():
    body = manifest(_scale(), "craft-craft-op-1a2b3c4d", COMMAND, ENV)
    old = dict(body, status=_status(("Failed", "True", "PodFailed", "node preempted")))
    api = FakeCluster([_status(("Complete", "True", "JobSetCompleted", ""))], existing=old)
    _, lines = _wait(api, body)
    kinds = [c[0] for c in api.calls]
    assert kinds.index("delete") < kinds.index("create")  # replaced, under the same name
    assert "failed in an earlier attempt" in lines[0] and "resumes from its newest checkpoint" in lines[0]


def test_a_retried_step_takes_over_a_job_that_is_still_running():
    body = manifest(_scale(), "craft-craft-op-1a2b3c4d", COMMAND, ENV)
    running = dict(body, status=_status(("Created", "True", "JobSetCreated", "")))
    api = FakeCluster([_status(("Created", "True", "JobSetCreated", "")),
                       _status(("Complete", "True", "JobSetCompleted", ""))], existing=running)  # fmt: skip
    _, lines = _wait(api, body)
    assert "create" not in [c[0] for c in api.calls] and "still running from an earlier attempt" in lines[0]


# ---------------------------------------------------------------- run_step


def test_checkpoint_prefix_is_per_run_and_task(monkeypatch):
    monkeypatch.delenv("CRAFT_CHECKPOINT_ROOT", raising=False)
    assert checkpoint_prefix("run-1", "pretrain-op") == ""  # a stage run by hand: local checkpoints only
    monkeypatch.setenv("CRAFT_CHECKPOINT_ROOT", "s3://craft/checkpoints/")
    assert checkpoint_prefix("run-1", "pretrain-op") == "s3://craft/checkpoints/run-1/pretrain-op"
    with pytest.raises(LaunchError, match="need the run id and task name"):
        checkpoint_prefix("{{$.pipeline_job_uuid}}", "pretrain-op")  # a placeholder nobody resolved


def echo(**kwargs):
    """A step for the launcher tests: returns how many overrides it got, and records them."""
    echo.seen = kwargs
    return {"n_overrides": float(len(kwargs["overrides"]))}


def test_one_process_step_runs_in_process_with_the_checkpoint_override(monkeypatch, tmp_path):
    monkeypatch.setenv("CRAFT_CHECKPOINT_ROOT", "s3://craft/checkpoints")
    monkeypatch.delenv("CRAFT_NPROC_PER_NODE", raising=False)
    monkeypatch.delenv("CRAFT_SCALE_OUT", raising=False)
    res = run_step("tests.test_launch:echo", {"data": Artifact(str(tmp_path)), "overrides": ["loop.steps=2"]},
                   config="reward", run_id="r1", task="reward-op")  # fmt: skip
    assert res == {"n_overrides": 2.0}
    assert echo.seen == {"data": str(tmp_path),
                         "overrides": ["loop.steps=2", "reward.loop.upload_uri=s3://craft/checkpoints/r1/reward-op"]}  # fmt: skip


def test_a_run_cannot_change_the_compiled_resources(monkeypatch):
    with pytest.raises(LaunchError, match="resources are compiled into the pipeline"):
        run_step("tests.test_launch:echo", {"overrides": ["resources.steps.craft.gpus=8"]}, config="reward")


# ---------------------------------------------------------------- checkpoints on the object store (one process)


def test_a_fresh_pod_resumes_from_the_object_store_and_matches_an_uninterrupted_run(s3_env, tmp_path, capfd):
    """The retried pod has an empty disk: the loop downloads the newest committed checkpoint and continues."""
    import torch

    from craft.storage.objectstore import ObjectStore
    from craft.train.loop import list_checkpoints, remote_checkpoints, train
    from tests.test_train_loop import _cfg, _data, _objective

    uri = f"s3://{s3_env.make_bucket('ckpt')}/checkpoints/run-1/finetune-op"
    cfg = _cfg(steps=6, checkpoint_every=2, keep_checkpoints=2)
    _, model_a = _objective(cfg)
    res_a = train(model_a, _data(), cfg.loop, tmp_path / "a")  # uninterrupted, no store

    cfg.loop.upload_uri = uri
    _, model_b = _objective(cfg)
    part = train(model_b, _data(), cfg.loop, tmp_path / "pod-1", stop_after=5)  # the pod dies after step 5
    assert part.step == 5
    store = ObjectStore.from_env()
    assert [s for s, _ in remote_checkpoints(store, uri)] == [2, 4]  # committed: 2 and 4; 5 never was

    _, model_c = _objective(cfg)  # the retried pod: a new process, an empty disk
    res_c = train(model_c, _data(), cfg.loop, tmp_path / "pod-2")
    assert res_c.resumed_from == 4 and res_c.step == 6
    assert f"resuming from {uri}/checkpoints/step-0000004 (step 4, object store)" in capfd.readouterr().out
    for (k, va), (_, vc) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(va, vc), f"parameter {k} differs after resuming from the object store"
    assert res_a.logs["loss"] == res_c.logs["loss"]
    # only the newest keep_checkpoints stay on the store, as on disk
    assert [s for s, _ in remote_checkpoints(store, uri)] == [4, 6]
    assert [p.name for p in list_checkpoints(tmp_path / "pod-2")] == ["step-0000004", "step-0000006"]


def test_without_a_store_checkpoint_a_fresh_pod_starts_from_zero(s3_env, tmp_path):
    from craft.train.loop import train
    from tests.test_train_loop import _cfg, _data, _objective

    uri = f"s3://{s3_env.make_bucket('empty')}/checkpoints/run-2/pretrain-op"
    cfg = _cfg(steps=2, checkpoint_every=0, ema_decay=0.0, upload_uri=uri)
    _, model = _objective(cfg)
    assert train(model, _data(), cfg.loop, tmp_path).resumed_from == 0
