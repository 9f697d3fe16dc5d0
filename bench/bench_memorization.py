"""Time the memorization searches (craft.evaluate.memorization) against the previous version and a Python loop.

For n in SIZES: n generated x n training embeddings (D=512 float32) for the nearest-neighbour
cosine search, and n x n 64-bit pHashes for the Hamming search. Three versions:

- ours: the bf16 (or float32) prefilter + float64 rescore for NN, blocked XOR/popcount for pHash;
- previous: the chunked float32 product + row max and the unblocked XOR/popcount this replaced (run
  at every size; its answers must equal ours: same indices, distances within float32 rounding);
- loop: one dot product / one XOR-popcount per pair in Python, run on LOOP_ROWS query rows and
  EXTRAPOLATED linearly to n rows (its cost is exactly proportional to the pair count).

Gaussian embeddings have few near-ties; real encoder embeddings are clustered, so the largest size is
also timed on clustered data (50 centres), where the bf16 prefilter keeps too many candidates and
the search falls back to float32 (``memorization_nn_clustered_...``).

    .venv/bin/python bench/bench_memorization.py            # 1k, 2k, 5k, 10k, 20k
    .venv/bin/python bench/bench_memorization.py 1000 10000  # chosen sizes

Prints `ratio: memorization_<n>_vs_5s = <ours NN + pHash seconds / 5>` (issue 18's goal: <= 1 at 20k),
`ratio: memorization_speedup_vs_previous_<n>`, `ratio: memorization_chunked_vs_loop_<n>` (loop / ours),
and `time: ...` lines with seconds. Threads: torch and BLAS at 2 (the machine's core count).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from craft.evaluate import memorization as mem  # noqa: E402

SIZES = [1000, 2000, 5000, 10000, 20000]
D = 512
LOOP_ROWS = 20


def previous_nn(query: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The search before the prefilter (craft 2026-12-05): chunked float32 product, row max."""
    q = torch.nn.functional.normalize(torch.as_tensor(query), dim=1)
    r = torch.nn.functional.normalize(torch.as_tensor(ref), dim=1)
    best, arg = torch.empty(len(q)), torch.empty(len(q), dtype=torch.long)
    with torch.no_grad():
        for s in range(0, len(q), chunk):
            v, i = (q[s : s + chunk] @ r.T).max(1)
            best[s : s + chunk], arg[s : s + chunk] = v, i
    return (1.0 - best.double()).clamp_min(0.0).numpy(), arg.numpy()


def previous_hamming(q: np.ndarray, r: np.ndarray, threshold: int, chunk: int = 1024):
    """The Hamming search before blocking: (chunk, Nr, W) XOR, popcount, int64 sum, min / argmin / count."""
    dmin, arg, cnt = (np.empty(len(q), np.int64) for _ in range(3))
    for s in range(0, len(q), chunk):
        d = np.bitwise_count(q[s : s + chunk, None, :] ^ r[None, :, :]).sum(-1, dtype=np.int64)
        arg[s : s + chunk], dmin[s : s + chunk] = d.argmin(1), d.min(1)
        cnt[s : s + chunk] = (d <= threshold).sum(1)
    return dmin, arg, cnt


def loop_nn(q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The straightforward baseline: one Python-level cosine per pair."""
    out = np.empty(len(q))
    rn = [v / np.linalg.norm(v) for v in r]
    for i, v in enumerate(q):
        v = v / np.linalg.norm(v)
        best = -2.0
        for w in rn:
            c = float(np.dot(v, w))
            if c > best:
                best = c
        out[i] = 1.0 - best
    return out


def loop_hamming(q: list[int], r: list[int]) -> np.ndarray:
    """One XOR + popcount per pair on Python ints."""
    return np.array([min((a ^ b).bit_count() for b in r) for a in q])


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main(sizes: list[int]) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    prec = mem.resolve_nn_precision("auto")
    print(f"# D={D} float32 embeddings, 64-bit pHashes; torch threads={torch.get_num_threads()}; NN prefilter {prec}")
    print(f"# load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    for n in sizes:
        gen = rng.standard_normal((n, D), dtype=np.float32)
        train = rng.standard_normal((n, D), dtype=np.float32)
        hg = mem.pack_bits(rng.random((n, 64)) > 0.5)
        ht = mem.pack_bits(rng.random((n, 64)) > 0.5)

        (d, i), t_nn = timed(mem.nearest_cosine_distance, gen, train)
        (h, hi, hc), t_ph = timed(mem.hamming_nearest, hg, ht, threshold=8)
        (pd_, pi), t_pnn = timed(previous_nn, gen, train)
        (ph, phi, phc), t_pph = timed(previous_hamming, hg, ht, 8)
        assert np.array_equal(i, pi) and np.allclose(d, pd_, atol=1e-6), "NN differs from the previous search"
        assert np.array_equal(h, ph) and np.array_equal(hc, phc), "Hamming differs from the previous search"
        assert np.array_equal(hi, phi), "Hamming argmin differs from the previous search"

        rows = min(LOOP_ROWS, n)
        d_loop, t_loop_nn = timed(loop_nn, gen[:rows], train)
        t_loop_nn *= n / rows
        qi, ri = [int(x) for x in hg[:rows, 0]], [int(x) for x in ht[:, 0]]
        h_loop, t_loop_ph = timed(loop_hamming, qi, ri)
        t_loop_ph *= n / rows
        assert np.allclose(d_loop, d[:rows], atol=1e-4), "NN differs from the loop"
        assert np.array_equal(h_loop, h[:rows]), "Hamming differs from the loop"

        ours, prev, loop = t_nn + t_ph, t_pnn + t_pph, t_loop_nn + t_loop_ph
        print(f"time: memorization_chunked_nn_{n}x{n}_s = {t_nn:.3f}")
        print(f"time: memorization_chunked_phash_{n}x{n}_s = {t_ph:.3f}")
        print(f"time: memorization_previous_nn_{n}x{n}_s = {t_pnn:.3f}")
        print(f"time: memorization_previous_phash_{n}x{n}_s = {t_pph:.3f}")
        print(f"time: memorization_loop_nn_{n}x{n}_s (extrapolated from {rows} rows) = {t_loop_nn:.1f}")
        print(f"time: memorization_loop_phash_{n}x{n}_s (extrapolated from {rows} rows) = {t_loop_ph:.1f}")
        print(f"ratio: memorization_speedup_vs_previous_{n} = {prev / ours:.2f}")
        print(f"ratio: memorization_chunked_vs_loop_{n} = {loop / ours:.1f}")
        print(f"ratio: memorization_{n}_vs_5s = {ours / 5:.3f}", flush=True)

    n = max(sizes)
    centres = rng.standard_normal((50, D), dtype=np.float32)
    gen = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, D), dtype=np.float32)
    train = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, D), dtype=np.float32)
    (d, i), t_nn = timed(mem.nearest_cosine_distance, gen, train)
    (pd_, pi), t_pnn = timed(previous_nn, gen, train)
    same = np.array_equal(i, pi)
    print(f"time: memorization_nn_clustered_{n}x{n}_s = {t_nn:.3f} (previous {t_pnn:.3f}; same indices: {same})")
    print(f"ratio: memorization_nn_clustered_speedup_vs_previous_{n} = {t_pnn / t_nn:.2f}")
    print(f"# load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or SIZES)
