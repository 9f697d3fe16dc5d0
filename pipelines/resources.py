"""Per-step Kubernetes settings for pipeline tasks: GPUs, CPU/memory, placement, secrets, model cache, retries.

The pipeline calls ``apply_resources(task, step, settings)`` on every task with that step's settings
(``DEFAULT_RESOURCES[step]`` merged with the user's). Everything here compiles into the pipeline YAML
and is ignored by kfp.local (ENVIRONMENT.md), so the same pipeline runs on a laptop and on GPU nodes.

Settings (all optional)::

    cpu: "4"                  # CPU request;   cpu_limit: "8"  (default: the request)
    memory: "32Gi"            # memory request; memory_limit: "48Gi" (default: the request)
    accelerator: {type: nvidia.com/gpu, count: 1}   # GPU request (limit) per pod
    node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    object_store_secret: craft-s3-reader  # scoped store identity -> AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; null: none
    mllm_secret: craft-mllm                # -> MLLM_API_KEY (annotate and the DPO judge only); null: none
    model_cache: {mount_path: /cache/models, size_limit: 50Gi}  # per-pod emptyDir cache; null: none
    env: {CRAFT_LOG_LEVEL: debug}          # plain, non-secret values only
    retries: 2                # with exponential backoff
    caching: false            # off where sampling is not deterministic
    timeout_s: 86400          # activeDeadlineSeconds of each attempt (every step has one)
    ephemeral_storage: "50Gi" # pod-local disk: a scratch volume of that size where the artifacts live
    scratch_mount: /minio     # ... mounted there (the local root of the pipeline root's artifacts)
    nodes: 1                  # > 1: the pod orchestrates a multi-node TrainJob / PyTorchJob (craft.trainjob)
    scale_out: {engine: trainjob, runtime: torch-distributed}       # the engine of nodes > 1
    checkpoints: s3://craft/checkpoints  # training steps: CRAFT_CHECKPOINT_ROOT (per-run/per-task checkpoints)

What every task gets whatever its settings (``apply_access``): the deployment's settings from the ConfigMap
``craft-env`` (``CONFIG_ENV``: where the object store is, https or not, the bucket and registry, the checkpoint
root, the MLLM allowlist), created by the k8s/ overlays in the namespace the pods run in; the label the
egress NetworkPolicy selects (``POD_LABELS``); and the image's non-root uid/gid as container security context.

Object-store identities are scoped per step kind (``object_store_secret`` below; policies in k8s/object-store): a reader
(datasets, models, validation records), a writer (also validation records, training checkpoints and the
registry's candidate area) and no keys at all where a step never touches the store (annotate, gate): the
Kubeflow launcher moves artifacts with its own credentials, not the step's. Promotion (``production``) is
not a pipeline step: only ``craft promote`` in CI holds that identity.

Secrets are referenced by name and key only: the compiled YAML carries ``secretName``/``secretKey``,
never a value. ``env`` refuses names that look like credentials so that nobody passes a key there.

Sizing (``_apply_sizing``): ``accelerator.count`` > 1 sets ``CRAFT_NPROC_PER_NODE`` (craft.launch runs the
stage under ``torchrun --nproc_per_node`` inside the pod) and a memory-backed /dev/shm. ``nodes`` > 1 keeps the
pod small and CPU-only and compiles the GPU settings into ``CRAFT_SCALE_OUT`` instead: the JSON of the job
(craft.trainjob.ScaleOut) the pod submits. ``ephemeral_storage``: KFP 2.17 cannot set a container's
``ephemeral-storage`` request (kubeflow/pipelines#11137), so the size becomes an emptyDir scratch volume
with that ``sizeLimit`` over the artifacts' local root: the disk a step may fill is explicit and bounded
(the kubelet evicts the pod with that reason) rather than unaccounted on the node. Multi-node jobs get a
real ``ephemeral-storage`` request per node. The profile's ``resources`` section (craft.launch.ResourcesConfig)
is merged over the defaults by :func:`profile_settings`. kfp.local ignores resources, placement and volumes but
passes task env: a local run's training steps see ``CRAFT_NPROC_PER_NODE`` and ``CRAFT_CHECKPOINT_ROOT`` too, and
the GPU steps see ``CRAFT_MODEL_CACHE=/cache/models``, which a local run overrides with a folder under its root
(``pipelines.local.local_env``, read by ``craft.data.loader.model_cache_dir``): a laptop has no such mount.
"""

