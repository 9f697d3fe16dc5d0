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
    timeout_s: 86400

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
For multi-GPU steps ``accelerator.count`` > 1 also sets ``CRAFT_NPROC_PER_NODE``, which the training
components hand to ``torchrun --nproc_per_node`` inside the pod.
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
CONFIG_ENV = {k: k for k in ("CRAFT_S3_ENDPOINT", "CRAFT_S3_SECURE", "CRAFT_BUCKET", "CRAFT_REGISTRY",
                             "CRAFT_CHECKPOINT_ROOT", "CRAFT_MLLM_ALLOWED_URLS")}  # fmt: skip
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
}  # fmt: skip
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")

# Defaults per step: CPU steps small, training steps on one GPU with the model cache. Caching is off
# wherever sampling or training is stochastic, so a re-run really re-runs.
_CPU = {"cpu": "1", "memory": "4Gi", "object_store_secret": S3_READER, "retries": 2, "caching": True}
_GPU = {
    "cpu": "8",
    "memory": "64Gi",
    "accelerator": dict(GPU),
    "tolerations": [dict(GPU_TOLERATION)],
    "object_store_secret": S3_WRITER,  # training checkpoints go to the object store (CRAFT_CHECKPOINT_ROOT)
    "model_cache": dict(MODEL_CACHE),
    "retries": 1,
    "caching": False,
}
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    # never cached: it reads the dataset's latest pointer, and its output is every data step's cache key
    "dataset-version": dict(_CPU, caching=False),
    "data": dict(_CPU),
    "validate": dict(_CPU, object_store_secret=S3_WRITER),  # records the verdict under validations/
    "annotate": dict(_CPU, object_store_secret=None, mllm_secret=MLLM_SECRET, caching=False),  # MLLM key only
    "pretrain": dict(_GPU),
    "finetune": dict(_GPU),
    "encoders": dict(_GPU),
    "probe": dict(_GPU, memory="32Gi", caching=True, object_store_secret=S3_READER),
    "baselines": dict(_GPU),
    "craft": dict(_GPU),
    "controlnet": dict(_GPU),
    "evaluate": dict(_GPU, memory="32Gi", object_store_secret=S3_READER),
    "champion": dict(_CPU, caching=False),  # production moves between runs
    "gate": dict(_CPU, cpu="500m", memory="1Gi", retries=0, caching=False, object_store_secret=None),
    "register": dict(_CPU, retries=3, caching=False, object_store_secret=S3_WRITER),  # the candidate area
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


def apply_resources(task, step: str, resources: dict[str, Any]):
    """Apply ``resources`` (module docstring) to the KFP ``task`` of ``step``; returns the task."""
    from kfp import kubernetes

    unknown = sorted(set(resources) - KNOWN)
    if unknown:
        raise ValueError(f"resources for step {step!r}: unknown key(s) {unknown} (known: {sorted(KNOWN)})")
    r = resources
    if r.get("cpu"):
        task.set_cpu_request(str(r["cpu"]))
        task.set_cpu_limit(str(r.get("cpu_limit") or r["cpu"]))
    if r.get("memory"):
        task.set_memory_request(str(r["memory"]))
        task.set_memory_limit(str(r.get("memory_limit") or r["memory"]))
    acc = r.get("accelerator")
    if acc:
        count = int(acc.get("count", 1))
        if count < 1:
            raise ValueError(f"resources for step {step!r}: accelerator.count must be >= 1, got {count}")
        task.set_accelerator_type(str(acc.get("type", GPU["type"])))
        task.set_accelerator_limit(count)
        if count > 1:
            task.set_env_variable("CRAFT_NPROC_PER_NODE", str(count))
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
    apply_access(task, step, r)
    if r.get("retries"):
        task.set_retry(num_retries=int(r["retries"]), backoff_duration="60s", backoff_factor=2.0)
    if "caching" in r:
        task.set_caching_options(bool(r["caching"]))
    if r.get("timeout_s"):
        kubernetes.set_timeout(task, int(r["timeout_s"]))
    return task


def apply_access(task, step: str, resources: dict[str, Any]):
    """What the task's pod may see and reach: ConfigMap env, scoped secrets, model cache, labels, uid/gid."""
    from kfp import kubernetes

    r = resources
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIG_MAP, config_map_key_to_env=CONFIG_ENV)
    if r.get("object_store_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["object_store_secret"], secret_key_to_env=OBJECT_STORE_KEYS)
    if r.get("mllm_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["mllm_secret"], secret_key_to_env=MLLM_SECRET_KEYS)
    cache = r.get("model_cache")
    if cache:
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
