"""Memorization search: pixel near-duplicates and feature-space nearest neighbours (CRAFT app. M).

Two tests for every generated image against the training set:

1. Pixel space. SSIM >= ``ssim_threshold`` (0.95 in CRAFT) and pHash Hamming distance <=
   ``phash_threshold`` count as near-duplicates. pHash is computed here (DCT of a 32x32 grey
   thumbnail, ``scipy.fft.dct``; bit-identical to ``imagehash.phash``, see the tests), packed into
   uint64 words, and compared with XOR + popcount on whole chunks of rows at once against EVERY
   training image. The pHash threshold symbol is lost in our copy of the CRAFT text; the default
   here is 8 of 64 bits, a common near-duplicate cut, and it is a parameter.
   SSIM is exact (equal to torchmetrics' SSIM, checked in the tests), but all pairs cost
   n_generated x n_train full-resolution SSIMs: hours at 512 px. So by default (``ssim_top_k=k``,
   ``DEFAULT_SSIM_TOP_K``) it is computed only for each generated image's k nearest training
   images in a cheap prefilter embedding, ``thumb16``: 16x16 grey thumbnails (channel mean, area
   pooling), mean-removed and unit-normalised, so the dot product is low-resolution normalised
   cross-correlation (the ``pixels`` embedding of ``craft.evaluate.run``); ``memorization_per_image``
   adds the image's pHash-nearest and embedding-nearest training image to its candidates.
   ``ssim_top_k="all"`` is the exhaustive search. SSIM is not a metric, so no finite k PROVES that
   a near-duplicate cannot hide outside the candidates; an image with SSIM >= 0.95 is nearly
   pixel-identical and so has near-maximal low-resolution NCC, which the tests confirm on planted
   copies (top-k finds what the exhaustive search finds), but the max SSIM of a NON-duplicate is
   then a lower bound. The report says which search ran (``ssim_search``, ``ssim_top_k``,
   ``ssim_prefilter``, ``ssim_pairs``).
   Each image's local mean and variance are filtered once per chunk and reused for all its pairs,
   and the Gaussian window is two banded matrix products, so a pair costs one filtered map. Memory
   is bounded (``mem_budget``): images are converted to float a chunk at a time, never the whole
   set. ``device=None`` runs on CUDA when there is one.
2. Feature space. Cosine distance from each generated embedding to its nearest training embedding
   (d_train) and nearest held-out test embedding (d_test), in an encoder independent of critic and
   evaluator (DINOv2 in CRAFT). gap = d_test - d_train: memorization shows as d_train << d_test.

Every pairwise step is a chunked matrix (or XOR) product over blocks of ``chunk`` generated rows;
there is no Python loop over pairs. ``bench/bench_memorization.py`` times the NN / pHash searches
against a loop; ``bench/bench_eval_scale.py`` times top-k against exhaustive SSIM.

How the wiring calls this: per variant, ``memorization_per_image(gen_images, train_images,
test_images, gen_emb, train_emb, test_emb)`` -> DataFrame columns joined onto per_image.parquet,
and ``memorization_summary(that frame)`` (or ``memorization_report(...)``, both in one call) -> a
dict of scalars for metrics.json (Table 17 + Table 18 of CRAFT).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import scipy.fft
import torch
from PIL import Image

from craft.evaluate.metrics import as_image_tensor

_LANCZOS = Image.Resampling.LANCZOS
DEFAULT_SSIM_TOP_K = 32  # training images per generated image that get an exact SSIM (see the module docstring)
EXHAUSTIVE = "all"  # ssim_top_k value for the exhaustive all-pairs SSIM search
PREFILTER = "thumb16"  # the top-k prefilter: NCC of 16x16 grey thumbnails
_PREFILTER_SIZE = 16
_CHUNK_IMAGES = 256  # images converted to float at once outside the SSIM loop
_PAIR_BUDGET_CPU = 2**25  # bytes of float maps per batch of SSIM pairs on a CPU


# ----------------------------------------------------------------------------------------------
# image helpers


def _as_array(images):
    """A list of PIL images -> one stacked array; arrays pass through (uint8 stays uint8)."""
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("images: empty list")
        return np.stack([np.asarray(im) for im in images])
    return np.asarray(images)


def _iter_pil(images, chunk: int = _CHUNK_IMAGES) -> Iterator[Image.Image]:
    """uint8 array (N, H, W[, C]) / float [0, 1] array / list of PIL images -> PIL images, a chunk at a time."""
    if isinstance(images, list | tuple) and images and isinstance(images[0], Image.Image):
        yield from images
        return
    a = _as_array(images)
    for s in range(0, len(a), chunk):
        t = as_image_tensor(a[s : s + chunk])  # validates shape and range
        u = (t.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        for x in u:
            yield Image.fromarray(x[..., 0], mode="L") if x.shape[-1] == 1 else Image.fromarray(x)


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
    pix = np.stack([np.asarray(im.convert("L").resize((size, size), _LANCZOS)) for im in _iter_pil(images)])
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


def thumbnail_vectors(images, size: int = _PREFILTER_SIZE, chunk: int = _CHUNK_IMAGES) -> torch.Tensor:
    """The ``thumb16`` prefilter (float32 rows): grey size x size area thumbnails, mean-removed, unit-normalised.

    Grey is the channel mean; the dot product of two rows is their low-resolution normalised
    cross-correlation (NCC). The same vectors as the ``pixels`` embedding of ``craft.evaluate.run``.
    """
    a = _as_array(images)
    if len(a) == 0:
        return torch.zeros(0, size * size)
    parts = []
    for s in range(0, len(a), chunk):
        t = as_image_tensor(a[s : s + chunk]).mean(1, keepdim=True)
        parts.append(torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1))
    v = torch.cat(parts)
    v = v - v.mean(1, keepdim=True)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


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


class _Gauss:
    """SSIM's Gaussian window as two matrix products A X B^T (reflection folded into A and B).

    The same quantity as torchmetrics' ``structural_similarity_index_measure`` (window 11, sigma 1.5,
    K1 = 0.01, K2 = 0.03, data range 1, reflect padding, mean over channels and pixels; CRAFTS eq. 22).
    """

    c1, c2 = 0.01**2, 0.03**2

    def __init__(self, h: int, w: int, device: torch.device):
        if min(h, w) < 11:
            raise ValueError(f"images: {h}x{w} is smaller than the 11-pixel SSIM window")
        self.a = _gauss_filter_matrix(h).float().to(device)
        self.b = _gauss_filter_matrix(w).float().to(device)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.a @ t @ self.b.T

    def stats(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local mean and variance of every image: computed once per chunk, reused for all its pairs."""
        mu = self(t)
        return mu, (self(t * t) - mu * mu).clamp_min(0.0)

    def pairs(self, x, mx, vx, y, my, vy) -> torch.Tensor:
        """SSIM of aligned rows (x[i], y[i]) from their statistics: one filtered map per pair."""
        cov = self(x * y) - mx * my
        num = (2 * mx * my + self.c1) * (2 * cov + self.c2)
        den = (mx * mx + my * my + self.c1) * (vx + vy + self.c2)
        return (num / den).flatten(1).mean(1)


