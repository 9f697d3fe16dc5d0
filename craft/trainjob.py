"""Multi-node training steps as Kubeflow Trainer ``TrainJob`` s (or training-operator ``PyTorchJob`` s).

The step's pod (``craft.launch.run_step`` with ``CRAFT_SCALE_OUT`` set) is only the orchestrator:

1. it uploads the step's input artifacts to ``PREFIX/inputs/<arg>`` (committed prefixes, craft.storage) and
   writes the call (target, arguments, where inputs and outputs live) to ``PREFIX/spec.json``;
2. it builds the job from the compiled :class:`ScaleOut` with the Trainer API's typed models
   (``kubeflow_trainer_api.models``), submits it through the Kubernetes API (in-cluster config), and prints
   every new condition and child-job count until the job completes or fails (a failure fails the step);
3. it downloads ``PREFIX/outputs/<arg>`` into its output artifacts and returns the result rank 0 wrote.

Each node of the job runs ``python -m craft.launch node PREFIX/spec.json`` (:func:`run_node`): it downloads the
inputs, runs the same call under ``torchrun`` with the rendezvous the Trainer's torch policy (or the training
operator) injects as ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT`` and
``PET_NPROC_PER_NODE``, and node 0 uploads the outputs and the result. Checkpoints go to the object store
(the stage's ``loop.upload_uri``), so a restarted node, a new job after a failed one, or a retried step
resumes from the newest one.

The job is named after the run and task, so a retried step finds the job of its earlier attempt: it waits
on one still running, takes the outputs of one that completed, and replaces one that failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from craft.launch import ENV_NPROC, ENV_SCALE_OUT, Artifact, LaunchError, torchrun

NODE_CONTAINER = {"trainjob": "node", "pytorchjob": "pytorch"}  # the container the runtime / operator runs
# Environment passed from the orchestrating pod to the nodes by value: non-secret settings only (the store's
# endpoint, registry, model cache, offline flags). Credentials go by secret reference, never by value.
PASS_ENV = re.compile(r"^(CRAFT_|HF_|TRANSFORMERS_OFFLINE$|AWS_ENDPOINT_URL|AWS_REGION$|AWS_DEFAULT_REGION$)")
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")
NOT_PASSED = {ENV_SCALE_OUT, ENV_NPROC}
PATCH_MANAGER = "craft.launch"  # owner of our runtimePatches entry (TrainJob)
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass
class ScaleOut:
    """A multi-node step as compiled into ``CRAFT_SCALE_OUT`` (pipelines/resources.py): everything the job needs."""

    engine: Literal["trainjob", "pytorchjob"]  # Trainer v2 TrainJob or training-operator PyTorchJob
    nodes: int  # training nodes (pods)
    gpus_per_node: int  # GPUs per node = processes per node (torchrun --nproc_per_node)
    image: str  # the GPU image (components/images.py), the same code as the step's pod
    runtime: str = "torch-distributed"  # TrainJob runtimeRef (ClusterTrainingRuntime)
    gpu_resource: str = "nvidia.com/gpu"  # extended resource name of a GPU
    cpu: str | None = None  # CPU request = limit per node
    memory: str | None = None  # memory request = limit per node
    ephemeral_storage: str | None = None  # ephemeral-storage request per node
    node_selector: dict[str, str] = field(default_factory=dict)  # e.g. nvidia.com/gpu.product
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # as in pipelines/resources.py
    secrets: list[dict[str, Any]] = field(default_factory=list)  # [{"name": secret, "keys": {secret key: ENV}}]
    timeout_s: int = 86400  # activeDeadlineSeconds of the job, and how long the step waits for it
    shm: str | None = "8Gi"  # /dev/shm (memory-backed) per node for NCCL with several GPUs; None: runtime default

    def validate(self) -> None:
        if self.engine not in NODE_CONTAINER:
            raise ValueError(f"scale-out engine must be trainjob or pytorchjob, got {self.engine!r}")
        if self.nodes < 2 or self.gpus_per_node < 1:
            raise ValueError(f"a multi-node job needs nodes >= 2 and gpus_per_node >= 1 "
                             f"(got {self.nodes}, {self.gpus_per_node})")  # fmt: skip
        if not self.image:
            raise ValueError("a multi-node job needs the image its nodes run")
        if self.timeout_s < 1:
            raise ValueError(f"timeout_s must be >= 1, got {self.timeout_s}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScaleOut:
        try:
            obj = cls(**json.loads(text))
        except (TypeError, json.JSONDecodeError) as e:
            raise LaunchError(f"{ENV_SCALE_OUT} is not a scale-out spec: {e}") from e
        obj.validate()
        return obj


# ---------------------------------------------------------------- manifests (typed models)


def _core_models():
    from kubeflow_trainer_api import models as m

    return m


def _env(env: dict[str, str], secrets: list[dict[str, Any]]) -> list:
    m = _core_models()
    out = [m.IoK8sApiCoreV1EnvVar(name=k, value=str(v)) for k, v in sorted(env.items())]
    for s in secrets:
        for key, var in sorted(s["keys"].items()):
            ref = m.IoK8sApiCoreV1SecretKeySelector(name=s["name"], key=key)
            out.append(m.IoK8sApiCoreV1EnvVar(name=var, valueFrom=m.IoK8sApiCoreV1EnvVarSource(secretKeyRef=ref)))
    return out


def _quantity(value: str | int):
    """A Kubernetes resource quantity ("8", "64Gi") as the typed model (it refuses anything else)."""
    return _core_models().IoK8sApimachineryPkgApiResourceQuantity(str(value))


def _resources(scale: ScaleOut):
    m = _core_models()
    requests = {scale.gpu_resource: _quantity(scale.gpus_per_node)}
    limits = {scale.gpu_resource: _quantity(scale.gpus_per_node)}
    for key, value in (("cpu", scale.cpu), ("memory", scale.memory)):
        if value:
            requests[key] = limits[key] = _quantity(value)
    if scale.ephemeral_storage:
        requests["ephemeral-storage"] = _quantity(scale.ephemeral_storage)
    return m.IoK8sApiCoreV1ResourceRequirements(requests=requests, limits=limits)


def _tolerations(scale: ScaleOut) -> list:
    m = _core_models()
    return [
        m.IoK8sApiCoreV1Toleration(key=t.get("key"), operator=t.get("operator", "Equal"), value=t.get("value"),
                                   effect=t.get("effect"), tolerationSeconds=t.get("toleration_seconds"))
        for t in scale.tolerations
    ]  # fmt: skip


def _shm(scale: ScaleOut) -> tuple[list, list]:
    """The memory-backed /dev/shm volume and its mount (NCCL between the GPUs of a node), if any."""
    m = _core_models()
    if not scale.shm or scale.gpus_per_node < 2:
        return [], []
    vol = m.IoK8sApiCoreV1Volume(
        name="dshm", emptyDir=m.IoK8sApiCoreV1EmptyDirVolumeSource(medium="Memory", sizeLimit=_quantity(scale.shm))
    )
    return [vol], [m.IoK8sApiCoreV1VolumeMount(name="dshm", mountPath="/dev/shm")]


def build_trainjob(scale: ScaleOut, name: str, command: list[str], env: dict[str, str],
                   labels: dict[str, str] | None = None):  # fmt: skip
    """The ``TrainJob`` (trainer.kubeflow.org/v1alpha1) of a multi-node step, as the Trainer API's typed model.

    The runtime (``runtimeRef``) supplies the JobSet, the torch policy and its ``PET_*`` rendezvous; we set
    the trainer (image, command, nodes, processes and resources per node, env) and patch the runtime's
    ``node`` replicated job with the node selector, tolerations and /dev/shm.
    """
    m = _core_models()
    volumes, mounts = _shm(scale)
    pod = m.TrainerV1alpha1PodSpecPatch(
        nodeSelector=dict(scale.node_selector) or None, tolerations=_tolerations(scale) or None,
        volumes=volumes or None,
        containers=[m.TrainerV1alpha1ContainerPatch(name=NODE_CONTAINER["trainjob"], volumeMounts=mounts)]
        if mounts else None,
    )  # fmt: skip
    patch = m.TrainerV1alpha1RuntimePatch(
        manager=PATCH_MANAGER,
        trainingRuntimeSpec=m.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=m.TrainerV1alpha1JobSetTemplatePatch(
                spec=m.TrainerV1alpha1JobSetSpecPatch(
                    replicatedJobs=[m.TrainerV1alpha1ReplicatedJobPatch(
                        name=NODE_CONTAINER["trainjob"],
                        template=m.TrainerV1alpha1JobTemplatePatch(
                            spec=m.TrainerV1alpha1JobSpecPatch(template=m.TrainerV1alpha1PodTemplatePatch(spec=pod))
                        ),
                    )]
                )
            )
        ),
    )  # fmt: skip
    spec = m.TrainerV1alpha1TrainJobSpec(
        runtimeRef=m.TrainerV1alpha1RuntimeRef(name=scale.runtime, kind="ClusterTrainingRuntime",
                                               apiGroup="trainer.kubeflow.org"),
        trainer=m.TrainerV1alpha1Trainer(
            image=scale.image, command=list(command), numNodes=scale.nodes, numProcPerNode=scale.gpus_per_node,
            resourcesPerNode=_resources(scale), env=_env(env, scale.secrets),
        ),
        activeDeadlineSeconds=scale.timeout_s,
        runtimePatches=[patch] if (pod.node_selector or pod.tolerations or pod.volumes) else None,
    )  # fmt: skip
    return m.TrainerV1alpha1TrainJob(
        apiVersion="trainer.kubeflow.org/v1alpha1", kind="TrainJob",
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=name, labels=labels or None), spec=spec,
    )  # fmt: skip


def build_pytorchjob(scale: ScaleOut, name: str, command: list[str], env: dict[str, str],
                     labels: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The ``PyTorchJob`` (kubeflow.org/v1) of a multi-node step, for clusters with the training operator only.

    Its pod template is built with the same typed Kubernetes models as the TrainJob; the PyTorchJob envelope
    (one Master, ``nodes - 1`` Workers, ``nprocPerNode``, ``runPolicy``) has no typed model in the Trainer
    API (the legacy ``kubeflow-training`` SDK's package ``kubeflow`` collides with the ``kubeflow`` SDK's).
    """
    m = _core_models()
    volumes, mounts = _shm(scale)
    container = m.IoK8sApiCoreV1Container(
        name=NODE_CONTAINER["pytorchjob"], image=scale.image, command=list(command), env=_env(env, scale.secrets),
        resources=_resources(scale), volumeMounts=mounts or None,
    )  # fmt: skip
    template = m.IoK8sApiCoreV1PodTemplateSpec(
        metadata=m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels or None),
        spec=m.IoK8sApiCoreV1PodSpec(containers=[container], nodeSelector=dict(scale.node_selector) or None,
                                     tolerations=_tolerations(scale) or None, volumes=volumes or None),
    )  # fmt: skip
    pod = template.to_dict()

    def replicas(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure", "template": pod}

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, **({"labels": dict(labels)} if labels else {})},
        "spec": {
            "nprocPerNode": str(scale.gpus_per_node),
            "runPolicy": {"activeDeadlineSeconds": scale.timeout_s, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Master": replicas(1), "Worker": replicas(scale.nodes - 1)},
        },
    }


