"""ControlNet evaluation against the paired real image (CRAFTS, "Structure-controllable image generation", Fig. 4).

For every test pair (condition, real H&E) the ControlNet generates one image from the condition with the
training prompt, and we measure:

- SSIM, MSE, NCC, PSNR of generated vs real (CRAFTS eqs. 22-25; ``craft.evaluate.metrics``, torchmetrics);
- domain FID (CRAFTS eq. 16, "PLIP-FID") between real and generated images in the EVALUATOR encoder's image
  embedding (``DualEncoder.encode_images``); only when an evaluator is given, otherwise the key is absent
  and ``fid_note`` says why;
- mask adherence: the share of generated nuclear pixels that lie inside the conditioning nuclear mask,
  with nuclei segmented from the output by colour deconvolution (Ruifrok & Johnston 2001: optical density
  OD = -log10(I / I0) projected on the inverse of the H/E/DAB stain matrix) and an Otsu threshold on the
  hematoxylin concentration; plus the Dice of that segmentation with the mask. Pairs without a mask
  (a fluorescence dataset without ``mask_path``) are skipped for these two; an output with no nuclear
  pixel at all has no adherence (NaN) and is counted in ``no_nuclei_rate``.

``compare({name: (controlnet_dir, base_dir), ...}, dataset_dir, out_dir)`` evaluates several ControlNets on
the same pairs (CRAFTS vs the ControlNet trained on the plain base) and writes ``metrics.json``,
``table.csv``, ``table.md``, one triplet grid PNG per run (rows: condition | real | generated) and
``report.html`` with the table and grids.
"""

from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from craft.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# Ruifrok & Johnston (2001) stain vectors (rows: hematoxylin, eosin, DAB), RGB optical densities.
RJ_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
PAIRED_KEYS = ("ssim", "mse", "ncc", "psnr")


# ---------------------------------------------------------------- nuclei segmentation


