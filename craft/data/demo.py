"""Deterministic demo datasets that stand in for real medical images offline (issue 2, item 4).

Two modalities, four classes each, drawn procedurally from ground-truth attributes so that an
oracle can later re-draw fresh images of any class and check what a generator produced:

- ``histo``: RGB H&E-like colorectal tissue tiles. Hematoxylin and eosin are mixed with the
  Beer-Lambert optical-density model (OD = c_H * v_H + c_E * v_E, I = exp(-OD)) with per-patient
  stain vectors, so colour varies as between scanning sites. The morphology follows the classes
  the CRAFTS paper generates (gland regularity, nuclear crowding, pleomorphism, hyperchromasia,
  mucin pools). Each image comes with a nuclear instance mask and a fluorescence-like (DAPI-like)
  nuclei channel drawn from the same nuclei: the pair CRAFTS' ControlNet is conditioned on.
- ``cxr``: grayscale frontal chest-radiograph-like images: body outline, ribs, lungs, spine and
  mediastinum, cardiac silhouette, diaphragm. Findings are the ones CRAFT's clinical reward reads:
  cardiothoracic ratio, blunted costophrenic angle with meniscus, focal patchy opacity.

Everything is vectorised numpy / scipy.ndimage; only nuclei are stamped one by one, each into its
own small bounding box. Same config -> byte-identical directory.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from craft.data.manifest import DatasetMeta, read_manifest, read_meta, write_manifest, write_meta
from craft.io import atomic_dir, atomic_write_bytes

log = logging.getLogger(__name__)

HISTO_CLASSES = ("normal", "adenoma", "adenocarcinoma", "mucinous_carcinoma")
CXR_CLASSES = ("no_finding", "cardiomegaly", "pleural_effusion", "pneumonia")
CLASSES = {"histo": HISTO_CLASSES, "cxr": CXR_CLASSES}
CLASS_PHRASES = {
    "histo": {
        "normal": "normal colonic mucosa",
        "adenoma": "tubular adenoma",
        "adenocarcinoma": "colorectal adenocarcinoma",
        "mucinous_carcinoma": "mucinous carcinoma",
    },
    "cxr": {
        "no_finding": "no acute cardiopulmonary finding",
        "cardiomegaly": "cardiomegaly",
        "pleural_effusion": "pleural effusion",
        "pneumonia": "pneumonia",
    },
}
# What the mask PNG holds, per modality (also written into dataset.yaml's description).
MASK_DOC = {
    "histo": "masks/: uint16 nuclear instance mask, 0 = background, k = k-th nucleus (1..n_nuclei)",
    "cxr": "masks/: uint16 region labels, 0 = other, 1 = patient-right lung field (image left), "
    "2 = patient-left lung field, 3 = cardiac silhouette, 4 = finding (effusion fluid or consolidation)",
}
CXR_REGIONS = {"lung_right": 1, "lung_left": 2, "heart": 3, "finding": 4}


@dataclass
class DemoConfig:
    """``craft data demo``: generate a seeded demo dataset."""

    modality: Literal["histo", "cxr"] = "histo"  # histo: H&E-like RGB tiles; cxr: chest-radiograph-like grayscale
    n: int = 400  # number of images
    seed: int = 0  # everything (classes, patients, splits, pixels, captions) follows from it
    resolution: int = 64  # square image side in pixels (32..256 look right; 16..1024 accepted)
    test_fraction: float = 0.25  # share of each class's patients in the test split
    val_fraction: float = 0.0  # share of each class's patients in the val split
    images_per_patient: int = 4  # images per patient; a patient has one class and lies in one split
    caption_class_rate: float = 0.6  # share of weak captions that name the true class
    caption_wrong_rate: float = 0.1  # share that name a wrong class (label noise for stage-1 pretraining)
    noise: float = 1.0  # scale of pixel noise and stain / exposure variation (0 = clean)

    def validate(self) -> None:
        if self.modality not in CLASSES:
            raise ValueError(f"modality: {self.modality!r} is not one of {sorted(CLASSES)}")
        n_classes = len(CLASSES[self.modality])
        if self.n < n_classes:
            raise ValueError(f"n: {self.n} images cannot cover the {n_classes} classes")
        if not 16 <= self.resolution <= 1024:
            raise ValueError(f"resolution: {self.resolution} outside 16..1024")
        if self.images_per_patient < 1:
            raise ValueError(f"images_per_patient: {self.images_per_patient} must be >= 1")
        for name in ("test_fraction", "val_fraction", "caption_class_rate", "caption_wrong_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0 and not (name.startswith("caption") and value == 1.0):
                raise ValueError(f"{name}: {value} outside [0, 1)")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError(
                f"test_fraction: test_fraction + val_fraction = {self.test_fraction + self.val_fraction} leaves no train"
            )
        if self.caption_class_rate + self.caption_wrong_rate > 1.0:
            raise ValueError("caption_wrong_rate: caption_class_rate + caption_wrong_rate exceeds 1")
        if self.noise < 0:
            raise ValueError(f"noise: {self.noise} must be >= 0")
        n_splits = 1 + (self.test_fraction > 0) + (self.val_fraction > 0)
        per_class = math.ceil(self.n / self.images_per_patient) // n_classes
        if per_class < n_splits:
            raise ValueError(
                f"n: {self.n} images at images_per_patient={self.images_per_patient} give {per_class} patient(s) "
                f"per class; every class needs one patient in each of {n_splits} splits"
            )


# ----------------------------------------------------------------------------------------------
# shared helpers


def _as_rng(rng_or_seed: np.random.Generator | int | None) -> np.random.Generator:
    return rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean, unit std (low-frequency texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in field units [0, 1): (y, x)."""
    c = (np.arange(res, dtype=np.float64) + 0.5) / res
    return np.meshgrid(c, c, indexing="ij")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)  # no timestamp or other varying chunk is written
    return buf.getvalue()


