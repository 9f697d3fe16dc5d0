"""Importers: real image collections -> the dataset directory contract (issue 2, item 5).

``craft data import FORMAT SRC --out DIR`` reads a collection in one of the layouts below, keeps the
images of the classes the papers use, assigns a patient-level split and writes ``DIR`` atomically
(``dataset.yaml`` + ``manifest.parquet`` + ``images/<label>/<image_id>.<ext>``).

Split: when the source has an official split it is kept (``split_col`` / the layout's own), else
patients are split per class (stratified by each patient's majority label) with ``test_fraction``
(CRAFT, appendix N: 50/50 for the downstream sets) and ``val_fraction``; no patient ever lands in two
splits, and an official split that puts one patient in two splits is refused.

Images: every image is written under ``DIR/images``. A file whose PIL mode already equals the
dataset's ``mode`` and that needs no resizing is copied byte for byte (format kept); any other is
converted to ``mode`` (and resized + centre-cropped to ``resolution`` when > 0) and saved as PNG.
So the imported directory always passes ``craft validate``'s mode check.

Bad input raises ``ImportError_`` naming the CSV row (1-based data row, as a spreadsheet shows it
after the header) or the file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from PIL import Image, ImageOps

from craft.data.manifest import MODALITIES, DatasetMeta, write_manifest, write_meta
from craft.io import atomic_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}

# CRAFT appendix N/C: the 20 Fitzpatrick17k conditions used for the dermatology experiments.
FITZPATRICK_CONDITIONS = (
    "psoriasis",
    "squamous cell carcinoma",
    "lichen planus",
    "basal cell carcinoma",
    "allergic contact dermatitis",
    "lupus erythematosus",
    "sarcoidosis",
    "folliculitis",
    "scabies",
    "melanoma",
    "erythema multiforme",
    "granuloma annulare",
    "eczema",
    "pityriasis rosea",
    "acne",
    "mycosis fungoides",
    "actinic keratosis",
    "prurigo nodularis",
    "vitiligo",
    "keloid",
)
# CheXpert observation columns (Irvin et al. 2019); the four kept classes are the demo's cxr classes.
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_CLASSES = {
    "No Finding": "no_finding",
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural_effusion",
    "Pneumonia": "pneumonia",
}
BREAKHIS_CLASSES = {
    "benign": ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"),
    "malignant": ("ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"),
}
ORIGA_CLASSES = ("non_glaucoma", "glaucoma")
MODALITY_OF = {"fitzpatrick17k": "derm", "chexpert": "cxr", "breakhis": "histo", "origa": "fundus"}


class ImportError_(ValueError):  # noqa: N801 - trailing underscore: not the builtin ImportError
    """A source collection that does not match its declared layout; the message names the row or file."""


@dataclass
class ImportConfig:
    """How ``craft data import`` reads a collection."""

    format: Literal["csv", "imagefolder", "fitzpatrick17k", "chexpert", "breakhis", "origa"] = "imagefolder"
    name: str = ""  # dataset name written to dataset.yaml (default: the source folder's name)
    modality: str = ""  # histo | cxr | derm | fundus | other; "" = the layout's own (csv / imagefolder: other)
    mode: Literal["", "RGB", "L"] = ""  # PIL mode of the imported images; "" = L for cxr, RGB otherwise
    resolution: int = 0  # 0 = keep native size; > 0 = resize the short side then centre-crop to a square
    test_fraction: float = 0.5  # share of patients in test when the source has no official split (CRAFT: 50/50)
    val_fraction: float = 0.0  # share of patients in val when the source has no official split
    seed: int = 0  # seed of the patient shuffle
    use_official_split: bool = True  # keep the source's own split where it has one (csv split_col, ORIGA set)
    classes: list[str] = field(default_factory=list)  # keep only these labels, in this order; [] = all found
    limit: int = 0  # keep at most this many images (after filtering, sorted by source order); 0 = all
    # generic csv layout
    csv_file: str = ""  # csv: the CSV (relative to SRC when SRC is a folder); "" = SRC itself or SRC's only .csv
    path_col: str = "path"  # csv: column holding the image path, relative to the CSV's folder
    label_col: str = "label"  # csv: column holding the class label
    patient_col: str = ""  # csv / fitzpatrick17k / origa: patient column; "" = one patient per image
    split_col: str = ""  # csv: column holding an official split (train/val/valid/test); "" = none
    caption_col: str = ""  # csv: column holding a caption; "" = none
    # imagefolder layout
    patient_pattern: str = ""  # imagefolder: regex on the file stem, group 1 = patient id; "" = the stem
    # chexpert layout
    chexpert_ignore: list[str] = field(default_factory=lambda: ["Support Devices"])  # positives that do not count
    # origa layout
    origa_image_col: str = "Filename"  # origa: image file name column of the label CSV
    origa_label_col: str = "Glaucoma"  # origa: 0/1 glaucoma column
    origa_split_col: str = "Set"  # origa: official split column (A -> train, B -> test); absent = none

    def validate(self) -> None:
        if self.modality and self.modality not in MODALITIES:
            raise ValueError(f"import.modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if not (
            0 <= self.test_fraction < 1 and 0 <= self.val_fraction < 1 and self.test_fraction + self.val_fraction < 1
        ):
            raise ValueError("import.test_fraction and val_fraction must be in [0, 1) and sum below 1")
        if self.resolution < 0 or self.limit < 0:
            raise ValueError("import.resolution and import.limit must be >= 0")
        if self.patient_pattern:
            try:
                if re.compile(self.patient_pattern).groups < 1:
                    raise ValueError("import.patient_pattern needs a capture group (the patient id)")
            except re.error as e:
                raise ValueError(f"import.patient_pattern: not a regex: {e}") from e


@dataclass
class Record:
    """One source image before writing: where it is, its class, patient and (official) split."""

    src: Path
    label: str
    patient: str
    image_id: str
    split: str | None = None
    caption: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # e.g. "train.csv row 12" for error messages


def slug(text: str) -> str:
    """Label / id normal form: lower case, runs of other characters -> '_'.

    >>> slug("Squamous cell carcinoma")
    'squamous_cell_carcinoma'
    """
    return re.sub(r"[^a-z0-9]+", "_", str(text).strip().lower()).strip("_")


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "img"


def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ImportError_(f"{path}: CSV not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise ImportError_(f"{path}: not a readable CSV: {e}") from e
    missing = [c for c in required if c and c not in df.columns]
    if missing:
        raise ImportError_(f"{path}: missing column {missing[0]!r} (columns: {', '.join(df.columns)})")
    return df


def _image_file(path: Path, where: str) -> Path:
    if not path.is_file():
        raise ImportError_(f"{where}: image file {path} not found")
    return path


def _split_of(value: str, where: str) -> str:
    s = SPLIT_ALIASES.get(str(value).strip().lower())
    if s is None:
        raise ImportError_(f"{where}: unknown split {value!r} (known: {', '.join(sorted(SPLIT_ALIASES))})")
    return s


# ---------------------------------------------------------------- layouts


def read_csv_layout(cfg: ImportConfig, src: Path) -> list[Record]:
    """Generic CSV: one row per image; ``path_col`` relative to the CSV's folder, ``label_col`` the class,
    optional ``patient_col``, ``split_col``, ``caption_col``."""
    if src.is_file():
        csv = src
    elif cfg.csv_file:
        csv = src / cfg.csv_file
    else:
        found = sorted(src.glob("*.csv"))
        if len(found) != 1:
            raise ImportError_(f"{src}: expected exactly one .csv (found {len(found)}); set import.csv_file")
        csv = found[0]
    df = _read_csv(csv, [cfg.path_col, cfg.label_col, cfg.patient_col, cfg.split_col, cfg.caption_col])
    out = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        where = f"{csv.name} row {i}"
        rel = row[cfg.path_col].strip()
        if not rel:
            raise ImportError_(f"{where}: empty {cfg.path_col!r}")
        label = slug(row[cfg.label_col])
        if not label:
            raise ImportError_(f"{where}: empty label in {cfg.label_col!r}")
        path = _image_file(csv.parent / rel, where)
        patient = row[cfg.patient_col].strip() if cfg.patient_col else ""
        if cfg.patient_col and not patient:
            raise ImportError_(f"{where}: empty patient in {cfg.patient_col!r}")
        split = _split_of(row[cfg.split_col], where) if cfg.split_col and cfg.use_official_split else None
        out.append(
            Record(
                src=path,
                label=label,
                patient=patient or Path(rel).stem,
                image_id=_safe_id(str(Path(rel).with_suffix(""))),
                split=split,
                caption=(row[cfg.caption_col] or None) if cfg.caption_col else None,
                where=where,
            )
        )
    return out


def read_imagefolder(cfg: ImportConfig, src: Path) -> list[Record]:
    """ImageFolder: ``SRC/<class>/*.{png,jpg,...}``, or ``SRC/<split>/<class>/...`` when every top-level
    folder is a split name (train, val/valid/validation, test). Patient = file stem, or group 1 of
    ``patient_pattern`` matched against the stem."""
    if not src.is_dir():
        raise ImportError_(f"{src}: not a folder")
    top = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not top:
        raise ImportError_(f"{src}: no class folders")
    with_split = all(p.name.lower() in SPLIT_ALIASES for p in top)
    groups = [(SPLIT_ALIASES[p.name.lower()], p) for p in top] if with_split else [(None, src)]
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    out = []
    for split, base in groups:
        for cdir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cdir.rglob("*")):
                if not f.is_file() or f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                rel = f.relative_to(src)
                patient = f.stem
                if pattern is not None:
                    m = pattern.search(f.stem)
                    if m is None:
                        raise ImportError_(f"{f}: file stem does not match patient_pattern {cfg.patient_pattern!r}")
                    patient = m.group(1)
                out.append(
                    Record(
                        src=f,
                        label=slug(cdir.name),
                        patient=patient,
                        image_id=_safe_id(str(rel.with_suffix(""))),
                        split=split if cfg.use_official_split else None,
                        where=str(rel),
                    )
                )
    if not out:
        raise ImportError_(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders")
    return out


def read_fitzpatrick17k(cfg: ImportConfig, src: Path) -> list[Record]:
    """Fitzpatrick17k (Groh et al. 2021): ``SRC/fitzpatrick17k.csv`` (columns md5hash, label,
    fitzpatrick_scale or fitzpatrick, nine_partition_label, three_partition_label, ...) and the
    downloaded images as ``SRC/images/<md5hash>.jpg`` (``.png`` accepted). Only the 20 conditions of
    CRAFT appendix N are kept; no official split (CRAFT splits 50/50). The dataset has no patient
    identifiers: patient = md5hash unless ``patient_col`` names one."""
    csv = src / "fitzpatrick17k.csv" if src.is_dir() else src
    root = csv.parent
    df = _read_csv(csv, ["md5hash", "label", cfg.patient_col])
    scale_col = next((c for c in ("fitzpatrick_scale", "fitzpatrick") if c in df.columns), None)
    keep = {slug(c) for c in FITZPATRICK_CONDITIONS}
    out = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        label = slug(row["label"])
        if label not in keep:
            continue
        where = f"{csv.name} row {i}"
        md5 = row["md5hash"].strip()
        if not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
            raise ImportError_(f"{where}: md5hash {md5!r} is not 32 hex digits")
        cands = [root / "images" / f"{md5}{ext}" for ext in (".jpg", ".jpeg", ".png")]
        path = next((p for p in cands if p.is_file()), None)
        if path is None:
            raise ImportError_(f"{where}: image file {cands[0]} not found")
        attrs = {}
        if scale_col is not None:
            try:
                attrs["fitzpatrick_scale"] = int(float(row[scale_col]))
            except ValueError as e:
                raise ImportError_(f"{where}: {scale_col} {row[scale_col]!r} is not a number") from e
        for c in ("nine_partition_label", "three_partition_label"):
            if c in df.columns:
                attrs[c] = row[c]
        patient = row[cfg.patient_col].strip() if cfg.patient_col else md5
        out.append(Record(src=path, label=label, patient=patient, image_id=md5, attributes=attrs, where=where))
    return out


def read_chexpert(cfg: ImportConfig, src: Path) -> list[Record]:
    """CheXpert-v1.0-small (Irvin et al. 2019): ``train.csv`` and ``valid.csv`` beside ``train/`` and
    ``valid/``; column ``Path`` like ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``
    (relative to the folder that holds ``CheXpert-v1.0-small``), ``Frontal/Lateral``, and the 14
    observation columns with 1.0 (positive), 0.0 (negative), -1.0 (uncertain) or blank.

    Kept: frontal views whose positive observations (ignoring ``chexpert_ignore``) are exactly one of
    No Finding, Cardiomegaly, Pleural Effusion, Pneumonia, with no uncertain (-1) value in those four.
    Patient = the ``patientNNNNN`` path component. The official valid set (200 patients) is too small
    for 4-class evaluation after filtering, so both CSVs are pooled and split by patient."""
    root = src
    if not (root / "train.csv").is_file() and (root / "CheXpert-v1.0-small" / "train.csv").is_file():
        root = root / "CheXpert-v1.0-small"
    csvs = [root / n for n in ("train.csv", "valid.csv") if (root / n).is_file()]
    if not csvs:
        raise ImportError_(f"{src}: no train.csv / valid.csv (expected the CheXpert-v1.0-small folder)")
    counted = [c for c in CHEXPERT_OBSERVATIONS if c not in cfg.chexpert_ignore]
    out = []
    for csv in csvs:
        df = _read_csv(csv, ["Path", "Frontal/Lateral", *CHEXPERT_CLASSES])
        present = [c for c in counted if c in df.columns]
        for i, row in enumerate(df.to_dict("records"), start=1):
            where = f"{csv.name} row {i}"
            if row["Frontal/Lateral"].strip() != "Frontal":
                continue
            values = {}
            for c in present:
                v = row[c].strip()
                if v not in ("", "1.0", "0.0", "-1.0", "1", "0", "-1"):
                    raise ImportError_(f"{where}: column {c!r} has {v!r} (expected 1.0, 0.0, -1.0 or blank)")
                values[c] = float(v) if v else None
            if any(values.get(c) == -1.0 for c in CHEXPERT_CLASSES):
                continue
            positives = [c for c, v in values.items() if v == 1.0]
            if len(positives) != 1 or positives[0] not in CHEXPERT_CLASSES:
                continue
            rel = row["Path"].strip()
            m = re.search(r"(patient\d+)/(study\d+)/([^/]+)$", rel)
            if m is None:
                raise ImportError_(f"{where}: Path {rel!r} has no patientNNNNN/studyN/<file> part")
            parts = Path(rel).parts
            inner = Path(*parts[1:]) if parts and parts[0] == root.name else Path(rel)
            path = _image_file(root / inner, where)
            attrs = {k: row[k] for k in ("Sex", "Age", "AP/PA") if k in df.columns}
            out.append(
                Record(
                    src=path,
                    label=CHEXPERT_CLASSES[positives[0]],
                    patient=m.group(1),
                    image_id=_safe_id(f"{m.group(1)}_{m.group(2)}_{Path(m.group(3)).stem}"),
                    attributes=attrs,
                    where=where,
                )
            )
    return out


def read_breakhis(cfg: ImportConfig, src: Path) -> list[Record]:
    """BreaKHis v1 (Spanhol et al. 2016): ``BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/
    <type>/<slide folder, e.g. SOB_B_A_14-22549AB>/{40X,100X,200X,400X}/<file>.png``. Only 100X is kept
    (CRAFT); the 8 tumour types are the classes. Patient = the slide folder's last ``_`` field
    (``14-22549AB``), which groups all images of one patient across magnifications and types."""
    cands = [src, src / "histology_slides" / "breast", src / "BreaKHis_v1" / "histology_slides" / "breast"]
    root = next((c for c in cands if (c / "benign").is_dir() or (c / "malignant").is_dir()), None)
    if root is None:
        raise ImportError_(f"{src}: no benign/ or malignant/ folder (expected BreaKHis_v1/histology_slides/breast)")
    out = []
    for group, types in BREAKHIS_CLASSES.items():
        base = root / group / "SOB"
        if not base.is_dir():
            continue
        for tdir in sorted(p for p in base.iterdir() if p.is_dir()):
            label = slug(tdir.name)
            if label not in types:
                raise ImportError_(f"{tdir}: unknown {group} tumour type {tdir.name!r} (known: {', '.join(types)})")
            for slide in sorted(p for p in tdir.iterdir() if p.is_dir()):
                m = re.fullmatch(r"SOB_([BM])_([A-Z]+)_(.+)", slide.name)
                if m is None:
                    raise ImportError_(f"{slide}: slide folder name is not SOB_<B|M>_<type>_<patient>")
                for f in sorted((slide / "100X").glob("*")):
                    if f.suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    out.append(
                        Record(
                            src=f,
                            label=label,
                            patient=m.group(3),
                            image_id=_safe_id(f.stem),
                            attributes={"malignant": group == "malignant", "magnification": "100X"},
                            where=str(f.relative_to(root)),
                        )
                    )
    if not out:
        raise ImportError_(f"{root}: no 100X images found")
    return out


def read_origa(cfg: ImportConfig, src: Path) -> list[Record]:
    """ORIGA (Zhang et al. 2010; ORIGA-light, 650 fundus images): a label CSV beside an image folder
    (``Images/`` or ``images/``) with ``origa_image_col`` (file name, e.g. ``001.jpg``),
    ``origa_label_col`` (glaucoma 0/1) and optionally ``origa_split_col`` (the two published halves,
    set A -> train, set B -> test; train/val/test spellings also accepted). ORIGA gives one image per
    eye and no patient identifiers: patient = image stem unless ``patient_col`` names one."""
    csv = Path(src / cfg.csv_file) if cfg.csv_file else None
    if csv is None:
        found = sorted(src.glob("*.csv"))
        if len(found) != 1:
            raise ImportError_(f"{src}: expected exactly one label .csv (found {len(found)}); set import.csv_file")
        csv = found[0]
    df = _read_csv(csv, [cfg.origa_image_col, cfg.origa_label_col, cfg.patient_col])
    img_dir = next((src / n for n in ("Images", "images") if (src / n).is_dir()), None)
    if img_dir is None:
        raise ImportError_(f"{src}: no Images/ or images/ folder")
    has_split = cfg.use_official_split and cfg.origa_split_col in df.columns
    out = []
    for i, row in enumerate(df.to_dict("records"), start=1):
        where = f"{csv.name} row {i}"
        name = row[cfg.origa_image_col].strip()
        path = img_dir / name
        if not Path(name).suffix:
            path = next((img_dir / f"{name}{e}" for e in IMAGE_SUFFIXES if (img_dir / f"{name}{e}").is_file()), path)
        path = _image_file(path, where)
        v = row[cfg.origa_label_col].strip()
        if v not in ("0", "1", "0.0", "1.0"):
            raise ImportError_(f"{where}: {cfg.origa_label_col} {v!r} is not 0 or 1")
        split = None
        if has_split:
            s = row[cfg.origa_split_col].strip()
            split = {"a": "train", "b": "test"}.get(s.lower()) or _split_of(s, where)
        out.append(
            Record(
                src=path,
                label=ORIGA_CLASSES[int(float(v))],
                patient=row[cfg.patient_col].strip() if cfg.patient_col else path.stem,
                image_id=_safe_id(path.stem),
                split=split,
                where=where,
            )
        )
    return out


READERS = {
    "csv": read_csv_layout,
    "imagefolder": read_imagefolder,
    "fitzpatrick17k": read_fitzpatrick17k,
    "chexpert": read_chexpert,
    "breakhis": read_breakhis,
    "origa": read_origa,
}


# ---------------------------------------------------------------- split + write


def patient_split(records: list[Record], test_fraction: float, val_fraction: float, seed: int) -> None:
    """Assign ``split`` to records without one: patients shuffled per class (their majority label,
    ties -> alphabetically first), then the first ``test_fraction`` of each class to test, the next
    ``val_fraction`` to val, the rest to train. Deterministic in ``seed``. Official splits are kept,
    and a patient with an official split puts all its other images there too."""
    fixed: dict[str, str] = {}
    for r in records:
        if r.split is not None:
            if fixed.setdefault(r.patient, r.split) != r.split:
                raise ImportError_(
                    f"{r.where}: patient {r.patient!r} is in official split {r.split!r} and {fixed[r.patient]!r}"
                )
    labels: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        if r.patient not in fixed:
            labels[r.patient][r.label] += 1
    by_class: dict[str, list[str]] = defaultdict(list)
    for p, cnt in labels.items():
        top = max(cnt.values())
        by_class[min(lab for lab, n in cnt.items() if n == top)].append(p)
    rng = random.Random(seed)
    assign = dict(fixed)
    for label in sorted(by_class):
        patients = sorted(by_class[label])
        rng.shuffle(patients)
        n_test = round(len(patients) * test_fraction)
        n_val = round(len(patients) * val_fraction)
        if test_fraction > 0 and n_test == 0 and len(patients) >= 2:
            n_test = 1  # a class with few patients still gets one test patient when it can spare one
        for k, p in enumerate(patients):
            assign[p] = "test" if k < n_test else ("val" if k < n_test + n_val else "train")
    for r in records:
        r.split = assign[r.patient]


def _write_image(rec: Record, dst_dir: Path, mode: str, resolution: int) -> tuple[str, tuple[int, int]]:
    """Copy or convert one image into ``dst_dir``; returns (file name, (width, height))."""
    try:
        with Image.open(rec.src) as im:
            im.load()
            if im.mode == mode and resolution == 0:
                name = f"{rec.image_id}{rec.src.suffix.lower()}"
                shutil.copyfile(rec.src, dst_dir / name)
                return name, im.size
            out = im.convert(mode)
    except Exception as e:  # noqa: BLE001
        raise ImportError_(f"{rec.where}: image {rec.src} does not decode: {type(e).__name__}: {e}") from e
    if resolution > 0:
        out = ImageOps.fit(out, (resolution, resolution), Image.Resampling.LANCZOS)
    name = f"{rec.image_id}.png"
    out.save(dst_dir / name)
    return name, out.size


def main(cfg: ImportConfig, src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Import ``src`` (layout ``cfg.format``) into dataset directory ``out``, written atomically."""
    cfg.validate()
    src, out = Path(src), Path(out)
    if not src.exists():
        raise ImportError_(f"{src}: source not found")
    records = READERS[cfg.format](cfg, src)
    if cfg.classes:
        wanted = [slug(c) for c in cfg.classes]
        if cfg.format in ("csv", "imagefolder"):  # generic layouts: a declared class set is a contract
            bad = next((r for r in records if r.label not in wanted), None)
            if bad is not None:
                raise ImportError_(f"{bad.where}: unknown label {bad.label!r} (import.classes: {', '.join(wanted)})")
        records = [r for r in records if r.label in wanted]
        classes = wanted
    else:
        classes = sorted({r.label for r in records})
    if cfg.limit:
        records = records[: cfg.limit]
    if not records:
        raise ImportError_(f"{src}: no images left to import ({cfg.format} layout, classes {classes or 'any'})")
    seen: dict[str, str] = {}
    for r in records:
        if r.image_id in seen:
            raise ImportError_(f"{r.where}: image id {r.image_id!r} also produced by {seen[r.image_id]}")
        seen[r.image_id] = r.where
    patient_split(records, cfg.test_fraction, cfg.val_fraction, cfg.seed)

    modality = cfg.modality or MODALITY_OF.get(cfg.format, "other")
    mode = cfg.mode or ("L" if modality == "cxr" else "RGB")
    rows, sizes = [], Counter()
    with atomic_dir(out) as tmp:
        for r in records:
            d = tmp / "images" / r.label
            d.mkdir(parents=True, exist_ok=True)
            name, size = _write_image(r, d, mode, cfg.resolution)
            sizes[size] += 1
            rows.append(
                dict(
                    image_id=r.image_id,
                    image_path=f"images/{r.label}/{name}",
                    label=r.label,
                    split=r.split,
                    patient_id=r.patient,
                    caption=r.caption,
                    attributes=json.dumps(r.attributes, sort_keys=True) if r.attributes else None,
                )
            )
        if cfg.resolution:
            resolution: int | list[int] = cfg.resolution
        elif len(sizes) == 1:
            (w, h), _ = sizes.most_common(1)[0]
            resolution = w if w == h else [h, w]
        else:
            resolution = 0  # native sizes vary
        write_manifest(tmp, pd.DataFrame(rows))
        write_meta(
            tmp,
            DatasetMeta(
                name=cfg.name or src.name,
                modality=modality,
                classes=classes,
                resolution=resolution,
                mode=mode,
                description=f"imported from the {cfg.format} layout at {src.name}"
                + ("; native image sizes vary" if resolution == 0 else ""),
                source=f"craft.data.importers format={cfg.format} seed={cfg.seed} test_fraction={cfg.test_fraction}",
            ),
        )
    n = Counter(r["split"] for r in rows)
    log.info("imported %d images (%s) of %d classes into %s", len(rows), dict(n), len(classes), out)
    return out