from typing import Any

# Scoped object-store identities (k8s/object-store/*: one policy each); each Secret has the keys of Kubeflow's
# own artifact secret, accesskey/secretkey.
S3_READER = "craft-s3-reader"  # read datasets/, models/, validations/
S3_WRITER = "craft-s3-writer"  # + write validations/, checkpoints/, the registry's candidate area
OBJECT_STORE_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
MLLM_SECRET = "craft-mllm"
MLLM_SECRET_KEYS = {"api-key": "MLLM_API_KEY"}
# Deployment settings every task reads from the ConfigMap (k8s/base/kustomization.yaml); key -> env var.
CONFIG_MAP = "craft-env"
# CRAFT_CHECKPOINT_ROOT is not among them: it is set per training task from the profile's resources.checkpoints
CONFIG_ENV = {k: k for k in ("CRAFT_S3_ENDPOINT", "CRAFT_S3_SECURE", "CRAFT_BUCKET", "CRAFT_REGISTRY",
                             "CRAFT_MLLM_ALLOWED_URLS")}  # fmt: skip
# Labels on every task's pod: the egress NetworkPolicy of k8s/run selects them.
POD_LABELS = {"app.kubernetes.io/part-of": "craft", "app.kubernetes.io/component": "craft-pipeline-step"}
RUN_AS = 10001  # the images' non-root uid and gid (docker/*/Dockerfile)
# One model cache per pod, fed from the object store (craft.models.diffusion._fetch): an emptyDir, so no
# ReadWriteMany storage class is needed, parallel steps on several nodes share nothing, and the non-root uid
# can write it without an fsGroup (which Kubeflow Pipelines cannot set on a task).
MODEL_CACHE = {"mount_path": "/cache/models", "size_limit": "50Gi"}
GPU = {"type": "nvidia.com/gpu", "count": 1}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

KNOWN = {
    "cpu", "cpu_limit", "memory", "memory_limit", "accelerator", "node_selector", "tolerations",
    "object_store_secret", "mllm_secret", "model_cache", "env", "retries", "caching", "timeout_s",
    "ephemeral_storage", "scratch_mount", "nodes", "scale_out", "checkpoints",
}  # fmt: skip
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # node label of the GPU model (NVIDIA GPU feature discovery)
SCRATCH_MOUNT = "/minio"  # local root of KFP's default pipeline root minio://mlpipeline/v2/artifacts
SHM_SIZE = "8Gi"  # memory-backed /dev/shm of multi-GPU pods (NCCL between the GPUs of a node)
ORCHESTRATOR = {"cpu": "1", "memory": "4Gi"}  # the pod of a multi-node step only stages files and waits
CHECKPOINT_ROOT = "s3://craft/checkpoints"
HOUR = 3600
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")

# Defaults per step: CPU steps small, training steps on one GPU with the model cache. Caching is off
# wherever sampling or training is stochastic, so a re-run really re-runs. Every step has a timeout (per
# attempt) and a disk budget: inputs + outputs + work dirs (SD 2.1 is ~5 GB; a checkpoint with its AdamW
# state ~3x the trainable weights, two kept).
_CPU = {"cpu": "1", "memory": "4Gi", "object_store_secret": S3_READER, "retries": 2, "caching": True,
        "timeout_s": 2 * HOUR, "ephemeral_storage": "20Gi"}  # fmt: skip