def manifest(scale: ScaleOut, name: str, command: list[str], env: dict[str, str],
             labels: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The job's JSON body for the Kubernetes API (the engine's camelCase field names, no nulls)."""
    scale.validate()
    if scale.engine == "trainjob":
        return build_trainjob(scale, name, command, env, labels).to_dict()
    return build_pytorchjob(scale, name, command, env, labels)


def job_name(run_id: str, task: str) -> str:
    """A DNS-1035 job name that is the same for every attempt of one task of one run (40 chars at most).

    >>> job_name("3f2a9c0d-1e4b", "pretrain-op")
    'craft-pretrain-op-9d3a3d0b'
    """
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", task.lower()).strip("-")[:22].strip("-") or "step"
    return f"craft-{stem}-{digest}"


def node_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The non-secret settings of this pod that its nodes need too (store endpoint, registry, offline flags)."""
    environ = dict(os.environ if environ is None else environ)
    return {
        k: v for k, v in environ.items()
        if PASS_ENV.match(k) and k not in NOT_PASSED and not any(w in k.upper() for w in SECRET_WORDS)
    }  # fmt: skip


# ---------------------------------------------------------------- submit and wait


@dataclass(frozen=True)
class JobKind:
    """Where a kind of job lives in the Kubernetes API and which conditions end it."""

    group: str
    version: str
    plural: str
    kind: str
    complete: str  # condition type that means success
    failed: str = "Failed"