def stain_concentrations(rgb) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> stain concentrations [H, W, 3] (H, E, DAB) by Ruifrok-Johnston deconvolution.

    OD = -log10((I + 1) / 256) per channel (the +1 avoids log 0), then C = OD @ inv(M) with M the unit-norm
    stain matrix: OD = C @ M, so each pixel's optical density is decomposed into stain amounts.
    """
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {a.shape}")
    m = RJ_STAINS / np.linalg.norm(RJ_STAINS, axis=1, keepdims=True)
    od = -np.log10((a.astype(np.float64) + 1.0) / 256.0)
    return od @ np.linalg.inv(m)


def otsu_threshold(values, bins: int = 256) -> float:
    """The threshold maximising the between-class variance of a histogram of ``values`` (Otsu 1979).

    >>> round(otsu_threshold(np.r_[np.zeros(50), np.ones(50)]), 1)
    0.5
    """
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold: no finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1e-12)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    # A flat optimum (an empty gap between two modes) is split in its middle rather than at its first bin.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((edges[best[0] + 1] + edges[best[-1] + 1]) / 2)


def segment_nuclei(rgb, min_contrast: float = 0.05) -> np.ndarray:
    """Boolean nuclei mask of an H&E image: hematoxylin concentration above its Otsu threshold.

    When the hematoxylin range is below ``min_contrast`` (a flat image) nothing is called a nucleus.
    """
    h = stain_concentrations(rgb)[..., 0]
    if float(h.max() - h.min()) < min_contrast:
        return np.zeros(h.shape, bool)
    return h > otsu_threshold(h)


def mask_adherence(rgb, mask) -> float:
    """Share of the nuclear pixels segmented in ``rgb`` that lie inside ``mask`` (> 0); NaN if none are found.

    >>> img = np.full((8, 8, 3), (230, 150, 200), np.uint8); img[2:4, 2:4] = (70, 40, 140)
    >>> m = np.zeros((8, 8), np.uint16); m[2:4, 2:4] = 1
    >>> mask_adherence(img, m)
    1.0
    """
    seg = segment_nuclei(rgb)
    m = np.asarray(mask) > 0
    if seg.shape != m.shape:
        raise ValueError(f"mask shape {m.shape} differs from the image's {seg.shape}")
    n = int(seg.sum())
    return float((seg & m).sum() / n) if n else float("nan")


def mask_dice(rgb, mask) -> float:
    """Dice between the segmented nuclei of ``rgb`` and ``mask`` (> 0); 1.0 when both are empty."""
    seg = segment_nuclei(rgb)
    m = np.asarray(mask) > 0
    den = int(seg.sum() + m.sum())
    return float(2 * (seg & m).sum() / den) if den else 1.0


# ---------------------------------------------------------------- grids and report


def _to_pil(x):
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float()
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x.permute(1, 2, 0)
        x = (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    a = np.asarray(x)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def triplet_grid(conditions, reals, generated) -> list:
    """One PIL row per pair: condition | real | generated (for ``save_grid(rows, path, cols=1)``)."""
    from craft.sample import grid

    if not (len(conditions) == len(reals) == len(generated)):
        raise ValueError(f"triplet_grid: {len(conditions)} conditions, {len(reals)} reals, {len(generated)} generated")
    return [grid([_to_pil(c), _to_pil(r), _to_pil(g)], cols=3) for c, r, g in zip(conditions, reals, generated)]


def _png_b64(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- evaluation


def evaluate(controlnet_dir, base_dir, dataset_dir, split: str = "test", n: int = 32, evaluator=None,
             steps: int = 20, guidance: float = 3.0, seed: int = 0, conditioning_scale: float = 1.0,
             prompt: str = "", batch: int = 16) -> dict[str, Any]:  # fmt: skip
    """Generate from the test conditions and score against the paired real images.

    ``evaluator``: a ``DualEncoder`` or a directory/s3 prefix of one (domain FID), or None (no FID).
    Returns ``{"metrics": {...}, "per_image": DataFrame, "triplets": [PIL rows]}``.
    """
    from craft.data.conditions import PROMPTS, load_conditions, load_pil_images
    from craft.data.manifest import read_manifest
    from craft.evaluate.metrics import fid_from_embeddings, paired_image_metrics
    from craft.models.diffusion import Components, load_pipeline, model_resolution, read_lineage
    from craft.sample import controlnet_pipeline, generate_controlnet, load_controlnet

    lin = read_lineage(controlnet_dir)
    kind = lin.get("condition")
    if kind not in PROMPTS:
        raise ValueError(f"{controlnet_dir}/lineage.json: no condition kind (mask | fluorescence)")
    prompt = prompt or lin.get("prompt") or PROMPTS[kind]
    pipe = load_pipeline(base_dir)
    res = model_resolution(pipe.unet, pipe.vae)  # the UNet-implied size it was trained at (the SD 2.x VAE says 768)
    df = read_manifest(dataset_dir)
    df = df[df["split"] == split].reset_index(drop=True)
    if n:
        df = df.head(n)
    if len(df) == 0:
        raise ValueError(f"{dataset_dir}/manifest.parquet: no rows with split={split!r}")
    cond = load_conditions(dataset_dir, df, kind, res)
    reals = load_pil_images(dataset_dir, df, res)
    cpipe = controlnet_pipeline(Components.from_pipeline(pipe), load_controlnet(controlnet_dir))
    if torch.cuda.is_available():
        cpipe.to("cuda")
    gen = generate_controlnet(cpipe, cond, [prompt] * len(df), steps=steps, guidance=guidance, seed=seed,
                              conditioning_scale=conditioning_scale, batch=batch)  # fmt: skip
    real_a = np.stack([np.asarray(r) for r in reals])
    gen_a = np.stack([np.asarray(g.convert("RGB")) for g in gen])
    from craft.evaluate import metrics as M

    per = pd.DataFrame({"image_id": df["image_id"].astype(str).tolist(), "ssim": M.ssim(gen_a, real_a),
                        "mse": M.mse(gen_a, real_a), "ncc": M.ncc(gen_a, real_a), "psnr": M.psnr(gen_a, real_a)})  # fmt: skip
    metrics: dict[str, Any] = dict(paired_image_metrics(gen_a, real_a))
    adh, dice = [], []
    masks = _masks(dataset_dir, df, res)
    for g, m in zip(gen_a, masks):
        adh.append(mask_adherence(g, m) if m is not None else float("nan"))
        dice.append(mask_dice(g, m) if m is not None else float("nan"))
    per["mask_adherence"], per["mask_dice"] = adh, dice
    with_mask = [m is not None for m in masks]
    if any(with_mask):
        a = np.array(adh)[with_mask]
        metrics["mask_adherence"] = float(np.nanmean(a)) if np.isfinite(a).any() else float("nan")
        metrics["mask_dice"] = float(np.nanmean(np.array(dice)[with_mask]))
        metrics["no_nuclei_rate"] = float(np.mean(~np.isfinite(a)))
        # Reference: the same segmentation on the REAL images (how well the segmenter itself agrees).
        metrics["real_mask_adherence"] = float(np.nanmean([mask_adherence(r, m) for r, m in zip(real_a, masks)
                                                           if m is not None]))  # fmt: skip
    if evaluator is not None:
        from craft.models.encoders import DualEncoder, load_encoder

        enc = evaluator if isinstance(evaluator, DualEncoder) else load_encoder(evaluator)
        with torch.no_grad():
            er = enc.encode_images(M.as_image_tensor(real_a)).cpu().numpy()
            eg = enc.encode_images(M.as_image_tensor(gen_a)).cpu().numpy()
        metrics["fid"] = fid_from_embeddings(er, eg)
    else:
        metrics["fid_note"] = "no evaluator encoder given: domain FID not computed"
    metrics["n"] = len(df)
    metrics["condition"] = kind
    metrics["base_stage"] = lin.get("base_stage")
    return {"metrics": metrics, "per_image": per, "triplets": triplet_grid(cond, reals, gen)}


def _masks(dataset_dir, df, res: int) -> list[np.ndarray | None]:
    from PIL import Image

    out: list[np.ndarray | None] = []
    for rel in df["mask_path"].tolist():
        if rel is None or (isinstance(rel, float) and np.isnan(rel)) or str(rel) in ("", "<NA>"):
            out.append(None)
            continue
        with Image.open(Path(dataset_dir) / str(rel)) as im:
            a = np.asarray(im).astype(np.int32)
        if a.shape != (res, res):
            a = np.asarray(Image.fromarray(a).resize((res, res), Image.NEAREST))
        out.append(a)
    return out


def compare(runs: dict[str, tuple[str | os.PathLike, str | os.PathLike]], dataset_dir, out_dir, split: str = "test",
            n: int = 32, evaluator=None, steps: int = 20, guidance: float = 3.0, seed: int = 0,
            conditioning_scale: float = 1.0) -> pd.DataFrame:  # fmt: skip
    """Evaluate each ``name -> (controlnet_dir, base_dir)`` on the same pairs; write table, grids and report.

    Typical names: ``crafts-mask`` (base = stage-2 model) vs ``base-mask`` (base = stage-1 model), likewise
    for fluorescence. Returns the table (one row per run).
    """
    from craft.models.encoders import DualEncoder, load_encoder
    from craft.sample import save_grid

    if not runs:
        raise ValueError("compare: no runs given")
    if evaluator is not None and not isinstance(evaluator, DualEncoder):
        evaluator = load_encoder(evaluator)
    out = Path(out_dir)
    rows, sections = [], []
    for name, (cn, base) in runs.items():
        r = evaluate(cn, base, dataset_dir, split=split, n=n, evaluator=evaluator, steps=steps, guidance=guidance,
                     seed=seed, conditioning_scale=conditioning_scale)  # fmt: skip
        rows.append({"run": name, "controlnet": str(cn), "base": str(base), **r["metrics"]})
        g = save_grid(r["triplets"][:8], out / f"triplets-{name}.png", cols=1)
        r["per_image"].to_csv(out / f"per_image-{name}.csv.tmp", index=False)
        os.replace(out / f"per_image-{name}.csv.tmp", out / f"per_image-{name}.csv")
        sections.append((name, _png_b64(g)))
    table = pd.DataFrame(rows)
    atomic_write_json(out / "metrics.json", {r["run"]: {k: v for k, v in r.items() if k != "run"} for r in rows})
    atomic_write_bytes(out / "table.csv", table.to_csv(index=False).encode())
    cols = [c for c in ("run", "condition", "base_stage", "n", "ssim", "mse", "ncc", "psnr", "fid", "mask_adherence",
                        "mask_dice", "no_nuclei_rate", "real_mask_adherence") if c in table.columns]  # fmt: skip
    atomic_write_text(out / "table.md", markdown_table(table[cols]))
    atomic_write_text(out / "report.html", _html(table[cols], sections))
    return table


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-markdown table of ``df`` (floats to 4 decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _html(table: pd.DataFrame, sections: list[tuple[str, str]]) -> str:
    import html

    parts = ["<html><head><meta charset='utf-8'><title>ControlNet evaluation</title></head><body>",
             "<h1>ControlNet: condition | real | generated</h1>",
             "<p>CRAFTS Fig. 4 protocol: SSIM, MSE, NCC, PSNR against the paired real image; domain FID in the "
             "evaluator's embedding; mask adherence = share of generated nuclear pixels (H&amp;E deconvolution + "
             "Otsu) inside the conditioning mask.</p>",
             table.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")]  # fmt: skip
    for name, b64 in sections:
        parts.append(f"<h2>{html.escape(name)}</h2><p>rows: condition | real | generated</p>")
        parts.append(f"<img src='data:image/png;base64,{b64}' style='image-rendering:pixelated;width:480px'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def step(runs: dict[str, tuple[str, str]], dataset_dir, out_dir, profile: str, overrides: list[str],
         evaluator: str = "") -> dict[str, float]:  # fmt: skip
    """Pipeline step (KFP ``controlnet_eval_op``): compare ``runs`` with the profile's ``controlnet`` settings.

    Returns flat numeric metrics ``<run>.<metric>`` for ``Output[Metrics]``.
    """
    from craft.config import load_stage_config

    cfg = load_stage_config("controlnet", profile, list(overrides))
    table = compare(runs, dataset_dir, out_dir, split=cfg.eval_split, n=cfg.eval_images, evaluator=evaluator or None,
                    steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.loop.seed,
                    conditioning_scale=cfg.conditioning_scale)  # fmt: skip
    flat: dict[str, float] = {}
    for row in table.to_dict("records"):
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                flat[f"{row['run']}.{k}"] = float(v)
    return flat


def compare_step(crafts_controlnet, crafts_base, base_controlnet, plain_base, dataset_dir, html_path, profile: str,
                 overrides: list[str], evaluator: str = "", report_dir: str = "") -> dict[str, float]:  # fmt: skip
    """Pipeline step: the CRAFTS ControlNet (on the stage-2 model) vs the one on the plain base (stage 1).

    Runs are named ``crafts-<condition>`` / ``base-<condition>`` from the ControlNets' lineage. The
    self-contained ``report.html`` (table + embedded triplet grids) is copied to ``html_path``; the full
    report folder goes to ``report_dir`` (default: a temporary folder that is removed).
    """
    import shutil
    import tempfile

    from craft.models.diffusion import read_lineage

    runs = {}
    for tag, cn, base in (("crafts", crafts_controlnet, crafts_base), ("base", base_controlnet, plain_base)):
        runs[f"{tag}-{read_lineage(cn).get('condition', 'unknown')}"] = (str(cn), str(base))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(report_dir) if report_dir else Path(tmp) / "report"
        flat = step(runs, dataset_dir, out, profile, overrides, evaluator)
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "report.html", html_path)
    return flat