def _chw(a: np.ndarray) -> tuple[int, int, int]:
    if a.ndim not in (3, 4):
        raise ValueError(f"images: expected (N, H, W[, C]), got shape {a.shape}")
    return (a.shape[3] if a.ndim == 4 else 1, a.shape[1], a.shape[2])


def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_top_k(top_k, n_ref: int) -> int | None:
    """The k of a top-k SSIM search, or None for the exhaustive one (``"all"``, None, or k >= n_ref).

    >>> resolve_top_k(32, 1000), resolve_top_k("all", 1000), resolve_top_k(32, 20)
    (32, None, None)
    """
    if top_k is None or (isinstance(top_k, str) and top_k == EXHAUSTIVE):
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"ssim_top_k: {top_k!r} must be an integer >= 1 or {EXHAUSTIVE!r}")
    return None if top_k >= n_ref else int(top_k)


def _ssim_search(gen_images, ref_images, top_k, extra_candidates, device, mem_budget: int):
    """(max SSIM, argmax reference index, number of SSIM pairs computed) per generated image."""
    g, r = _as_array(gen_images), _as_array(ref_images)
    if _chw(g) != _chw(r):
        raise ValueError(f"ref_images: shape {_chw(r)} differs from gen_images' {_chw(g)}")
    if len(r) == 0:
        raise ValueError("ref_images: empty")
    best, arg = np.full(len(g), np.nan), np.zeros(len(g), np.int64)
    if len(g) == 0:
        return best, arg, 0
    dev = _device(device)
    k = resolve_top_k(top_k, len(r))
    extra = None
    if k is not None and extra_candidates is not None:
        extra = np.asarray(extra_candidates, np.int64).reshape(len(g), -1)
        if extra.size and (extra.min() < 0 or extra.max() >= len(r)):
            raise ValueError(f"extra_candidates: indices must lie in 0..{len(r) - 1}")
    c, h, w = _chw(g)
    f = _Gauss(h, w, dev)
    map_bytes = 4 * c * h * w
    gen_chunk = int(max(1, min(512, mem_budget // (6 * map_bytes))))  # x, mu, var + temporaries
    # pairs per batch (gathered stats, products, filtered maps): on a CPU a small working set that stays in
    # cache is several times faster than big batches (bench/bench_eval_scale.py); a GPU wants big batches
    pair_budget = _PAIR_BUDGET_CPU if dev.type == "cpu" else mem_budget
    pair_batch = int(max(1, pair_budget // (14 * map_bytes)))
    ref_thumbs = thumbnail_vectors(r).to(dev) if k is not None else None
    n_pairs = 0
    with torch.no_grad():
        for s in range(0, len(g), gen_chunk):
            xg = as_image_tensor(g[s : s + gen_chunk]).to(dev)  # float inputs stay unquantised
            n = len(xg)
            if k is None:
                cand = np.broadcast_to(np.arange(len(r)), (n, len(r)))
            else:
                sim = thumbnail_vectors(g[s : s + n]).to(dev) @ ref_thumbs.T
                cand = torch.topk(sim, k, dim=1).indices.cpu().numpy()
                if extra is not None:
                    cand = np.concatenate([cand, extra[s : s + n]], axis=1)
                cand = np.sort(cand, axis=1)
            keep = np.ones(cand.shape, bool)
            keep[:, 1:] = cand[:, 1:] != cand[:, :-1]  # a candidate named twice is computed once
            pos = np.flatnonzero(keep)
            pi, pj = pos // cand.shape[1], cand.reshape(-1)[pos]
            order = np.argsort(pj, kind="stable")  # pairs grouped by reference: its stats once per batch
            vals = np.full(cand.size, -np.inf)
            mg, vg = f.stats(xg)
            for b in range(0, len(order), pair_batch):
                sel = order[b : b + pair_batch]
                uj, inv = np.unique(pj[sel], return_inverse=True)
                y = as_image_tensor(r[uj]).to(dev)
                my, vy = f.stats(y)
                i, j = torch.from_numpy(pi[sel]).to(dev), torch.from_numpy(inv).to(dev)
                vals[pos[sel]] = f.pairs(xg[i], mg[i], vg[i], y[j], my[j], vy[j]).double().cpu().numpy()
            v = vals.reshape(n, -1)
            best_j = v.argmax(1)
            rows = np.arange(n)
            best[s : s + n], arg[s : s + n] = v[rows, best_j], cand[rows, best_j]
            n_pairs += len(pos)
    return best, arg, n_pairs


def max_ssim_to_reference(
    gen_images,
    ref_images,
    top_k: int | str | None = DEFAULT_SSIM_TOP_K,
    *,
    extra_candidates=None,
    device=None,
    mem_budget: int = 2**29,
) -> tuple[np.ndarray, np.ndarray]:
    """For every generated image: (max SSIM over its candidate reference images, index of that image).

    ``top_k="all"`` (or None, or k >= len(ref)): every reference, exact over all pairs. Otherwise
    exact SSIM on the ``top_k`` references nearest in ``thumb16`` NCC plus the indices in the
    columns of ``extra_candidates`` (Ng, e): every near-duplicate among those is found exactly, but
    the max for a NON-duplicate image can be lower than the exhaustive max (module docstring).
    ``mem_budget``: bytes of float maps held for a chunk of generated images (and, on a GPU, per batch
    of pairs); ``device``: None = CUDA when there is one.
    """
    best, arg, _ = _ssim_search(gen_images, ref_images, top_k, extra_candidates, device, mem_budget)
    return best, arg


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
    ssim_top_k: int | str | None = DEFAULT_SSIM_TOP_K,
    chunk: int = 1024,
    device=None,
) -> pd.DataFrame:
    """Per generated image: max SSIM to train, min pHash distance, near-duplicate flags, d_train, d_test, gap.

    ``test_images`` is accepted for symmetry with the embeddings and checked for length; the pixel
    tests run against the training set only (CRAFT app. M). With a top-k SSIM search each image's
    candidates are its ``ssim_top_k`` nearest thumbnails, its pHash-nearest and its embedding-nearest
    training image. ``frame.attrs`` records the thresholds and which search ran (``memorization_summary``).
    """
    n = len(gen_emb)
    if len(gen_images) != n:
        raise ValueError(f"gen_emb: {n} rows but {len(gen_images)} generated images")
    if len(train_images) != len(train_emb):
        raise ValueError(f"train_emb: {len(train_emb)} rows but {len(train_images)} training images")
    if len(test_images) != len(test_emb):
        raise ValueError(f"test_emb: {len(test_emb)} rows but {len(test_images)} test images")
    hg, ht = pack_bits(phash_bits(gen_images)), pack_bits(phash_bits(train_images))
    ph_min, ph_idx, _ = hamming_nearest(hg, ht, chunk=chunk)
    d_train, nn_train = nearest_cosine_distance(gen_emb, train_emb, chunk=chunk)
    d_test, _ = nearest_cosine_distance(gen_emb, test_emb, chunk=chunk)
    k = resolve_top_k(ssim_top_k, len(train_images))
    max_ssim, ssim_idx, n_pairs = _ssim_search(
        gen_images, train_images, ssim_top_k, np.stack([ph_idx, nn_train], axis=1), device, 2**29
    )
    df = pd.DataFrame(
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
    df.attrs.update(
        {
            "ssim_threshold": ssim_threshold,
            "phash_threshold": phash_threshold,
            "ssim_search": "exhaustive" if k is None else "top_k",
            "ssim_top_k": k,
            "ssim_prefilter": None if k is None else f"{PREFILTER}+phash_nn+embedding_nn",
            "ssim_pairs": int(n_pairs),
        }
    )
    return df


# frame.attrs keys copied into the summary: the thresholds and which SSIM search ran
_SEARCH_KEYS = ("ssim_threshold", "phash_threshold", "ssim_search", "ssim_top_k", "ssim_prefilter", "ssim_pairs")


def memorization_summary(per_image: pd.DataFrame) -> dict:
    """CRAFT Table 17 (counts, max SSIM) and Table 18 (mean d_train, d_test, gap) of one variant, plus the search.

    ``per_image``: a frame from ``memorization_per_image`` (its ``attrs`` say which SSIM search ran:
    ``ssim_search`` "top_k" or "exhaustive", ``ssim_top_k`` k or None, ``ssim_prefilter``, ``ssim_pairs``).
    """
    df = per_image
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
        **{k: df.attrs.get(k) for k in _SEARCH_KEYS},
    }


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
    ssim_top_k: int | str | None = DEFAULT_SSIM_TOP_K,
    chunk: int = 1024,
    device=None,
) -> dict:
    """``memorization_summary(memorization_per_image(...))``: the metrics.json block of one variant."""
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
        device=device,
    )
    return memorization_summary(df)
