"""Paired-folder importer for ControlNet data: condition image + target H&E (+ optional caption) -> dataset dir.

``craft data import-paired LAYOUT SRC --out DIR`` writes the dataset contract (``craft.data.manifest``) with
``images/<label>/<id>.png`` (the H&E target), and per row either ``mask_path`` (``masks/<id>.png``, uint16
nuclear instance map, 0 = background) or ``condition_path`` (``conditions/<id>.png``, 8-bit grayscale nuclei
channel), the columns ``craft train controlnet --condition mask|fluorescence`` reads.

Layouts (folder names are config fields; the defaults are what the public releases ship):

- ``consep`` / ``glysac`` / ``instance`` -- nuclear instance segmentation sets (CRAFTS: GLySAC, CoNSeP)::

      SRC/[Train|Test/]Images/<stem>.png|.tif   H&E tile (CoNSeP ships RGBA PNGs: alpha is dropped)
      SRC/[Train|Test/]Labels/<stem>.mat        MATLAB file with "inst_map" (H x W, 0 = background,
                                                k = k-th nucleus), read with scipy.io.loadmat
                      or Labels/<stem>.png      a single-channel (16-bit) instance-mask PNG instead

  ``type_map`` / ``inst_type`` in the .mat are not needed for mask conditioning and are ignored.
- ``hemit`` / ``shift`` / ``pairs`` -- registered stain-translation pairs (CRAFTS: HEMIT, SHIFT)::

      SRC/[train|val|test/]<condition_dir>/<stem>.*   the fluorescence / mIHC image
      SRC/[train|val|test/]<target_dir>/<stem>.*      the registered H&E image, same stem

  HEMIT releases ``input/`` (H&E) and ``label/`` (mIHC) per split, so its defaults are
  ``condition_dir=label, target_dir=input``; SHIFT's tiles are commonly stored as ``IF/`` and ``HE/`` per
  split (defaults ``IF`` / ``HE``; set the two fields for your copy). A multi-channel condition is reduced
  to one nuclei channel: ``condition_channel`` >= 0 picks that channel (e.g. DAPI's index in your mIHC
  stack), -1 takes the luminance of the image.

Splits: when SRC has split folders (Train/Test, train/val/test ... in any case) they are the official split;
otherwise every source image is one "patient" and images are split by ``craft.data.importers.patient_split``.
Tiles (``tile`` > 0: non-overlapping ``tile`` x ``tile`` crops, the remainder dropped) inherit their
source image's patient, so a slide's tiles never straddle two splits. ``resolution`` > 0 resizes every
tile (H&E and fluorescence bicubic, instance masks nearest, so ids survive).

Captions: optional CSV ``caption_file`` (relative to SRC) with columns ``file`` (the target's stem) and
``caption``; rows without one get ``caption`` (may be empty = none).

Every image, mask and condition is checked: a missing partner, an unreadable file, a multi-channel mask
or a size mismatch between the pair raises ``ImportError_`` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from craft.data.importers import IMAGE_SUFFIXES, SPLIT_ALIASES, ImportError_, Record, _safe_id, patient_split, slug
from craft.data.manifest import MODALITIES, DatasetMeta, write_manifest, write_meta
from craft.io import atomic_dir

log = logging.getLogger(__name__)

INSTANCE_LAYOUTS = ("consep", "glysac", "instance")
PAIR_DEFAULTS = {"hemit": ("label", "input"), "shift": ("IF", "HE"), "pairs": ("condition", "target")}
MASK_SUFFIXES = (".mat", ".png", ".tif", ".tiff")


@dataclass
class PairedImportConfig:
    """Stage ``import_paired``: how ``craft data import-paired`` reads condition / target folders."""

    layout: Literal["consep", "glysac", "instance", "hemit", "shift", "pairs"] = "pairs"  # see module docstring
    name: str = ""  # dataset name in dataset.yaml ("" = the source folder's name)
    label: str = "tissue"  # class label of every row (these sets are not classification sets)
    modality: str = "histo"  # dataset.yaml modality
    images_dir: str = "Images"  # instance layouts: folder of H&E tiles
    labels_dir: str = "Labels"  # instance layouts: folder of .mat / mask PNG instance maps
    mat_key: str = "inst_map"  # instance layouts: variable holding the instance map in the .mat
    condition_dir: str = ""  # pair layouts: folder of condition images ("" = the layout's default)
    target_dir: str = ""  # pair layouts: folder of H&E targets ("" = the layout's default)
    condition_channel: int = -1  # pair layouts: channel of a multi-channel condition (-1 = luminance)
    caption_file: str = ""  # CSV (file, caption) relative to SRC; "" = none
    caption: str = ""  # caption of rows without one in caption_file ("" = none)
    tile: int = 0  # > 0: cut each image into non-overlapping tile x tile crops
    resolution: int = 0  # > 0: resize each tile to resolution x resolution
    test_fraction: float = 0.25  # share of source images in test when SRC has no split folders
    val_fraction: float = 0.0  # share of source images in val when SRC has no split folders
    seed: int = 0  # seed of the split shuffle
    limit: int = 0  # keep at most this many source images (sorted by path); 0 = all

    def validate(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.tile < 0 or self.resolution < 0 or self.limit < 0:
            raise ValueError("tile, resolution and limit must be >= 0")
        if not (0 <= self.test_fraction < 1 and 0 <= self.val_fraction < 1
                and self.test_fraction + self.val_fraction < 1):  # fmt: skip
            raise ValueError("test_fraction and val_fraction must be in [0, 1) and sum below 1")
        if not slug(self.label):
            raise ValueError(f"label: {self.label!r} is empty after normalisation")

    def folders(self) -> tuple[str, str]:
        """(condition folder, target folder) of a pair layout."""
        cond, tgt = PAIR_DEFAULTS.get(self.layout, ("", ""))
        return self.condition_dir or cond, self.target_dir or tgt


# ---------------------------------------------------------------- reading


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not folder.is_dir():
        raise ImportError_(f"{folder}: folder not found")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in out:
                raise ImportError_(f"{p}: stem {p.stem!r} also used by {out[p.stem].name}")
            out[p.stem] = p
    return out


def _roots(src: Path, needed: str) -> list[tuple[Path, str | None]]:
    """(folder holding ``needed``, official split or None): split subfolders of SRC, else SRC itself."""
    if (src / needed).is_dir():
        return [(src, None)]
    found = []
    for d in sorted(src.iterdir()):
        split = SPLIT_ALIASES.get(d.name.lower())
        if d.is_dir() and split and (d / needed).is_dir():
            found.append((d, split))
    if not found:
        raise ImportError_(f"{src}: no {needed}/ folder, neither directly nor under split folders (Train/Test, ...)")
    return found


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise ImportError_(f"{path}: image does not decode: {type(e).__name__}: {e}") from e


def read_instance_map(path: Path, mat_key: str = "inst_map") -> np.ndarray:
    """An instance map (H x W ints, 0 = background) from a .mat (``mat_key``) or a single-channel image."""
    if path.suffix.lower() == ".mat":
        import scipy.io

        try:
            mat = scipy.io.loadmat(str(path))
        except Exception as e:  # noqa: BLE001
            raise ImportError_(f"{path}: not a readable .mat file: {type(e).__name__}: {e}") from e
        if mat_key not in mat:
            keys = sorted(k for k in mat if not k.startswith("__"))
            raise ImportError_(f"{path}: no variable {mat_key!r} (has: {', '.join(keys)})")
        a = np.asarray(mat[mat_key])
    else:
        try:
            with Image.open(path) as im:
                a = np.asarray(im)
        except Exception as e:  # noqa: BLE001
            raise ImportError_(f"{path}: mask does not decode: {type(e).__name__}: {e}") from e
    if a.ndim != 2:
        raise ImportError_(f"{path}: instance map must be 2-D (one channel), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or (a < 0).any() or a.max(initial=0) > 65535:
        raise ImportError_(f"{path}: instance ids must be integers in 0..65535")
    if np.issubdtype(a.dtype, np.floating) and not np.all(a == np.round(a)):
        raise ImportError_(f"{path}: instance ids must be integers, found fractional values")
    return a.astype(np.uint16)


def read_condition(path: Path, channel: int) -> np.ndarray:
    """A condition image as one 8-bit channel: ``channel`` of a multi-channel image, or its luminance (-1)."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
            lum = np.asarray(im.convert("L")) if channel < 0 and a.ndim == 3 else None
    except Exception as e:  # noqa: BLE001
        raise ImportError_(f"{path}: condition image does not decode: {type(e).__name__}: {e}") from e
    if a.ndim == 3:
        if channel >= a.shape[2]:
            raise ImportError_(f"{path}: condition_channel {channel} but the image has {a.shape[2]} channels")
        a = lum if channel < 0 else a[..., channel]
    if a.dtype != np.uint8:  # 16-bit fluorescence: rescale its range to 8 bits
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros(a.shape, np.uint8) if hi <= lo else np.rint((a - lo) / (hi - lo) * 255).astype(np.uint8)
    return a


