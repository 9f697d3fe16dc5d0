"""Upload and run the craft pipeline on a Kubeflow Pipelines host; render its retraining CronJob.

These are `craft pipeline upload|run|schedule` and the run starters of `craft retrain-if-new-data`.

One KFP pipeline per profile, named ``craft-<profile>`` (the file's stem for a YAML path): a profile's
``pipeline`` plan fixes the DAG's tasks when it is compiled (craft.plan), so profile P is uploaded as
pipeline ``craft-P`` and a run of P always takes a version of ``craft-P``, never another profile's DAG.

Connection settings come from the environment only, never from arguments that end up in logs:

- ``KFP_HOST``: the KFP API endpoint, e.g. ``http://ml-pipeline.kubeflow.svc.cluster.local:8888`` inside
  the cluster or ``https://kubeflow.example.org/pipeline`` through the gateway;
- ``KFP_TOKEN``: a bearer token (optional). Without it, kfp.Client uses the projected service-account
  token at ``KF_PIPELINES_SA_TOKEN_PATH`` (audience ``pipelines.kubeflow.org``; the CronJob mounts it);
- ``KFP_NAMESPACE``: the Kubeflow profile namespace runs and experiments go to (multi-user mode).

A run passes all five parameters of ``pipelines.craft_pipeline.craft_pipeline`` (what the Kubeflow UI
shows in "Create run"): ``profile``, ``overrides``, ``dataset_uri``, ``base_uri``, ``model_name``
(docs/DEPLOY.md describes each). Overrides naming the gates, the registry or a secret's variable are
refused here, before the host is contacted (craft.config.check_run_overrides).

Scheduling has one form: the CronJob of k8s/base/cronjob-retrain.yaml running
``craft retrain-if-new-data``, which starts a run only for a new dataset version. A KFP recurring run
cannot make that check, so none is created here; ``render_retrain_cronjob`` writes the CronJob for a profile.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PROFILE = "demo-histo"
DEFAULT_EXPERIMENT = "craft"
DEFAULT_NAMESPACE = "craft"  # the namespace of k8s/base (and of the prod overlay)
CRONJOB_TEMPLATE = Path(__file__).resolve().parents[1] / "k8s" / "base" / "cronjob-retrain.yaml"

# kfp.Client.get_run(run_id).state (kfp_server_api V2beta1RuntimeState; the v1 API's names too) -> what
# `craft retrain-if-new-data` does with a claimed run: wait, count it done, or restart it.
RUN_STATES = {
    "RUNTIME_STATE_UNSPECIFIED": "running",
    "PENDING": "running",
    "RUNNING": "running",
    "PAUSED": "running",
    "CANCELING": "running",
    "TERMINATING": "running",
    "SUCCEEDED": "succeeded",
    "SKIPPED": "succeeded",
    "FAILED": "failed",
    "CANCELED": "failed",
    "CANCELLED": "failed",
    "TERMINATED": "failed",
    "ERROR": "failed",
}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*?,/\-]+$")


class KfpConfigError(RuntimeError):
    """KFP connection settings missing or a pipeline/version that does not exist."""


def profile_name(profile: str | os.PathLike) -> str:
    """A profile's name: the bundled name itself, or a YAML path's stem.

    >>> profile_name("chexpert"), profile_name("/opt/craft/configs/my-site.yaml")
    ('chexpert', 'my-site')
    """
    name = Path(str(profile)).stem
    if not name:
        raise ValueError("a profile name or YAML path is required")
    return name


def pipeline_name(profile: str | os.PathLike) -> str:
    """The KFP pipeline that holds ``profile``'s DAG (the name the compiled pipeline carries too).

    >>> pipeline_name("demo-histo")
    'craft-demo-histo'
    """
    from pipelines.craft_pipeline import pipeline_name as compiled_name

    profile_name(profile)  # refuses an empty profile (the compiled default would be the bare "craft")
    return compiled_name(str(profile))


def default_model_name(profile: str | os.PathLike) -> str:
    """The registry name a run registers under when none is given: the profile's name (as craft.promote)."""
    return profile_name(profile)


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


# ---------------------------------------------------------------------------------------------- upload


