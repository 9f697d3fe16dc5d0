"""`craft retrain-if-new-data`: start a pipeline run only for a dataset version no model was trained on.

What the retraining CronJob (k8s/base/cronjob-retrain.yaml) runs on a schedule:

1. resolve the dataset to its content version (``craft.storage.datasets.resolve``: the ``latest``
   pointer of ``s3://B/datasets/NAME``, a committed prefix, a ``.dvc`` file or ``dvc://`` URI), the same
   id the pipeline's data step emits and the registry's lineage records (``lineage.dataset.version``);
2. the production model's dataset version (the lineage of the version the ``production`` alias names):
   equal -> nothing to do;
3. a version whose validation failed (recorded by the pipeline's validate step,
   ``<registry root>/validations/NAME/<version>.json``) is never started again: a corrupt upload fails
   once, is recorded, and the schedule moves on;
4. otherwise claim the version with a marker ``models/<name>/retrain/<version>.json`` created with
   ``If-None-Match: *`` (craft/storage/cas.py): of any number of concurrent invocations exactly one
   creates it and starts the run; the others see the marker. An existing marker is reconciled with the
   run's real state: ``submitted`` (a Kubeflow run) is looked up by its run id (``run_status``): still
   running -> wait; succeeded -> done; failed -> start again while fewer than ``max_attempts`` runs were
   started for this version (every attempt is recorded in the marker), then give up. A local run
   (``started``, holding a lease) is synchronous: it ends ``succeeded`` or ``failed`` (failed local runs are
   retried the same bounded way; a holder that died is taken over once its lease expired). Takeovers
   are compare-and-swap on the marker's etag, so they are exclusive too. ``force`` retries whatever the
   marker says (the attempt count still grows).

The run itself is started by a callable the caller passes in (the CLI picks the Kubeflow client when
``KFP_HOST`` is set, else ``pipelines.local`` with kfp.local against the same object store): this package
never imports the orchestration layer. The run reads the PINNED version (``datasets/NAME/<version>``),
so a pointer moved meanwhile does not change what it trains on.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from craft.storage.cas import PreconditionFailed, get_json_etag, put_json_conditional

# start_run(profile, overrides, dataset_uri, model_name) -> {"run_id": ..., "mode": "local"|"kfp",
# "state": "succeeded"|"failed" (local runs, which are synchronous), ...}
RunStarter = Callable[[str, list[str], str, str], dict[str, Any]]
# run_status(run_id) -> "running" | "succeeded" | "failed"  (a Kubeflow run's state)
RunStatus = Callable[[str], str]


@dataclass
class RetrainConfig:
    """Scheduled retraining (`craft retrain-if-new-data`)."""

    # registered model name whose production lineage is compared
    model: str = ""
    # profile the new run uses (bundled name or YAML path inside the image)
    profile: str = "demo-histo"
    # the dataset: a .dvc file or DVC-tracked local folder, or s3://bucket/prefix of a committed dataset
    dataset: str = ""
    # pipeline-wide overrides passed to the run (stage.key=value)
    overrides: list[str] = field(default_factory=list)
    # seconds a local run holds its claim before another invocation may assume it died and take over
    lease_s: float = 6 * 3600.0
    # retry even if a run for this dataset version was already started or finished
    force: bool = False
    # runs started for one dataset version before a failing version is given up (recorded in the marker)
    max_attempts: int = 3

    def validate(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"retrain.lease_s must be > 0, got {self.lease_s}")
        if self.max_attempts < 1:
            raise ValueError(f"retrain.max_attempts must be >= 1, got {self.max_attempts}")


@dataclass
class RetrainOutcome:
    # "up-to-date" | "invalid" | "running" | "done" | "already-claimed" | "started" | "submitted" | "failed"
    # | "gave-up"
    action: str
    dataset_version: str
    production_dataset_version: str | None
    production_version: str | None
    marker: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    message: str = ""


def resolve_dataset(dataset: str, store=None):
    """The :class:`craft.storage.datasets.DatasetRef` of ``dataset`` (module docstring, step 1)."""
    import tempfile

    from craft.storage import datasets

    if not dataset:
        raise ValueError("retrain.dataset is empty: give s3://B/datasets/NAME, an s3:// prefix, a .dvc file or dvc://")
    with tempfile.TemporaryDirectory(prefix="craft-retrain-") as tmp:
        return datasets.resolve(dataset, store, work_dir=tmp)


def dataset_version_of(dataset: str, store=None) -> str:
    """The content version of ``dataset``."""
    return resolve_dataset(dataset, store).version


def run_dataset_uri(ref) -> str:
    """What the pipeline run reads: the pinned version of an object-store dataset, else what the user gave
    (a folder, a .dvc file, a dvc:// URI: the data step checks it is still the resolved version)."""
    return ref.resolved_uri if ref.resolved_uri.startswith("s3://") else ref.uri


def _marker_name(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", version) + ".json"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def main(
    cfg: RetrainConfig, registry, start_run: RunStarter, *, run_status: RunStatus | None = None, owner: str = ""
) -> RetrainOutcome:
    """Compare dataset versions and keep exactly one live run per new dataset version (module docstring)."""
    from craft.storage import datasets

    if not cfg.model:
        raise ValueError("retrain.model is empty: name the registered model to keep up to date")
    ref = resolve_dataset(cfg.dataset, registry.store)
    current = ref.version
    pointer = registry.get_production(cfg.model)
    prod_version = pointer["version"] if pointer else None
    prod_dataset = None
    if prod_version:
        lineage = registry.get_version(cfg.model, prod_version)["lineage"]
        prod_dataset = (lineage.get("dataset") or {}).get("version")
    base = RetrainOutcome("up-to-date", current, prod_dataset, prod_version)
    if prod_dataset == current and not cfg.force:
        base.message = f"{cfg.model}: production {prod_version} was trained on dataset {current}; nothing to do"
        return base
    verdict = datasets.validation_of(registry.store, registry.root, ref.name, current)
    if verdict is not None and verdict.get("ok") is False and not cfg.force:
        base.action = "invalid"
        base.message = (f"{cfg.model}: dataset {ref.name} {current} failed validation ({verdict.get('n_failures')} "
                        f"failures, {datasets.validation_uri(registry.root, ref.name, current)}); not retrying")  # fmt: skip
        return base

    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    uri = f"{registry.root}/models/{cfg.model}/retrain/{_marker_name(current)}"
    now = _now()
    claim = {
        "model": cfg.model,
        "dataset_version": current,
        "dataset": cfg.dataset,
        "dataset_name": ref.name,
        "production_version": prod_version,
        "owner": owner,
        "state": "started",
        "started": _iso(now),
        "expires": _iso(now + timedelta(seconds=cfg.lease_s)),
        "attempts": [],
    }
    try:
        etag = put_json_conditional(registry.store, uri, claim)
    except PreconditionFailed:
        existing, old_etag = get_json_etag(registry.store, uri)
        existing = existing or {}
        decision = _reconcile(cfg, existing, now, run_status, registry, ref)
        if decision[0] != "restart":
            action, message, updated = decision
            if updated is not None:
                try:
                    put_json_conditional(registry.store, uri, updated, if_match=old_etag)
                except PreconditionFailed:
                    action, message = "already-claimed", f"{cfg.model}: another invocation updated the run first"
            base.action, base.marker, base.message = action, updated or existing, message
            return base
        claim["attempts"] = list((decision[2] if len(decision) > 2 else existing).get("attempts") or [])
        claim["takeover"] = {"from": existing.get("owner"), "reason": decision[1]}
        try:
            etag = put_json_conditional(registry.store, uri, claim, if_match=old_etag)
        except PreconditionFailed:
            base.action = "already-claimed"
            base.message = f"{cfg.model}: another invocation took over the run for dataset {current} first"
            return base

    attempt = {"n": len(claim["attempts"]) + 1, "owner": owner, "started": _iso(_now())}
    claim["attempts"].append(attempt)
    try:
        run = start_run(cfg.profile, list(cfg.overrides), run_dataset_uri(ref), cfg.model)
    except Exception as e:
        attempt.update(state="failed", error=str(e)[:2000], finished=_iso(_now()))
        claim.update(state="failed", finished=_iso(_now()), error=str(e)[:2000])
        put_json_conditional(registry.store, uri, claim, if_match=etag)
        raise
    mode = run.get("mode", "local")
    run_info = {k: v for k, v in run.items() if isinstance(v, (str, int, float, bool)) or v is None}
    attempt.update(run_id=run.get("run_id"), mode=mode)
    if mode == "kfp":
        state, action = "submitted", "submitted"
    else:
        state = "succeeded" if run.get("state", "succeeded") == "succeeded" else "failed"
        attempt["finished"] = _iso(_now())
        action = "started" if state == "succeeded" else "failed"
        if state == "failed":
            verdict = datasets.validation_of(registry.store, registry.root, ref.name, current)
            if verdict is not None and verdict.get("ok") is False:
                state, action = "invalid", "invalid"
    attempt["state"] = state
    claim.update(state=state, run=run_info, finished=_iso(_now()) if mode != "kfp" else None)
    put_json_conditional(registry.store, uri, claim, if_match=etag)
    what = {"invalid": "the dataset failed validation; recorded, not retried",
            "failed": f"the run failed ({str(run.get('error') or '')[:300]}); the next check retries it "
                      f"({len(claim['attempts'])}/{cfg.max_attempts} attempts)"}.get(state, f"run {run.get('run_id')}")  # fmt: skip
    return RetrainOutcome(
        action,
        current,
        prod_dataset,
        prod_version,
        marker=claim,
        run=run,
        message=f"{cfg.model}: dataset {ref.name} {current} (production's: {prod_dataset}); {what}",
    )


def _reconcile(cfg: RetrainConfig, marker: dict[str, Any], now: datetime, run_status, registry, ref):
    """What to do with an existing claim: ``("restart", reason)`` or ``(action, message, updated marker|None)``."""
    from craft.storage import datasets

    state = marker.get("state")
    attempts = list(marker.get("attempts") or [])
    version = marker.get("dataset_version", ref.version)
    who = f"{cfg.model}: dataset {version}"
    if cfg.force:
        return ("restart", "forced")
    if state == "submitted":
        run_id = (marker.get("run") or {}).get("run_id")
        if run_status is None or not run_id:
            return ("already-claimed", f"{who}: run {run_id} was submitted to Kubeflow; set KFP_HOST to check it",
                    None)  # fmt: skip
        status = run_status(run_id)
        if status == "running":
            return ("running", f"{who}: run {run_id} is still running; waiting", None)
        updated = dict(marker)
        if attempts:
            attempts[-1] = {**attempts[-1], "state": status, "finished": _iso(now)}
        updated.update(attempts=attempts, finished=_iso(now))
        if status == "succeeded":
            updated["state"] = "succeeded"
            return ("done", f"{who}: run {run_id} succeeded", updated)
        verdict = datasets.validation_of(registry.store, registry.root, ref.name, version)
        if verdict is not None and verdict.get("ok") is False:
            updated["state"] = "invalid"
            return ("invalid", f"{who}: run {run_id} stopped at validation; recorded, not retried", updated)
        state = "failed"
        marker = updated
        if len(attempts) < cfg.max_attempts:  # restart, keeping the failed attempt recorded as failed
            return ("restart", f"run {run_id} failed (attempt {len(attempts)} of {cfg.max_attempts})", updated)
    if state == "succeeded":
        return ("done", f"{who}: a run for it succeeded already ({(marker.get('run') or {}).get('run_id')})", None)
    if state == "invalid":
        return ("invalid", f"{who}: failed validation; not retrying", None)
    if state == "failed":
        if len(attempts) >= cfg.max_attempts:
            updated = {**marker, "state": "gave-up"}
            return ("gave-up", f"{who}: {len(attempts)} runs failed; giving up (use --force to try again)",
                    updated)  # fmt: skip
        return ("restart", f"previous run failed (attempt {len(attempts)} of {cfg.max_attempts})")
    if state == "gave-up":
        return ("gave-up", f"{who}: gave up after {len(attempts)} failed runs (use --force to try again)", None)
    if state == "started":
        try:
            expires = datetime.fromisoformat(marker["expires"])
        except (KeyError, ValueError):
            return ("restart", "claim without a valid expiry")
        if now > expires:
            return ("restart", f"lease of {marker.get('owner')} expired at {marker['expires']}")
        return ("already-claimed", f"{who}: a run is in progress (owner {marker.get('owner')}); not starting another",
                None)  # fmt: skip
    return ("restart", f"marker in unknown state {state!r}")