def _check_size(a: np.ndarray, b: np.ndarray, pa: Path, pb: Path) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ImportError_(
            f"{pb}: size {b.shape[1]}x{b.shape[0]} differs from its pair {pa} ({a.shape[1]}x{a.shape[0]})"
        )


def _tiles(h: int, w: int, t: int) -> list[tuple[int, int]]:
    if t <= 0:
        return [(0, 0)]
    if h < t or w < t:
        return []
    return [(y, x) for y in range(0, h - t + 1, t) for x in range(0, w - t + 1, t)]


def _captions(cfg: PairedImportConfig, src: Path) -> dict[str, str]:
    if not cfg.caption_file:
        return {}
    path = src / cfg.caption_file
    if not path.is_file():
        raise ImportError_(f"{path}: caption_file not found")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("file", "caption"):
        if col not in df.columns:
            raise ImportError_(f"{path}: missing column {col!r} (columns: {', '.join(df.columns)})")
    return {Path(f).stem: c for f, c in zip(df["file"], df["caption"])}


def collect(cfg: PairedImportConfig, src: Path) -> list[tuple[Path, Path, str | None, str]]:
    """(target file, condition/mask file, official split, patient) for every source pair, sorted."""
    pairs = []
    if cfg.layout in INSTANCE_LAYOUTS:
        for root, split in _roots(src, cfg.images_dir):
            images = _files(root / cfg.images_dir, IMAGE_SUFFIXES)
            labels = _files(root / cfg.labels_dir, MASK_SUFFIXES)
            for stem, img in images.items():
                if stem not in labels:
                    raise ImportError_(f"{img}: no instance map {cfg.labels_dir}/{stem}.mat|.png")
                pairs.append((img, labels[stem], split, f"{root.name}_{stem}" if split else stem))
    else:
        cdir, tdir = cfg.folders()
        for root, split in _roots(src, tdir):
            targets = _files(root / tdir, IMAGE_SUFFIXES)
            conds = _files(root / cdir, IMAGE_SUFFIXES)
            for stem in sorted(set(targets) ^ set(conds)):
                where = targets.get(stem) or conds.get(stem)
                other = cdir if stem in targets else tdir
                raise ImportError_(f"{where}: no file with the same name in {root / other}")
            for stem, tgt in targets.items():
                pairs.append((tgt, conds[stem], split, f"{root.name}_{stem}" if split else stem))
    if not pairs:
        raise ImportError_(f"{src}: no image pairs found ({cfg.layout} layout)")
    pairs.sort(key=lambda p: str(p[0]))
    return pairs[: cfg.limit] if cfg.limit else pairs


