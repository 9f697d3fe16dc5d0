"""Memorization search: pixel near-duplicates and feature-space nearest neighbours (CRAFT app. M).

Two tests for every generated image against the whole training set:

1. Pixel space. SSIM >= ``ssim_threshold`` (0.95 in CRAFT) and pHash Hamming distance <=
   ``phash_threshold`` count as near-duplicates. pHash is computed here (DCT of a 32x32 grey
   thumbnail, ``scipy.fft.dct``; bit-identical to ``imagehash.phash``, see the tests), packed into
   uint64 words, and compared with XOR + popcount on whole chunks of rows at once.
   The pHash threshold symbol is lost in our copy of the CRAFT text; the default here is 8 of 64
   bits, a common near-duplicate cut, and it is a parameter.
   SSIM: by default EXACT SSIM on every (generated, training) pair, in batches of pairs. The value
   equals torchmetrics' SSIM (checked in the tests) but each image's local mean and variance are
   filtered once and reused for all its pairs, and the Gaussian window is two banded matrix
   products, so a pair costs one filtered map. For very large sets ``ssim_top_k=k`` computes exact
   SSIM only for the k training images nearest in a cheap prefilter (16x16 grey thumbnails, mean-
   removed and unit-normalised = low-resolution normalised cross-correlation, chunked matmul).
   SSIM is not a metric, so no finite k PROVES that a near-duplicate cannot hide outside the top-k;
   an image with SSIM >= 0.95 is nearly pixel-identical and so has near-maximal low-resolution NCC,
   which the tests confirm on planted copies, but the reported max SSIM of non-duplicates is then
   a lower bound. Use the exact default at demo sizes.
2. Feature space. Cosine distance from each generated embedding to its nearest training embedding
   (d_train) and nearest held-out test embedding (d_test), in an encoder independent of critic and
   evaluator (DINOv2 in CRAFT). gap = d_test - d_train: memorization shows as d_train << d_test.

Every pairwise step is a chunked matrix (or XOR) product over blocks of ``chunk`` generated rows;
there is no Python loop over pairs. ``bench/bench_memorization.py`` times it against a loop.

How the wiring calls this: per variant,
``memorization_report(gen_images, train_images, test_images, gen_emb, train_emb, test_emb)``
-> a dict of scalars for metrics.json (Table 17 + Table 18 of CRAFT), and
``memorization_per_image(...)`` -> DataFrame columns joined onto per_image.parquet.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.fft
import torch
from PIL import Image

from craft.evaluate.metrics import as_image_tensor

_LANCZOS = Image.Resampling.LANCZOS


# ----------------------------------------------------------------------------------------------
# image helpers


def _to_pil_list(images) -> list[Image.Image]:
    """uint8 array (N, H, W[, C]) / float [0, 1] array / list of PIL images -> list of PIL images."""
    if isinstance(images, list | tuple) and images and isinstance(images[0], Image.Image):
        return list(images)
    t = as_image_tensor(images)  # validates shape and range
    a = (t.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        return [Image.fromarray(x[..., 0], mode="L") for x in a]
    return [Image.fromarray(x) for x in a]


# ----------------------------------------------------------------------------------------------
# pHash


def phash_bits(images, hash_size: int = 8, highfreq_factor: int = 4) -> np.ndarray:
    """Perceptual hash bits (N, hash_size**2) as bool, row-major like ``imagehash.phash(...).hash``.

    Grey (PIL "L"), Lanczos resize to (hash_size * highfreq_factor)^2, 2-D DCT-II, keep the top-left
    hash_size x hash_size low frequencies, bit = coefficient > their median. The per-image resize
    is O(N); the DCT runs on the whole stack at once.
    """
    if hash_size < 2:
        raise ValueError(f"hash_size: {hash_size} must be >= 2")
    size = hash_size * highfreq_factor
    pix = np.stack([np.asarray(im.convert("L").resize((size, size), _LANCZOS)) for im in _to_pil_list(images)])
    dct = scipy.fft.dct(scipy.fft.dct(pix.astype(np.float64), axis=1), axis=2)
    low = dct[:, :hash_size, :hash_size].reshape(len(pix), -1)
    med = np.median(low, axis=1, keepdims=True)
    return low > med


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, ceil(B / 64)) uint64 (zero padded), for XOR/popcount Hamming distances."""
    bits = np.asarray(bits, dtype=bool)
    n, b = bits.shape
    words = -(-b // 64)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :b] = bits
    return np.packbits(padded, axis=1).view(">u8").astype(np.uint64)


def hamming_nearest(query: np.ndarray, ref: np.ndarray, threshold: int | None = None, chunk: int = 1024):
    """For each packed query hash: (min Hamming distance to ref, argmin, count of ref within ``threshold``).

    ``query`` (Nq, W) and ``ref`` (Nr, W) uint64 from ``pack_bits``. Chunked over query rows: each block
    builds an (chunk, Nr, W) XOR and ``np.bitwise_count`` popcounts it.
    """
    q, r = np.asarray(query, np.uint64), np.asarray(ref, np.uint64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"hamming_nearest: packed shapes {q.shape} and {r.shape} do not match")
    if len(r) == 0:
        raise ValueError("ref: empty")
    dmin = np.empty(len(q), np.int64)
    arg = np.empty(len(q), np.int64)
    cnt = np.zeros(len(q), np.int64)
    for s in range(0, len(q), chunk):
        d = np.bitwise_count(q[s : s + chunk, None, :] ^ r[None, :, :]).sum(-1, dtype=np.int64)
        arg[s : s + chunk] = d.argmin(1)
        dmin[s : s + chunk] = d.min(1)
        if threshold is not None:
            cnt[s : s + chunk] = (d <= threshold).sum(1)
    return dmin, arg, cnt


# ----------------------------------------------------------------------------------------------
# nearest neighbours in an embedding


def nearest_cosine_distance(query, ref, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(min cosine distance 1 - cos, argmin) from every query row to the ref rows, chunked matmul (float32)."""
    q = torch.as_tensor(np.asarray(query, np.float32))
    r = torch.as_tensor(np.asarray(ref, np.float32))
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"nearest_cosine_distance: shapes {tuple(q.shape)} and {tuple(r.shape)} do not match")
    if len(r) == 0:
        raise ValueError("ref: empty")
    q = torch.nn.functional.normalize(q, dim=1)
    r = torch.nn.functional.normalize(r, dim=1)
    best = torch.empty(len(q))
    arg = torch.empty(len(q), dtype=torch.long)
    with torch.no_grad():
        for s in range(0, len(q), chunk):
            sim = q[s : s + chunk] @ r.T
            v, i = sim.max(1)
            best[s : s + chunk], arg[s : s + chunk] = v, i
    return (1.0 - best.double()).clamp_min(0.0).numpy(), arg.numpy()


# ----------------------------------------------------------------------------------------------
# SSIM near-duplicates


def _thumb_vectors(images, size: int = 16) -> np.ndarray:
    """Grey size x size thumbnails, mean-removed and unit-normalised: dot product = low-res NCC."""
    v = np.stack(
        [np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), np.float32) for im in images]
    ).reshape(len(images), -1)
    v -= v.mean(1, keepdims=True)
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(n > 0, n, 1.0)


def _gauss_filter_matrix(n: int, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(n, n) matrix M with M @ v = Gaussian filter of v after reflect-padding by size // 2 (torchmetrics' SSIM)."""
    pad = size // 2
    d = torch.arange(size, dtype=torch.float64) - pad
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = g / g.sum()
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # output pixel i reads padded pixels i .. i + size - 1
        for t in range(size):
            src = i + t - pad
            src = -src if src < 0 else (2 * (n - 1) - src if src >= n else src)  # reflect, edge not repeated
            m[i, src] += g[t]
    return m


class _SSIMIndex:
    """SSIM of many (x, y) pairs with the per-image statistics computed once per image.

    The same quantity as torchmetrics' ``structural_similarity_index_measure`` (Gaussian window 11,
    sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1,
    reflect padding, mean over channels and all pixels; CRAFTS eq. 22), but the Gaussian filter is
    written as two matrix products A X B^T (reflection folded into A and B), and
    mu / sigma^2 of each image are reused across all of its pairs, so a pair costs one filtered
    product map instead of five.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        h, w = x.shape[-2:]
        if min(h, w) < 11:
            raise ValueError(f"images: {h}x{w} is smaller than the 11-pixel SSIM window")
        self.a, self.b = _gauss_filter_matrix(h).float(), _gauss_filter_matrix(w).float()
        self.x, self.y = x, y
        self.mx, self.vx = self._stats(x)
        self.my, self.vy = self._stats(y)
        self.c1, self.c2 = 0.01**2, 0.03**2

    def _filt(self, t: torch.Tensor) -> torch.Tensor:
        return self.a @ t @ self.b.T

    def _stats(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self._filt(t)
        return mu, (self._filt(t * t) - mu * mu).clamp_min(0.0)

    def pairs(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        mx, my = self.mx[i], self.my[j]
        cov = self._filt(self.x[i] * self.y[j]) - mx * my
        num = (2 * mx * my + self.c1) * (2 * cov + self.c2)
        den = (mx * mx + my * my + self.c1) * (self.vx[i] + self.vy[j] + self.c2)
        return (num / den).flatten(1).mean(1)


def max_ssim_to_reference(gen_images, ref_images, top_k: int | None = None, chunk: int = 256, batch: int = 1024):
    """For every generated image: (max SSIM over the reference images, index of that image).

    ``top_k=None``: exact over all pairs (in batches of ``batch`` pairs). Otherwise exact SSIM on
    the ``top_k`` references nearest in low-resolution NCC: every near-duplicate that the prefilter
    ranks in the top-k is found exactly, but the returned max for a NON-duplicate image can be lower
    than the exhaustive max (see the module docstring).
    """
    g, r = as_image_tensor(gen_images), as_image_tensor(ref_images)  # float inputs stay unquantised
    if g.shape[1:] != r.shape[1:]:
        raise ValueError(f"ref_images: shape {tuple(r.shape[1:])} differs from gen_images' {tuple(g.shape[1:])}")
    if top_k is None or top_k >= len(r):
        cand = np.broadcast_to(np.arange(len(r)), (len(g), len(r)))
    else:
        g_pil, r_pil = _to_pil_list(gen_images), _to_pil_list(ref_images)
        tg, tr = torch.from_numpy(_thumb_vectors(g_pil)), torch.from_numpy(_thumb_vectors(r_pil))
        cand = np.concatenate(
            [torch.topk(tg[s : s + chunk] @ tr.T, top_k, dim=1).indices.numpy() for s in range(0, len(g), chunk)]
        )
    index = _SSIMIndex(g, r)
    gi = torch.from_numpy(np.repeat(np.arange(len(g)), cand.shape[1]))
    ri = torch.from_numpy(np.ascontiguousarray(cand).reshape(-1))
    vals = torch.empty(len(gi), dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(gi), batch):  # batches of pairs, each one batched matrix product
            vals[s : s + batch] = index.pairs(gi[s : s + batch], ri[s : s + batch]).double()
    v = vals.numpy().reshape(len(g), -1)
    j = v.argmax(1)
    return v[np.arange(len(g)), j], cand[np.arange(len(g)), j]


# ----------------------------------------------------------------------------------------------
# the report


def memorization_per_image(
    gen_images,
    train_images,
    test_images,
    gen_emb,
    train_emb,
    test_emb,
    *,
    ssim_threshold: float = 0.95,
    phash_threshold: int = 8,
    ssim_top_k: int | None = None,
    chunk: int = 1024,
) -> pd.DataFrame:
    """Per generated image: max SSIM to train, min pHash distance, near-duplicate flags, d_train, d_test, gap.

    ``test_images`` is accepted for symmetry with the embeddings and checked for shape; the pixel
    tests run against the training set only (CRAFT app. M).
    """
    n = len(gen_emb)
    if len(gen_images) != n:
        raise ValueError(f"gen_emb: {n} rows but {len(gen_images)} generated images")
    if len(train_images) != len(train_emb):
        raise ValueError(f"train_emb: {len(train_emb)} rows but {len(train_images)} training images")
    if len(test_images) != len(test_emb):
        raise ValueError(f"test_emb: {len(test_emb)} rows but {len(test_images)} test images")
    max_ssim, ssim_idx = max_ssim_to_reference(gen_images, train_images, top_k=ssim_top_k)
    hg, ht = pack_bits(phash_bits(gen_images)), pack_bits(phash_bits(train_images))
    ph_min, ph_idx, _ = hamming_nearest(hg, ht, chunk=chunk)
    d_train, nn_train = nearest_cosine_distance(gen_emb, train_emb, chunk=chunk)
    d_test, _ = nearest_cosine_distance(gen_emb, test_emb, chunk=chunk)
    return pd.DataFrame(
        {
            "max_ssim_train": max_ssim,
            "max_ssim_train_index": ssim_idx,
            "min_phash_train": ph_min,
            "min_phash_train_index": ph_idx,
            "ssim_duplicate": max_ssim >= ssim_threshold,
            "phash_duplicate": ph_min <= phash_threshold,
            "d_train": d_train,
            "d_test": d_test,
            "nn_gap": d_test - d_train,
            "nn_train_index": nn_train,
        }
    )


def memorization_report(
    gen_images,
    train_images,
    test_images,
    gen_emb,
    train_emb,
    test_emb,
    *,
    ssim_threshold: float = 0.95,
    phash_threshold: int = 8,
    ssim_top_k: int | None = None,
    chunk: int = 1024,
) -> dict:
    """Summary for one variant: CRAFT Table 17 (counts, max SSIM) and Table 18 (mean d_train, d_test, gap)."""
    df = memorization_per_image(
        gen_images,
        train_images,
        test_images,
        gen_emb,
        train_emb,
        test_emb,
        ssim_threshold=ssim_threshold,
        phash_threshold=phash_threshold,
        ssim_top_k=ssim_top_k,
        chunk=chunk,
    )
    return {
        "n_generated": len(df),
        "ssim_duplicates": int(df["ssim_duplicate"].sum()),
        "phash_duplicates": int(df["phash_duplicate"].sum()),
        "any_duplicates": int((df["ssim_duplicate"] | df["phash_duplicate"]).sum()),
        "max_ssim": float(df["max_ssim_train"].max()),
        "min_phash_distance": int(df["min_phash_train"].min()),
        "d_train": float(df["d_train"].mean()),
        "d_test": float(df["d_test"].mean()),
        "gap": float(df["nn_gap"].mean()),
        "ssim_threshold": ssim_threshold,
        "phash_threshold": phash_threshold,
        "ssim_top_k": ssim_top_k,
    }
