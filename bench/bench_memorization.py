"""Time the memorization searches (craft.evaluate.memorization) against a per-pair Python loop.

For n in SIZES: n generated x n training embeddings (D=512 float32) for the nearest-neighbour
cosine search, and n x n 64-bit pHashes for the Hamming search. The chunked versions run in full
at every size (the 10,000 x 10,000 case must finish on CPU). The per-pair loop (one dot product /
one XOR-popcount per pair in Python) is run only on LOOP_ROWS query rows and its time is
EXTRAPOLATED linearly to n rows (the loop's cost is exactly proportional to the pair count); the
printed loop times are labelled "extrapolated".

    .venv/bin/python bench/bench_memorization.py            # 1k, 2k, 5k, 10k, 20k
    .venv/bin/python bench/bench_memorization.py 1000 10000  # chosen sizes

Prints `ratio: memorization_chunked_vs_loop_<n> = <x>` (loop time / chunked time, NN + pHash),
and `time: ...` lines with seconds. Threads: torch and BLAS at 2 (the machine's core count).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from craft.evaluate.memorization import hamming_nearest, nearest_cosine_distance, pack_bits  # noqa: E402

SIZES = [1000, 2000, 5000, 10000, 20000]
D = 512
LOOP_ROWS = 20


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


def main(sizes: list[int]) -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    print(f"# D={D} float32 embeddings, 64-bit pHashes; torch threads={torch.get_num_threads()}")
    for n in sizes:
        gen = rng.standard_normal((n, D), dtype=np.float32)
        train = rng.standard_normal((n, D), dtype=np.float32)
        hg = pack_bits(rng.random((n, 64)) > 0.5)
        ht = pack_bits(rng.random((n, 64)) > 0.5)

        t0 = time.perf_counter()
        d, _ = nearest_cosine_distance(gen, train)
        t_nn = time.perf_counter() - t0
        t0 = time.perf_counter()
        h, _, _ = hamming_nearest(hg, ht, threshold=8)
        t_ph = time.perf_counter() - t0

        rows = min(LOOP_ROWS, n)
        t0 = time.perf_counter()
        d_loop = loop_nn(gen[:rows], train)
        t_loop_nn = (time.perf_counter() - t0) * n / rows
        qi, ri = [int(x) for x in hg[:rows, 0]], [int(x) for x in ht[:, 0]]
        t0 = time.perf_counter()
        h_loop = loop_hamming(qi, ri)
        t_loop_ph = (time.perf_counter() - t0) * n / rows
        assert np.allclose(d_loop, d[:rows], atol=1e-4), "chunked NN differs from the loop"
        assert np.array_equal(h_loop, h[:rows]), "chunked Hamming differs from the loop"

        chunked, loop = t_nn + t_ph, t_loop_nn + t_loop_ph
        print(f"time: memorization_chunked_nn_{n}x{n}_s = {t_nn:.3f}")
        print(f"time: memorization_chunked_phash_{n}x{n}_s = {t_ph:.3f}")
        print(f"time: memorization_loop_nn_{n}x{n}_s (extrapolated from {rows} rows) = {t_loop_nn:.1f}")
        print(f"time: memorization_loop_phash_{n}x{n}_s (extrapolated from {rows} rows) = {t_loop_ph:.1f}")
        print(f"ratio: memorization_chunked_vs_loop_{n} = {loop / chunked:.1f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or SIZES)