def _stamp_nuclei(nuc: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw elliptic nuclei into an instance mask and a hematoxylin density map, all at once.

    ``nuc`` rows: centre y, centre x, semi-axes a, b (pixels), orientation, stain strength. Each
    nucleus is evaluated on its own small patch (broadcast to one (N, K, K) array); where nuclei
    overlap the later one wins in the mask. The mask gets the hard ellipse (at least the centre
    pixel); the density a soft-edged copy, so the stain is anti-aliased while the mask stays exact.
    Returns the mask relabelled 1..K in drawing order (nuclei hidden under later ones drop out).
    """
    mask = np.zeros(res * res, np.int64)
    dens = np.zeros(res * res)
    if len(nuc) == 0:
        return mask.reshape(res, res).astype(np.uint16), dens.reshape(res, res)
    cy, cx = nuc[:, 0, None, None], nuc[:, 1, None, None]
    a, b = np.maximum(nuc[:, 2], 0.6)[:, None, None], np.maximum(nuc[:, 3], 0.6)[:, None, None]
    ct, st = np.cos(nuc[:, 4])[:, None, None], np.sin(nuc[:, 4])[:, None, None]
    rad = int(math.ceil(max(a.max(), b.max()))) + 1
    off = np.arange(-rad, rad + 1)
    py = np.floor(cy).astype(np.int64) + off[None, :, None]
    pxx = np.floor(cx).astype(np.int64) + off[None, None, :]
    dy, dx = py + 0.5 - cy, pxx + 0.5 - cx
    d = ((dx * ct + dy * st) / a) ** 2 + ((-dx * st + dy * ct) / b) ** 2
    inside = d <= 1.0
    inside[:, rad, rad] = True
    valid = (py >= 0) & (py < res) & (pxx >= 0) & (pxx < res)
    flat = np.broadcast_to(py * res + pxx, d.shape)
    sel = inside & valid
    ids = np.broadcast_to(np.arange(1, len(nuc) + 1)[:, None, None], d.shape)
    np.maximum.at(mask, flat[sel], ids[sel])
    soft = nuc[:, 5, None, None] * np.clip((1.35 - d) / 0.7, 0.0, 1.0)
    selv = valid & (soft > 0)
    np.maximum.at(dens, flat[selv], soft[selv])
    present = np.unique(mask)
    present = present[present > 0]
    lut = np.zeros(len(nuc) + 1, np.int64)
    lut[present] = np.arange(1, present.size + 1)
    return lut[mask].reshape(res, res).astype(np.uint16), dens.reshape(res, res)


# ----------------------------------------------------------------------------------------------
# histology

# Typical optical-density vectors (rows: R, G, B absorbance) of hematoxylin and eosin as estimated
# by stain-separation methods on H&E slides; mucin gets a pale blue-grey vector of its own.
_V_H = np.array([0.56, 0.72, 0.41])
_V_E = np.array([0.22, 0.80, 0.56])
_V_M = np.array([0.50, 0.36, 0.20])

# Per-class morphology priors. Units: field fraction (the tile is 1 x 1).
#   nuc_r: mean nuclear radius; pleo: relative size spread (pleomorphism); elong: axis ratio;
#   hyper: hematoxylin strength (hyperchromasia); harm: amplitude of gland-outline harmonics
#   (irregularity); rows: layers of nuclei along the gland wall (pseudostratification).
_HISTO_PRIOR: dict[str, dict[str, Any]] = {
    "normal": dict(nuc_r=0.016, pleo=0.06, elong=1.15, hyper=0.8, harm=0.03, rows=1, crowd=0.35),
    "adenoma": dict(nuc_r=0.015, pleo=0.10, elong=2.4, hyper=1.05, harm=0.05, rows=3, crowd=0.75),
    "adenocarcinoma": dict(nuc_r=0.019, pleo=0.45, elong=1.3, hyper=1.3, harm=0.28, rows=0, crowd=0.55),
    "mucinous_carcinoma": dict(nuc_r=0.018, pleo=0.25, elong=1.2, hyper=1.1, harm=0.0, rows=0, crowd=0.3),
}


def _sample_stain(rng: np.random.Generator, noise: float) -> dict[str, Any]:
    """Per-patient stain: perturbed stain vectors and concentrations (site / batch variation)."""

    def jitter(v: np.ndarray, s: float) -> np.ndarray:
        w = np.clip(v + noise * rng.normal(0, s, 3), 0.05, None)
        return w / np.linalg.norm(w)

    return {
        "v_h": jitter(_V_H, 0.06).tolist(),
        "v_e": jitter(_V_E, 0.06).tolist(),
        "h_scale": float(1 + noise * rng.uniform(-0.2, 0.2)),
        "e_scale": float(1 + noise * rng.uniform(-0.25, 0.25)),
    }


def _gland_polar(y: np.ndarray, x: np.ndarray, g: dict[str, Any]) -> np.ndarray:
    """Normalised radius rho of each pixel for gland ``g`` (1 on the gland outline).

    The outline harmonics cos(k*ang + ph) are evaluated as Re(z**k e^{i ph}) with z = e^{i ang},
    built by repeated multiplication (no arctan / cos over the grid).
    """
    dy, dx = y - g["cy"], x - g["cx"]
    ct, st = math.cos(g["rot"]), math.sin(g["rot"])
    u, v = (dx * ct + dy * st) / g["asp"], -dx * st + dy * ct
    r = np.hypot(u, v)
    z = (u + 1j * v) / np.maximum(r, 1e-12)
    out = np.ones_like(r)
    zk = np.ones_like(z)
    done = 0
    for k, amp, ph in g["harm"]:
        while done < k:
            zk = zk * z
            done += 1
        out += amp * (zk.real * math.cos(ph) - zk.imag * math.sin(ph))
    return r / (g["r"] * np.maximum(out, 0.35))


def _outline(ang: np.ndarray | float, g: dict[str, Any]) -> np.ndarray | float:
    """Gland outline radius factor: 1 + sum of angular harmonics (irregular / angulated glands)."""
    out = 1.0
    for k, amp, ph in g["harm"]:
        out = out + amp * np.cos(k * ang + ph)
    return np.maximum(out, 0.35)


def _gland_point(g: dict[str, Any], rho: Any, ang: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Field coordinates (y, x) of polar points (rho, ang) of gland ``g`` and their outward normal angle."""
    rr = rho * g["r"] * _outline(ang, g)
    u, v = g["asp"] * rr * np.cos(ang), rr * np.sin(ang)
    ct, st = math.cos(g["rot"]), math.sin(g["rot"])
    x, y = g["cx"] + u * ct - v * st, g["cy"] + u * st + v * ct
    nu, nv = np.cos(ang) / g["asp"], np.sin(ang)  # gradient direction of the ellipse
    normal = np.arctan2(nu * st + nv * ct, nu * ct - nv * st)
    return y, x, normal


def _place_glands(rng: np.random.Generator, label: str) -> list[dict[str, Any]]:
    prior = _HISTO_PRIOR[label]
    glands: list[dict[str, Any]] = []
    if label == "mucinous_carcinoma":
        return glands
    if label == "normal":  # round crypts cut across, evenly spaced
        count, r_rng, asp_rng, lumen = rng.integers(3, 6), (0.14, 0.19), (1.0, 1.25), (0.5, 0.62)
    elif label == "adenoma":  # elongated tubules, still smooth, packed close together
        count, r_rng, asp_rng, lumen = rng.integers(3, 5), (0.10, 0.13), (2.0, 3.0), (0.28, 0.4)
    else:  # irregular, fused, angulated glands with small lumina
        count, r_rng, asp_rng, lumen = rng.integers(4, 7), (0.11, 0.2), (1.0, 1.8), (0.15, 0.38)
    base_rot = rng.uniform(0, math.pi)
    for _ in range(int(count) * 30):
        if len(glands) >= count:
            break
        g = {
            "cy": float(rng.uniform(-0.05, 1.05)),
            "cx": float(rng.uniform(-0.05, 1.05)),
            "r": float(rng.uniform(*r_rng)),
            "asp": float(rng.uniform(*asp_rng)),
            "rot": float(base_rot + rng.normal(0, 0.25) if label == "adenoma" else rng.uniform(0, math.pi)),
            "lumen": float(rng.uniform(*lumen)),
            "harm": [
                (k, float(prior["harm"] * rng.uniform(0.4, 1.0) / (1 + 0.3 * (k - 2))), float(rng.uniform(0, 6.3)))
                for k in range(2, 7)
            ],
        }
        reach = g["r"] * g["asp"]
        if label == "adenocarcinoma":
            min_gap = 0.55  # carcinoma glands may overlap (fused / back-to-back)
        elif label == "adenoma":
            min_gap = 1.02
        else:
            min_gap = 1.25
        ok = all(
            math.hypot(g["cy"] - h["cy"], g["cx"] - h["cx"])
            > min_gap * 0.5 * (reach + h["r"] * h["asp"] + g["r"] + h["r"])
            for h in glands
        )
        if ok:
            glands.append(g)
    return glands


def _render_histo(
    label: str, rng: np.random.Generator, res: int, stain: dict[str, Any] | None = None, noise: float = 1.0
) -> tuple[Image.Image, np.ndarray, Image.Image, dict[str, Any]]:
    if label not in HISTO_CLASSES:
        raise ValueError(f"label: {label!r} is not a histo class {HISTO_CLASSES}")
    prior = _HISTO_PRIOR[label]
    stain = stain or _sample_stain(rng, noise)
    y, x = _grid(res)
    px = float(res)  # field units -> pixels

    # Stroma: eosin with a fibrous (anisotropic) texture; lamina propria in benign, desmoplastic in carcinoma.
    fib_sigma = (0.006 * px, 0.02 * px) if rng.random() < 0.5 else (0.02 * px, 0.006 * px)
    c_e = 0.42 + 0.06 * _smooth_noise(rng, (res, res), fib_sigma) + 0.05 * _smooth_noise(rng, (res, res), 0.08 * px)
    c_h = np.full((res, res), 0.06) + 0.02 * _smooth_noise(rng, (res, res), 0.02 * px)
    c_m = np.zeros((res, res))
    epith = np.zeros((res, res), bool)
    lumen = np.zeros((res, res), bool)

    glands = _place_glands(rng, label)
    for g in glands:
        rho = _gland_polar(y, x, g)
        inner = rho < g["lumen"]
        if label == "adenocarcinoma" and rng.random() < 0.3:
            inner &= False  # solid nest without lumen
            g["lumen"] = 0.0
        epith |= rho < 1.0
        lumen |= inner
    epith &= ~lumen
    c_e = np.where(epith, 0.62 + 0.06 * _smooth_noise(rng, (res, res), 0.01 * px), c_e)
    c_h = np.where(epith, 0.12, c_h)
    lum_tex = _smooth_noise(rng, (res, res), 0.02 * px)
    c_e = np.where(lumen, 0.03 + 0.03 * np.clip(lum_tex, 0, None), c_e)
    c_h = np.where(lumen, 0.01, c_h)

    # Nuclei (centre y, x in field units, semi-axes a >= b, orientation, strength, nucleolus)
    nuclei: list[np.ndarray] = []
    hyper = prior["hyper"] * float(rng.uniform(0.9, 1.1))
    r_mean = prior["nuc_r"] * float(rng.uniform(0.9, 1.1))

    def add(cy: Any, cx: Any, r: Any, elong: Any, theta: Any, strength: Any) -> None:
        """Queue nuclei (scalars or arrays, broadcast together)."""
        cy, cx, r, elong, theta, strength = np.broadcast_arrays(*map(np.asarray, (cy, cx, r, elong, theta, strength)))
        sq = np.sqrt(elong)
        nuclei.append(np.stack([cy, cx, r * sq, r / sq, theta, strength], axis=-1).reshape(-1, 6))

    mucin_fraction = 0.0
    if label in ("normal", "adenoma"):
        for g in glands:
            perim = math.pi * g["r"] * (1 + g["asp"]) * 0.95
            rows = prior["rows"]
            spacing = r_mean * (2.9 if label == "normal" else 1.45)
            n_per_row = max(int(perim / spacing), 6)
            j = np.arange(n_per_row)
            for row in range(rows):
                ang = rng.uniform(0, 2 * math.pi) + 2 * math.pi * (j + rng.normal(0, 0.06, n_per_row)) / n_per_row
                if label == "normal":  # single neat basal layer near the outline
                    depth = 0.86 + rng.normal(0, 0.01, n_per_row)
                else:  # pseudostratified: several rows across the wall
                    depth = 0.92 - row * (0.9 - g["lumen"]) / rows * 0.9 + rng.normal(0, 0.03, n_per_row)
                cy, cx, normal = _gland_point(g, depth, ang)
                r = r_mean * (1 + prior["pleo"] * rng.normal(size=n_per_row))
                elong = prior["elong"] * rng.uniform(0.9, 1.1, n_per_row)
                add(cy, cx, r, elong, normal, hyper * rng.uniform(0.9, 1.1, n_per_row))
            if label == "normal":  # goblet cells: pale mucin vacuoles between the nuclei
                n_gob = n_per_row // 2
                ang = 2 * math.pi * (np.arange(n_gob) + 0.5) / n_gob + rng.normal(0, 0.05, n_gob)
                gy, gx, _ = _gland_point(g, 0.5 * (0.86 + g["lumen"]) + 0.05, ang)
                goblet = np.zeros((res, res))
                iy, ix = np.clip((gy * px).astype(int), 0, res - 1), np.clip((gx * px).astype(int), 0, res - 1)
                goblet[iy, ix] = 1.0
                goblet = ndimage.gaussian_filter(goblet, 0.012 * px) * (2 * math.pi * (0.012 * px) ** 2)
                c_m = np.maximum(c_m, 0.45 * np.clip(goblet, 0, 1))
        # lamina propria: scattered small round lymphocytes / plasma cells
        n_lym = int(rng.integers(8, 20))
        pts = rng.uniform(0, 1, (n_lym * 3, 2))
        ok = ~(epith | lumen)[(pts[:, 0] * res).astype(int), (pts[:, 1] * res).astype(int)]
        pts = pts[ok][:n_lym]
        add(pts[:, 0], pts[:, 1], r_mean * 0.8, 1.05, rng.uniform(0, math.pi, len(pts)), hyper * 1.1)
    elif label == "adenocarcinoma":
        # crowded, randomly arranged nuclei filling the epithelium; sizes vary widely (pleomorphism)
        idx = np.flatnonzero(epith.ravel())
        area = idx.size / (res * res)
        count = int(prior["crowd"] * area / (math.pi * r_mean**2) * 0.65)
        if idx.size:
            m = min(count, idx.size * 4)
            flat = rng.choice(idx, size=m, replace=True)
            cy = (flat // res + rng.uniform(size=m)) / res
            cx = (flat % res + rng.uniform(size=m)) / res
            r = r_mean * np.clip(1 + prior["pleo"] * rng.normal(size=m), 0.45, 2.2)
            elong = prior["elong"] * rng.uniform(0.8, 1.4, m)
            add(cy, cx, r, elong, rng.uniform(0, math.pi, m), hyper * rng.uniform(0.8, 1.25, m))
        m = int(rng.integers(6, 14))  # desmoplastic stroma: spindle fibroblasts along the fibres
        fib_dir = math.pi / 2 if fib_sigma[0] > fib_sigma[1] else 0.0
        add(rng.uniform(size=m), rng.uniform(size=m), r_mean * 0.55, 4.0, fib_dir + rng.normal(0, 0.2, m), hyper * 0.7)
    else:  # mucinous carcinoma: large mucin pools with small floating clusters of tumour cells
        target = float(rng.uniform(0.5, 0.8))
        field = _smooth_noise(rng, (res, res), 0.12 * px) + 0.25 * _smooth_noise(rng, (res, res), 0.04 * px)
        pool = field > np.quantile(field, 1 - target)
        mucin_fraction = float(pool.mean())
        wisp = _smooth_noise(rng, (res, res), 0.012 * px)
        c_m = np.where(pool, 0.45 + 0.08 * wisp, c_m)
        c_e = np.where(pool, 0.06 + 0.03 * np.clip(wisp, 0, None), c_e)
        c_h = np.where(pool, 0.1 + 0.03 * wisp, c_h)
        # clusters sit deep inside pools (distance transform), rings or strips of 4-10 cells
        inner = ndimage.distance_transform_edt(pool) / res
        cand = np.flatnonzero((inner > 0.05).ravel())
        n_clusters = int(rng.integers(3, 7))
        for flat in rng.choice(cand, size=min(n_clusters, cand.size), replace=False) if cand.size else []:
            ccy, ccx = (flat // res + 0.5) / res, (flat % res + 0.5) / res
            m = int(rng.integers(4, 10))
            rad = 0.025 + 0.006 * m
            d2 = (y - ccy) ** 2 + (x - ccx) ** 2
            blob = d2 < (rad + r_mean) ** 2
            c_e = np.where(blob, 0.6, c_e)  # tumour cell cytoplasm
            c_m = np.where(blob, 0.0, c_m)
            c_h = np.where(blob, 0.12, c_h)
            for j in range(m):
                ang = 2 * math.pi * j / m + rng.normal(0, 0.15)
                rr = rad * rng.uniform(0.6, 1.0)
                r = r_mean * float(np.clip(1 + prior["pleo"] * rng.normal(), 0.5, 1.8))
                add(
                    ccy + rr * math.sin(ang),
                    ccx + rr * math.cos(ang),
                    r,
                    prior["elong"],
                    ang,
                    hyper * rng.uniform(0.85, 1.15),
                )
        for _ in range(int(rng.integers(4, 10))):  # fibroblasts in the thin septa
            p = rng.uniform(0, 1, 2)
            if not pool[int(p[0] * res), int(p[1] * res)]:
                add(p[0], p[1], r_mean * 0.5, 4.0, rng.uniform(0, math.pi), hyper * 0.7)

    # Stamp nuclei into the instance mask and a hematoxylin density map.
    nuc = np.concatenate(nuclei + [np.zeros((0, 6))]) * np.array([px, px, px, px, 1, 1])
    mask, dens = _stamp_nuclei(nuc, res)
    n_nuclei = int(mask.max())
    nucleoli: list[tuple[float, float]] = []
    if label == "adenocarcinoma" and len(nuc):
        big = np.flatnonzero((nuc[:, 2] > 1.5) & (rng.random(len(nuc)) < 0.4))
        nucleoli = [(float(nuc[i, 0]), float(nuc[i, 1])) for i in big]
    # chromatin texture inside nuclei
    chrom = 1 + 0.15 * _smooth_noise(rng, (res, res), 0.5)
    nuc_h = dens * chrom
    c_h = np.maximum(c_h, np.minimum(nuc_h, 1.05))  # saturate: hyperchromatic nuclei stay purple, not black
    c_e = np.where(dens > 0.3, c_e * 0.5, c_e)
    for ny, nx in nucleoli:  # prominent (eosinophilic) nucleoli of carcinoma cells
        iy, ix = min(int(ny), res - 1), min(int(nx), res - 1)
        c_h[iy, ix] *= 0.6
        c_e[iy, ix] += 0.5

    # Beer-Lambert mixing: OD = c_H v_H + c_E v_E + c_M v_M, transmitted intensity exp(-OD).
    v_h, v_e = np.array(stain["v_h"]), np.array(stain["v_e"])
    od = (
        (c_h * stain["h_scale"] * 1.45)[..., None] * v_h
        + (np.clip(c_e, 0, None) * stain["e_scale"] * 1.1)[..., None] * v_e
        + (np.clip(c_m, 0, None) * 0.6)[..., None] * _V_M
        + 0.03
    )
    od = ndimage.gaussian_filter(od, sigma=(0.004 * px, 0.004 * px, 0))
    rgb = 255.0 * np.exp(-od) + noise * rng.normal(0, 3.0, od.shape)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")

    # Fluorescence-like nuclei channel (DAPI): bright blurred nuclei on a dark, noisy background.
    fl = ndimage.gaussian_filter(dens / max(hyper, 1e-3), 0.006 * px + 0.4)
    gain = float(rng.uniform(0.75, 1.0))
    fl = 255.0 * (0.04 + gain * np.clip(fl, 0, 1.2) / 1.2 * (1 + 0.1 * chrom - 0.1)) + noise * rng.normal(
        0, 4.0, fl.shape
    )
    condition = Image.fromarray(np.clip(np.rint(fl), 0, 255).astype(np.uint8), "L")

    areas = np.bincount(mask.ravel(), minlength=n_nuclei + 1)[1:] if n_nuclei else np.zeros(0)
    gland_irreg = float(np.mean([sum(abs(a) for _, a, _ in g["harm"]) for g in glands])) if glands else 0.0
    attributes = {
        "label": label,
        "n_nuclei": n_nuclei,
        "nuclear_area_fraction": round(float((mask > 0).mean()), 4),
        "nuclear_area_mean_px": round(float(areas.mean()) if n_nuclei else 0.0, 3),
        "nuclear_area_cv": round(float(areas.std() / areas.mean()) if n_nuclei else 0.0, 4),
        "n_glands": len(glands),
        "gland_irregularity": round(gland_irreg, 4),
        "gland_regularity": round(1.0 / (1.0 + 5 * gland_irreg), 4),
        "lumen_fraction": round(float(lumen.mean()), 4),
        "nuclear_crowding": prior["crowd"],
        "pseudostratified": label == "adenoma",
        "nuclear_elongation": prior["elong"],
        "pleomorphism": prior["pleo"],
        "hyperchromasia": round(hyper, 4),
        "prominent_nucleoli": len(nucleoli),
        "mucin_fraction": round(mucin_fraction, 4),
        "stain": {k: (np.round(v, 4).tolist() if isinstance(v, list) else round(v, 4)) for k, v in stain.items()},
    }
    return image, mask, condition, attributes


# ----------------------------------------------------------------------------------------------
# chest radiograph


def _smoothstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _render_cxr(
    label: str, rng: np.random.Generator, res: int, noise: float = 1.0
) -> tuple[Image.Image, np.ndarray, None, dict[str, Any]]:
    if label not in CXR_CLASSES:
        raise ValueError(f"label: {label!r} is not a cxr class {CXR_CLASSES}")
    y, x = _grid(res)
    px = float(res)
    # patient pose / size variation
    s = float(rng.uniform(0.94, 1.04))
    mx = 0.5 + float(rng.normal(0, 0.012))
    x = (x - mx) / s + 0.5
    y = (y - 0.5 - float(rng.normal(0, 0.012))) / s + 0.5
    ax = np.abs(x - 0.5)

    # body silhouette (soft tissue) narrowing to the neck at the top
    shoulder = _smoothstep(0.0, 0.26, y)
    body_hw = 0.1 + 0.37 * shoulder**0.7
    body = _smoothstep(0.0, 0.02, body_hw - ax)
    img = 0.06 + 0.42 * body

    thorax_w = float(rng.uniform(0.72, 0.78))  # inner rib-cage width at its widest
    apex = float(rng.uniform(0.1, 0.14))
    base_r = float(rng.uniform(0.76, 0.8))  # right hemidiaphragm (image left) sits higher
    base_l = base_r + float(rng.uniform(0.01, 0.03))
    dome = float(rng.uniform(0.06, 0.1))
    med_hw = 0.05
    lungs = []
    diaph = np.zeros_like(x)
    for sgn, base in ((-1, base_r), (1, base_l)):
        half = med_hw + (thorax_w / 2 - med_hw) * np.sqrt(
            np.clip((y - apex) / 0.32, 0, 1) * (2 - np.clip((y - apex) / 0.32, 0, 1))
        )
        lateral = half
        mid = (med_hw + thorax_w / 2) / 2
        t = (ax - mid) / (thorax_w / 2 - mid + 1e-6)
        y_d = base - dome * np.clip(1 - t**2, 0, 1)  # dome peaks mid-lung, deep sharp lateral recess
        side = (x - 0.5) * sgn > 0
        apex_round = (ax - med_hw - 0.12) ** 2 / 0.12**2 + (y - apex - 0.08) ** 2 / 0.08**2 < 1
        lung = side & ((y > apex + 0.08) | apex_round) & (ax > med_hw) & (ax < lateral) & (y < y_d)
        lungs.append(lung)
        diaph = np.where(side, y_d, diaph)
    lung_r, lung_l = lungs
    lung_any = lung_r | lung_l

    # lung fields: dark air with vascular markings brighter towards the hila
    vessels = _smooth_noise(rng, (res, res), 0.012 * px)
    hilum = np.exp(-((ax - 0.11) ** 2 + (y - 0.42) ** 2) / (2 * 0.07**2))
    lung_val = 0.14 + 0.05 * vessels * (0.4 + hilum) + 0.16 * hilum
    img = np.where(lung_any, lung_val, img)
    # abdomen below the diaphragm (bright soft tissue) with a gastric air bubble under the left dome
    below = (y >= diaph) & (ax < thorax_w / 2 + 0.02)
    img = np.where(below, np.maximum(img, 0.5), img)
    gb = ((x - 0.5 - 0.14) / 0.06) ** 2 + ((y - base_l - 0.05) / 0.035) ** 2 < 1
    img = np.where(gb & below, img - 0.2, img)
    # mediastinum, trachea and spine
    med = (ax < med_hw + 0.005) & (y < base_r) & (y > 0.03)
    img = np.where(med, 0.56 + 0.06 * _smoothstep(0.1, 0.5, y), img)
    trachea = (ax < 0.014) & (y > 0.02) & (y < 0.33)
    img = np.where(trachea, img - 0.15, img)
    vert = (ax < 0.035) & (np.cos(2 * np.pi * y / 0.05) > 0.6)
    img = img + 0.05 * vert

    # cardiac silhouette: width = CTR x thoracic width, two thirds of it left of the midline (image right)
    ctr_ranges = {"cardiomegaly": (0.57, 0.68)}
    ctr = float(rng.uniform(*ctr_ranges.get(label, (0.4, 0.48))))
    heart_w = ctr * thorax_w
    hc = 0.5 + 0.15 * heart_w
    hh = float(rng.uniform(0.15, 0.18)) * (1 + 0.6 * (ctr - 0.44))
    hy = base_r - dome - 0.01  # widest at the level of the domes, lower part merging with the diaphragm
    heart = (((x - hc) / (heart_w / 2)) ** 2 + ((y - hy) / hh) ** 2 < 1) & (y < base_l + 0.02)
    img = np.where(heart, 0.66 + 0.02 * vessels, img)

    # ribs (posterior arcs falling laterally) and clavicles, faint over lungs
    phase = (y - 0.9 * (ax - 0.05) ** 2 * 2.2) / 0.075
    ribs = _smoothstep(0.55, 0.85, np.cos(2 * np.pi * phase)) * (ax > 0.05) * (y > 0.1) * (ax < thorax_w / 2 + 0.02)
    img = img + 0.07 * ribs * (lung_any | (body > 0.5) & ~heart & ~med & (y < diaph))
    clav_y = 0.13 - 0.12 * (ax - 0.05)
    clav = (np.abs(y - clav_y) < 0.012) & (ax > 0.04) & (ax < 0.3)
    img = img + 0.12 * clav

    finding = np.zeros_like(lung_any)
    attrs: dict[str, Any] = {
        "label": label,
        "ctr": round(ctr, 4),
        "thoracic_width": round(thorax_w * s, 4),
        "heart_width": round(heart_w * s, 4),
        "effusion_side": "none",
        "effusion_height": 0.0,
        "meniscus": 0.0,
        "cp_angle_blunted": [],
        "opacity_side": "none",
        "opacity_zone": "none",
        "opacity_size": 0.0,
        "opacity_density": 0.0,
    }
    if label == "pleural_effusion":
        side = ["right", "left", "bilateral"][int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
        height = float(rng.uniform(0.12, 0.24))
        men = float(rng.uniform(0.06, 0.12))
        for sgn, lung, base, name in ((-1, lung_r, base_r, "right"), (1, lung_l, base_l, "left")):
            if side not in (name, "bilateral"):
                continue
            lat = np.clip((ax - med_hw) / (thorax_w / 2 - med_hw), 0, 1)
            surface = base - height - men * lat**2  # concave meniscus climbing the lateral wall
            fluid_y = _smoothstep(-0.02, 0.02, y - surface)
            region = ((x - 0.5) * sgn > 0) & (ax < thorax_w / 2 + 0.005) & (ax > med_hw) & (y < base + 0.03)
            fluid = fluid_y * region
            img = np.maximum(img, np.where(region, 0.14 + 0.46 * fluid, 0))
            finding |= (fluid > 0.5) & (lung | (y < base + 0.03) & region)
            attrs["cp_angle_blunted"].append(name)
        attrs.update(effusion_side=side, effusion_height=round(height, 4), meniscus=round(men, 4))
    elif label == "pneumonia":
        name = ["right", "left"][int(rng.integers(2))]
        zone = ["upper", "middle", "lower"][int(rng.integers(3))]
        lung = lung_r if name == "right" else lung_l
        cy = {"upper": 0.28, "middle": 0.45, "lower": 0.6}[zone] + float(rng.normal(0, 0.02))
        cx = 0.5 + (-1 if name == "right" else 1) * float(rng.uniform(0.18, 0.27))
        size = float(rng.uniform(0.08, 0.12))
        dens = float(rng.uniform(0.3, 0.45))
        env = np.exp(-((x - cx) ** 2 / (1.3 * size) ** 2 + (y - cy) ** 2 / size**2))
        patch = env * (0.75 + 0.35 * _smooth_noise(rng, (res, res), 0.015 * px))
        opacity = np.clip((patch - 0.25) / 0.5, 0, 1) * (lung & ~heart)  # airspace only, not behind the heart
        img = img + dens * opacity
        finding = opacity > 0.35
        attrs.update(opacity_side=name, opacity_zone=zone, opacity_size=round(size, 4), opacity_density=round(dens, 4))

    # exposure (gamma / contrast), detector blur and noise
    gamma = float(np.exp(noise * rng.normal(0, 0.12)))
    contrast = 1 + noise * float(rng.uniform(-0.1, 0.1))
    img = ndimage.gaussian_filter(np.clip(img, 0, 1), 0.006 * px + 0.35)
    img = np.clip(img, 0, 1) ** gamma * contrast + noise * rng.normal(0, 0.018, img.shape)
    image = Image.fromarray(np.clip(np.rint(255 * img), 0, 255).astype(np.uint8), "L")
    attrs.update(exposure_gamma=round(gamma, 4), exposure_contrast=round(contrast, 4))

    mask = np.zeros((res, res), np.uint16)
    mask[lung_r] = CXR_REGIONS["lung_right"]
    mask[lung_l] = CXR_REGIONS["lung_left"]
    mask[heart] = CXR_REGIONS["heart"]
    mask[finding] = CXR_REGIONS["finding"]
    return image, mask, None, attrs


# ----------------------------------------------------------------------------------------------
# public API


# The findings an independent reader can measure on an image, per modality (issue 20): the oracle
# (craft.evaluate.oracle) learns a regression head per name, so a report can say WHICH finding a
# generator gets wrong, not only whether the class reads. Values come from ``render_one``'s attributes.
FINDING_ATTRIBUTES = {
    "histo": ("nuclear_density", "gland_regularity", "mucin_fraction"),
    "cxr": ("cardiothoracic_ratio", "costophrenic_blunting", "opacity_presence"),
}


def finding_values(modality: str, attrs: dict[str, Any]) -> list[float]:
    """The ``FINDING_ATTRIBUTES`` of one rendered image, from its attribute dict (``render_one``'s 4th output).

    histo: nuclear density = nuclear area fraction; gland regularity = 1 / (1 + 5 * outline harmonic
    amplitude) (1 where the tile has no gland); mucin fraction = share of the tile in mucin pools.
    cxr: cardiothoracic ratio; costophrenic blunting = number of blunted angles (0, 1, 2); opacity
    presence = 1 where a focal consolidation was drawn, else 0.

    >>> finding_values("cxr", {"ctr": 0.6, "cp_angle_blunted": ["left"], "opacity_size": 0.0})
    [0.6, 1.0, 0.0]
    """
    if modality == "histo":
        return [
            float(attrs["nuclear_area_fraction"]),
            float(attrs["gland_regularity"]),
            float(attrs["mucin_fraction"]),
        ]
    if modality == "cxr":
        return [float(attrs["ctr"]), float(len(attrs["cp_angle_blunted"])), float(attrs["opacity_size"] > 0)]
    raise ValueError(f"modality: {modality!r} is not one of {sorted(CLASSES)}")


def render_one(
    modality: str,
    label: str,
    rng_or_seed: np.random.Generator | int | None,
    resolution: int = 64,
    *,
    stain: dict[str, Any] | None = None,
    noise: float = 1.0,
) -> tuple[Image.Image, np.ndarray, Image.Image | None, dict[str, Any]]:
    """Draw one fresh image of ``label``: (image, uint16 mask, condition or None, attributes).

    ``condition`` is the fluorescence-like nuclei channel for histo and None for cxr. ``stain``
    (histo) fixes the patient's stain; without it one is sampled from the generator.
    """
    rng = _as_rng(rng_or_seed)
    if modality == "histo":
        return _render_histo(label, rng, resolution, stain=stain, noise=noise)
    if modality == "cxr":
        return _render_cxr(label, rng, resolution, noise=noise)
    raise ValueError(f"modality: {modality!r} is not one of {sorted(CLASSES)}")


_VAGUE = {
    "histo": [
        "pink tissue section, H&E stain",
        "histology image of colonic tissue",
        "microscopy slide, hematoxylin and eosin",
        "H&E stained tissue",
        "a tile from a pathology slide",
        "colon biopsy section",
    ],
    "cxr": ["chest x-ray", "frontal chest radiograph", "PA chest film", "radiograph of the chest", "chest xray image"],
}
_DESCRIPTORS = {
    "normal": ["regular round glands", "uniform small nuclei", "goblet cells", "orderly crypts"],
    "adenoma": ["crowded tubular glands", "elongated nuclei", "pseudostratified nuclei", "dysplastic epithelium"],
    "adenocarcinoma": ["irregular fused glands", "pleomorphic nuclei", "dark crowded nuclei", "desmoplastic stroma"],
    "mucinous_carcinoma": ["pools of mucin", "pale blue extracellular mucin", "floating tumor cell clusters"],
    "no_finding": ["clear lungs", "normal heart size", "sharp costophrenic angles"],
    "cardiomegaly": ["enlarged heart", "wide cardiac silhouette", "increased cardiothoracic ratio"],
    "pleural_effusion": ["blunted costophrenic angle", "basal opacity with meniscus", "fluid at the lung base"],
    "pneumonia": ["patchy consolidation", "focal airspace opacity", "ill-defined opacity"],
}


def weak_caption(modality: str, label: str, rng: np.random.Generator, class_rate: float, wrong_rate: float) -> str:
    """A noisy caption: names the class (``class_rate``), a wrong class (``wrong_rate``) or none.

    Stands in for the loosely matched image-text pairs of CRAFTS stage-1 pretraining (sec. 2).
    """
    classes = CLASSES[modality]
    phrases = CLASS_PHRASES[modality]
    u = rng.random()
    said = label
    parts = [str(rng.choice(_VAGUE[modality]))]
    if u < class_rate:
        parts.append(phrases[label] if rng.random() < 0.7 else label.replace("_", " "))
    elif u < class_rate + wrong_rate:
        said = str(rng.choice([c for c in classes if c != label]))
        parts.append(phrases[said])
    else:
        said = ""
    if rng.random() < 0.5:  # descriptors follow the class the caption speaks for (or the true one)
        parts.append(str(rng.choice(_DESCRIPTORS[said or label])))
    order = rng.permutation(len(parts)) if rng.random() < 0.3 else np.arange(len(parts))
    return ", ".join(parts[i] for i in order)


def _plan(cfg: DemoConfig) -> pd.DataFrame:
    """Patients, their class and split, and the image rows (no pixels)."""
    classes = CLASSES[cfg.modality]
    rng = np.random.default_rng([cfg.seed, 7])
    n_pat = math.ceil(cfg.n / cfg.images_per_patient)
    pat_class = np.array([i % len(classes) for i in range(n_pat)])
    rng.shuffle(pat_class)
    split = np.empty(n_pat, dtype=object)
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(pat_class == c))
        n_test = max(1, round(cfg.test_fraction * members.size)) if cfg.test_fraction > 0 else 0
        n_val = max(1, round(cfg.val_fraction * members.size)) if cfg.val_fraction > 0 else 0
        n_test = min(n_test, members.size - n_val - 1)
        split[members[:n_test]] = "test"
        split[members[n_test : n_test + n_val]] = "val"
        split[members[n_test + n_val :]] = "train"
    prefix = "h" if cfg.modality == "histo" else "c"
    rows = []
    for i in range(cfg.n):
        p = i // cfg.images_per_patient
        rows.append(
            {
                "image_id": f"{prefix}{i:06d}",
                "label": classes[pat_class[p]],
                "split": split[p],
                "patient_id": f"{prefix}p{p:05d}",
                "patient_idx": p,
            }
        )
    return pd.DataFrame(rows)


def generate(cfg: DemoConfig, out: Path) -> Path:
    """Write the demo dataset to ``out`` atomically (built beside it, renamed into place); return it."""
    cfg.validate()
    out = Path(out)
    plan = _plan(cfg)
    histo = cfg.modality == "histo"
    stains: dict[int, dict[str, Any]] = {}
    with atomic_dir(out) as tmp:
        for sub in ("images", "masks") + (("conditions",) if histo else ()):
            (tmp / sub).mkdir()
        records = []
        for i, row in enumerate(plan.itertuples(index=False)):
            rng = np.random.default_rng([cfg.seed, 11, i])
            stain = None
            if histo:
                if row.patient_idx not in stains:
                    stains[row.patient_idx] = _sample_stain(
                        np.random.default_rng([cfg.seed, 13, row.patient_idx]), cfg.noise
                    )
                stain = _jitter_stain(stains[row.patient_idx], rng, cfg.noise)
            image, mask, cond, attrs = render_one(
                cfg.modality, row.label, rng, cfg.resolution, stain=stain, noise=cfg.noise
            )
            iid = row.image_id
            (tmp / "images" / f"{iid}.png").write_bytes(_png_bytes(image))
            (tmp / "masks" / f"{iid}.png").write_bytes(_png_bytes(Image.fromarray(mask)))
            if cond is not None:
                (tmp / "conditions" / f"{iid}.png").write_bytes(_png_bytes(cond))
            records.append(
                {
                    "image_id": iid,
                    "image_path": f"images/{iid}.png",
                    "label": row.label,
                    "split": row.split,
                    "patient_id": row.patient_id,
                    "caption": weak_caption(
                        cfg.modality, row.label, rng, cfg.caption_class_rate, cfg.caption_wrong_rate
                    ),
                    "mask_path": f"masks/{iid}.png",
                    "condition_path": f"conditions/{iid}.png" if cond is not None else None,
                    "attributes": json.dumps(attrs, sort_keys=True),
                }
            )
        classes = CLASSES[cfg.modality]
        meta = DatasetMeta(
            name=f"demo-{cfg.modality}",
            modality=cfg.modality,
            classes=list(classes),
            resolution=cfg.resolution,
            mode="RGB" if histo else "L",
            description=(
                f"Procedural {'H&E-like colorectal tissue' if histo else 'chest-radiograph-like'} demo images. "
                + MASK_DOC[cfg.modality]
                + ("; conditions/: fluorescence-like (DAPI) nuclei channel" if histo else "")
            ),
            source=(
                f"craft.data.demo modality={cfg.modality} n={cfg.n} seed={cfg.seed} resolution={cfg.resolution} "
                f"test_fraction={cfg.test_fraction} val_fraction={cfg.val_fraction} "
                f"images_per_patient={cfg.images_per_patient} caption_class_rate={cfg.caption_class_rate} "
                f"caption_wrong_rate={cfg.caption_wrong_rate} noise={cfg.noise}"
            ),
            class_names=dict(CLASS_PHRASES[cfg.modality]),
        )
        write_meta(tmp, meta)
        write_manifest(tmp, pd.DataFrame(records))
    return out


def _jitter_stain(stain: dict[str, Any], rng: np.random.Generator, noise: float) -> dict[str, Any]:
    """Small per-image variation around the patient's stain (section thickness, staining time)."""
    out = dict(stain)
    out["h_scale"] = float(stain["h_scale"] * (1 + noise * rng.uniform(-0.06, 0.06)))
    out["e_scale"] = float(stain["e_scale"] * (1 + noise * rng.uniform(-0.08, 0.08)))
    return out


def main(cfg: DemoConfig, out: Path) -> Path:
    """Generate the dataset and log a one-line summary."""
    path = generate(cfg, out)
    df = read_manifest(path)
    counts = df.groupby("split").size().to_dict()
    log.info(
        "demo %s: %d images (%s), %d patients, %dx%d -> %s",
        cfg.modality,
        len(df),
        ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        df["patient_id"].nunique(),
        cfg.resolution,
        cfg.resolution,
        path,
    )
    return path


def class_grid(
    dataset_dir: Path, out_png: Path, per_class: int = 8, scale: int = 2, colors: int | None = None
) -> Path:
    """A PNG with one row per class: ``per_class`` images (upscaled ``scale``x nearest), class name on the left.

    ``colors`` quantises to a palette of that many colours (smaller files for documentation).
    """
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    df = read_manifest(dataset_dir).sort_values("image_id")
    mode = "L" if meta.mode == "L" else "RGB"
    tiles: list[list[Image.Image]] = []
    for label in meta.classes:
        rows = df[df["label"] == label].head(per_class)
        if rows.empty:
            raise ValueError(f"{dataset_dir}: no image of class {label!r} for the grid")
        tiles.append([Image.open(dataset_dir / p).convert(mode) for p in rows["image_path"]])
    side = max(im.width for row in tiles for im in row) * scale
    font = ImageFont.load_default()
    label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(lb, font=font)) for lb in meta.classes) + 12
    pad = 2
    grid = Image.new(mode, (label_w + per_class * (side + pad), len(tiles) * (side + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, row) in enumerate(zip(meta.classes, tiles)):
        top = r * (side + pad)
        draw.text((4, top + side // 2 - 6), label, fill="black", font=font)
        for c, im in enumerate(row):
            grid.paste(im.resize((side, side), Image.NEAREST), (label_w + c * (side + pad), top))
    if colors:
        grid = grid.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    return atomic_write_bytes(out_png, _png_bytes(grid))