def compile_package(profile: str = DEFAULT_PROFILE, output: str | os.PathLike | None = None) -> Path:
    """Compile ``profile``'s plan to pipeline YAML (a temp file unless ``output``)."""
    from pipelines.craft_pipeline import compile_pipeline

    if output is None:
        output = Path(tempfile.mkdtemp(prefix="craft-kfp-")) / f"{pipeline_name(profile)}.yaml"
    return compile_pipeline(output, profile)


def task_names(package: str | os.PathLike) -> set[str]:
    """The display names of every task in a compiled pipeline, nested groups included."""
    docs = [d for d in yaml.safe_load_all(Path(package).read_text()) if d]
    spec = docs[0] if docs else {}
    dags = [spec.get("root", {}).get("dag", {})]
    dags += [c["dag"] for c in spec.get("components", {}).values() if isinstance(c, dict) and "dag" in c]
    return {t.get("taskInfo", {}).get("name", key) for dag in dags for key, t in dag.get("tasks", {}).items()}


def _code_tag() -> str:
    """The code version for a version name: package version + git commit (craft.version), e.g. 0.1.0-3f2a9c0d1e4b."""
    from components.images import VERSION
    from craft.version import code_version

    code = code_version()
    sha = "unknown" if code.startswith("unknown") else code[:12] + ("-dirty" if code.endswith("-dirty") else "")
    return f"{VERSION}-{sha}"


def _version_name(name: str) -> str:
    return f"{name}-{_code_tag()}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def latest_version_id(client, pipeline_id: str) -> str:
    resp = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    versions = getattr(resp, "pipeline_versions", None) or []
    if not versions:
        raise KfpConfigError(f"pipeline {pipeline_id} has no versions")
    return versions[0].pipeline_version_id


def upload(
    client,
    package: str | os.PathLike,
    name: str,
    version: str | None = None,
    description: str = "",
    namespace: str | None = None,
) -> dict[str, Any]:
    """Upload ``package`` as pipeline ``name``, or as a new version of it when the name exists already.

    The first upload creates the pipeline (KFP names its first version after the pipeline); later ones
    add a version named ``version`` or ``<name>-<package version>-<git commit>-<UTC time>``.
    """
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


def upload_profile(
    client,
    profile: str,
    package: str | os.PathLike | None = None,
    version: str | None = None,
    description: str = "",
    namespace: str | None = None,
) -> dict[str, Any]:
    """Compile ``profile``'s plan and upload it as pipeline ``craft-<profile>`` (a new version when it exists).

    A ``package`` compiled elsewhere is uploaded only when its tasks are those of ``profile``'s plan, so
    no profile's pipeline ever holds another profile's DAG.
    """
    from craft.version import code_version

    name = pipeline_name(profile)
    expected = compile_package(profile)
    if package is None:
        package = expected
    elif Path(package).is_file() and task_names(package) != task_names(expected):
        have, want = task_names(package), task_names(expected)
        diff = sorted(have ^ want)
        raise KfpConfigError(
            f"{package} was not compiled from profile {profile!r}'s plan (tasks differ: {', '.join(diff)}); "
            f"compile it with `craft pipeline compile --profile {profile}` or leave out --package"
        )
    description = description or f"craft, the DAG of profile {profile} (code {_code_tag()}, {code_version()})"
    out = upload(client, package, name, version, description, namespace=namespace)
    return {**out, "pipeline_name": name, "profile": profile}


# ------------------------------------------------------------------------------------------------- run


def run_params(
    profile: str,
    overrides: Iterable[str] | None,
    dataset_uri: str = "",
    base_uri: str = "",
    model_name: str = "",
) -> dict[str, Any]:
    """The five pipeline parameters of a run (the Kubeflow UI's run form), protected overrides refused.

    Every stage config of the profile with these overrides must build (craft.plan.config_errors): a run with a
    mistyped key is refused here, once, naming it, instead of failing in the step that reads it, retried.

    >>> run_params("chexpert", ["data.n=800"], "s3://craft/datasets/chexpert")["model_name"]
    'chexpert'
    """
    from craft.config import ConfigError, check_run_overrides
    from craft.plan import config_errors

    overrides = check_run_overrides(overrides or [], where="override")
    errors = config_errors(profile, overrides)
    if errors:
        raise ConfigError(f"profile {profile} with these overrides: " + "; ".join(errors))
    return {
        "profile": str(profile),
        "overrides": overrides,
        "dataset_uri": dataset_uri or "",
        "base_uri": base_uri or "",
        "model_name": model_name or default_model_name(profile),
    }