KINDS = {
    "trainjob": JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", complete="Complete"),
    "pytorchjob": JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", complete="Succeeded"),
}


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


def _get(api, kind: JobKind, namespace: str, name: str) -> dict | None:
    try:
        return api.get_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
    except Exception as e:
        if _not_found(e):
            return None
        raise


def _true(obj: dict, ctype: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and str(c.get("status")) == "True":
            return c
    return None


def _describe(c: dict) -> str:
    extra = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
    return f"{c.get('type')}={c.get('status')}" + (f" ({extra})" if extra else "")


def submit_and_wait(api, namespace: str, body: dict, kind: JobKind, *, timeout_s: float, poll_s: float = 15.0,
                    log: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> dict:  # fmt: skip
    """Create the job ``body`` (or take over the earlier attempt's, same name), stream its status until it ends.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (or anything with its ``create`` / ``get`` / ``delete
    _namespaced_custom_object`` methods). Prints each new condition and each change of the child jobs'
    counts. Returns the final object when the ``kind.complete`` condition is true; raises
    :class:`LaunchError` with the reason and message when ``kind.failed`` is, and deletes the job (freeing its
    GPUs) when it is still running after ``timeout_s``.
    """
    name = body["metadata"]["name"]
    where = f"{kind.kind} {namespace}/{name}"
    existing = _get(api, kind, namespace, name)
    if existing is not None and _true(existing, kind.complete):
        log(f"{where}: completed in an earlier attempt of this step; using its outputs")
        return existing
    if existing is not None and _true(existing, kind.failed):
        log(f"{where}: failed in an earlier attempt ({_describe(_true(existing, kind.failed))}); replacing it "
            f"(training resumes from its newest checkpoint)")  # fmt: skip
        api.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
        while _get(api, kind, namespace, name) is not None:
            sleep(min(poll_s, 5.0))
        existing = None
    if existing is None:
        api.create_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, body)
        log(f"{where}: created ({_summary(body)})")
    else:
        log(f"{where}: still running from an earlier attempt of this step; waiting for it")
    deadline = clock() + timeout_s
    seen: set[tuple] = set()
    last_jobs = None
    while True:
        obj = _get(api, kind, namespace, name)
        if obj is None:
            raise LaunchError(f"{where}: deleted while the step was waiting for it")
        status = obj.get("status") or {}
        for c in status.get("conditions") or []:
            key = (c.get("type"), str(c.get("status")), c.get("reason"), c.get("message"))
            if key not in seen:
                seen.add(key)
                log(f"{where}: {_describe(c)}")
        jobs = _jobs_summary(status)
        if jobs and jobs != last_jobs:
            log(f"{where}: {jobs}")
            last_jobs = jobs
        if _true(obj, kind.complete):
            return obj
        failed = _true(obj, kind.failed)
        if failed:
            raise LaunchError(f"{where} failed: {_describe(failed)}")
        if clock() >= deadline:
            api.delete_namespaced_custom_object(kind.group, kind.version, namespace, kind.plural, name)
            raise LaunchError(f"{where}: not finished after {timeout_s:.0f} s; deleted it (its checkpoints stay)")
        sleep(poll_s)


def _summary(body: dict) -> str:
    spec = body.get("spec") or {}
    if "trainer" in spec:
        t = spec["trainer"]
        return f"{t.get('numNodes')} nodes x {t.get('numProcPerNode')} processes, runtime {spec['runtimeRef']['name']}"
    reps = spec.get("pytorchReplicaSpecs") or {}
    return f"{sum(r.get('replicas', 0) for r in reps.values())} nodes x {spec.get('nprocPerNode')} processes"


def _jobs_summary(status: dict) -> str:
    """Child-job counts: TrainJob ``jobsStatus`` or PyTorchJob ``replicaStatuses``."""
    parts = []
    for j in status.get("jobsStatus") or []:
        counts = ", ".join(f"{k} {j[k]}" for k in ("active", "ready", "succeeded", "failed") if j.get(k))
        parts.append(f"{j.get('name')}: {counts or 'pending'}")
    for role, r in sorted((status.get("replicaStatuses") or {}).items()):
        counts = ", ".join(f"{k} {r[k]}" for k in ("active", "succeeded", "failed") if r.get(k))
        parts.append(f"{role}: {counts or 'pending'}")
    return "; ".join(parts)


def in_cluster():
    """``(CustomObjectsApi, namespace)`` of the pod this runs in (its service account's namespace)."""
    from kubernetes import client, config

    if not SA_NAMESPACE.is_file():
        raise LaunchError(f"a multi-node step submits its job from a Kubernetes pod; {SA_NAMESPACE} is missing")
    config.load_incluster_config()
    return client.CustomObjectsApi(), SA_NAMESPACE.read_text().strip()


# ---------------------------------------------------------------- the orchestrating pod and the nodes


def run_job(scale: ScaleOut, target: str, kwargs: dict[str, Any], prefix: str, *, run_id: str, task: str,
            api=None, namespace: str | None = None, store=None, poll_s: float = 15.0) -> dict[str, float]:  # fmt: skip
    """In the step's pod: stage the inputs, run the job, fetch the outputs; returns rank 0's metrics."""
    from craft.storage.objectstore import ObjectStore

    store = store or ObjectStore.from_env()
    call: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    outputs: dict[str, tuple[str, str]] = {}
    for key, value in kwargs.items():
        if isinstance(value, Artifact) and value.output:
            outputs[key] = (f"{prefix}/outputs/{key}", value.path)
            call[key] = {"$output": key}
        elif isinstance(value, Artifact):
            if not Path(value.path).is_dir():
                raise LaunchError(f"input {key} at {value.path}: not a folder (multi-node steps stage folders)")
            inputs[key] = f"{prefix}/inputs/{key}"
            store.upload_dir(value.path, inputs[key])
            call[key] = {"$input": key}
        else:
            call[key] = value
    spec_uri = f"{prefix}/spec.json"
    result_uri = f"{prefix}/outputs/result.json"
    store.put_json(spec_uri, {"target": target, "kwargs": call, "inputs": inputs,
                              "outputs": {k: u for k, (u, _) in outputs.items()}, "result": result_uri,
                              "nproc": scale.gpus_per_node})  # fmt: skip
    name = job_name(run_id, task)
    body = manifest(scale, name, ["python", "-m", "craft.launch", "node", spec_uri], node_env(),
                    labels={"app.kubernetes.io/part-of": "craft", "craft/task": _label(task)})  # fmt: skip
    if api is None:
        api, namespace = in_cluster()
    submit_and_wait(api, namespace, body, KINDS[scale.engine], timeout_s=scale.timeout_s, poll_s=poll_s)
    for uri, local in outputs.values():
        store.download_dir(uri, local)
    return {k: float(v) for k, v in store.get_json(result_uri).items()}


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value)[:63].strip("-._") or "x"


