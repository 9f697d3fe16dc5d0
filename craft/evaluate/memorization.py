"""Memorization search: pixel near-duplicates and feature-space nearest neighbours (CRAFT app. M).

Two tests for every generated image against the training set:

1. Pixel space. SSIM >= ``ssim_threshold`` (0.95 in CRAFT) and pHash Hamming distance <=
   ``phash_threshold`` count as near-duplicates. pHash is ``imagehash.phash`` (``PHASH_IMPL`` names
   the version; the report records it), packed into uint64 words, and compared with XOR + popcount
   in cache-sized blocks against EVERY training image. The pHash threshold symbol is lost in our copy of the CRAFT text; the default
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

Every pairwise step is a blocked matrix (or XOR) product; there is no Python loop over pairs. The
nearest-neighbour search is exact (the float64 cosine's nearest, lowest index on ties) but runs its
product in bf16 where the CPU multiplies bf16 natively, then rescores in float64 the few references
that the bf16 rounding-error bound cannot rule out (``nearest_cosine_distance``).
``bench/bench_memorization.py`` times the NN / pHash searches against the previous version and a
loop; ``bench/bench_eval_scale.py`` times top-k against exhaustive SSIM.

How the wiring calls this: per variant, ``memorization_per_image(gen_images, train_images,
test_images, gen_emb, train_emb, test_emb)`` -> DataFrame columns joined onto per_image.parquet,
and ``memorization_summary(that frame)`` (or ``memorization_report(...)``, both in one call) -> a
dict of scalars for metrics.json (Table 17 + Table 18 of CRAFT).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
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
_HAMMING_ROWS, _HAMMING_COLS = 64, 8192  # Hamming block: 4 MiB of XORed words (fastest here, bench/)
_NN_BLOCK_BYTES = 2**22  # bf16 similarities per NN block (~100 rows x 20k refs; smaller blocks stay in cache)
_RESCORE_PAIRS = 512  # candidate pairs rescored in float64 at once (buffers of 2 MiB for D = 512)
_MAX_CANDIDATES_PER_ROW = 16  # bf16 prefilter candidates per row above which float32 is cheaper
_BF16_CPU: bool | None = None  # cached: does this CPU multiply bf16 in hardware?
PHASH_IMPL = f"imagehash {imagehash.__version__} phash (hash_size=8, highfreq_factor=4)"  # named in the report


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
    if a.dtype == np.uint8 and a.ndim in (3, 4):  # already 8-bit: straight to PIL, no float round trip
        for x in a:
            yield Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x)
        return
    for s in range(0, len(a), chunk):
        t = as_image_tensor(a[s : s + chunk])  # validates shape and range
        u = (t.permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        for x in u:
            yield Image.fromarray(x[..., 0], mode="L") if x.shape[-1] == 1 else Image.fromarray(x)


# ----------------------------------------------------------------------------------------------
# pHash


def phash_bits(images, hash_size: int = 8, highfreq_factor: int = 4) -> np.ndarray:
    """Perceptual hash bits (N, hash_size**2) as bool, row-major: ``imagehash.phash(image, ...).hash`` per image.

    imagehash's pHash (grey, Lanczos resize to (hash_size * highfreq_factor)^2, 2-D DCT-II, top-left
    hash_size x hash_size low frequencies, bit = coefficient > their median) is called as is: a batched
    DCT of our own saved nothing measurable (the per-image resize dominates), so there is no reason to
    keep a second implementation. ``PHASH_IMPL`` names it for the report.
    """
    if hash_size < 2:
        raise ValueError(f"hash_size: {hash_size} must be >= 2")
    rows = [imagehash.phash(im, hash_size=hash_size, highfreq_factor=highfreq_factor).hash for im in _iter_pil(images)]
    if not rows:
        return np.zeros((0, hash_size * hash_size), dtype=bool)
    return np.stack(rows).reshape(len(rows), -1).astype(bool)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, ceil(B / 64)) uint64 (zero padded), for XOR/popcount Hamming distances."""
    bits = np.asarray(bits, dtype=bool)
    n, b = bits.shape
    words = -(-b // 64)
    padded = np.zeros((n, words * 64), dtype=bool)
    padded[:, :b] = bits
    return np.packbits(padded, axis=1).view(">u8").astype(np.uint64)


def _threads(threads: int | None) -> int:
    return max(1, int(threads) if threads else min(torch.get_num_threads(), os.cpu_count() or 1))


def _parallel_rows(fn, n: int, rows: int, threads: int) -> None:
    """Run ``fn(start, stop)`` over blocks of ``rows`` query rows, on ``threads`` threads (numpy and torch
    release the GIL inside their kernels, so the blocks run truly in parallel)."""
    starts = range(0, n, rows)
    if threads <= 1 or len(starts) <= 1:
        for s in starts:
            fn(s, min(n, s + rows))
        return
    with ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(fn, s, min(n, s + rows)) for s in starts]:
            f.result()