def _check_version(client, name: str, pipeline_id: str, version_id: str) -> None:
    """Refuse a pinned version that does not exist or belongs to another pipeline (another profile's DAG)."""
    from kfp_server_api.exceptions import ApiException

    try:
        found = client.get_pipeline_version(pipeline_id, version_id)
    except ApiException as e:
        if getattr(e, "status", None) == 404:
            raise KfpConfigError(f"pipeline {name!r} has no version {version_id!r}") from e
        raise
    owner = getattr(found, "pipeline_id", None)
    if owner and owner != pipeline_id:
        raise KfpConfigError(f"version {version_id!r} belongs to pipeline {owner}, not to {name!r} ({pipeline_id})")


def resolve_version(client, profile: str, version_id: str | None = None) -> tuple[str, str, str]:
    """``(pipeline name, pipeline id, version id)`` for a run of ``profile``: its latest version, or ``version_id``."""
    name = pipeline_name(profile)
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:
        raise KfpConfigError(
            f"no pipeline {name!r} on the KFP host: profile {profile!r} was never uploaded; "
            f"run `craft pipeline upload --profile {profile}` first"
        )
    if version_id:
        _check_version(client, name, pipeline_id, version_id)
        return name, pipeline_id, version_id
    return name, pipeline_id, latest_version_id(client, pipeline_id)


def experiment_id(client, name: str, namespace: str | None) -> str:
    """The id of experiment ``name``, created when missing."""
    try:
        exp = client.get_experiment(experiment_name=name, namespace=namespace)
    except ValueError as e:  # kfp: "No experiment is found with name ..."
        if "no experiment" not in str(e).lower():
            raise
        exp = client.create_experiment(name, namespace=namespace)
    return exp.experiment_id


def run(
    client,
    profile: str,
    overrides: Iterable[str] | None = None,
    dataset_uri: str = "",
    base_uri: str = "",
    model_name: str = "",
    *,
    version_id: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    namespace: str | None = None,
    run_name: str | None = None,
    enable_caching: bool | None = None,
) -> dict[str, Any]:
    """Start one run of ``profile``'s pipeline (its latest version unless ``version_id``) with all five parameters."""
    params = run_params(profile, overrides, dataset_uri, base_uri, model_name)  # refused before any request
    name, pipeline_id, version_id = resolve_version(client, profile, version_id)
    exp = experiment_id(client, experiment, namespace)
    job = run_name or f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    r = client.run_pipeline(
        exp, job, params=params, pipeline_id=pipeline_id, version_id=version_id, enable_caching=enable_caching
    )
    return {
        "run_id": r.run_id,
        "mode": "kfp",
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "name": job,
        "pipeline_name": name,
    }


def run_state(state: str | None) -> str:
    """A KFP run state as "running", "succeeded" or "failed" (:data:`RUN_STATES`).

    A state not listed counts as running: waiting is safe, while "failed" would start a second run
    next to one that may still be going.

    >>> run_state("SUCCEEDED"), run_state("CANCELED"), run_state("PENDING"), run_state(None)
    ('succeeded', 'failed', 'running', 'running')
    """
    return RUN_STATES.get(str(state or "RUNTIME_STATE_UNSPECIFIED").upper(), "running")


def run_status(run_id: str, client=None) -> str:
    """The state of KFP run ``run_id`` (kfp.Client.get_run(run_id).state) as "running", "succeeded" or "failed"."""
    if client is None:
        client, _ = make_client()
    return run_state(getattr(client.get_run(run_id), "state", None))