_GPU = {
    "cpu": "8",
    "memory": "64Gi",
    "accelerator": dict(GPU),
    "tolerations": [dict(GPU_TOLERATION)],
    "object_store_secret": S3_WRITER,  # training checkpoints go to the object store (CRAFT_CHECKPOINT_ROOT)
    "model_cache": dict(MODEL_CACHE),
    "retries": 1,
    "caching": False,
    "timeout_s": 24 * HOUR,
    "ephemeral_storage": "150Gi",
}
_TRAIN = dict(_GPU, checkpoints=CHECKPOINT_ROOT)  # steps on craft.train.loop: checkpoints on the object store
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    # never cached: it reads the dataset's latest pointer, and its output is every data step's cache key
    "dataset-version": dict(_CPU, caching=False, timeout_s=HOUR),
    "data": dict(_CPU, ephemeral_storage="100Gi", timeout_s=6 * HOUR),  # imports write the dataset twice
    # records the verdict under validations/. Never retried: its checks are deterministic (a retry reads the same
    # data and profile), and the plan check of craft.plan runs here so that a bad config fails once, in seconds
    "validate": dict(_CPU, ephemeral_storage="60Gi", object_store_secret=S3_WRITER, retries=0),
    "annotate": dict(
        _CPU,
        object_store_secret=None,
        mllm_secret=MLLM_SECRET,
        caching=False,
        ephemeral_storage="60Gi",
        timeout_s=12 * HOUR,
    ),  # the MLLM key only  # fmt: skip
    "pretrain": dict(_TRAIN, ephemeral_storage="200Gi", timeout_s=48 * HOUR),  # UNet + text encoder trained
    "finetune": dict(_TRAIN, ephemeral_storage="200Gi", timeout_s=48 * HOUR),
    "encoders": dict(_GPU, ephemeral_storage="100Gi", timeout_s=12 * HOUR),
    "probe": dict(
        _GPU, memory="32Gi", caching=True, ephemeral_storage="60Gi", timeout_s=4 * HOUR, object_store_secret=S3_READER
    ),  # fmt: skip
    "baselines": dict(_TRAIN),
    "craft": dict(_TRAIN),
    "controlnet": dict(_TRAIN),
    # every variant + the champion
    "evaluate": dict(_GPU, memory="32Gi", ephemeral_storage="200Gi", object_store_secret=S3_READER),
    "champion": dict(_CPU, caching=False, ephemeral_storage="30Gi", timeout_s=HOUR),  # production moves between runs
    "gate": dict(
        _CPU,
        cpu="500m",
        memory="1Gi",
        retries=0,
        caching=False,
        ephemeral_storage="5Gi",
        timeout_s=HOUR // 2,
        object_store_secret=None,
    ),  # fmt: skip
    # export_model loads the fp32 SD pipeline (SD 2.1: ~5.2 GB of weights) and merges the LoRA on the CPU (a
    # rank-4 update per layer: seconds; a GPU would idle), then writes it: 24 Gi holds the pipeline, the merge
    # and the write; the disk holds base + adapter inputs and the merged copy in a temporary folder.
    "register": dict(
        _CPU, cpu="4", memory="24Gi", retries=3, caching=False, ephemeral_storage="60Gi", object_store_secret=S3_WRITER
    ),  # the candidate area  # fmt: skip
}
# The DPO baseline is sized like the other baselines; it also holds the MLLM key, because its judge
# (dpo.judge=mllm, CRAFT sec. 4.1.2) can be chosen by a run's overrides after the pipeline was compiled.
DEFAULT_RESOURCES["dpo"] = dict(DEFAULT_RESOURCES["baselines"], mllm_secret=MLLM_SECRET)


