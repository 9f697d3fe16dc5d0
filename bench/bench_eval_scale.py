"""Time the two evaluation steps whose cost grows with a real profile: the SSIM memorization search and the
downstream classifier.

1. SSIM near-duplicate search (``craft.evaluate.memorization.max_ssim_to_reference``) at 128 px RGB
   (H&E-like demo tiles), n generated x m training images: exhaustive (every pair) against top-k (exact SSIM
   on the ``DEFAULT_SSIM_TOP_K`` training images nearest in 16x16-thumbnail NCC), side by side in this
   process. Planted near-copies (exact, noised, brightened) among the generated images must be found by both.
   The exhaustive search costs exactly (generated rows) x m pairs, so above ``--exhaustive-pairs`` it runs on
   fewer rows and its time is EXTRAPOLATED linearly to n rows (labelled "extrapolated").
2. Downstream classifier (``craft.evaluate.downstream``): forward + backward of one batch of 32 RGB images,
   the demo's ``small_cnn`` (which pools its input to 32 px) against the library backbone ``resnet18``
   (transformers ResNetConfig, random init), at 64 and 224 px; median of ``--repeats`` after a warm-up.

    .venv/bin/python bench/bench_eval_scale.py                   # 100x200 and 200x800, 64 and 224 px
    .venv/bin/python bench/bench_eval_scale.py --sizes 100x200   # chosen SSIM sizes

Prints `time: ...` lines (seconds) and `ratio: ssim_exhaustive_vs_topk_<n>x<m> = <exhaustive / top-k>`,
`ratio: downstream_resnet18_vs_small_cnn_<px>px = <resnet18 / small_cnn>`. Threads: torch at 2 (the
machine's core count). Measure on a quiet machine: a second busy process on the cores distorts both sides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from craft.data.demo import CLASSES, render_one  # noqa: E402
from craft.evaluate import downstream as ds  # noqa: E402
from craft.evaluate.memorization import DEFAULT_SSIM_TOP_K, max_ssim_to_reference  # noqa: E402

PX = 128


def _tiles(n: int, seed: int) -> np.ndarray:
    """n distinct 128-px H&E-like tiles: n / 8 rendered ones in their 8 flips / rotations (rendering is slow)."""
    rng = np.random.default_rng(seed)
    base = [np.asarray(render_one("histo", CLASSES["histo"][i % 4], rng, PX)[0]) for i in range(-(-n // 8))]
    out = [np.rot90(b[:, ::-1] if f else b, r) for b in base for f in (0, 1) for r in range(4)]
    return np.ascontiguousarray(np.stack(out[:n]))


def _plant(gen: np.ndarray, train: np.ndarray) -> dict[int, int]:
    """Generated rows 0-2 become near-copies of training images: exact, noised (+-3), brightened (+4)."""
    j = [len(train) // 3, len(train) // 2, len(train) - 1]
    noise = np.random.default_rng(1).integers(-3, 4, train[j[1]].shape)
    gen[0] = train[j[0]]
    gen[1] = np.clip(train[j[1]].astype(int) + noise, 0, 255).astype(np.uint8)
    gen[2] = np.clip(train[j[2]].astype(int) + 4, 0, 255).astype(np.uint8)
    return dict(zip(range(3), j))


def bench_ssim(n: int, m: int, exhaustive_pairs: int) -> None:
    gen, train = _tiles(n, 10 + n), _tiles(m, 20 + m)
    planted = _plant(gen, train)
    rows = min(n, max(len(planted), exhaustive_pairs // m))
    t0 = time.perf_counter()
    ex_val, ex_idx = max_ssim_to_reference(gen[:rows], train, top_k="all", device="cpu")
    t_ex = (time.perf_counter() - t0) * n / rows
    t0 = time.perf_counter()
    tk_val, tk_idx = max_ssim_to_reference(gen, train, top_k=DEFAULT_SSIM_TOP_K, device="cpu")
    t_tk = time.perf_counter() - t0
    dup_ex, dup_tk = ex_val >= 0.95, tk_val[:rows] >= 0.95
    assert all(ex_idx[i] == j and tk_idx[i] == j for i, j in planted.items()), "a planted copy was missed"
    assert np.array_equal(dup_ex, dup_tk), "top-k and exhaustive disagree on the near-duplicates"
    label = f"{n}x{m}"
    note = f" (extrapolated from {rows} rows)" if rows < n else ""
    print(f"time: ssim_exhaustive_{label}_s{note} = {t_ex:.2f}")
    print(f"time: ssim_top{DEFAULT_SSIM_TOP_K}_{label}_s = {t_tk:.2f}")
    print(f"check: ssim_duplicates_{label} exhaustive = {int(dup_ex.sum())}, top-k = {int(dup_tk.sum())} "
          f"(of {rows} rows; {len(planted)} planted)")  # fmt: skip
    print(f"ratio: ssim_exhaustive_vs_topk_{label} = {t_ex / t_tk:.1f}", flush=True)


def _fwd_bwd_s(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    model.train()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_downstream(px: int, repeats: int, batch: int = 32) -> None:
    g = torch.Generator().manual_seed(px)
    x, y = torch.rand(batch, 3, px, px, generator=g), torch.randint(0, 4, (batch,), generator=g)
    t = {}
    for arch in ("small_cnn", "resnet18"):
        a, size, width = ds.resolve_classifier(arch, 0, 0, px)
        torch.manual_seed(0)
        t[arch] = _fwd_bwd_s(ds.build_classifier(a, 3, 4, width, size), x, y, repeats)
        print(f"time: downstream_{arch}_{px}px_fwd_bwd_batch{batch}_s (input {size} px) = {t[arch]:.4f}")
    print(f"ratio: downstream_resnet18_vs_small_cnn_{px}px = {t['resnet18'] / t['small_cnn']:.1f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=["100x200", "200x800"], help="generated x training images")
    ap.add_argument("--exhaustive-pairs", type=int, default=25_000, help="SSIM pairs the exhaustive search runs")
    ap.add_argument("--px", nargs="*", type=int, default=[64, 224], help="classifier input sizes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# SSIM at {PX} px RGB, top-k k={DEFAULT_SSIM_TOP_K}; classifier batch 32 RGB; "
          f"torch threads={torch.get_num_threads()}")  # fmt: skip
    for size in args.sizes:
        n, m = (int(v) for v in size.split("x"))
        bench_ssim(n, m, args.exhaustive_pairs)
    for px in args.px:
        bench_downstream(px, args.repeats)


if __name__ == "__main__":
    main()
