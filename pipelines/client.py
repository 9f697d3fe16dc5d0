"""Upload, run and schedule the craft pipeline on a Kubeflow Pipelines host (`craft pipeline upload|run|schedule`).

Connection settings come from the environment only, never from arguments that end up in logs:

- ``KFP_HOST``: the KFP API endpoint, e.g. ``http://ml-pipeline.kubeflow.svc.cluster.local:8888`` inside
  the cluster or ``https://kubeflow.example.org/pipeline`` through the gateway;
- ``KFP_TOKEN``: a bearer token (optional). Without it, kfp.Client uses the projected service-account
  token at ``KF_PIPELINES_SA_TOKEN_PATH`` (audience ``pipelines.kubeflow.org``; the CronJob mounts it);
- ``KFP_NAMESPACE``: the Kubeflow profile namespace runs and experiments go to (multi-user mode).

The pipeline's run parameters (what the Kubeflow UI shows in "Create run") are those of
``pipelines.craft_pipeline.craft_pipeline``: ``profile``, ``overrides`` and ``dataset_uri``
(docs/DEPLOY.md describes each).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PIPELINE_NAME = "craft"
DEFAULT_EXPERIMENT = "craft"


class KfpConfigError(RuntimeError):
    """KFP connection settings missing or a pipeline/version that does not exist."""


def make_client(factory: Callable[..., Any] | None = None):
    """A kfp.Client for ``KFP_HOST`` (token from ``KFP_TOKEN`` or the projected SA token) and its namespace."""
    host = os.environ.get("KFP_HOST", "").strip()
    if not host:
        raise KfpConfigError("KFP_HOST is not set: export the Kubeflow Pipelines API endpoint (see docs/DEPLOY.md)")
    namespace = os.environ.get("KFP_NAMESPACE", "").strip() or None
    if factory is None:
        import kfp

        factory = kfp.Client
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    token = os.environ.get("KFP_TOKEN", "").strip()
    if token:
        kwargs["existing_token"] = token
    return factory(**kwargs), namespace


def compile_package(output: str | os.PathLike | None = None) -> Path:
    """Compile the pipeline to YAML (a temp file unless ``output``)."""
    from pipelines.craft_pipeline import compile_pipeline

    if output is None:
        output = Path(tempfile.mkdtemp(prefix="craft-kfp-")) / "craft_pipeline.yaml"
    return compile_pipeline(output)


def _version_name(name: str) -> str:
    from components.images import VERSION

    return f"{name}-{VERSION}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def latest_version_id(client, pipeline_id: str) -> str:
    resp = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    versions = getattr(resp, "pipeline_versions", None) or []
    if not versions:
        raise KfpConfigError(f"pipeline {pipeline_id} has no versions")
    return versions[0].pipeline_version_id


def upload(
    client,
    package: str | os.PathLike,
    name: str = PIPELINE_NAME,
    version: str | None = None,
    description: str = "",
    namespace: str | None = None,
) -> dict[str, Any]:
    """Upload ``package`` as pipeline ``name``, or as a new version of it when the name exists already."""
    package = str(package)
    if not Path(package).is_file():
        raise FileNotFoundError(f"{package}: compiled pipeline not found (craft pipeline compile)")
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(package, pipeline_name=name, description=description, namespace=namespace)
        pipeline_id = pipeline.pipeline_id
        return {"pipeline_id": pipeline_id, "version_id": latest_version_id(client, pipeline_id), "created": True}
    v = client.upload_pipeline_version(
        package, pipeline_version_name=version or _version_name(name), pipeline_id=pipeline_id, description=description
    )
    return {"pipeline_id": pipeline_id, "version_id": v.pipeline_version_id, "created": False}


def _resolve(client, name: str, version_id: str | None) -> tuple[str, str]:
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        raise KfpConfigError(f"no pipeline named {name!r} on the KFP host; run `craft pipeline upload` first")
    return pipeline_id, version_id or latest_version_id(client, pipeline_id)


def experiment_id(client, name: str, namespace: str | None) -> str:
    """The id of experiment ``name``, created when missing."""
    try:
        exp = client.get_experiment(experiment_name=name, namespace=namespace)
    except ValueError as e:  # kfp: "No experiment is found with name ..."
        if "no experiment" not in str(e).lower():
            raise
        exp = client.create_experiment(name, namespace=namespace)
    return exp.experiment_id


def run_params(profile: str, overrides: list[str] | None, dataset_uri: str = "") -> dict[str, Any]:
    """The pipeline parameters a run takes (the same fields as the Kubeflow UI's run form)."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form stage.key=value")
    return {"profile": profile, "overrides": list(overrides or []), "dataset_uri": dataset_uri}


def run(
    client,
    profile: str,
    overrides: list[str] | None = None,
    dataset_uri: str = "",
    *,
    name: str = PIPELINE_NAME,
    version_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    run_name: str | None = None,
    enable_caching: bool | None = None,
) -> dict[str, Any]:
    """Start one run of pipeline ``name`` (latest version unless ``version_id``) with ``profile``."""
    pipeline_id, version_id = _resolve(client, name, version_id)
    exp = experiment_id(client, experiment, namespace)
    job = run_name or f"{name}-{profile}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    r = client.run_pipeline(
        exp,
        job,
        params=run_params(profile, overrides, dataset_uri),
        pipeline_id=pipeline_id,
        version_id=version_id,
        enable_caching=enable_caching,
    )
    return {"run_id": r.run_id, "mode": "kfp", "pipeline_id": pipeline_id, "version_id": version_id, "name": job}


