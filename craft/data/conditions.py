"""Condition images for ControlNet (CRAFTS, "Structure-controllable image generation based on CRAFTS").

What a ControlNet sees, float [3, H, W] in [0, 1] at the image resolution:

- ``mask``: the nuclear instance mask (``mask_path``, uint16, 0 = background) encoded in 3 channels:
  channel 0 = foreground (any nucleus), channel 1 = instance boundaries (a nuclear pixel whose
  4-neighbour belongs to another instance or to background), channel 2 = 0. The boundary channel keeps
  touching nuclei apart, which a binary mask would merge (the paper's GLySAC / CoNSeP masks are
  instance maps).
- ``fluorescence``: the grayscale nuclei channel (``condition_path``, e.g. DAPI) replicated to 3 channels.

Training (``craft.train.controlnet``), sampling (``craft.sample``) and evaluation
(``craft.evaluate.controlnet_eval``) read conditions here, so all three see the same input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from craft.data.loader import PixelColumn

CONDITIONS = ("mask", "fluorescence")
# The paper's instruction prompts (CRAFTS, "Structure-controllable image generation"), in our own words and
# short enough for the tiny model's 32-token window (a longer prompt is truncated, with a warning).
PROMPTS = {
    "mask": "h&e stained image from a nuclear mask: purple hematoxylin nuclei in the mask, pink eosin stroma",
    "fluorescence": "h&e stained image from nuclear fluorescence: purple hematoxylin nuclei where bright, pink eosin stroma",
}


def encode_mask(inst: np.ndarray) -> np.ndarray:
    """Instance mask [H, W] (0 = background) -> uint8 [H, W, 3]: foreground, instance boundaries, 0 (x255).

    >>> m = np.zeros((4, 4), np.uint16); m[1:3, 1:3] = 1
    >>> encode_mask(m)[..., 0].sum() // 255, encode_mask(m)[..., 1].sum() // 255
    (4, 4)
    """
    inst = np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"instance mask must be 2-D, got shape {inst.shape}")
    fg = inst > 0
    pad = np.pad(inst, 1, mode="edge")
    h, w = inst.shape
    edge = np.zeros_like(fg)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        edge |= pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] != inst
    out = np.zeros((h, w, 3), np.uint8)
    out[..., 0] = fg * 255
    out[..., 1] = (edge & fg) * 255
    return out


def _condition_rel(row: Any, kind: str) -> str:
    """The row's condition file (relative path); an error naming the row when it has none."""
    col = "mask_path" if kind == "mask" else "condition_path"
    rel = row[col]
    if rel is None or (isinstance(rel, float) and math.isnan(rel)) or str(rel) in ("", "<NA>"):
        raise ValueError(f"manifest row image_id={row['image_id']}: no {col} (condition={kind} needs it)")
    return str(rel)


def read_condition(dataset_dir: str | os.PathLike, row: Any, kind: str, resolution: int) -> np.ndarray:
    """The condition image of one manifest row as uint8 [R, R, 3] (see the module docstring)."""
    from PIL import Image

    path = Path(dataset_dir) / _condition_rel(row, kind)
    col = "mask_path" if kind == "mask" else "condition_path"
    try:
        with Image.open(path) as im:
            im.load()
            if kind == "mask":
                arr = np.asarray(im)
                if arr.ndim == 3:
                    raise ValueError(f"instance mask must be single-channel, got mode {im.mode}")
                if arr.shape != (resolution, resolution):  # NEAREST keeps instance ids intact
                    arr = np.asarray(Image.fromarray(arr.astype(np.int32)).resize((resolution, resolution),
                                                                                   Image.NEAREST))  # fmt: skip
                return encode_mask(arr)
            g = im.convert("L")
            if g.size != (resolution, resolution):
                g = g.resize((resolution, resolution), Image.BICUBIC)
            return np.repeat(np.asarray(g)[..., None], 3, axis=2)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read {col} ({e})") from e


class ConditionFiles:
    """Reader of the condition images of manifest rows: ``files(i)`` -> uint8 [R, R, 3] (picklable for workers)."""

    def __init__(self, dataset_dir, df, kind: str, resolution: int):
        if kind not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {kind!r}")
        col = "mask_path" if kind == "mask" else "condition_path"
        cols = ["image_id", col] if col in df.columns else ["image_id"]
        self.rows = [dict(r) for r in df[cols].to_dict("records")]
        for r in self.rows:
            r.setdefault(col, None)
            _condition_rel(r, kind)  # refuse a row without a condition now, not at its first batch
        self.root, self.kind, self.resolution = dataset_dir, kind, resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __call__(self, i: int) -> np.ndarray:
        return read_condition(self.root, self.rows[i], self.kind, self.resolution)


def condition_column(dataset_dir, df, kind: str, resolution: int) -> PixelColumn:
    """Conditions of ``df`` as a lazy column: float [B, 3, R, R] in [0, 1] per batch, read from disk then."""
    files = ConditionFiles(dataset_dir, df, kind, resolution)
    return PixelColumn(files, len(files), "unit")


def load_conditions(dataset_dir, df, kind: str, resolution: int) -> torch.Tensor:
    """Conditions of ``df`` as one float tensor [N, 3, R, R] in [0, 1] (the range diffusers' ControlNet expects)."""
    col = condition_column(dataset_dir, df, kind, resolution)
    return col[list(range(len(col)))]


def condition_from_file(path: str | os.PathLike, kind: str, resolution: int) -> torch.Tensor:
    """One condition image file -> float [1, 3, R, R] in [0, 1] (for ``craft sample --condition``)."""
    col = "mask_path" if kind == "mask" else "condition_path"
    p = Path(path)
    return load_conditions(p.parent, _one_row(p.name, col), kind, resolution)


def _one_row(name: str, col: str):
    import pandas as pd

    return pd.DataFrame([{"image_id": name, col: name}])


def load_pil_images(dataset_dir, df, res: int) -> list:
    """The RGB images of ``df``'s rows as PIL images at ``res`` x ``res`` (bicubic when resized)."""
    from PIL import Image

    out = []
    for rel in df["image_path"].tolist():
        with Image.open(Path(dataset_dir) / rel) as im:
            im = im.convert("RGB")
            out.append(im.resize((res, res), Image.BICUBIC) if im.size != (res, res) else im.copy())
    return out
