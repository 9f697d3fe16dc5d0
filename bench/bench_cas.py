"""Time CAS scoring (craft.evaluate.run.cas_from_embeddings) against a straightforward per-image loop.

For n in SIZES: n generated images' evaluator embeddings (D=512 float32, the width of SigLIP/MedSigLIP
embeddings), their prompt embeddings, 4 class checklists, a linear probe (4 classes) and the paired
real images' embeddings. Our path scores all n at once with tensor operations (what ``craft evaluate``
runs); the peer scores one image at a time in Python (normalise, four dot products, the probe's
matvec and argmax, the mean of the four primitives). Both produce the same CAS (checked to 1e-5).
The embedding forward passes are NOT included: they cost the same either way and are measured by
the evaluation's own timing.

    .venv/bin/python bench/bench_cas.py             # 1k, 2k, 5k, 10k, 20k
    .venv/bin/python bench/bench_cas.py 1000 5000   # chosen sizes

Ours: one thread, best of 5 after a warm-up call; the loop: one pass. Prints `time:` lines (seconds, images/s) and `ratio: cas_vectorised_vs_loop_<n> = <loop / ours>`.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from craft.evaluate.run import cas_from_embeddings  # noqa: E402

SIZES = [1000, 2000, 5000, 10000, 20000]
D, C = 512, 4


def loop_cas(emb, text, checklist, weight, bias, y, ref) -> np.ndarray:
    """The peer: one image at a time, numpy vectors, the same definitions (CRAFT 4.1.4)."""
    out = np.empty(len(emb))
    unit = lambda v: v / max(np.linalg.norm(v), 1e-8)  # noqa: E731
    for i in range(len(emb)):
        e = unit(emb[i])
        vdc = float(e @ unit(text[i]))
        ccs = float(e @ unit(checklist[y[i]]))
        dd = float(np.argmax(weight @ emb[i] + bias) == y[i])
        sfs = float(e @ unit(ref[i]))
        out[i] = (vdc + ccs + dd + sfs) / 4
    return out


def main(sizes: list[int]) -> None:
    torch.set_num_threads(1)  # the loop is single-threaded: the ratio measures vectorisation, not cores
    print(f"CAS scoring from embeddings: D={D}, C={C}, torch threads {torch.get_num_threads()}")
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        emb, text, ref = (torch.randn(n, D, generator=g) for _ in range(3))
        checklist = torch.randn(C, D, generator=g)
        probe = torch.nn.Linear(D, C)
        y = torch.randint(0, C, (n,), generator=g)

        def ours_once(probe=probe, emb=emb, text=text, checklist=checklist, y=y, ref=ref):
            with torch.no_grad():
                logits = probe(emb)  # the probe's forward is part of scoring (DD)
                return cas_from_embeddings(emb, text, checklist, logits, y, ref)["cas"]

        ours_once()  # warm-up (first-call allocations and lazy imports are not per-image cost)
        times = []
        for _ in range(5):  # best of 5
            t0 = time.perf_counter()
            ours = ours_once()
            times.append(time.perf_counter() - t0)
        t_ours = min(times)
        w, b = probe.weight.detach().numpy(), probe.bias.detach().numpy()
        t0 = time.perf_counter()
        theirs = loop_cas(emb.numpy(), text.numpy(), checklist.numpy(), w, b, y.numpy(), ref.numpy())
        t_loop = time.perf_counter() - t0
        err = float(np.abs(ours - theirs).max())
        if err > 1e-5:
            raise SystemExit(f"n={n}: vectorised and loop CAS differ by {err}")
        print(f"time: n={n} vectorised {t_ours:.4f} s ({n / t_ours:,.0f} images/s)  "
              f"loop {t_loop:.3f} s ({n / t_loop:,.0f} images/s)  max |diff| {err:.1e}")  # fmt: skip
        print(f"ratio: cas_vectorised_vs_loop_{n} = {t_loop / t_ours:.1f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or SIZES)