def normalize_cron(expr: str) -> str:
    """KFP's cron has a seconds field first (6 fields); a standard 5-field expression gets ``0`` prepended.

    >>> normalize_cron("0 3 * * *")
    '0 0 3 * * *'
    """
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron expression {expr!r}: expected 5 fields (min hour dom mon dow) or 6 (with seconds)")
    return " ".join(fields)


def schedule(
    client,
    cron: str,
    profile: str,
    overrides: list[str] | None = None,
    dataset_uri: str = "",
    *,
    name: str = PIPELINE_NAME,
    version_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    job_name: str | None = None,
    max_concurrency: int = 1,
) -> dict[str, Any]:
    """Create a recurring run (cron) of pipeline ``name``; no catch-up of missed intervals, one at a time."""
    pipeline_id, version_id = _resolve(client, name, version_id)
    exp = experiment_id(client, experiment, namespace)
    rr = client.create_recurring_run(
        exp,
        job_name or f"{name}-{profile}-scheduled",
        cron_expression=normalize_cron(cron),
        max_concurrency=max_concurrency,
        no_catchup=True,
        params=run_params(profile, overrides, dataset_uri),
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
    )
    return {"recurring_run_id": rr.recurring_run_id, "pipeline_id": pipeline_id, "version_id": version_id}


def start_run(profile: str, overrides: list[str], dataset_uri: str) -> dict[str, Any]:
    """The run starter `craft retrain-if-new-data` uses when ``KFP_HOST`` is set (craft.retrain.RunStarter)."""
    client, namespace = make_client()
    experiment = os.environ.get("KFP_EXPERIMENT", DEFAULT_EXPERIMENT)
    name = os.environ.get("KFP_PIPELINE_NAME", PIPELINE_NAME)
    return run(client, profile, overrides, dataset_uri, name=name, experiment=experiment, namespace=namespace)


def local_run_starter(root: str | os.PathLike) -> Callable[[str, list[str], str], dict[str, Any]]:
    """The run starter without a KFP host: the whole pipeline on this machine (pipelines.local.run_local)."""

    def start(profile: str, overrides: list[str], dataset_uri: str) -> dict[str, Any]:
        from pipelines.local import run_local

        summary = run_local(profile, overrides, root, dataset_uri=dataset_uri)
        return {
            "run_id": summary.get("run_dir"),
            "mode": "local",
            "ok": summary.get("ok"),
            "wall_s": summary.get("wall_s"),
        }

    return start
