"""The evaluation report: a self-contained report.html plus metrics.json and per_image.parquet.

Figures are drawn with PIL (no matplotlib in the environment): the tail CDF of per-image CAS per
variant with the real-image P25 threshold (CRAFT Fig. 4 / app. H), per-class image grids, a 2-D
PCA map of embeddings coloured by class (CRAFTS Fig. 2g uses t-SNE; PCA is deterministic and
needs nothing but numpy), and the probe's confusion matrix as an HTML table. Every image is
inlined as base64, so the single HTML file is the whole report (a KFP ``Output[HTML]``).

How the wiring calls this, after computing everything with the other modules:

    figs = {"Low-alignment tail": tail_cdf_png({v: cas_v ...}, threshold=real_p25),
            "Evaluator embedding (PCA)": embedding_map_png(emb, labels)}
    grids = {"CRAFT": image_grid_png({cls: [img, ...], ...})}
    build_report(out_dir, {"Table 1 + Table 14": variant_table(per_image), ...}, figs, grids,
                 notes=[...], metrics=metrics_dict, per_image=per_image_df)
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from craft.io import atomic_write_bytes, atomic_write_json, atomic_write_text

# Colour-blind-safe qualitative palette (Okabe-Ito), cycled.
PALETTE = [
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (240, 228, 66),
    (0, 0, 0),
]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _check_png(data: bytes, name: str) -> bytes:
    if not isinstance(data, bytes | bytearray) or not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"figure {name!r}: expected PNG bytes")
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# plots


def _axes(draw, box, xr, yr, xlabel, ylabel, font, ticks=5, xfmt="{:.2f}", yfmt="{:.2f}", xticks=None):
    """Frame, ticks and labels; returns a function mapping data (x, y) to pixels."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))

    def to_px(x, y):
        px = x0 + (x - xr[0]) / (xr[1] - xr[0]) * (x1 - x0)
        py = y1 - (y - yr[0]) / (yr[1] - yr[0]) * (y1 - y0)
        return px, py

    xs = [xr[0] + k * (xr[1] - xr[0]) / ticks for k in range(ticks + 1)] if xticks is None else list(xticks)
    for xv in xs:
        px, _ = to_px(xv, yr[0])
        draw.line([(px, y1), (px, y1 + 4)], fill=(0, 0, 0))
        draw.text((px - 12, y1 + 6), xfmt.format(xv), fill=(0, 0, 0), font=font)
    for k in range(ticks + 1):
        yv = yr[0] + k * (yr[1] - yr[0]) / ticks
        _, py = to_px(xr[0], yv)
        draw.line([(x0 - 4, py), (x0, py)], fill=(0, 0, 0))
        draw.text((x0 - 44, py - 5), yfmt.format(yv), fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) / 2 - 3 * len(xlabel), y1 + 22), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, y0 - 16), ylabel, fill=(0, 0, 0), font=font)
    return to_px


def _legend(draw, names, x, y, font):
    for i, n in enumerate(names):
        c = PALETTE[i % len(PALETTE)]
        draw.rectangle([x, y + 14 * i + 2, x + 10, y + 14 * i + 11], fill=c)
        draw.text((x + 14, y + 14 * i), str(n), fill=(0, 0, 0), font=font)


def tail_cdf_png(
    cas_by_variant: Mapping[str, Sequence[float]], threshold: float, size: tuple[int, int] = (720, 420)
) -> bytes:
    """Empirical CDF of per-image CAS for each variant, with a dashed vertical line at ``threshold``
    (the real images' 25th percentile, CRAFT Fig. 4): the height where a curve crosses the line is
    that variant's low-CAS rate."""
    if not cas_by_variant:
        raise ValueError("cas_by_variant: empty")
    vals = {k: np.sort(np.asarray(v, np.float64)) for k, v in cas_by_variant.items()}
    for k, v in vals.items():
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"cas_by_variant[{k!r}]: empty or non-finite")
    lo = min(min(v[0] for v in vals.values()), threshold)
    hi = max(max(v[-1] for v in vals.values()), threshold)
    pad = 0.05 * (hi - lo or 1.0)
    xr = (lo - pad, hi + pad)
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    box = (50, 24, w - 170, h - 44)
    to_px = _axes(d, box, xr, (0.0, 1.0), "per-image CAS", "cumulative share of images", font)
    for i, (_name, v) in enumerate(vals.items()):
        c = PALETTE[i % len(PALETTE)]
        ys = np.arange(1, len(v) + 1) / len(v)
        pts = [to_px(xr[0], 0.0)]
        prev = 0.0
        for x, y in zip(v, ys):  # step function: flat, then jump at each value
            pts += [to_px(x, prev), to_px(x, y)]
            prev = y
        pts.append(to_px(xr[1], 1.0))
        d.line(pts, fill=c, width=2)
    tx, _ = to_px(threshold, 0)
    for yy in range(box[1], box[3], 8):
        d.line([(tx, yy), (tx, min(yy + 4, box[3]))], fill=(120, 120, 120), width=1)
    d.text((tx + 3, box[1] + 2), f"real P25 = {threshold:.3f}", fill=(90, 90, 90), font=font)
    _legend(d, list(vals), w - 160, 30, font)
    return png_bytes(img)


