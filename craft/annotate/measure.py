"""Measurements of an image itself, for the offline annotation backend (no model involved).

Histology: colour deconvolution into hematoxylin / eosin optical densities (Ruifrok and Johnston's
stain vectors), nuclear-cluster blobs, lumen, mucin and stroma shares, edge density.
Chest radiographs: lung fields as the two largest dark regions inside the body, the
cardiothoracic ratio from the gap between the medial lung edges, per-side basal brightness
(fluid at a lung base), and focal consolidation as holes in a lung's dark field.
Sides are the patient's: image left is the patient's right on a frontal radiograph.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

# Ruifrok & Johnston (2001) optical-density vectors for hematoxylin and eosin; third = residual.
_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
_RES = np.cross(_HE[0], _HE[1])
_UNMIX = np.linalg.inv(np.vstack([_HE, _RES / np.linalg.norm(_RES)]))


def measure_histo(path: str | os.PathLike) -> dict[str, float]:
    """Stain, nuclear and texture statistics of an H&E tile (fractions are shares of the tile's pixels)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    od = -np.log((rgb + 1.0) / 256.0)  # Beer-Lambert optical density per channel
    conc = (od.reshape(-1, 3) @ _UNMIX).reshape(rgb.shape)
    h, e = conc[..., 0], conc[..., 1]
    r, g, b = (rgb[..., i] / 255.0 for i in range(3))
    gray = rgb.mean(2) / 255.0
    sat = (rgb.max(2) - rgb.min(2)) / 255.0
    nuclei = ndimage.binary_opening(h > 0.55)
    lab, n = ndimage.label(nuclei)
    areas = np.bincount(lab.ravel())[1:] if n else np.zeros(0)
    areas = areas[areas >= 3]
    lumen = (gray > 0.88) & (sat < 0.08)
    mucin = (b - r > 0.02) & (gray > 0.55) & (gray <= 0.88) & ~nuclei
    stroma = (r - b > 0.04) & (r - g > 0.08) & ~nuclei
    edges = np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1)) > 0.5
    return {
        "hematoxylin_fraction": float(nuclei.mean()),
        "nuclear_clusters": float(len(areas)),
        "cluster_mean_area_px": float(areas.mean()) if len(areas) else 0.0,
        "cluster_area_cv": float(areas.std() / areas.mean()) if len(areas) else 0.0,
        "lumen_fraction": float(lumen.mean()),
        "mucin_fraction": float(mucin.mean()),
        "stroma_fraction": float(stroma.mean()),
        "edge_density": float(edges.mean()),
        "mean_hematoxylin_od": float(h.mean()),
        "mean_eosin_od": float(e.mean()),
    }


def _lung_fields(sm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the image-left and image-right lung fields (two largest dark regions in the body)."""
    H, W = sm.shape
    body = ndimage.binary_fill_holes(sm > 0.5 * np.percentile(sm, 99))
    if not body.any():
        raise ValueError("no body region found (image is blank or not a radiograph)")
    dark = (sm < np.median(sm[body]) - 0.05) & body
    dark[: int(0.1 * H)] = False
    lab, n = ndimage.label(dark)
    if n < 2:
        raise ValueError(f"found {n} dark lung region(s), need two")
    sizes = ndimage.sum(dark, lab, index=range(1, n + 1))
    a, b = (lab == k for k in np.argsort(sizes)[::-1][:2] + 1)
    return (a, b) if np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean() else (b, a)


def measure_cxr(path: str | os.PathLike) -> dict[str, Any]:
    """Cardiothoracic ratio, basal density per side and focal consolidation of a frontal radiograph."""
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0
    H, W = img.shape
    sm = ndimage.gaussian_filter(img, sigma=max(1.0, W / 96))
    left_img, right_img = _lung_fields(sm)
    lungs = left_img | right_img
    ys, xs = np.nonzero(lungs)
    thorax = xs.max() - xs.min() + 1
    y0, y1 = ys.min(), ys.max()
    # Cardiothoracic ratio: widest gap between the medial lung edges over the lower lung rows
    # (90th percentile, rows where both lungs are present), over the widest lung-to-lung span.
    gaps = []
    for y in range(int(y0 + 0.4 * (y1 - y0)), int(y0 + 0.95 * (y1 - y0))):
        lx, rx = np.nonzero(left_img[y])[0], np.nonzero(right_img[y])[0]
        if len(lx) > 0.08 * thorax and len(rx) > 0.08 * thorax:
            gaps.append(rx.min() - lx.max() - 1)
    ctr = float(np.percentile(gaps, 90) / thorax) if gaps else float("nan")
    out: dict[str, Any] = {"cardiothoracic_ratio": ctr, "thoracic_width": float(thorax / W)}
    for side, m in (("right", left_img), ("left", right_img)):  # patient side
        yy, xx = np.nonzero(m)
        env = np.zeros_like(m)
        env[yy.min() : y1 + 1, xx.min() : xx.max() + 1] = True  # the side's box down to the lower lung base
        rows = np.nonzero(env.any(1))[0]
        span = rows.max() - rows.min()
        base, top = env.copy(), env.copy()
        base[: rows.min() + int(0.75 * span)] = False
        top[rows.min() + int(0.5 * span) :] = False
        filled = ndimage.binary_fill_holes(ndimage.binary_closing(m, iterations=2))
        hole = filled & ~m  # bright islands inside a dark lung: focal consolidation
        hy = (np.nonzero(hole)[0].mean() - y0) / max(1, y1 - y0) if hole.any() else float("nan")
        out[f"{side}_basal_brightness"] = float(sm[base].mean())
        out[f"{side}_apical_brightness"] = float(sm[top].mean())
        out[f"{side}_lung_height"] = float((yy.max() - yy.min() + 1) / H)
        out[f"{side}_consolidation_fraction"] = float(hole.sum() / max(1, filled.sum()))
        out[f"{side}_consolidation_height"] = float(hy)  # 0 = lung apex, 1 = lowest lung row
    out["left_right_brightness_difference"] = float(sm[right_img].mean() - sm[left_img].mean())
    return out