def _resize(a: np.ndarray, res: int, nearest: bool) -> np.ndarray:
    if res <= 0 or a.shape[:2] == (res, res):
        return a
    if nearest:
        return np.asarray(Image.fromarray(a.astype(np.int32)).resize((res, res), Image.NEAREST)).astype(a.dtype)
    return np.asarray(Image.fromarray(a).resize((res, res), Image.BICUBIC))


def _png(a: np.ndarray, path: Path) -> None:
    Image.fromarray(a).save(path, format="PNG")


def main(cfg: PairedImportConfig, src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Import ``src`` in ``cfg.layout`` into dataset directory ``out`` (written atomically)."""
    cfg.validate()
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ImportError_(f"{src}: source folder not found")
    is_mask = cfg.layout in INSTANCE_LAYOUTS
    label = slug(cfg.label)
    captions = _captions(cfg, src)
    records: list[Record] = []
    pairs = collect(cfg, src)
    for tgt, cond, split, patient in pairs:
        for y, x in _tiles(*read_rgb(tgt).shape[:2], cfg.tile) if cfg.tile else [(0, 0)]:
            suffix = f"_y{y}_x{x}" if cfg.tile else ""
            rec = Record(src=tgt, label=label, patient=_safe_id(patient), image_id=_safe_id(patient + suffix),
                         split=split, caption=captions.get(tgt.stem, cfg.caption) or None, where=str(tgt))  # fmt: skip
            rec.attributes = {"source": str(tgt.relative_to(src)), "pair": str(cond.relative_to(src)), "y": y, "x": x}
            records.append(rec)
    if not records:
        raise ImportError_(f"{src}: every image is smaller than tile={cfg.tile}")
    has_official = any(r.split is not None for r in records)
    if has_official and any(r.split is None for r in records):
        raise ImportError_(f"{src}: some pairs are under split folders and some are not")
    patient_split(records, cfg.test_fraction, cfg.val_fraction, cfg.seed)

    rows, sizes = [], Counter()
    cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    with atomic_dir(out) as tmp:
        for sub in ("images/" + label, "masks" if is_mask else "conditions"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        for r in records:
            info = r.attributes
            if r.src not in cache:
                cache.clear()  # one source image at a time (tiles of it come in a row)
                img = read_rgb(r.src)
                pair = src / info["pair"]
                c = read_instance_map(pair, cfg.mat_key) if is_mask else read_condition(pair, cfg.condition_channel)
                _check_size(img, c, r.src, pair)
                cache[r.src] = (img, c)
            img, c = cache[r.src]
            t = cfg.tile or None
            y, x = info["y"], info["x"]
            img_t = img[y : y + t, x : x + t] if t else img
            c_t = c[y : y + t, x : x + t] if t else c
            img_t = _resize(np.ascontiguousarray(img_t), cfg.resolution, nearest=False)
            c_t = _resize(np.ascontiguousarray(c_t), cfg.resolution, nearest=is_mask)
            _png(img_t, tmp / "images" / label / f"{r.image_id}.png")
            rel_c = f"{'masks' if is_mask else 'conditions'}/{r.image_id}.png"
            _png(c_t.astype(np.uint16) if is_mask else c_t.astype(np.uint8), tmp / rel_c)
            sizes[img_t.shape[:2]] += 1
            if is_mask:
                info["n_nuclei"] = int(len(np.unique(c_t)) - (1 if (c_t == 0).any() else 0))
            rows.append(dict(
                image_id=r.image_id, image_path=f"images/{label}/{r.image_id}.png", label=label, split=r.split,
                patient_id=r.patient, caption=r.caption, mask_path=rel_c if is_mask else None,
                condition_path=None if is_mask else rel_c, attributes=json.dumps(info, sort_keys=True),
            ))  # fmt: skip
        (h, w), _ = sizes.most_common(1)[0]
        resolution: int | list[int] = (w if w == h else [h, w]) if len(sizes) == 1 else 0
        write_manifest(tmp, pd.DataFrame(rows))
        kind = "masks/: uint16 nuclear instance maps" if is_mask else "conditions/: 8-bit nuclei channel"
        write_meta(tmp, DatasetMeta(
            name=cfg.name or src.name, modality=cfg.modality, classes=[label], resolution=resolution, mode="RGB",
            description=f"paired ControlNet data imported from the {cfg.layout} layout at {src.name}; "
            f"images/: H&E targets; {kind}" + ("; native sizes vary" if resolution == 0 else ""),
            source=f"craft.data.paired layout={cfg.layout} tile={cfg.tile} resolution={cfg.resolution} seed={cfg.seed}",
        ))  # fmt: skip
    log.info("imported %d pairs (%s) into %s", len(rows), dict(Counter(r["split"] for r in rows)), out)
    return out
