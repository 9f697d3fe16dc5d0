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


def prepare_dataset(out_dir: str | Path, profile: str, overrides: list[str], dataset_uri: str = "") -> dict:
    """Materialise the run's dataset at ``out_dir``.

    - ``dataset_uri`` empty: generate the profile's demo dataset (stage ``data``).
    - ``s3://bucket/prefix``: download a committed object-store prefix (sha256-verified).
    - a local folder holding ``manifest.parquet``: copy it (kfp.local runs, mounted volumes).
    - any other local folder: import it with the profile's ``import`` stage (format from the config).
    """
    out_dir = Path(out_dir)
    if not dataset_uri:
        from craft.data import demo

        demo.main(load_stage_config("data", profile, overrides), out_dir)
    elif dataset_uri.startswith("s3://"):
        from craft.storage.objectstore import ObjectStore

        ObjectStore.from_env(load_stage_config("storage", profile, overrides)).download_dir(dataset_uri, out_dir)
    else:
        src = Path(dataset_uri)
        if not src.exists():
            raise FileNotFoundError(f"dataset_uri {dataset_uri}: no such folder")
        if (src / MANIFEST).is_file():
            from craft.io import copy_tree

            copy_tree(src, out_dir)
        else:
            from craft.data import importers

            importers.main(load_stage_config("import", profile, overrides), src, out_dir)
    meta = read_meta(out_dir)
    df = read_manifest(out_dir)
    metrics = {"n_images": float(len(df)), "n_classes": float(len(meta.classes))}
    for split, count in df["split"].value_counts().items():
        metrics[f"n_{split}"] = float(count)
    return metrics


def validate_dataset(dataset_dir: str | Path, html_path: str | Path, profile: str, overrides: list[str]) -> dict:
    """Validate the dataset; copy report.html to ``html_path``; raise StepFailed when invalid."""
    from craft.data import validate

    cfg = load_stage_config("validate", profile, overrides)
    dataset_dir = Path(dataset_dir)
    report_dir = Path(str(html_path) + ".d")
    report = validate.main(cfg, dataset_dir, report_dir)
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(report_dir / "report.html", html_path)
    if not report.ok:
        lines = "\n".join(f"  - {f.check}: {f.message}" for f in report.failures[:50])
        raise StepFailed(f"dataset {dataset_dir} is not valid ({len(report.failures)} failures):\n{lines}")
    return {"n_rows": float(report.n_rows), "n_failures": float(len(report.failures))}


def import_model(uri: str, out_dir: str | Path) -> dict:
    """Materialise an existing checkpoint (a local folder or an s3:// prefix) as a pipeline model artifact."""
    from craft.io import copy_tree
    from craft.models.diffusion import resolve_model_dir

    src = resolve_model_dir(uri)
    copy_tree(src, out_dir)
    n_files = sum(1 for p in Path(out_dir).rglob("*") if p.is_file())
    return {"n_files": float(n_files)}
