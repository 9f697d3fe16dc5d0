"""Evaluation metrics as pure functions over arrays (CRAFT sec. 4.1.4, 4.2.2, 4.2.7, app. H; CRAFTS "Metrics").

Everything here takes numbers that the caller has already computed with the EVALUATOR encoder
(never the training critic; DESIGN.md "Model roles") and returns numbers or a table:

- per image: ``per_image_cas`` from the four primitives VDC, CCS, DD, SFS (CRAFT 4.1.4);
- tails: ``low_alignment_rate`` and ``percentile`` (CRAFT 4.2.2 / app. H, Table 14);
- fidelity: ``fid_from_embeddings`` (CRAFTS eq. 16, "PLIP-FID" in any embedding; torchmetrics),
  ``image_image_similarity`` / ``image_text_similarity`` (eqs. 17-18, "PLIP-I" / "PLIP-T" style),
  ``silhouette`` (eq. 19-21; scikit-learn);
- paired images: ``ssim``, ``mse``, ``ncc``, ``psnr`` (CRAFTS eqs. 22-25; torchmetrics);
- diversity: ``prompt_diversity`` (embedding substitute for LPIPS, see its docstring), ``pixel_diversity``;
- ``variant_table``: one row per generator variant, shaped like CRAFT Table 1 + Table 14.

How the wiring (``craft evaluate``, written later) calls this: for every variant it samples the
held-out enriched prompts, embeds images / prompts / checklists with the evaluator, computes the
primitives per image (cosines from ``craft.losses`` or ``image_text_similarity`` here, DD from the
evaluator probe's prediction), stacks them into one long ``per_image`` DataFrame with columns
``variant, image_id, label, vdc, ccs, dd, sfs`` (real images included as variant ``"real"``), and
calls ``variant_table(per_image)``. FID / similarity / silhouette are called once per variant with
that variant's embedding matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

PRIMITIVES = ("vdc", "ccs", "dd", "sfs")


# ----------------------------------------------------------------------------------------------
# CAS and its tail


def _vec(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name}: non-finite value at index {bad}")
    return a


def dd_correct(predicted, target) -> np.ndarray:
    """DD per image at evaluation time: 1.0 where the evaluator probe's prediction equals the target class.

    CRAFT 4.1.4 reports DD as the probe's classification accuracy on generated images, so its
    per-image value is this indicator and its mean over images is the accuracy.

    >>> dd_correct(["a", "b", "c"], ["a", "c", "c"]).tolist()
    [1.0, 0.0, 1.0]
    """
    p, t = np.asarray(predicted), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"predicted: shape {p.shape} differs from target {t.shape}")
    return (p == t).astype(np.float64)


def per_image_cas(vdc, ccs, dd, sfs) -> np.ndarray:
    """CAS per image: the unweighted mean of VDC, CCS, DD and SFS (CRAFT 4.1.4, "macro-average").

    >>> per_image_cas([0.2], [0.1], [1.0], [0.5]).tolist()
    [0.45]
    """
    parts = [_vec(v, n) for v, n in zip((vdc, ccs, dd, sfs), PRIMITIVES)]
    n = len(parts[0])
    for p, name in zip(parts, PRIMITIVES):
        if len(p) != n:
            raise ValueError(f"{name}: length {len(p)} differs from vdc's {n}")
    return np.mean(np.stack(parts), axis=0)


def percentile(x, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"q: {q} outside [0, 100]")
    a = _vec(x, "x")
    if a.size == 0:
        raise ValueError("x: empty")
    return float(np.percentile(a, q))


def low_alignment_threshold(real_cas, quantile: float = 0.25) -> float:
    """tau: the ``quantile`` of the REAL images' CAS (CRAFT app. H uses the 25th percentile)."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile: {quantile} outside (0, 1)")
    return percentile(real_cas, 100 * quantile)


def low_alignment_rate(generated_cas, real_cas, quantile: float = 0.25) -> float:
    """Share of generated images whose CAS lies STRICTLY below the real images' ``quantile`` (CRAFT 4.2.2, app. H).

    An image exactly at the threshold is not counted as low-alignment.

    >>> low_alignment_rate([0.1, 0.2, 0.3], [0.2, 0.2, 0.2, 0.2])
    0.3333333333333333
    """
    tau = low_alignment_threshold(real_cas, quantile)
    g = _vec(generated_cas, "generated_cas")
    if g.size == 0:
        raise ValueError("generated_cas: empty")
    return float(np.mean(g < tau))


# ----------------------------------------------------------------------------------------------
# distribution and embedding metrics


def _mat(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, d) matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: non-finite values")
    return a


