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
    object_store_secret: mlpipeline-minio-artifact  # -> AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; null: none
    mllm_secret: craft-mllm                          # -> MLLM_API_KEY (annotate step only); null: none
    model_cache: {pvc: craft-model-cache, mount_path: /cache/models}  # null: no mount
    env: {CRAFT_S3_ENDPOINT: "minio-service.kubeflow:9000"}            # plain, non-secret values only
    retries: 2                # with exponential backoff
    caching: false            # off where sampling is not deterministic
    timeout_s: 86400

Secrets are referenced by name and key only: the compiled YAML carries ``secretName``/``secretKey``,
never a value. ``env`` refuses names that look like credentials so that nobody passes a key there.
For multi-GPU steps ``accelerator.count`` > 1 also sets ``CRAFT_NPROC_PER_NODE``, which the training
components hand to ``torchrun --nproc_per_node`` inside the pod.
"""

from typing import Any

# Kubeflow's artifact-store secret (SeaweedFS since KFP 2.16, MinIO before) and its key names.
OBJECT_STORE_SECRET = "mlpipeline-minio-artifact"
OBJECT_STORE_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
MLLM_SECRET_KEYS = {"api-key": "MLLM_API_KEY"}
MODEL_CACHE = {"pvc": "craft-model-cache", "mount_path": "/cache/models"}
GPU = {"type": "nvidia.com/gpu", "count": 1}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

KNOWN = {
    "cpu", "cpu_limit", "memory", "memory_limit", "accelerator", "node_selector", "tolerations",
    "object_store_secret", "mllm_secret", "model_cache", "env", "retries", "caching", "timeout_s",
}  # fmt: skip
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")

# Defaults per step: CPU steps small, training steps on one GPU with the model cache. Caching is off
# wherever sampling or training is stochastic, so a re-run really re-runs.
_CPU = {"cpu": "1", "memory": "4Gi", "object_store_secret": OBJECT_STORE_SECRET, "retries": 2, "caching": True}
_GPU = {
    "cpu": "8",
    "memory": "64Gi",
    "accelerator": dict(GPU),
    "tolerations": [dict(GPU_TOLERATION)],
    "object_store_secret": OBJECT_STORE_SECRET,
    "model_cache": dict(MODEL_CACHE),
    "retries": 1,
    "caching": False,
}
DEFAULT_RESOURCES: dict[str, dict[str, Any]] = {
    # never cached: it reads the dataset's latest pointer, and its output is every data step's cache key
    "dataset-version": dict(_CPU, caching=False),
    "data": dict(_CPU),
    "validate": dict(_CPU),
    "annotate": dict(_CPU, mllm_secret="craft-mllm", caching=False),
    "pretrain": dict(_GPU),
    "finetune": dict(_GPU),
    "encoders": dict(_GPU),
    "probe": dict(_GPU, memory="32Gi", caching=True),
    "baselines": dict(_GPU),
    "craft": dict(_GPU),
    "controlnet": dict(_GPU),
    "evaluate": dict(_GPU, memory="32Gi"),
    "champion": dict(_CPU, caching=False),  # production moves between runs
    "gate": dict(_CPU, cpu="500m", memory="1Gi", retries=0, caching=False),
    "register": dict(_CPU, retries=3, caching=False),
}


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
    if r.get("object_store_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["object_store_secret"], secret_key_to_env=OBJECT_STORE_KEYS)
    if r.get("mllm_secret"):
        kubernetes.use_secret_as_env(task, secret_name=r["mllm_secret"], secret_key_to_env=MLLM_SECRET_KEYS)
    cache = r.get("model_cache")
    if cache:
        cache = MODEL_CACHE if cache is True else {**MODEL_CACHE, **cache}
        kubernetes.mount_pvc(task, pvc_name=cache["pvc"], mount_path=cache["mount_path"])
        task.set_env_variable("CRAFT_MODEL_CACHE", cache["mount_path"])
    for name, value in (r.get("env") or {}).items():
        if any(w in name.upper() for w in SECRET_WORDS):
            raise ValueError(
                f"resources for step {step!r}: env {name!r} looks like a credential; pass it through a secret"
            )
        task.set_env_variable(name, str(value))
    if r.get("retries"):
        task.set_retry(num_retries=int(r["retries"]), backoff_duration="60s", backoff_factor=2.0)
    if "caching" in r:
        task.set_caching_options(bool(r["caching"]))
    if r.get("timeout_s"):
        kubernetes.set_timeout(task, int(r["timeout_s"]))
    return task
