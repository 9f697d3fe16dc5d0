"""`craft retrain-if-new-data`: start a pipeline run only when the dataset changed since production.

What the retraining CronJob (k8s/base/cronjob-retrain.yaml) runs on a schedule:

1. the current dataset version: the md5 a DVC ``.dvc`` file records (``craft.storage.dvc.dataset_version``,
   also for a plain local folder), or for an ``s3://`` dataset prefix the sha256 of its committed
   ``MANIFEST.json`` file list (path, size, sha256 of every file);
2. the dataset version the production model was trained on: ``dataset_version`` in the lineage of
   the version the registry's production pointer names;
3. equal -> nothing to do. Different (or nothing in production) -> claim the dataset version with a
   marker object ``models/<name>/retrain/<version>.json`` created with ``If-None-Match: *``
   (craft/storage/cas.py): of any number of concurrent invocations exactly one creates it and starts
   the run; the others see the marker and stop. The marker records its owner, state and lease:
   ``started`` (a local run in progress; another invocation may take it over once ``expires`` has
   passed, i.e. the holder died), ``submitted`` (handed to Kubeflow Pipelines with its run id; not
   retried automatically: the run's own retries and the gate decide), ``succeeded`` or ``failed``
   (a failed local run is retried by the next invocation). Takeovers are compare-and-swap on the
   marker's etag, so they are exclusive too. ``force`` retries whatever the marker says.

The run itself is started by a callable the caller passes in (the CLI picks the Kubeflow client when
``KFP_HOST`` is set, else ``pipelines.local.run_local``): this package never imports the orchestration
layer. The pipeline run is expected to record the dataset version in the lineage of what it registers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from craft.storage.cas import PreconditionFailed, get_json_etag, put_json_conditional

# start_run(profile, overrides, dataset_uri) -> {"run_id": ..., "mode": "local"|"kfp", ...}
RunStarter = Callable[[str, list[str], str], dict[str, Any]]


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

    def validate(self) -> None:
        if self.lease_s <= 0:
            raise ValueError(f"retrain.lease_s must be > 0, got {self.lease_s}")


@dataclass
class RetrainOutcome:
    action: str  # "up-to-date" | "already-claimed" | "started" | "submitted" | "failed"
    dataset_version: str
    production_dataset_version: str | None
    production_version: str | None
    marker: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    message: str = ""


def dataset_version_of(dataset: str, store=None) -> str:
    """The version string of ``dataset`` (see the module docstring, step 1)."""
    if not dataset:
        raise ValueError("retrain.dataset is empty: give a .dvc file, a DVC-tracked folder or an s3:// prefix")
    if dataset.startswith("s3://"):
        if store is None:
            raise ValueError(f"{dataset}: an object store is needed to read its manifest")
        manifest = store.read_manifest(dataset)
        files = sorted(({"path": f["path"], "size": f["size"], "sha256": f["sha256"]} for f in manifest["files"]),
                       key=lambda f: f["path"])  # fmt: skip
        blob = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()
    from craft.storage.dvc import dataset_version

    path = Path(dataset)
    if not path.exists() and not Path(f"{dataset}.dvc").exists():
        raise FileNotFoundError(f"{dataset}: dataset not found (neither the path nor {dataset}.dvc exists)")
    return dataset_version(path)


def run_dataset_uri(dataset: str) -> str:
    """What the pipeline run reads: the data folder a ``.dvc`` file tracks (``outs[0].path`` beside it,
    present after ``dvc pull``), else ``dataset`` itself (an s3:// prefix or a local folder)."""
    if dataset.startswith("s3://") or not dataset.endswith(".dvc"):
        return dataset
    import yaml

    doc = yaml.safe_load(Path(dataset).read_text()) or {}
    outs = doc.get("outs") if isinstance(doc, dict) else None
    if not outs or not isinstance(outs[0], dict) or not outs[0].get("path"):
        raise ValueError(f"{dataset}: no outs[0].path recorded (is it a `dvc add` file?)")
    return str(Path(dataset).parent / outs[0]["path"])


def _marker_name(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", version) + ".json"


def _now() -> datetime:
    return datetime.now(UTC)


def main(cfg: RetrainConfig, registry, start_run: RunStarter, *, owner: str = "") -> RetrainOutcome:
    """Compare dataset versions and start at most one run per new dataset version (module docstring)."""
    if not cfg.model:
        raise ValueError("retrain.model is empty: name the registered model to keep up to date")
    current = dataset_version_of(cfg.dataset, registry.store)
    pointer = registry.get_production(cfg.model)
    prod_version = pointer["version"] if pointer else None
    prod_dataset = None
    if prod_version:
        prod_dataset = registry.get_version(cfg.model, prod_version)["lineage"].get("dataset_version")
    base = RetrainOutcome("up-to-date", current, prod_dataset, prod_version)
    if prod_dataset == current and not cfg.force:
        base.message = f"{cfg.model}: production {prod_version} was trained on dataset {current}; nothing to do"
        return base

    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    uri = f"{registry.root}/models/{cfg.model}/retrain/{_marker_name(current)}"
    now = _now()
    claim = {
        "model": cfg.model,
        "dataset_version": current,
        "dataset": cfg.dataset,
        "production_version": prod_version,
        "owner": owner,
        "state": "started",
        "started": now.isoformat(timespec="seconds"),
        "expires": (now + timedelta(seconds=cfg.lease_s)).isoformat(timespec="seconds"),
    }
    try:
        etag = put_json_conditional(registry.store, uri, claim)
    except PreconditionFailed:
        existing, old_etag = get_json_etag(registry.store, uri)
        reason = _takeover_reason(existing, now, cfg.force)
        if reason is None:
            base.action, base.marker = "already-claimed", existing
            base.message = (
                f"{cfg.model}: a run for dataset {current} is {existing.get('state')} "
                f"(owner {existing.get('owner')}); not starting another"
            )
            return base
        claim["takeover"] = {"from": existing.get("owner"), "reason": reason}
        try:
            etag = put_json_conditional(registry.store, uri, claim, if_match=old_etag)
        except PreconditionFailed:
            base.action = "already-claimed"
            base.message = f"{cfg.model}: another invocation took over the run for dataset {current} first"
            return base

    try:
        run = start_run(cfg.profile, list(cfg.overrides), run_dataset_uri(cfg.dataset))
    except Exception as e:
        claim.update(state="failed", finished=_now().isoformat(timespec="seconds"), error=str(e)[:2000])
        put_json_conditional(registry.store, uri, claim, if_match=etag)
        raise
    mode = run.get("mode", "local")
    claim.update(
        state="submitted" if mode == "kfp" else "succeeded",
        finished=_now().isoformat(timespec="seconds"),
        run={k: v for k, v in run.items() if isinstance(v, (str, int, float, bool)) or v is None},
    )
    put_json_conditional(registry.store, uri, claim, if_match=etag)
    return RetrainOutcome(
        "submitted" if mode == "kfp" else "started",
        current,
        prod_dataset,
        prod_version,
        marker=claim,
        run=run,
        message=f"{cfg.model}: dataset {current} differs from production's {prod_dataset}; run {run.get('run_id')}",
    )


def _takeover_reason(marker: dict[str, Any] | None, now: datetime, force: bool) -> str | None:
    """Why an existing claim may be replaced, or None when it must be respected."""
    if marker is None:
        return "marker vanished"
    if force:
        return "forced"
    state = marker.get("state")
    if state == "failed":
        return "previous run failed"
    if state == "started":
        try:
            expires = datetime.fromisoformat(marker["expires"])
        except (KeyError, ValueError):
            return "claim without a valid expiry"
        if now > expires:
            return f"lease of {marker.get('owner')} expired at {marker['expires']}"
    return None