class _Embeddings(torch.nn.Module):
    """The identity "feature extractor" that lets torchmetrics' FID take embeddings the caller already has."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim  # read by FrechetInceptionDistance instead of probing with a dummy image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_from_embeddings(real, gen) -> float:
    """Frechet distance between Gaussians fitted to two embedding sets (CRAFTS eq. 16, "PLIP-FID").

    ``real``, ``gen``: (n, d) embeddings from the same (evaluator) encoder. Computed by torchmetrics'
    ``FrechetInceptionDistance`` with the embeddings as its features (float64, unbiased covariances,
    Tr((S1 S2)^1/2) from the eigenvalues of S1 S2, so rank-deficient covariances with n < d need no
    regularisation). A negative result of round-off (identical sets) is clipped to 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    r, g = _mat(real, "real"), _mat(gen, "gen")
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"gen: dimension {g.shape[1]} differs from real's {r.shape[1]}")
    if len(r) < 2 or len(g) < 2:
        raise ValueError("fid_from_embeddings: need at least 2 embeddings on each side")
    fid = FrechetInceptionDistance(feature=_Embeddings(r.shape[1]))
    fid.update(torch.from_numpy(r), real=True)
    fid.update(torch.from_numpy(g), real=False)
    out = float(fid.compute())
    if not np.isfinite(out):
        raise ValueError(f"fid_from_embeddings: torchmetrics returned {out}")
    return max(out, 0.0)


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("zero-norm embedding row")
    return a / n


def paired_cosine(a, b) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) matrices (CRAFTS eqs. 17-18; CRAFT VDC/CCS/SFS)."""
    x, y = _mat(a, "a"), _mat(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"b: shape {y.shape} differs from a's {x.shape}")
    return np.sum(_unit(x) * _unit(y), axis=1)


def image_image_similarity(real_emb, gen_emb) -> float:
    """Mean cosine of each generated image with its paired real image ("PLIP-I", CRAFTS eq. 17)."""
    return float(paired_cosine(real_emb, gen_emb).mean())


def image_text_similarity(text_emb, gen_emb) -> float:
    """Mean cosine of each generated image with its conditioning text ("PLIP-T", CRAFTS eq. 18)."""
    return float(paired_cosine(text_emb, gen_emb).mean())


def silhouette(emb, labels) -> float:
    """Mean silhouette coefficient, Euclidean distance (CRAFTS eqs. 19-21), by ``sklearn.metrics.silhouette_score``.

    s(i) = (b(i) - a(i)) / max(a(i), b(i)); a(i) mean distance to the other members of i's class,
    b(i) the smallest mean distance to another class; s(i) = 0 for a singleton class.
    """
    from sklearn.metrics import silhouette_score

    x = _mat(emb, "emb")
    lab = np.asarray(labels)
    if len(lab) != len(x):
        raise ValueError(f"labels: length {len(lab)} differs from emb's {len(x)}")
    n_cls = len(np.unique(lab))
    if not 2 <= n_cls <= len(x) - 1:
        raise ValueError(f"silhouette: needs 2..n-1 classes, got {n_cls} for {len(x)} points")
    return float(silhouette_score(x, lab, metric="euclidean"))


# ----------------------------------------------------------------------------------------------
# paired-image metrics (CRAFTS eqs. 22-25)


def as_image_tensor(images) -> torch.Tensor:
    """Images -> float tensor (N, C, H, W) in [0, 1].

    Accepts a uint8 array (N, H, W) or (N, H, W, C) (scaled by 1/255), a float array of the same
    shapes already in [0, 1], or a list of PIL images (all the same size and mode).
    """
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("images: empty list")
        images = np.stack([np.asarray(im) for im in images])
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise ValueError(f"images: expected (N, H, W[, C]), got shape {a.shape}")
    if a.dtype == np.uint8:
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
    else:
        t = torch.from_numpy(a.astype(np.float32))
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError("images: float images must lie in [0, 1]")
    return t.permute(0, 3, 1, 2).contiguous()


def _pair(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    tx, ty = as_image_tensor(x), as_image_tensor(y)
    if tx.shape != ty.shape:
        raise ValueError(f"y: shape {tuple(ty.shape)} differs from x's {tuple(tx.shape)}")
    return tx, ty


def ssim(x, y) -> np.ndarray:
    """Per-pair SSIM (CRAFTS eq. 22) via torchmetrics: Gaussian window 11, sigma 1.5, data range 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    tx, ty = _pair(x, y)
    out = structural_similarity_index_measure(tx, ty, data_range=1.0, reduction="none")
    return out.double().numpy().reshape(-1)