def hamming_nearest(
    query: np.ndarray, ref: np.ndarray, threshold: int | None = None, chunk: int = 1024, threads: int | None = None
):
    """For each packed query hash: (min Hamming distance to ref, argmin, count of ref within ``threshold``).

    ``query`` (Nq, W) and ``ref`` (Nr, W) uint64 from ``pack_bits``. Ties go to the lowest ref index.
    Blocked so that the working set stays in the core's cache: a block of at most ``chunk`` query rows
    x ``_HAMMING_COLS`` ref hashes is XORed word by word into one reused uint64 buffer and popcounted
    (``np.bitwise_count``, one VPOPCNTQ per pair on AVX-512 CPUs) into small distances (uint8 up to 255
    bits); the running min / argmin is updated per block, and within-``threshold`` counts are taken only
    for rows whose block minimum is within it (a non-duplicate never pays for counting). Blocks of rows
    run on ``threads`` threads (default: torch's thread count).
    """
    q, r = np.asarray(query, np.uint64), np.asarray(ref, np.uint64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"hamming_nearest: packed shapes {q.shape} and {r.shape} do not match")
    if len(r) == 0:
        raise ValueError("ref: empty")
    if chunk < 1:
        raise ValueError(f"chunk: {chunk} must be >= 1")
    n_q, n_r, w = len(q), len(r), q.shape[1]
    dist_t = np.uint8 if 64 * w <= 255 else np.uint16 if 64 * w <= 65535 else np.uint32
    qt, rt = np.ascontiguousarray(q.T), np.ascontiguousarray(r.T)  # (W, N): one word of every hash is contiguous
    dmin = np.empty(n_q, np.int64)
    arg = np.empty(n_q, np.int64)
    cnt = np.zeros(n_q, np.int64)
    rows = min(chunk, _HAMMING_ROWS)
    cols = min(n_r, _HAMMING_COLS)

    def block(s: int, e: int) -> None:
        m = e - s
        x = np.empty((m, cols), np.uint64)
        d = np.empty((m, cols), dist_t)
        pc = np.empty((m, cols), np.uint8) if w > 1 else None
        best = np.full(m, np.iinfo(np.int64).max, np.int64)
        best_j = np.zeros(m, np.int64)
        ar = np.arange(m)
        for c in range(0, n_r, cols):
            k = min(cols, n_r - c)
            xb, db = x[:, :k], d[:, :k]
            np.bitwise_xor(qt[0, s:e, None], rt[0, None, c : c + k], out=xb)
            np.bitwise_count(xb, out=db, casting="unsafe")
            for word in range(1, w):
                np.bitwise_xor(qt[word, s:e, None], rt[word, None, c : c + k], out=xb)
                db += np.bitwise_count(xb, out=pc[:, :k])
            j = db.argmin(1)  # first occurrence: ties stay with the lowest index
            v = db[ar, j].astype(np.int64)
            better = v < best
            best[better], best_j[better] = v[better], j[better] + c
            if threshold is not None:
                hit = np.flatnonzero(v <= threshold)
                if len(hit):
                    cnt[s + hit] += np.count_nonzero(db[hit] <= threshold, axis=1)
        dmin[s:e], arg[s:e] = best, best_j

    _parallel_rows(block, n_q, rows, _threads(threads))
    return dmin, arg, cnt


# ----------------------------------------------------------------------------------------------
# nearest neighbours in an embedding