# the over-optimisation curve's series (issue 21): what reward finetuning watched, then the stage's judges
TRAINING_SIDE = {"critic_reward": "critic reward", "critic_views": "critic reward, augmented views",
                 "critic_acc": "critic probe accuracy", "referee_reward": "referee reward",
                 "referee_acc": "referee probe accuracy",
                 "critic_unheld": "critic gain not held across views"}  # fmt: skip
JUDGES = {"evaluator_cas": "evaluator CAS", "evaluator_low_alignment_rate": "evaluator low-CAS rate",
          "oracle_accuracy": "oracle accuracy"}  # fmt: skip


def overoptimisation_png(rows: Sequence[Mapping], selected_step: int | None = None, selected_label: str = "",
                         size: tuple[int, int] = (760, 620)) -> bytes:  # fmt: skip
    """Two panels over training step, each series drawn as its change since step 0 (the first reading):
    top, the TRAINING-SIDE readings of the reward stage (critic, its augmented views, the referee, on held-out
    training prompts); bottom, the EVALUATOR's CAS and the ORACLE's accuracy (evaluate stage, held-out test
    prompts). Reward hacking: the top climbs while the bottom falls. A dashed line marks ``selected_step``.
    Missing (null) values leave a gap; a series without a first value is listed as not drawn."""
    if not rows:
        raise ValueError("rows: no readings")
    steps = np.array([float(r["step"]) for r in rows])
    if np.any(np.diff(steps) <= 0):
        raise ValueError(f"rows: steps must increase, got {steps.tolist()}")
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    lo, hi = steps[0], steps[-1]
    if selected_step is not None:
        lo, hi = min(lo, selected_step), max(hi, selected_step)
    xr = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)
    every = max(1.0, float(np.ceil((hi - lo) / 6)))  # whole-step ticks, at most ~7
    xticks = np.arange(lo, hi + 0.5 * every, every) if hi > lo else [lo]
    panels = (("TRAINING SIDE (reward stage: critic / referee, held-out training prompts)", TRAINING_SIDE),
              ("EVALUATOR and ORACLE (evaluate stage, held-out test prompts)", JUDGES))  # fmt: skip
    ph = (h - 40) // 2
    for p, (title, names) in enumerate(panels):
        top = 20 + p * (ph + 20)
        series, skipped = {}, []
        for key, label in names.items():
            v = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])
            if not np.isfinite(v).any():
                continue
            if not np.isfinite(v[0]):
                skipped.append(label)
                continue
            series[label] = v - v[0]
        vals = np.concatenate([[0.0], *[s[np.isfinite(s)] for s in series.values()]])
        span = float(vals.max() - vals.min()) or 1.0
        yr = (float(vals.min()) - 0.08 * span, float(vals.max()) + 0.08 * span)
        box = (70, top + 14, w - 230, top + ph - 40)
        d.text((70, top), f"{title}: change since step 0", fill=(0, 0, 0), font=font)
        to_px = _axes(d, box, xr, yr, "training step", "", font, xfmt="{:.0f}", yfmt="{:+.3g}", xticks=xticks)
        zx0, zy = to_px(xr[0], 0.0)
        zx1, _ = to_px(xr[1], 0.0)
        d.line([(zx0, zy), (zx1, zy)], fill=(200, 200, 200))
        for i, (_label, v) in enumerate(series.items()):
            c = PALETTE[i % len(PALETTE)]
            pts = [to_px(x, y) if np.isfinite(y) else None for x, y in zip(steps, v)]
            for a, b in zip(pts, pts[1:]):
                if a is not None and b is not None:
                    d.line([a, b], fill=c, width=2)
            for q in pts:
                if q is not None:
                    d.ellipse([q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3], fill=c)
        if selected_step is not None:
            sx, _ = to_px(float(selected_step), 0.0)
            for yy in range(int(box[1]), int(box[3]), 8):
                d.line([(sx, yy), (sx, min(yy + 4, box[3]))], fill=(90, 90, 90), width=1)
            text = f"selected: step {selected_step} {selected_label}".strip()
            tx = sx + 4 if sx < (box[0] + box[2]) / 2 else sx - 4 - d.textlength(text, font=font)  # inside the frame
            d.text((tx, box[3] - 14), text, fill=(60, 60, 60), font=font)
        _legend(d, list(series) or ["(no readings)"], w - 220, top + 16, font)
        for j, label in enumerate(skipped):
            d.text((w - 220, top + 16 + 14 * (len(series) + j)), f"{label}: no step-0 value, not drawn",
                   fill=(120, 120, 120), font=font)  # fmt: skip
    return png_bytes(img)