def start_run(
    profile: str,
    overrides: Iterable[str] | None,
    dataset_uri: str,
    model_name: str = "",
    *,
    base_uri: str | None = None,
) -> dict[str, Any]:
    """The run starter `craft retrain-if-new-data` uses when ``KFP_HOST`` is set (craft.retrain.RunStarter).

    Runs ``profile``'s pipeline (latest version) in experiment ``KFP_EXPERIMENT`` (default ``craft``);
    ``base_uri`` defaults to ``CRAFT_BASE_URI``, which the retraining CronJob sets for its profile.
    """
    client, namespace = make_client()
    experiment = os.environ.get("KFP_EXPERIMENT", "").strip() or DEFAULT_EXPERIMENT
    if base_uri is None:
        base_uri = os.environ.get("CRAFT_BASE_URI", "").strip()
    return run(
        client, profile, overrides, dataset_uri, base_uri, model_name, experiment=experiment, namespace=namespace
    )


def local_run_starter(root: str | os.PathLike) -> Callable[..., dict[str, Any]]:
    """The run starter without a KFP host: the whole pipeline on this machine (pipelines.local.run_local).

    The run has finished when ``start`` returns, so its result carries the final ``state``; a failed run
    is reported (state "failed", the error's text), never raised. ``base_uri`` defaults to ``CRAFT_BASE_URI``.
    """
    root = Path(root).resolve()

    def start(
        profile: str,
        overrides: Iterable[str] | None,
        dataset_uri: str,
        model_name: str = "",
        *,
        base_uri: str | None = None,
    ) -> dict[str, Any]:
        from pipelines.local import run_local

        if base_uri is None:
            base_uri = os.environ.get("CRAFT_BASE_URI", "").strip()
        root.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in root.iterdir()}
        t0 = time.monotonic()
        try:
            summary = run_local(
                profile, list(overrides or []), root, dataset_uri=dataset_uri, model_name=model_name, base_uri=base_uri
            )
        except Exception as e:  # the run failed: report it, with the folder it left, for the retry logic
            new = [p for p in root.iterdir() if p.is_dir() and p.name not in before | {"store", ".store-server"}]
            run_dir = str(max(new, key=lambda p: p.stat().st_mtime)) if new else None
            return {"run_id": run_dir, "mode": "local", "state": "failed", "ok": False,
                    "wall_s": round(time.monotonic() - t0, 1), "error": f"{type(e).__name__}: {e}"}  # fmt: skip
        ok = bool(summary.get("ok"))
        return {
            "run_id": summary.get("run_dir"),
            "mode": "local",
            "state": "succeeded" if ok else "failed",
            "ok": ok,
            "wall_s": summary.get("wall_s", round(time.monotonic() - t0, 1)),
            "error": None if ok else str(summary.get("error") or "the local run reported ok=False"),
            "decision": summary.get("decision"),
        }

    return start


# -------------------------------------------------------------------------------------------- schedule


def check_cron(expr: str) -> str:
    """A Kubernetes CronJob schedule: 5 fields (minute hour day-of-month month day-of-week) or a macro.

    >>> check_cron("0  3 * * *")
    '0 3 * * *'
    """
    fields = str(expr).split()
    if len(fields) == 1 and fields[0] in _CRON_MACROS:
        return fields[0]
    if any(f.upper().startswith(("TZ=", "CRON_TZ=")) for f in fields):
        raise ValueError(f"cron expression {expr!r}: no TZ= prefix; the CronJob's schedule is in UTC (timeZone)")
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise ValueError(
            f"cron expression {expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"e.g. '0 3 * * *', or one of {', '.join(_CRON_MACROS)}"
        )
    return " ".join(fields)


def _check_dataset(dataset: str) -> str:
    parts = dataset[len("s3://") :].strip("/").split("/") if dataset.startswith("s3://") else []
    if len(parts) < 2 or not all(parts):
        raise ValueError(
            f"dataset {dataset!r}: expected the s3:// prefix a dataset was uploaded to, "
            "s3://BUCKET/datasets/NAME (`craft store upload DIR s3://BUCKET/datasets/NAME`); the CronJob's pod "
            "has no local files"
        )
    return dataset.rstrip("/")


