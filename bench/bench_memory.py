"""Peak memory of a stage's training data, 200 vs 2,000 images: streamed + cached latents against the eager path.

For each dataset size (demo images from ``craft.data.demo`` at a small resolution) and each path, a fresh
subprocess builds a tiny diffusion model, then:

- ``stream`` (what the stages run now): latents through ``craft.train.crafts.stage_latents`` (encoded once into
  an empty cache folder, read back per batch), pixels as a lazy ``image_column``, one epoch of batches through
  the loop's DataLoader, then one training step of the CRAFTS denoiser through ``craft.train.loop.train``;
- ``eager`` (the pre-streaming code, copied below from commit 924615b): every image decoded into one float32
  tensor, all latents encoded into memory, the same epoch of batches by indexing, the same training step.

Each child reports its RSS after imports and model build (the floor), its peak RSS (``ru_maxrss``) after the
data is built and iterated, and after the training step. Printed: those per size and path, and ``ratio:`` lines
for peak(2000) / peak(200) per path (flat = 1.0) and the same ratio of the peak above the floor.

    .venv/bin/python bench/bench_memory.py [--sizes 200,2000 --resolution 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- the pre-streaming path (commit 924615b)


def eager_load_images(dataset_dir, df, resolution: int):
    """crafts.load_images before the loader: the whole split as one float32 tensor in [-1, 1]."""
    import torch
    from PIL import Image

    out = np.empty((len(df), resolution, resolution, 3), dtype=np.uint8)
    for i, rel in enumerate(df["image_path"].tolist()):
        with Image.open(Path(dataset_dir) / rel) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            out[i] = np.asarray(im)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def eager_encode_latents(vae, pixels, batch: int = 64):
    """crafts.encode_latents before the loader: every latent in memory."""
    import torch

    with torch.no_grad():
        vae.eval()
        outs = [vae.encode(pixels[i : i + batch]).latent_dist.mean * vae.config.scaling_factor
                for i in range(0, len(pixels), batch)]  # fmt: skip
        return torch.cat(outs)


# ---------------------------------------------------------------- one measurement (child process)


def child(mode: str, dataset: Path, resolution: int, batch: int, work: Path) -> dict:
    import os

    os.environ["CRAFT_CACHE_DIR"] = str(work / "cache")  # empty: the stream path pays its encode here
    import torch

    torch.set_num_threads(1)
    from craft.data import loader
    from craft.data.manifest import read_manifest, read_meta
    from craft.models.diffusion import ModelConfig, build_components
    from craft.train import crafts
    from craft.train.loop import LoopConfig, StepBatches, take, train

    meta = read_meta(dataset)
    mc = ModelConfig(preset="tiny", resolution=resolution, unet_channels=[8, 16], vae_channels=[8, 16],
                     text_hidden=16, text_layers=1, max_length=16)  # fmt: skip
    comp = build_components(mc, [meta.phrase(c) for c in meta.classes], seed=0)
    comp.vae.requires_grad_(False).eval()
    df = read_manifest(dataset)
    df = df[df["split"] == "train"].reset_index(drop=True)
    captions = [crafts.caption_for(r, meta, "class+weak") for _, r in df.iterrows()]
    import accelerate  # noqa: F401  (the loop's imports, loaded before the floor is read)
    import torch.utils.tensorboard  # noqa: F401
    import tqdm.auto  # noqa: F401

    floor = _rss_mb()
    t0 = time.perf_counter()
    loop = LoopConfig(steps=1, batch_size=batch, progress=False, seed=0, log_every=1)
    if mode == "stream":
        latents = crafts.stage_latents(comp.vae, dataset, df, resolution, loop)
        pixels = loader.image_column(dataset, df, resolution)
        data = {"latents": latents, "pixels": pixels, "caption": captions}
        n = len(df)
        sampler = StepBatches(n, batch, 0, 0, 1, 0, (n + batch - 1) // batch)
        for b in loader.batch_loader(data, sampler):
            assert b["latents"].shape[0] == b["pixels"].shape[0]
    else:
        pixels = eager_load_images(dataset, df, resolution)
        latents = eager_encode_latents(comp.vae, pixels)
        data = {"latents": latents, "pixels": pixels, "caption": captions}
        n = len(df)
        sampler = StepBatches(n, batch, 0, 0, 1, 0, (n + batch - 1) // batch)
        for idx in sampler:
            b = take(data, torch.tensor(idx))
            assert b["latents"].shape[0] == b["pixels"].shape[0]
    build_iter = time.perf_counter() - t0
    peak_data = _peak_mb()
    cfg = crafts.CraftsConfig(model=mc, loop=loop, train_text_encoder=False, sample_per_class=0, cate_weight=0.0)
    model = crafts.DenoiserObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, cfg)
    res = train(model, {"latents": data["latents"], "caption": captions}, loop, work / "run")
    return {"mode": mode, "n_train": n, "floor_mb": floor, "peak_data_mb": peak_data, "peak_mb": _peak_mb(),
            "seconds": build_iter, "loss": res.logs["loss"]}  # fmt: skip


# ---------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000", help="demo dataset sizes, comma separated (first, last compared)")
    ap.add_argument("--resolution", type=int, default=64, help="demo image side in pixels")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-memory"))
    ap.add_argument("--child", nargs=3, metavar=("MODE", "DATASET", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, dataset, work = args.child
        print(json.dumps(child(mode, Path(dataset), args.resolution, args.batch, Path(work))))
        return

    from craft.data.demo import DemoConfig, generate

    sizes = [int(s) for s in args.sizes.split(",")]
    rows: dict[tuple[str, int], dict] = {}
    for n in sizes:
        data = args.out / f"demo-{n}-{args.resolution}"
        if not (data / "manifest.parquet").is_file():
            t = time.perf_counter()
            generate(DemoConfig(modality="histo", n=n, seed=0, resolution=args.resolution), data)
            print(f"generated {n} demo images at {args.resolution} px in {time.perf_counter() - t:.1f} s", flush=True)
        for mode in ("stream", "eager"):
            with tempfile.TemporaryDirectory(prefix="bench-memory-") as work:
                cmd = [sys.executable, __file__, "--resolution", str(args.resolution), "--batch", str(args.batch),
                       "--child", mode, str(data), work]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[(mode, n)] = json.loads(out.strip().splitlines()[-1])
            r = rows[(mode, n)]
            print(f"{mode:6s} n={n:5d} (train {r['n_train']:4d}): floor {r['floor_mb']:7.1f} MB, peak after data "
                  f"{r['peak_data_mb']:7.1f} MB, peak after the step {r['peak_mb']:7.1f} MB (above the floor: "
                  f"{r['peak_mb'] - r['floor_mb']:6.1f} MB), build+epoch {r['seconds']:5.1f} s", flush=True)  # fmt: skip
    lo, hi = sizes[0], sizes[-1]
    for mode in ("stream", "eager"):
        a, b = rows[(mode, lo)], rows[(mode, hi)]
        print(f"ratio: memory_{mode}_peak_{hi}_vs_{lo} = {b['peak_mb'] / a['peak_mb']:.3f}")
        print(f"ratio: memory_{mode}_above_floor_{hi}_vs_{lo} = "
              f"{(b['peak_mb'] - b['floor_mb']) / max(a['peak_mb'] - a['floor_mb'], 1e-9):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