def _fast_bf16() -> bool:
    """True where a bf16 matrix product runs in hardware (CPU AVX512-BF16 / AMX, read from /proc/cpuinfo)."""
    global _BF16_CPU
    if _BF16_CPU is None:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        _BF16_CPU = bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
    return _BF16_CPU


def resolve_nn_precision(precision: str) -> str:
    """The prefilter precision of ``nearest_cosine_distance``: "bf16" where the CPU multiplies bf16 natively."""
    if precision == "auto":
        return "bf16" if _fast_bf16() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision: {precision!r} must be 'auto', 'bf16' or 'fp32'")
    return precision


def _bf16_order_key(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """int16 keys that sort like the bf16 values whose bit patterns are ``bits`` (sign-magnitude -> two's
    complement: negative values get their magnitude bits flipped), so max / compare run on integers."""
    np.right_shift(bits, 15, out=out)
    np.bitwise_and(out, np.int16(0x7FFF), out=out)
    return np.bitwise_xor(out, bits, out=out)


def _bf16_from_key(key: np.ndarray) -> torch.Tensor:
    """The bf16 values (as float32) of order keys: the key map is its own inverse."""
    bits = key ^ ((key >> 15) & np.int16(0x7FFF))
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bfloat16).float()


def _bf16_key_at_most(x: np.ndarray) -> np.ndarray:
    """Order keys of the largest bf16 values <= x (float64)."""
    lo = x.astype(np.float32)
    lo = np.where(lo > x, np.nextafter(lo, np.float32(-np.inf)), lo)  # float32 <= x
    hi = (lo.view(np.int32) >> 16).astype(np.int16)  # bf16 by truncation: toward 0
    back = (hi.astype(np.int32) << 16).view(np.float32)
    hi = np.where(back > lo, hi + np.int16(1), hi)  # a negative moved up: one step further from 0 (sign-magnitude)
    return _bf16_order_key(hi, np.empty_like(hi))


_U32, _U_BF16 = 2.0**-24, 2.0**-8  # unit roundoffs of float32 and bfloat16


def _prefilter_floor(sim_max: np.ndarray, a_norm, ea_norm, b_max, eb_max, dim: int, prec: str) -> np.ndarray:
    """Per query row, a value that the cheap similarity of its true nearest neighbour cannot fall below.

    Write q = a + e_q, r = b + e_r for the exact unit rows q, r and the rows a, b the product sees (|e|
    includes the rounding of the unit rows to float32 and, for "bf16", to bf16). Then
    |q.r - a.b| <= |a| |e_r| + |e_q| |b| + |e_q| |e_r| (Cauchy-Schwarz), and the float32 accumulation adds
    at most gamma_D |a| |b| (gamma_D = D u32 / (1 - D u32)); with e_in their sum (maxima of |b|, |e_r|
    over the refs; a relative margin of 4 gamma_D covers the rounding of the norms), the product before
    output rounding, s~, is within e_in of the exact q.r. A bf16 output rounds s~ to s^ with
    |s^ - s~| <= u' |s^| (u' = u / (1 - u)). For j* the true nearest and jm the cheap maximum:
    s~(j*) >= q.r* - e_in >= q.r_jm - e_in >= s~(jm) - 2 e_in >= s^max - u'|s^max| - 2 e_in =: T, and
    s^(j*) + u'|s^(j*)| >= s~(j*) >= T; x + u'|x| is increasing, so s^(j*) >= T / (1 + u') (T >= 0) or
    T / (1 - u') (T < 0). For "fp32" u' = 0 and the floor is s^max - 2 e_in.
    """
    gamma = dim * _U32 / (1 - dim * _U32)
    e_in = (a_norm * eb_max + ea_norm * b_max + ea_norm * eb_max + gamma * a_norm * b_max) * (1 + 4 * gamma + 1e-6)
    if prec == "fp32":
        return sim_max - 2 * e_in - 1e-300
    up = _U_BF16 / (1 - _U_BF16) * (1 + 1e-6)
    t = sim_max - up * np.abs(sim_max) - 2 * e_in
    return np.where(t >= 0, t / (1 + up), t / (1 - up))