PET_VARS = ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def run_node(spec_uri: str, *, store=None, scratch: str | os.PathLike | None = None) -> dict[str, float] | None:
    """On one node of the job: inputs from the store, the call under torchrun, and (node 0) outputs back."""
    from craft.storage.objectstore import ObjectStore

    missing = [v for v in PET_VARS if not os.environ.get(v)]
    if missing:
        raise LaunchError(f"node of a multi-node step: {', '.join(missing)} not set (the Trainer's torch runtime or "
                          "the training operator sets them on every node)")  # fmt: skip
    nnodes, node_rank = int(os.environ["PET_NNODES"]), int(os.environ["PET_NODE_RANK"])
    master = (os.environ["PET_MASTER_ADDR"], int(os.environ["PET_MASTER_PORT"]))
    store = store or ObjectStore.from_env()
    spec = store.get_json(spec_uri)
    raw = os.environ.get("PET_NPROC_PER_NODE", "")
    nproc = int(raw) if raw.isdigit() else int(spec["nproc"])  # "auto" (Trainer's default) -> what we asked for
    root = Path(scratch or os.environ.get("CRAFT_SCRATCH") or tempfile.mkdtemp(prefix="craft-node-"))
    kwargs: dict[str, Any] = {}
    outputs: dict[str, Path] = {}
    for key, value in spec["kwargs"].items():
        if isinstance(value, dict) and "$input" in value:
            kwargs[key] = str(store.download_dir(spec["inputs"][value["$input"]], root / "inputs" / key))
        elif isinstance(value, dict) and "$output" in value:
            outputs[key] = root / "outputs" / key
            kwargs[key] = str(outputs[key])
        else:
            kwargs[key] = value
    print(f"node {node_rank} of {nnodes}: {nproc} processes, master {master[0]}:{master[1]}", flush=True)
    result = torchrun(spec["target"], kwargs, nproc, nnodes=nnodes, node_rank=node_rank, master=master)
    if node_rank != 0:
        return None
    for key, path in outputs.items():
        store.upload_dir(path, spec["outputs"][key])
    store.put_json(spec["result"], result)
    return result