def overoptimisation_table(rows: Sequence[Mapping], selected_step: int | None = None) -> pd.DataFrame:
    """The curve's numbers, one row per reading: step, the training-side readings, then the evaluator / oracle."""
    cols = [k for k in (*TRAINING_SIDE, *JUDGES) if any(r.get(k) is not None for r in rows)]
    out = pd.DataFrame([{"step": int(r["step"]), **{k: r.get(k) for k in cols}} for r in rows])
    out = out.rename(columns={k: f"{'[training] ' if k in TRAINING_SIDE else '[evaluate] '}{v}"
                              for k, v in {**TRAINING_SIDE, **JUDGES}.items()})  # fmt: skip
    out["note"] = [", ".join(x for x in ("selected" if int(r["step"]) == selected_step else "",
                                         "early stop" if r.get("stop") else "") if x) for r in rows]  # fmt: skip
    return out.replace({None: np.nan})


def pca_2d(emb) -> np.ndarray:
    """Project (n, d) embeddings onto their first two principal components (numpy SVD, sign-fixed)."""
    x = np.asarray(emb, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"emb: expected (n >= 2, d), got {x.shape}")
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])[:, None]  # deterministic sign
    out = x @ comps.T
    return out if out.shape[1] == 2 else np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def embedding_map_png(emb, labels, size: tuple[int, int] = (560, 420), markers=None) -> bytes:
    """Scatter of the 2-D PCA of ``emb`` coloured by ``labels``; ``markers`` (optional, bool per point)
    draws those points hollow (e.g. real images) and the rest filled (generated)."""
    xy = pca_2d(emb)
    lab = np.asarray(labels)
    if len(lab) != len(xy):
        raise ValueError(f"labels: {len(lab)} labels for {len(xy)} embeddings")
    classes = list(dict.fromkeys(lab.tolist()))
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font()
    span = lambda a: (a.min() - 0.05 * (np.ptp(a) or 1), a.max() + 0.05 * (np.ptp(a) or 1))  # noqa: E731
    to_px = _axes(d, (50, 24, w - 150, h - 44), span(xy[:, 0]), span(xy[:, 1]), "PC 1", "PC 2", font)
    hollow = np.zeros(len(xy), bool) if markers is None else np.asarray(markers, bool)
    for (x, y), c, o in zip(xy, lab.tolist(), hollow):
        px, py = to_px(x, y)
        col = PALETTE[classes.index(c) % len(PALETTE)]
        if o:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], outline=col)
        else:
            d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=col)
    _legend(d, classes, w - 140, 30, font)
    return png_bytes(img)


def _to_pil(im) -> Image.Image:
    if isinstance(im, Image.Image):
        return im.convert("RGB")
    if isinstance(im, str | Path):
        with Image.open(im) as f:
            return f.convert("RGB")
    a = np.asarray(im)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(a.squeeze()).convert("RGB")


