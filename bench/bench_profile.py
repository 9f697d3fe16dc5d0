"""Where the time goes: torch.profiler over the DRaFT step, a CRAFTS stage-1 and stage-2 step and evaluation sampling.

    PYTHONPATH=. .venv/bin/python bench/bench_profile.py --threads 2 --top 12

Everything at the demo's tiny size (configs/demo-histo.yaml: tiny preset, 64 px, 4x16x16 latents) with random
weights: the DRaFT step as bench/bench_draft.py runs it (4 prompts x n=2, 10 DDPM steps, guidance 7.5, K=1, with
the eq. 1 diffusion loss), once on the stage's defaults ("fast") and once with every speed switch off as the step
ran before issue 18 ("reference": text re-encoded, no_grad prefix, separate L_diff call, checkpointing); a CRAFTS
step of each stage (batch 32, text encoder trained, L_corr; stage 2 adds L_cate); and ``craft.sample.generate``
(32 prompts, 15 DDIM steps, guidance 4: the demo's evaluation). Per workload: the wall time of the profiled
steps, the regions (``record_function`` labels in the code: share of the step, inclusive), and the top-N
operators by self CPU time. Prints ``ratio: profile_draft_fast_vs_reference`` (reference step / fast step, both
under the profiler). Profiler overhead inflates small-op counts; read shares, not absolute times.
``--candidates``: no profiler; the reward-only DRaFT step timed per speed candidate (checkpointing, bf16 autocast,
channels_last) in one process, alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PROMPTS = ["adenocarcinoma with crowded glands", "normal colon mucosa", "adenoma", "mucinous carcinoma"]


def components(seed: int = 0):
    from craft.models.diffusion import ModelConfig, build_components

    return build_components(ModelConfig(preset="tiny", resolution=64), ["adenocarcinoma", "adenoma"], seed=seed)


def draft_workload(reference: bool):
    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    comp = components()
    extra = dict(text_cache=0, prefix_inference_mode=False, fuse_diffusion_loss=False) if reference else {}
    cfg = RewardConfig(k=1, n_repeats=2, sample_steps=10, guidance=7.5, lora=LoraSettings(), **extra)
    cfg.validate()
    add_lora(comp.unet, cfg.lora)

    def reward(images, meta):
        return {"total": -((images - 0.5) ** 2).mean(dim=(1, 2, 3))}

    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, cfg)
    if reference:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the loop (loop.fused_optimizer)
    gen = torch.Generator().manual_seed(0)
    batch = {"prompt": PROMPTS, "label": ["x"] * 4, "latents": torch.randn(4, 4, 16, 16, generator=gen)}
    return lambda: train_step(model, batch, gen, opt, params)


def crafts_workload(stage: int):
    from craft.losses import typicality_stats
    from craft.train.crafts import DenoiserObjective, FinetuneConfig, PretrainConfig

    comp = components()
    cfg = PretrainConfig() if stage == 1 else FinetuneConfig()
    gen = torch.Generator().manual_seed(0)
    phrases = ["adenocarcinoma", "adenoma", "normal colon mucosa", "mucinous carcinoma"]
    caps = [f"{phrases[i % 4]}, glands and stroma with nuclei {i}" for i in range(32)]
    batch = {"latents": torch.randn(32, 4, 16, 16, generator=gen), "caption": caps,
             "class_prompt": [phrases[i % 4] for i in range(32)]}  # fmt: skip
    mu, sigma = 0.0, 1.0
    if stage == 2:
        s = torch.rand(32, generator=gen) * 0.5 + 0.25
        mu, sigma = typicality_stats(s)
        batch["typicality"] = s
    model = DenoiserObjective(comp.unet, comp.text_encoder, comp.tokenizer, comp.scheduler, cfg, mu, sigma)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)  # as the loop (loop.fused_optimizer)
    return lambda: train_step(model, batch, gen, opt, params)


def train_step(model, batch, gen, opt, params) -> None:
    with record_function("step/forward"):
        loss = model(batch, gen)["loss"]
    with record_function("step/backward"):
        loss.backward()
    with record_function("step/optimizer"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def sampling_workload():
    from craft.sample import generate

    pipe = components().pipeline()
    prompts = [PROMPTS[i % 4] for i in range(32)]

    def run() -> None:
        with record_function("sample/generate"):
            generate(pipe, prompts, steps=15, guidance=4.0, seed=0, batch=32)

    return run


def profile_workload(name: str, fn, steps: int, warmup: int, top: int) -> float:
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) / steps
    ev = prof.key_averages()
    total_us = wall * 1e6 * steps
    regions = sorted((e for e in ev if "/" in e.key and e.key.split("/")[0] in ("step", "draft", "crafts", "sample")),
                     key=lambda e: -e.cpu_time_total)  # fmt: skip
    print(f"\n### {name}: {wall:.3f} s per step under the profiler ({steps} steps)\n")
    print("| region | ms / step | share of step |")
    print("|---|---|---|")
    for e in regions:
        print(f"| `{e.key}` | {e.cpu_time_total / 1e3 / steps:.1f} | {e.cpu_time_total / total_us:.0%} |")
    ops = sorted((e for e in ev if e.key.startswith("aten::") or e.key.startswith("autograd::")
                  or e.key.startswith("Optimizer")), key=lambda e: -e.self_cpu_time_total)[:top]  # fmt: skip
    print(f"\n| top {top} ops by self CPU | calls / step | self ms / step | share |")
    print("|---|---|---|---|")
    for e in ops:
        print(f"| `{e.key}` | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.1f} | "
              f"{e.self_cpu_time_total / total_us:.0%} |")  # fmt: skip
    return wall


def candidates(threads: int, steps: int) -> None:
    """Time the reward-only DRaFT-1 step (bench_draft's setting) under each speed candidate, in this one process,
    alternating: checkpointed (the pre-issue-18 default), not, bf16 autocast, channels_last."""
    import statistics

    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    comp = components()
    cfg = RewardConfig(k=1, n_repeats=2, sample_steps=10, guidance=7.5, diffusion_weight=0.0, lora=LoraSettings())
    add_lora(comp.unet, cfg.lora)

    def reward(images, meta):
        return {"total": -((images - 0.5) ** 2).mean(dim=(1, 2, 3))}

    model = DraftObjective(comp.unet, comp.vae, comp.text_encoder, comp.tokenizer, comp.scheduler, reward, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = {"prompt": PROMPTS, "label": ["x"] * 4}
    runs = {"checkpointed": (True, False, False), "no checkpointing": (False, False, False),
            "bf16 autocast": (False, True, False), "channels_last": (False, False, True)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(2):  # two alternating rounds
        for name, (ckpt, bf16, cl) in runs.items():
            model.checkpointing = ckpt
            fmt = torch.channels_last if cl else torch.contiguous_format
            comp.unet.to(memory_format=fmt)
            comp.vae.to(memory_format=fmt)
            gen = torch.Generator().manual_seed(0)
            for i in range(steps + 1):
                t0 = time.perf_counter()
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
                with ctx:
                    loss = model(batch, gen)["loss"]
                loss.backward()
                for p in params:
                    p.grad = None
                if i:  # the first step of each warms up
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["checkpointed"])
    for name, ts in times.items():
        print(f"candidate: {name}: median {statistics.median(ts):.3f} s over {len(ts)} steps "
              f"({base / statistics.median(ts):.2f}x the checkpointed step)")  # fmt: skip
    print(f"ratio: draft_nockpt_vs_ckpt = {base / statistics.median(times['no checkpointing']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per workload")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--only", default="", help="comma list of draft,draft_reference,crafts1,crafts2,sampling")
    ap.add_argument("--candidates", action="store_true", help="time the DRaFT step per speed candidate instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"config: threads={args.threads} torch={torch.__version__} load1={os.getloadavg()[0]:.2f} "
          f"cpus={os.cpu_count()}")  # fmt: skip
    if args.candidates:
        candidates(args.threads, args.steps)
        return
    work = {
        "draft": ("DRaFT-1 step, fast (stage defaults)", lambda: draft_workload(False)),
        "draft_reference": ("DRaFT-1 step, reference (pre-issue-18 path)", lambda: draft_workload(True)),
        "crafts1": ("CRAFTS stage 1 step (L_diff + L_corr, batch 32)", lambda: crafts_workload(1)),
        "crafts2": ("CRAFTS stage 2 step (L_diff + L_corr + L_cate, batch 32)", lambda: crafts_workload(2)),
        "sampling": ("evaluation sampling (32 prompts, 15 DDIM steps, guidance 4)", sampling_workload),
    }
    only = [w for w in args.only.split(",") if w] or list(work)
    walls = {}
    for key in only:
        name, make = work[key]
        with contextlib.redirect_stderr(open(os.devnull, "w")):
            fn = make()
        walls[key] = profile_workload(name, fn, args.steps if key != "sampling" else 1, args.warmup, args.top)
    if "draft" in walls and "draft_reference" in walls:
        print(f"\nratio: profile_draft_fast_vs_reference = {walls['draft_reference'] / walls['draft']:.3f}")


if __name__ == "__main__":
    main()