def settings_for(step: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``DEFAULT_RESOURCES[step]`` updated with ``overrides``; an unknown step is an error (add it to the table)."""
    if step not in DEFAULT_RESOURCES:
        raise ValueError(
            f"no resource settings for step {step!r}; add it to DEFAULT_RESOURCES (known: {sorted(DEFAULT_RESOURCES)})"
        )
    out = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
           for k, v in DEFAULT_RESOURCES[step].items()}  # fmt: skip
    out.update(overrides or {})
    return out


def profile_settings(resources, step: str) -> dict[str, Any]:
    """The overrides of ``step``'s settings that a profile's ``resources`` section (craft.launch.ResourcesConfig,
    or None) asks for, in this module's keys: pass them to :func:`settings_for`."""
    if resources is None:
        return {}
    r = resources.step(step)
    out: dict[str, Any] = {"scratch_mount": resources.scratch_mount}
    if r.gpus is not None:
        out["accelerator"] = {**GPU, "count": r.gpus} if r.gpus > 0 else None
        if r.gpus == 0:
            out["tolerations"] = []
    if r.gpu_product:
        out["node_selector"] = {**DEFAULT_RESOURCES[step].get("node_selector", {}), GPU_PRODUCT_LABEL: r.gpu_product}
    if r.nodes is not None:
        out["nodes"] = r.nodes
    if r.cpu is not None:
        out["cpu"] = r.cpu
        out["cpu_limit"] = r.cpu
    if r.memory is not None:
        out["memory"] = r.memory
        out["memory_limit"] = r.memory
    if r.ephemeral_storage is not None:
        out["ephemeral_storage"] = r.ephemeral_storage
    if r.timeout is not None:
        from craft.launch import timeout_seconds

        out["timeout_s"] = timeout_seconds(r.timeout)
    if (r.nodes or 1) > 1:
        out["scale_out"] = {"engine": resources.scale_out, "runtime": resources.trainer_runtime}
    if "checkpoints" in DEFAULT_RESOURCES[step]:
        out["checkpoints"] = resources.checkpoints
    return out


def apply_resources(task, step: str, resources: dict[str, Any]):
    """Apply ``resources`` (module docstring) to the KFP ``task`` of ``step``; returns the task."""

    unknown = sorted(set(resources) - KNOWN)
    if unknown:
        raise ValueError(f"resources for step {step!r}: unknown key(s) {unknown} (known: {sorted(KNOWN)})")
    r = resources
    scaled_out = _apply_sizing(task, step, r)
    apply_access(task, step, r, scaled_out)
    if r.get("retries"):
        task.set_retry(num_retries=int(r["retries"]), backoff_duration="60s", backoff_factor=2.0)
    if "caching" in r:
        task.set_caching_options(bool(r["caching"]))
    return task


def apply_access(task, step: str, resources: dict[str, Any], scaled_out: bool = False):
    """What the task's pod may see and reach: ConfigMap env, scoped secrets, model cache, labels, uid/gid.

    ``scaled_out``: the task only orchestrates a multi-node job; its nodes fetch what they load, so no cache.
    """
    from kfp import kubernetes

    r = resources
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_ENV)
    if r.get("object_store_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["object_store_secret"], secret_key_to_env=OBJECT_STORE_KEYS)
    if r.get("mllm_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["mllm_secret"], secret_key_to_env=MLLM_SECRET_KEYS)
    cache = r.get("model_cache")
    if cache and not scaled_out:
        cache = MODEL_CACHE if cache is True else {**MODEL_CACHE, **cache}
        unknown = sorted(set(cache) - set(MODEL_CACHE))
        if unknown:
            raise ValueError(f"resources for step {step!r}: model_cache: unknown key(s) {unknown} (known: "
                             f"{sorted(MODEL_CACHE)})")  # fmt: skip
        kubernetes.empty_dir_mount(task, volume_name="model-cache", mount_path=cache["mount_path"],
                                   size_limit=cache["size_limit"])  # fmt: skip
        task.set_env_variable("CRAFT_MODEL_CACHE", cache["mount_path"])
    for name, value in (r.get("env") or {}).items():
        if any(w in name.upper() for w in SECRET_WORDS):
            raise ValueError(
                f"resources for step {step!r}: env {name!r} looks like a credential; pass it through a secret"
            )
        if name in CONFIG_ENV:
            raise ValueError(f"resources for step {step!r}: env {name!r} comes from the ConfigMap {CONFIG_MAP}")
        task.set_env_variable(name, str(value))
    for key, value in POD_LABELS.items():
        kubernetes.add_pod_label(task, key, value)
    kubernetes.set_security_context(task, run_as_user=RUN_AS, run_as_group=RUN_AS, run_as_non_root=True)
    return task


def _apply_sizing(task, step: str, r: dict[str, Any]) -> bool:
    """CPU, memory, GPUs, placement, disk, timeout, checkpoints and scale-out of one task (module docstring).

    Returns True when the task is the orchestrator of a multi-node job (its GPUs are the job's, not its own).
    """
    from kfp import kubernetes

    from craft.launch import ENV_CHECKPOINT_ROOT, ENV_NPROC, ENV_SCALE_OUT

    acc = r.get("accelerator")
    count = int(acc.get("count", 1)) if acc else 0
    if acc and count < 1:
        raise ValueError(f"resources for step {step!r}: accelerator.count must be >= 1, got {count}")
    nodes = int(r.get("nodes") or 1)
    if nodes < 1:
        raise ValueError(f"resources for step {step!r}: nodes must be >= 1, got {nodes}")
    timeout_s = int(r["timeout_s"]) if r.get("timeout_s") else 0
    if nodes > 1:
        from components.images import GPU_IMAGE
        from craft.trainjob import ScaleOut

        if not count:
            raise ValueError(f"resources for step {step!r}: nodes: {nodes} needs GPUs per node (accelerator)")
        if not timeout_s:
            raise ValueError(f"resources for step {step!r}: a multi-node step needs timeout_s (its job's deadline)")
        engine = r.get("scale_out") or {}
        secret = r.get("object_store_secret")
        scale = ScaleOut(
            engine=engine.get("engine", "trainjob"), nodes=nodes, gpus_per_node=count, image=GPU_IMAGE,
            runtime=engine.get("runtime", "torch-distributed"), gpu_resource=str(acc.get("type", GPU["type"])),
            cpu=str(r["cpu"]) if r.get("cpu") else None, memory=str(r["memory"]) if r.get("memory") else None,
            ephemeral_storage=r.get("ephemeral_storage"), node_selector={k: str(v) for k, v in
                                                                           (r.get("node_selector") or {}).items()},
            tolerations=list(r.get("tolerations") or []), timeout_s=timeout_s,
            secrets=[{"name": secret, "keys": dict(OBJECT_STORE_KEYS)}] if secret else [],
        )  # fmt: skip
        scale.validate()
        task.set_env_variable(ENV_SCALE_OUT, scale.to_json())
        task.set_cpu_request(ORCHESTRATOR["cpu"])
        task.set_cpu_limit(ORCHESTRATOR["cpu"])
        task.set_memory_request(ORCHESTRATOR["memory"])
        task.set_memory_limit(ORCHESTRATOR["memory"])
        timeout_s += HOUR  # the pod outlives the job's deadline by the time to stage inputs and fetch outputs
    else:
        if r.get("cpu"):
            task.set_cpu_request(str(r["cpu"]))
            task.set_cpu_limit(str(r.get("cpu_limit") or r["cpu"]))
        if r.get("memory"):
            task.set_memory_request(str(r["memory"]))
            task.set_memory_limit(str(r.get("memory_limit") or r["memory"]))
        if acc:
            task.set_accelerator_type(str(acc.get("type", GPU["type"])))
            task.set_accelerator_limit(count)
            if count > 1:  # craft.launch re-executes the stage under torchrun --nproc_per_node <count>
                task.set_env_variable(ENV_NPROC, str(count))
                kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                           size_limit=SHM_SIZE)  # fmt: skip
        for key, value in (r.get("node_selector") or {}).items():
            kubernetes.add_node_selector(task, label_key=key, label_value=str(value))
        for tol in r.get("tolerations") or []:
            kubernetes.add_toleration(
                task,
                key=tol.get("key"),
                operator=tol.get("operator", "Equal"),
                value=tol.get("value"),
                effect=tol.get("effect"),
                toleration_seconds=tol.get("toleration_seconds"),
            )
    if r.get("ephemeral_storage"):
        mount = r.get("scratch_mount") or SCRATCH_MOUNT
        kubernetes.empty_dir_mount(task, volume_name="craft-scratch", mount_path=mount,
                                   size_limit=str(r["ephemeral_storage"]))  # fmt: skip
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)
    if r.get("checkpoints"):
        if not str(r["checkpoints"]).startswith("s3://"):
            raise ValueError(
                f"resources for step {step!r}: checkpoints must be an s3:// prefix, got {r['checkpoints']!r}"
            )
        task.set_env_variable(ENV_CHECKPOINT_ROOT, str(r["checkpoints"]).rstrip("/"))
    return nodes > 1