def image_grid_png(images_by_class: Mapping[str, Sequence], per_class: int = 8, scale: int = 1) -> bytes:
    """One row per class (label on the left), up to ``per_class`` images each (PIL / array / path)."""
    rows = {k: [_to_pil(x) for x in list(v)[:per_class]] for k, v in images_by_class.items()}
    rows = {k: v for k, v in rows.items() if v}
    if not rows:
        raise ValueError("images_by_class: no images")
    tw, th = next(iter(rows.values()))[0].size
    tw, th = tw * scale, th * scale
    label_w, gap = 130, 2
    img = Image.new("RGB", (label_w + per_class * (tw + gap), len(rows) * (th + gap)), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    for r, (name, ims) in enumerate(rows.items()):
        y = r * (th + gap)
        d.text((4, y + th // 2 - 5), str(name)[:20], fill=(0, 0, 0), font=font)
        for c, im in enumerate(ims):
            img.paste(im.resize((tw, th), Image.Resampling.NEAREST), (label_w + c * (tw + gap), y))
    return png_bytes(img)


# ----------------------------------------------------------------------------------------------
# tables


def confusion_matrix(y_true, y_pred, classes: Sequence[str]) -> np.ndarray:
    """C[i, j] = images of true class i predicted as j, by ``sklearn.metrics.confusion_matrix``.

    Labels are indices into ``classes`` or names from it; a label outside ``classes`` is an error
    (scikit-learn would drop it silently).
    """
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    idx = {c: i for i, c in enumerate(classes)}

    def to_idx(v, name):
        a = np.asarray(v)
        if a.dtype.kind in "iu":
            bad = a[(a < 0) | (a >= len(classes))]
            if bad.size:
                raise ValueError(f"{name}: index {int(bad[0])} outside 0..{len(classes) - 1}")
            return a.astype(int)
        bad = [x for x in a.tolist() if x not in idx]
        if bad:
            raise ValueError(f"{name}: {bad[0]!r} is not one of {list(classes)}")
        return np.array([idx[x] for x in a.tolist()], int)

    t, p = to_idx(y_true, "y_true"), to_idx(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_pred: {len(p)} predictions for {len(t)} labels")
    return sk_confusion_matrix(t, p, labels=np.arange(len(classes))).astype(np.int64)


def confusion_table_html(matrix: np.ndarray, classes: Sequence[str]) -> str:
    """Confusion matrix as an HTML table (rows: true class, columns: predicted), cells shaded by row share."""
    m = np.asarray(matrix)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in classes)
    body = []
    for i, c in enumerate(classes):
        tot = max(int(m[i].sum()), 1)
        cells = "".join(
            f'<td style="background: rgba(0,114,178,{m[i, j] / tot:.2f})">{int(m[i, j])}</td>'
            for j in range(len(classes))
        )
        body.append(f"<tr><th>{html.escape(str(c))}</th>{cells}</tr>")
    return f'<table class="cm"><tr><th>true \\ predicted</th>{head}</tr>{"".join(body)}</table>'


def implementations_table_html(implementations: Mapping[str, str]) -> str:
    """metrics.json's ``implementations`` ({metric: implementation and version}) as an HTML table."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in implementations.items()
    )
    return f'<table class="impl"><tr><th>metric</th><th>implementation</th></tr>{rows}</table>'


# ----------------------------------------------------------------------------------------------
# outputs


def write_metrics(out_dir: str | Path, metrics: Mapping) -> Path:
    """metrics.json, atomically; NaN / inf become null (JSON has no NaN)."""

    def clean(o):
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if isinstance(o, np.generic):
            o = o.item()
        if isinstance(o, float) and not math.isfinite(o):
            return None
        return o

    return atomic_write_json(Path(out_dir) / "metrics.json", clean(dict(metrics)))


def write_per_image(out_dir: str | Path, per_image: pd.DataFrame) -> Path:
    """per_image.parquet, atomically (serialised in memory, then temp file + rename)."""
    buf = io.BytesIO()
    per_image.to_parquet(buf, index=False)
    return atomic_write_bytes(Path(out_dir) / "per_image.parquet", buf.getvalue())


_CSS = """body{font-family:sans-serif;margin:24px;max-width:1200px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f4f4f4}
img{max-width:100%;border:1px solid #ddd}h2{margin-top:28px}.notes li{margin:4px 0}"""


def _img_tag(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def build_report(
    out_dir: str | Path,
    tables: Mapping[str, pd.DataFrame | str],
    figures: Mapping[str, bytes] | None = None,
    grids: Mapping[str, str | Path | bytes] | None = None,
    notes: Sequence[str] = (),
    *,
    title: str = "craft evaluation report",
    metrics: Mapping | None = None,
    per_image: pd.DataFrame | None = None,
    float_format: str = "{:.4f}",
    implementations: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and, when given, metrics.json and per_image.parquet.

    ``tables``: {heading: DataFrame or ready HTML (e.g. ``confusion_table_html``)}; ``figures``:
    {heading: PNG bytes}; ``grids``: {heading: PNG path or bytes}; ``notes``: plain-text bullets
    (escaped); ``implementations``: {metric: implementation and version}, shown as the last table.
    Returns the report path.
    """
    out = Path(out_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")
    if notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    for name, t in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if isinstance(t, pd.DataFrame):
            parts.append(t.to_html(index=False, float_format=float_format.format, na_rep="-", border=0))
        elif isinstance(t, str):
            parts.append(t)
        else:
            raise ValueError(f"tables[{name!r}]: expected a DataFrame or an HTML string")
    if implementations:
        parts.append(f"<h2>Metric implementations</h2>{implementations_table_html(implementations)}")
    for name, data in (figures or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>{_img_tag(_check_png(data, name), name)}")
    for name, src in (grids or {}).items():
        data = src if isinstance(src, bytes | bytearray) else Path(src).read_bytes()
        parts.append(f"<h2>{html.escape(name)}</h2>{_img_tag(_check_png(data, name), name)}")
    parts.append("</body></html>\n")
    if metrics is not None:
        write_metrics(out, metrics)
    if per_image is not None:
        write_per_image(out, per_image)
    return atomic_write_text(out / "report.html", "".join(parts))


# ----------------------------------------------------------------------------------------------
# ground-truth oracle: its calibration and what its finding readers say (issue 20)


def oracle_calibration_tables(oracle_block: Mapping, variants: Mapping[str, Mapping]) -> dict[str, pd.DataFrame]:
    """Report tables of the demo oracle: its calibration table (always, so a refusal shows why), its
    finding readers' R^2 on fresh renders and, when it scored, each variant's finding deviations.

    ``oracle_block``: metrics.json's "oracle" ({"status", "calibration": {"rows", "readers", "passed"},
    "error"?}); ``variants``: metrics.json's "variants" (their "oracle_findings" where scored).
    """
    cal = oracle_block["calibration"]
    status = "PASSED" if cal["passed"] else f"FAILED, the oracle refuses to score: {oracle_block.get('error', '')}"
    rows = [{"input": r["row"], "kind": r["kind"], "accuracy": r["accuracy"], "rule": r["rule"],
             "result": {True: "pass", False: "FAIL", None: "shown"}[r["passed"]]} for r in cal["rows"]]  # fmt: skip
    out = {f"Oracle calibration on fresh renders (chance {cal['chance']:.2f}): {status}": pd.DataFrame(rows)}
    out["Oracle finding readers on fresh renders (R^2 against the renderer's values)"] = pd.DataFrame(
        [{"finding": r["finding"], "R^2 clean": r["r2_clean"], "R^2 blur radius 2": r["r2_blur_r2"],
          "MAE clean": r["mae_clean"]} for r in cal["readers"]]
    )  # fmt: skip
    found = {v: d["oracle_findings"] for v, d in variants.items() if d.get("oracle_findings")}
    if found:
        names = list(next(iter(found.values()))["mean_abs_z"])
        out["Which finding does each generator get wrong? Oracle readings vs real renders (mean |z| over classes)"] = (
            pd.DataFrame(
                [{"method": v, **{f"|z| {nm}": f["mean_abs_z"][nm] for nm in names},
                  "worst finding": f"{f['worst']['finding']} in {f['worst']['class']}",
                  "read": f["worst"]["generated"], "real": f["worst"]["reference"], "z": f["worst"]["z"]}
                 for v, f in found.items()]
            )
        )  # fmt: skip
    return out
