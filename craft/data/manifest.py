"""The dataset directory contract every stage reads (DESIGN.md, "Contracts").

    DATASET_DIR/
      dataset.yaml        name, modality, classes, resolution, mode
      manifest.parquet    one row per image (columns below)
      images/ ...         image files; other folders (masks/, conditions/) as the manifest names

Paths in the manifest are relative to DATASET_DIR and must stay inside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from craft.io import atomic_write_bytes, atomic_write_text

MANIFEST = "manifest.parquet"
DATASET_YAML = "dataset.yaml"

# column -> (pandas dtype, required). Optional columns may be absent or hold nulls.
COLUMNS: dict[str, tuple[str, bool]] = {
    "image_id": ("string", True),
    "image_path": ("string", True),
    "label": ("string", True),
    "split": ("string", True),
    "patient_id": ("string", True),
    "caption": ("string", False),  # weak caption for CRAFTS stage-1 pretraining
    "mask_path": ("string", False),  # nuclear instance mask (16-bit PNG, 0 = background)
    "condition_path": ("string", False),  # ControlNet condition (e.g. fluorescence-like nuclei channel)
    "attributes": ("string", False),  # JSON object: ground-truth generation attributes / metadata
}
REQUIRED_COLUMNS = tuple(c for c, (_, req) in COLUMNS.items() if req)
SPLITS = ("train", "val", "test")
MODALITIES = ("histo", "cxr", "derm", "fundus", "other")


@dataclass
class DatasetMeta:
    """``dataset.yaml``: what a dataset is, independent of its rows."""

    name: str
    modality: str
    classes: list[str]
    resolution: int | list[int] = 64  # square side, or [height, width]
    mode: str = "RGB"  # PIL mode of the images: RGB or L
    description: str = ""
    source: str = ""  # generator / importer and its arguments
    class_names: dict[str, str] = field(default_factory=dict)  # label -> human phrase for prompts

    def phrase(self, label: str) -> str:
        """Human-readable class name used in captions and prompts."""
        return self.class_names.get(label, label.replace("_", " "))


def read_meta(dataset_dir: str | os.PathLike) -> DatasetMeta:
    path = Path(dataset_dir) / DATASET_YAML
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a dataset directory needs {DATASET_YAML} and {MANIFEST})")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(DatasetMeta)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(known))})")
    missing = [k for k in ("name", "modality", "classes") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]!r}")
    return DatasetMeta(**data)


def write_meta(dataset_dir: str | os.PathLike, meta: DatasetMeta) -> Path:
    return atomic_write_text(
        Path(dataset_dir) / DATASET_YAML, yaml.safe_dump(dataclasses.asdict(meta), sort_keys=False)
    )


def read_manifest(dataset_dir: str | os.PathLike) -> pd.DataFrame:
    """The manifest with every contract column present (optional ones filled with nulls)."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    df = pd.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column {missing[0]!r}")
    for col, (dtype, _) in COLUMNS.items():
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), dtype=dtype)
    return df


def write_manifest(dataset_dir: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Write the manifest atomically; columns are ordered and typed per ``COLUMNS``."""
    df = df.copy()
    for col, (dtype, required) in COLUMNS.items():
        if col not in df.columns:
            if required:
                raise ValueError(f"manifest: missing required column {col!r}")
            df[col] = None
        df[col] = df[col].astype(dtype)
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra].reset_index(drop=True)
    path = Path(dataset_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    df.to_parquet(tmp, index=False)
    data = tmp.read_bytes()
    tmp.unlink()
    return atomic_write_bytes(path, data)


def attributes_of(row: Any) -> dict[str, Any]:
    """Parse a manifest row's ``attributes`` JSON (empty dict when absent)."""
    raw = row["attributes"] if isinstance(row, (dict, pd.Series)) else row
    if raw is None or (isinstance(raw, float) and pd.isna(raw)) or raw is pd.NA or raw == "":
        return {}
    return json.loads(raw)
