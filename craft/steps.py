"""Pipeline step entry points for the data stages: artifact paths + profile + overrides in, metrics out.

KFP components (components/) call exactly one of these; each loads its stage config from the
profile and the pipeline-wide overrides (``stage.key=value``), runs the stage, and returns the
numbers the Kubeflow UI shows. Nothing here knows about KFP.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from craft.config import load_stage_config
from craft.data.manifest import MANIFEST, read_manifest, read_meta


class StepFailed(RuntimeError):
    """A step whose result must stop the pipeline (e.g. an invalid dataset)."""


def _store(profile: str, overrides: list[str]):
    from craft.storage.objectstore import ObjectStore

    return ObjectStore.from_env(load_stage_config("storage", profile, overrides))


def _needs_store(dataset_uri: str) -> bool:
    return dataset_uri.startswith("s3://")


def resolve_dataset(profile: str, overrides: list[str], dataset_uri: str = "", work_dir: str | Path | None = None):
    """The :class:`craft.storage.datasets.DatasetRef` a run with ``dataset_uri`` reads (nothing copied for
    an object-store dataset: its manifest holds every file's sha256). Empty: the profile's demo data,
    generated in a temporary folder and hashed."""
    import tempfile

    from craft.storage import datasets

    if not dataset_uri:
        from craft.data import demo

        cfg = load_stage_config("data", profile, overrides)
        return datasets.demo_version(lambda out: demo.main(cfg, out))
    store = _store(profile, overrides) if _needs_store(dataset_uri) else None
    with tempfile.TemporaryDirectory(prefix="craft-resolve-") as tmp:
        ref = datasets.resolve(dataset_uri, store, work_dir=work_dir or tmp)
    return ref


def dataset_version_step(profile: str, overrides: list[str], dataset_uri: str = "") -> str:
    """Pipeline step ``dataset-version``: resolve ``dataset_uri`` (a ``latest`` pointer moves between runs)
    and return its content version. Never cached: this output is what makes every data-reading step's
    cache key change when new data lands (kubeflow/pipelines issue 4857)."""
    from craft.config import check_run_overrides

    check_run_overrides(overrides)
    ref = resolve_dataset(profile, overrides, dataset_uri)
    print(f"dataset {ref.name} version {ref.version} ({ref.resolved_uri or 'demo data'})")
    return ref.version


def prepare_dataset(
    out_dir: str | Path, profile: str, overrides: list[str], dataset_uri: str = "", dataset_version: str = ""
) -> dict:
    """Materialise the run's dataset at ``out_dir``: exactly version ``dataset_version`` of ``dataset_uri``.

    - ``dataset_uri`` empty: generate the profile's demo dataset (stage ``data``).
    - ``s3://B/datasets/NAME``: the version the ``dataset-version`` step resolved (``NAME/<version>``,
      immutable), so a pointer moved since then does not change what this run reads.
    - another committed ``s3://`` prefix, a local folder holding ``manifest.parquet``, a ``.dvc`` file or
      ``dvc://REPO?rev=REV#PATH``: copied and checked to be that version.
    - any other local folder: a collection imported with the profile's ``import`` stage (its files must
      still be the resolved version).

    Writes ``dataset_ref.json`` (name, version, URIs) beside the data; never part of the version.
    A read version other than ``dataset_version`` (when given) is an error: the data changed under the run.
    """
    import tempfile

    from craft.io import atomic_write_json
    from craft.storage import datasets

    out_dir = Path(out_dir)
    store = _store(profile, overrides) if _needs_store(dataset_uri) else None
    with tempfile.TemporaryDirectory(prefix="craft-data-") as tmp:
        if not dataset_uri:
            from craft.data import demo

            demo.main(load_stage_config("data", profile, overrides), out_dir)
            ref = datasets.DatasetRef(datasets._name_of(out_dir), datasets.local_version(out_dir), "", "", "demo")
        else:
            ref = datasets.resolve(dataset_uri, store, work_dir=tmp)
            if ref.source == "pointer" and dataset_version and ref.version != dataset_version:
                base = ref.resolved_uri.rsplit("/", 1)[0]  # the pointer moved: read the pinned version
                ref = datasets.resolve(f"{base}/{dataset_version}", store)
                ref.uri = dataset_uri
            src = Path(ref.resolved_uri) if not ref.resolved_uri.startswith("s3://") else None
            if src is not None and not (src / MANIFEST).is_file():
                from craft.data import importers

                importers.main(load_stage_config("import", profile, overrides), src, out_dir)
            else:
                datasets.fetch(ref, out_dir, store)
    if dataset_version and ref.version != dataset_version:
        raise StepFailed(
            f"dataset {dataset_uri or '(demo)'}: read version {ref.version}, but the run resolved "
            f"{dataset_version}: the data changed under the run; start a new run"
        )
    atomic_write_json(out_dir / datasets.REF_FILE, ref.to_dict())
    metrics = {"n_files": float(sum(1 for p in out_dir.rglob("*") if p.is_file()))}
    try:  # counts for the UI; an unreadable manifest is the validate step's to report, with names
        meta = read_meta(out_dir)
        df = read_manifest(out_dir)
    except Exception as e:  # noqa: BLE001
        print(f"dataset {ref.name} {ref.version}: manifest not readable here ({e}); the validate step reports it")
        return metrics
    metrics.update(n_images=float(len(df)), n_classes=float(len(meta.classes)))
    for split, count in df["split"].value_counts().items():
        metrics[f"n_{split}"] = float(count)
    return metrics


def dataset_ref(dataset_dir: str | Path):
    """The :class:`DatasetRef` the data step wrote into ``dataset_dir``."""
    import json

    from craft.storage.datasets import REF_FILE, DatasetRef

    f = Path(dataset_dir) / REF_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no dataset reference (the dataset was not materialised by the data step)")
    return DatasetRef(**json.loads(f.read_text()))


def validate_dataset(
    dataset_dir: str | Path,
    html_path: str | Path,
    profile: str,
    overrides: list[str],
    verdict_dir: str | Path | None = None,
    record: bool = False,
) -> dict:
    """Validate the dataset; copy report.html to ``html_path`` and report.json into ``verdict_dir``.

    With ``record`` the verdict is stored for the dataset version (``craft.storage.datasets``) before an
    invalid dataset raises StepFailed, so the schedule knows never to retry that version.
    """
    from craft.data import validate

    cfg = load_stage_config("validate", profile, overrides)
    dataset_dir = Path(dataset_dir)
    report_dir = Path(verdict_dir) if verdict_dir else Path(str(html_path) + ".d")
    report = validate.main(cfg, dataset_dir, report_dir)
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report_dir / "report.html", html_path)
    if record:
        from craft.storage import datasets
        from craft.storage.registry import open_registry

        ref = dataset_ref(dataset_dir)
        registry = open_registry(
            load_stage_config("registry", profile, overrides), load_stage_config("storage", profile, overrides)
        )
        verdict = {
            "ok": bool(report.ok),
            "n_rows": int(report.n_rows),
            "n_failures": len(report.failures),
            "failures": [f"{f.check}: {f.message}" for f in report.failures[:20]],
            "dataset_uri": ref.uri,
            "validated": _utc_now(),
        }
        uri = datasets.record_validation(registry.store, registry.root, ref.name, ref.version, verdict)
        print(f"validation of dataset {ref.name} {ref.version}: {'passed' if report.ok else 'FAILED'} ({uri})")
    if not report.ok:
        lines = "\n".join(f"  - {f.check}: {f.message}" for f in report.failures[:50])
        raise StepFailed(f"dataset {dataset_dir} is not valid ({len(report.failures)} failures):\n{lines}")
    return {"n_rows": float(report.n_rows), "n_failures": float(len(report.failures))}


def _utc_now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def import_model(uri: str, out_dir: str | Path) -> dict:
    """Materialise an existing checkpoint (a local folder or an s3:// prefix) as a pipeline model artifact."""
    from craft.io import copy_tree
    from craft.models.diffusion import resolve_model_dir

    if uri.startswith("s3://"):
        src = resolve_model_dir(uri)
    else:  # a diffusers pipeline (model_index.json) or a transformers encoder such as SigLIP (config.json)
        src = Path(uri)
        if not src.is_dir() or not ((src / "model_index.json").is_file() or (src / "config.json").is_file()):
            raise FileNotFoundError(f"{uri}: not a model folder (neither model_index.json nor config.json)")
    copy_tree(src, out_dir)
    n_files = sum(1 for p in Path(out_dir).rglob("*") if p.is_file())
    return {"n_files": float(n_files)}