def _unit_rows(x: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit length, rounded to float32; their float64 norms, floored at 1e-12 like torch's normalize)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if not np.isfinite(norm).all():
        raise ValueError(
            f"{name}: embeddings contain NaN or infinite values (row {int(np.argmin(np.isfinite(norm)))})"
        )
    norm = np.maximum(norm, 1e-12)
    return x * (1.0 / norm).astype(np.float32)[:, None], norm  # float32 throughout: two roundings


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (int16), round to nearest even (what torch's .bfloat16() does); finite x."""
    b = x.view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16).view(np.int16)


def _bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def nearest_cosine_distance(query, ref, chunk: int = 2048, precision: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(min cosine distance 1 - cos, argmin) from every query row to the ref rows; ties go to the lowest index.

    Exact: the result is that of an exhaustive search on float64 cosines of the (float32) inputs. Blocked
    matrix-product top-k: each block of query rows (at most ``chunk``, sized so that its similarities stay
    in cache) is multiplied against all ref rows in a cheap precision ("bf16" where the CPU has
    AVX512-BF16 / AMX: 2.5x the float32 throughput on this machine; else "fp32"), and every ref whose
    cheap similarity is at or above a floor that provably cannot exceed the true nearest's cheap
    similarity (``_prefilter_floor``: rigorous rounding-error bounds from the actual rounding of each
    row) is kept. Those few candidates are rescored in float64, which picks the nearest.
    ``bench/bench_memorization.py`` times it; the tests compare it with a float64 brute force.
    """
    x = np.ascontiguousarray(query, np.float32)
    y = np.ascontiguousarray(ref, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"nearest_cosine_distance: shapes {x.shape} and {y.shape} do not match")
    if len(y) == 0:
        raise ValueError("ref: empty")
    if chunk < 1:
        raise ValueError(f"chunk: {chunk} must be >= 1")
    prec = resolve_nn_precision(precision)
    # numpy, not torch, for the O(N D) preparation: one thread, no OpenMP barriers on a busy machine
    (q, x_norm), (r, y_norm) = _unit_rows(x, "query"), _unit_rows(y, "ref")
    n_q, n_r, dim = len(q), len(r), q.shape[1]
    # |x / |x| - q| <= 2 u32 per row (1 / |x| and the product rounded to float32): added to the errors below
    u_n = 2.01 * _U32
    # per prefilter: (query rows, ref rows) as tensors, and the norms its error bound needs (_prefilter_floor)
    tensors = {"fp32": (torch.from_numpy(q), torch.from_numpy(r))}
    bounds = {"fp32": (_row_norms(q), np.full(n_q, u_n), float(_row_norms(r).max()), u_n)}
    if prec == "bf16":
        qb, rb = _bf16_bits(q), _bf16_bits(r)
        qa, ra = _bf16_value(qb), _bf16_value(rb)  # q - qa is exact in float32
        tensors["bf16"] = (torch.from_numpy(qb).view(torch.bfloat16), torch.from_numpy(rb).view(torch.bfloat16))
        bounds["bf16"] = (_row_norms(qa), _row_norms(q - qa) + u_n, float(_row_norms(ra).max()),
                          float(_row_norms(r - ra).max()) + u_n)  # fmt: skip
    best = np.empty(n_q)
    arg = np.empty(n_q, np.int64)
    # rows per block: bf16 similarities stay in cache; a float32 product needs taller blocks to run at speed
    rows_of = {"bf16": int(max(1, min(chunk, _NN_BLOCK_BYTES // (n_r * 2)))),
               "fp32": int(max(1, min(chunk, 8 * _NN_BLOCK_BYTES // (n_r * 4))))}  # fmt: skip
    rows = max(rows_of.values())
    sims: dict[str, torch.Tensor] = {}  # reused per precision: a fresh block per chunk would page-fault
    key = np.empty((rows_of["bf16"], n_r), np.int16) if prec == "bf16" else None
    mask = np.empty((rows, n_r), bool)

    def candidates(s: int, e: int, how: str) -> np.ndarray:
        """Flat (row-major) positions of the block's candidates under prefilter ``how``."""
        a_n, ea_n, b_mx, eb_mx = bounds[how]
        qx, rx = tensors[how]
        if how not in sims:
            sims[how] = torch.empty(rows_of[how], n_r, dtype=rx.dtype)
        sim = sims[how][: e - s]
        with torch.no_grad():
            torch.mm(qx[s:e], rx.T, out=sim)  # the cheap similarities of this block
        if how == "bf16":
            k = _bf16_order_key(sim.view(torch.int16).numpy(), key[: e - s])
            top = _bf16_from_key(k.max(1)).double().numpy()
            thr = _bf16_key_at_most(_prefilter_floor(top, a_n[s:e], ea_n[s:e], b_mx, eb_mx, dim, how))
        else:
            k = sim.numpy()
            floor = _prefilter_floor(k.max(1).astype(np.float64), a_n[s:e], ea_n[s:e], b_mx, eb_mx, dim, how)
            thr = np.nextafter(floor.astype(np.float32), np.float32(-np.inf))  # float32 at or below the floor
        return np.flatnonzero(np.greater_equal(k, thr[:, None], out=mask[: e - s]))  # by row, ascending ref

    g32 = np.empty((2, _RESCORE_PAIRS, dim), np.float32)  # reused gather buffers: no page faults per batch
    g64 = np.empty((2, _RESCORE_PAIRS, dim))
    e = 0
    while e < n_q:
        s, e = e, min(n_q, e + rows_of[prec])
        m = e - s
        pos = candidates(s, e, prec)
        if prec == "bf16" and np.median(np.bincount(pos // n_r, minlength=m)) > _MAX_CANDIDATES_PER_ROW:
            # crowded neighbourhoods (clustered embeddings): many refs lie within bf16's error of the nearest,
            # and rescoring them all costs more than a float32 product, whose window is ~1e-5 wide; so this
            # block and every later one use float32 (bench/bench_memorization.py times both kinds of data).
            # Decided on the median row, so that a few odd rows (a zero vector ties with everything) do not
            # switch a whole search.
            prec = "fp32"
            pos = candidates(s, e, prec)
        i, j = pos // n_r, pos % n_r
        val = np.empty(len(pos))
        for p in range(0, len(pos), _RESCORE_PAIRS):  # float64 cosines of the candidate pairs
            c = min(_RESCORE_PAIRS, len(pos) - p)
            np.take(x, i[p : p + c] + s, axis=0, out=g32[0, :c])
            np.take(y, j[p : p + c], axis=0, out=g32[1, :c])
            g64[:, :c] = g32[:, :c]
            val[p : p + c] = np.einsum("pd,pd->p", g64[0, :c], g64[1, :c])
        val /= x_norm[i + s] * y_norm[j]  # the cosine of the inputs, in float64
        starts = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])
        if len(starts) != m:  # every row keeps at least its cheap maximum
            raise RuntimeError(f"nearest_cosine_distance: rows {s}..{e - 1} lost their maximum")
        row_best = np.maximum.reduceat(val, starts)
        first = np.where(val == np.repeat(row_best, np.diff(np.r_[starts, len(pos)])), j, n_r)
        best[s:e], arg[s:e] = row_best, np.minimum.reduceat(first, starts)
    return np.clip(1.0 - best, 0.0, None), arg


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
            "phash_impl": PHASH_IMPL,
        }
    )
    return df


# frame.attrs keys copied into the summary: the thresholds and which SSIM search ran
_SEARCH_KEYS = (
    "ssim_threshold", "phash_threshold", "ssim_search", "ssim_top_k", "ssim_prefilter", "ssim_pairs", "phash_impl",
)  # fmt: skip


def memorization_summary(per_image: pd.DataFrame) -> dict:
    """CRAFT Table 17 (counts, max SSIM) and Table 18 (mean d_train, d_test, gap) of one variant, plus the search.

    ``per_image``: a frame from ``memorization_per_image`` (its ``attrs`` say which SSIM search ran:
    ``ssim_search`` "top_k" or "exhaustive", ``ssim_top_k`` k or None, ``ssim_prefilter``, ``ssim_pairs``;
    ``phash_impl``: the pHash implementation and version, ``PHASH_IMPL``).
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