def mse(x, y) -> np.ndarray:
    """Per-pair mean squared error on [0, 1] intensities (CRAFTS eq. 23) via torchmetrics (one output per pair)."""
    from torchmetrics.functional import mean_squared_error

    tx, ty = _pair(x, y)
    a, b = tx.double().flatten(1), ty.double().flatten(1)
    # columns are the pairs: torchmetrics' multi-output form gives one MSE per column
    out = mean_squared_error(a.T, b.T, num_outputs=len(a)) if len(a) > 1 else mean_squared_error(a[0], b[0])
    return out.reshape(-1).numpy()


def ncc(x, y) -> np.ndarray:
    """Per-pair normalised cross-correlation over all pixels and channels (CRAFTS eq. 24); 0 for a flat image.

    NCC over the pixels is Pearson's r, computed by torchmetrics' ``pearson_corrcoef`` (one column per
    pair). A flat image has no defined correlation (torchmetrics gives NaN); it scores 0 here, as before.
    """
    from torchmetrics.functional import pearson_corrcoef

    tx, ty = _pair(x, y)
    a, b = tx.double().flatten(1), ty.double().flatten(1)
    flat = (a.amax(1) == a.amin(1)) | (b.amax(1) == b.amin(1))
    keep = ~flat
    out = torch.zeros(len(a), dtype=torch.float64)
    if keep.any():
        a, b = a[keep], b[keep]
        r = pearson_corrcoef(a.T, b.T) if len(a) > 1 else pearson_corrcoef(a[0], b[0])
        out[keep] = r.reshape(-1)
    return out.numpy()


