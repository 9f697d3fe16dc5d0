"""The LoRA folded into its base weights for no-graph UNet calls (``craft.models.adapters.merged_lora``, issue 18).

    .venv/bin/python bench/bench_lora_fold.py [--threads 2] [--steps 12]

One process, one model, the two paths alternating step by step (a busy machine's drift hits both alike):
- the DRaFT-1 step of ``bench/bench_draft.py`` (tiny preset, 64 px, K=1, n=2, 4 prompts, 10 DDPM steps, guidance
  7.5, LoRA r=4, reward only) with ``reward.merge_prefix_lora`` on and off;
- evaluation sampling of a LoRA variant (``craft.sample.generate_seeded``, 32 images, DPM-Solver++ 8 steps,
  guidance 4, the demo's evaluate settings) with the fold and without it.
Prints ``ratio: lora_fold_step_speedup`` and ``ratio: lora_fold_sampling_speedup`` (unfolded time / folded; > 1 =
the fold is faster) and the largest pixel difference between the two paths' images (0-255).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ["adenocarcinoma with crowded glands", "normal colon mucosa", "adenoma", "mucinous carcinoma"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="timed DRaFT steps per side")
    ap.add_argument("--samplings", type=int, default=4, help="timed sampling calls per side")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-draft"))
    args = ap.parse_args()

    import numpy as np
    import torch

    import craft.models.adapters as adapters
    from craft.models.diffusion import load_pipeline
    from craft.sample import generate_seeded
    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_draft import ensure_pipeline, toy_reward

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(ensure_pipeline(Path(args.work), "tiny", 64))
    cfg = RewardConfig(k=1, n_repeats=2, sample_steps=10, guidance=7.5, diffusion_weight=0.0,
                       lora=LoraSettings(rank=4, alpha=4.0))  # fmt: skip
    cfg.validate()
    add_lora(pipe.unet, cfg.lora)
    model = DraftObjective(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                           lambda im, meta: {"total": toy_reward(im)}, cfg).train()  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = {"prompt": PROMPTS, "label": ["x"] * len(PROMPTS)}
    step = {True: [], False: []}
    for i in range(2 + 2 * args.steps):  # two warm-up steps, then folded / unfolded in turn
        cfg.merge_prefix_lora = bool(i % 2)
        t0 = time.perf_counter()
        model(batch, gen)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            step[cfg.merge_prefix_lora].append(time.perf_counter() - t0)

    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    real = adapters.merged_lora
    prompts, seeds = ["adenoma"] * 32, list(range(32))
    samp, imgs = {True: [], False: []}, {}
    try:
        for i in range(2 + 2 * args.samplings):
            fold = bool(i % 2)
            adapters.merged_lora = real if fold else (lambda model: contextlib.nullcontext())
            t0 = time.perf_counter()
            imgs[fold] = generate_seeded(pipe, prompts, seeds, steps=8, guidance=4.0, scheduler="dpmpp", batch=32)
            if i >= 2:
                samp[fold].append(time.perf_counter() - t0)
    finally:
        adapters.merged_lora = real
    diff = max(
        float(np.abs(np.asarray(a, float) - np.asarray(b, float)).max()) for a, b in zip(imgs[True], imgs[False])
    )
    s_on, s_off = statistics.median(step[True]), statistics.median(step[False])
    g_on, g_off = statistics.median(samp[True]), statistics.median(samp[False])
    print(
        f"threads {args.threads}: DRaFT-1 step folded {s_on:.3f} s, unfolded {s_off:.3f} s ({args.steps} each); "
        f"sampling 32 images folded {g_on:.3f} s, unfolded {g_off:.3f} s; largest pixel difference {diff:.0f}/255"
    )
    print(f"ratio: lora_fold_step_speedup = {s_off / s_on:.3f}")
    print(f"ratio: lora_fold_sampling_speedup = {g_off / g_on:.3f}")


if __name__ == "__main__":
    main()