def _check_image(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
        raise ValueError(f"image {image!r}: pin a tag or digest (no ':latest'), e.g. ghcr.io/craft-ml/craft-cpu:0.1.0")
    return image


def retrain_cronjob(
    profile: str,
    cron: str,
    dataset: str,
    model_name: str = "",
    base_uri: str = "",
    overrides: Iterable[str] | None = None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    image: str | None = None,
    template: str | os.PathLike = CRONJOB_TEMPLATE,
) -> dict[str, Any]:
    """The retraining CronJob ``craft-retrain-<profile>``: k8s/base/cronjob-retrain.yaml set up for ``profile``.

    Its container runs ``craft retrain-if-new-data --model M --profile P --dataset URI [overrides]`` with
    CRAFT_MODEL / CRAFT_PROFILE / CRAFT_DATASET / CRAFT_BASE_URI on the container itself (they take
    precedence over the shared ConfigMap craft-env, which still supplies the endpoints). M defaults to
    the profile's name, the name the pipeline registers a run's model under, so the model the CronJob
    watches is the model its runs register.
    """
    from craft.config import ConfigError, check_run_overrides, load_profile, load_stage_config

    items = check_run_overrides(overrides or [], where="override")
    schedule = check_cron(cron)
    dataset = _check_dataset(dataset)
    load_profile(profile)  # an unknown or invalid profile fails here, not in the cluster at 03:00
    plan = load_stage_config("pipeline", profile)
    if plan.foundation == "import" and not base_uri:
        raise ConfigError(
            f"profile {profile!r} imports its foundation model (pipeline.foundation: import): pass --base-uri "
            "with the checkpoint's folder or s3:// prefix"
        )
    name = f"craft-retrain-{profile_name(profile)}"
    if len(name) > 52 or not _DNS_LABEL.match(name):
        raise ValueError(f"CronJob name {name!r}: the profile's name must be lowercase letters, digits and '-'")
    if not _DNS_LABEL.match(namespace):
        raise ValueError(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    if image is None:
        from components.images import CPU_IMAGE

        image = CPU_IMAGE
    model = model_name or default_model_name(profile)

    if not Path(template).is_file():
        raise FileNotFoundError(f"{template}: the CronJob template is not here; run this from a checkout of craft")
    doc = yaml.safe_load(Path(template).read_text())
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    if doc.get("kind") != "CronJob" or container.get("command") != ["craft", "retrain-if-new-data"]:
        raise ValueError(f"{template}: expected the CronJob running `craft retrain-if-new-data`")
    labels = {"app.kubernetes.io/name": "craft-retrain", "app.kubernetes.io/instance": name,
              "app.kubernetes.io/part-of": "craft"}  # fmt: skip
    doc["metadata"] = {"name": name, "namespace": namespace, "labels": labels}
    doc["spec"]["schedule"] = schedule
    doc["spec"]["concurrencyPolicy"] = "Forbid"  # one check at a time per profile (the claim marker also holds)
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    container["image"] = _check_image(image)
    container["args"] = [*container.get("args", []), *items]
    watched = {
        "CRAFT_PROFILE": str(profile),
        "CRAFT_MODEL": model,
        "CRAFT_DATASET": dataset,
        "CRAFT_BASE_URI": base_uri,
    }
    env = [e for e in container.get("env", []) if e.get("name") not in watched]
    container["env"] = [{"name": k, "value": v} for k, v in watched.items()] + env
    return doc


def render_retrain_cronjob(profile: str, cron: str, dataset: str, **kwargs: Any) -> str:
    """:func:`retrain_cronjob` as YAML for ``kubectl apply -f``, headed by how it was made."""
    doc = retrain_cronjob(profile, cron, dataset, **kwargs)
    (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    head = (
        f"# Retraining of profile {env['CRAFT_PROFILE']}: rendered by `craft pipeline schedule` from "
        "k8s/base/cronjob-retrain.yaml.\n"
        f"# At {doc['spec']['schedule']} (UTC) it runs `craft retrain-if-new-data` for model {env['CRAFT_MODEL']} on "
        f"{env['CRAFT_DATASET']}.\n"
        "# Apply it in the namespace of a deployed overlay (ServiceAccount craft-scheduler, ConfigMap craft-env).\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, width=1000)