def psnr(x, y) -> np.ndarray:
    """Per-pair PSNR in dB with MAX = 1 (CRAFTS eq. 25) via torchmetrics; +inf for identical images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    tx, ty = _pair(x, y)
    out = peak_signal_noise_ratio(tx.double(), ty.double(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return out.numpy().reshape(-1)


def paired_image_metrics(x, y) -> dict[str, float]:
    """Means of SSIM, MSE, NCC and PSNR over pairs (the ControlNet evaluation of CRAFTS)."""
    p = psnr(x, y)
    return {
        "ssim": float(ssim(x, y).mean()),
        "mse": float(mse(x, y).mean()),
        "ncc": float(ncc(x, y).mean()),
        "psnr": float(np.mean(p[np.isfinite(p)])) if np.any(np.isfinite(p)) else float("inf"),
    }


# ----------------------------------------------------------------------------------------------
# diversity (CRAFT 4.2.7, "prompt-level LPIPS over 4 samples for each of 100 held-out prompts")


def _groups(prompt_ids: Sequence, n: int) -> list[np.ndarray]:
    ids = np.asarray(prompt_ids)
    if len(ids) != n:
        raise ValueError(f"prompt_ids: length {len(ids)} differs from the {n} samples")
    _, inv = np.unique(ids, return_inverse=True)
    return [np.flatnonzero(inv == g) for g in range(inv.max() + 1) if np.sum(inv == g) >= 2]


def prompt_diversity(emb, prompt_ids) -> float:
    """Mean pairwise cosine DISTANCE between samples of the same prompt, averaged over prompts.

    Kept instead of torchmetrics' LPIPS (CRAFT 4.2.7's metric): LPIPS needs torchvision's AlexNet/VGG
    backbone, whose weights torchvision downloads at run time, and torchvision's wheel does not import
    beside the CPU torch wheel (its compiled ops are missing; issue 22). So diversity is measured in the
    evaluator's image embedding (1 - cos between every two samples of one prompt); ``implementations()``
    and metrics.json say so. Higher = more diverse; 0 = identical samples (mode collapse). Prompts with
    a single sample are skipped.
    """
    x = _unit(_mat(emb, "emb"))
    groups = _groups(prompt_ids, len(x))
    if not groups:
        raise ValueError("prompt_diversity: no prompt has two or more samples")
    vals = []
    for g in groups:  # loop over prompts (few), not over pairs
        c = x[g] @ x[g].T
        iu = np.triu_indices(len(g), 1)
        vals.append(float(np.mean(1.0 - c[iu])))
    return float(np.mean(vals))


def pixel_diversity(images, prompt_ids) -> float:
    """Mean pairwise (1 - SSIM) between samples of the same prompt: a pixel-space diversity substitute.

    (MS-SSIM needs images larger than 160 px for its five scales, so plain SSIM is used at demo sizes.)
    """
    t = as_image_tensor(images)
    groups = _groups(prompt_ids, len(t))
    if not groups:
        raise ValueError("pixel_diversity: no prompt has two or more samples")
    vals = []
    for g in groups:
        i, j = np.triu_indices(len(g), 1)
        vals.append(
            float(np.mean(1.0 - ssim(t[g[i]].permute(0, 2, 3, 1).numpy(), t[g[j]].permute(0, 2, 3, 1).numpy())))
        )
    return float(np.mean(vals))


# ----------------------------------------------------------------------------------------------
# which implementation computed each metric (metrics.json "implementations", the report's table)


def _version(dist: str) -> str:
    from importlib.metadata import version

    return f"{dist} {version(dist)}"


def implementations() -> dict[str, str]:
    """{metric: implementation and version} for every metric ``craft evaluate`` reports (issue 22).

    Library calls name the library and its installed version; the few kept by hand say why in
    their own docstring and name what they were cross-checked against (tests/test_library_metrics.py).
    """
    skl, tm, npv = _version("scikit-learn"), _version("torchmetrics"), _version("numpy")
    return {
        "cas": f"craft per_image_cas: mean of VDC, CCS, DD, SFS (CRAFT 4.1.4), {npv}",
        "low_cas_rate": f"craft low_alignment_rate: share below the real P25, numpy.percentile (linear), {npv}",
        "fid": f"torchmetrics.image.fid.FrechetInceptionDistance on evaluator embeddings, {tm}",
        "image_image": f"craft paired_cosine (numpy), {npv}",
        "image_text": f"craft paired_cosine (numpy), {npv}",
        "silhouette": f"sklearn.metrics.silhouette_score (euclidean), {skl}",
        "diversity": f"craft prompt_diversity: 1 - cosine in the evaluator embedding (LPIPS unavailable offline), {npv}",
        "ssim": f"torchmetrics.functional.image.structural_similarity_index_measure, {tm}",
        "memorization_ssim": f"craft batched SSIM (craft.evaluate.memorization, kept for speed), checked against {tm}",
        "mse": f"torchmetrics.functional.mean_squared_error, {tm}",
        "ncc": f"torchmetrics.functional.pearson_corrcoef, {tm}",
        "psnr": f"torchmetrics.functional.image.peak_signal_noise_ratio, {tm}",
        "confusion_matrix": f"sklearn.metrics.confusion_matrix, {skl}",
        "bradley_terry": f"choix.ilsr_pairwise_dense, {_version('choix')}",
    }


# ----------------------------------------------------------------------------------------------
# the per-variant table (CRAFT Table 1 + Table 14)


def variant_table(per_image: pd.DataFrame, real_variant: str = "real", quantile: float = 0.25) -> pd.DataFrame:
    """One row per variant: n, mean VDC/CCS/DD/SFS/CAS (Table 1), low-CAS rate and 10th-pct CAS (Table 14).

    ``per_image`` columns: ``variant``, ``vdc``, ``ccs``, ``dd``, ``sfs`` and optionally ``cas``
    (recomputed from the primitives when absent; checked against them when present). The low-CAS
    threshold is the ``quantile`` of the rows whose variant is ``real_variant``; without real rows the
    tail columns are NaN. Row order: the real variant first, then the order of first appearance.
    """
    missing = [c for c in ("variant", *PRIMITIVES) if c not in per_image.columns]
    if missing:
        raise ValueError(f"per_image: missing column(s) {missing}")
    df = per_image.copy()
    cas = per_image_cas(df["vdc"], df["ccs"], df["dd"], df["sfs"])
    if "cas" in df.columns:
        bad = np.flatnonzero(~np.isclose(df["cas"].to_numpy(np.float64), cas, atol=1e-6))
        if bad.size:
            raise ValueError(f"per_image: row {int(bad[0])} has cas that is not the mean of vdc, ccs, dd, sfs")
    df["cas"] = cas
    real = df.loc[df["variant"] == real_variant, "cas"].to_numpy()
    tau = low_alignment_threshold(real, quantile) if real.size else float("nan")
    order = list(dict.fromkeys(df["variant"]))
    if real_variant in order:
        order.remove(real_variant)
        order.insert(0, real_variant)
    rows = []
    for v in order:
        d = df[df["variant"] == v]
        c = d["cas"].to_numpy()
        rows.append(
            {
                "variant": v,
                "n": len(d),
                **{p: float(d[p].mean()) for p in PRIMITIVES},
                "cas": float(c.mean()),
                "real_p25" if quantile == 0.25 else f"real_q{quantile:g}": tau,
                "low_cas_rate": float(np.mean(c < tau)) if real.size else float("nan"),
                "cas_p10": percentile(c, 10),
            }
        )
    return pd.DataFrame(rows)
