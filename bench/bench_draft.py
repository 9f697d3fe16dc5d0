"""DRaFT-step benchmark: our DRaFT-K step (K=1, n=2, batch 4) against TRL 0.23.1's AlignPropTrainer.

    .venv/bin/python bench/bench_draft.py                       # tiny preset, 64x64, CPU, 1 thread
    python bench/bench_draft.py --preset sd21 --resolution 512  # on a GPU machine

Both sides load the SAME saved pipeline directory (random weights of the chosen size preset), run one
after the other in separate processes (clean peak memory), with the same thread count, the same
number of sampler steps, guidance and LoRA (r=4 on to_q/to_k/to_v/to_out.0, AdamW lr 1e-3) and the
same toy differentiable reward. AlignProp runs in its own venv (created under the work dir when
missing: trl 0.23.1 is the last release with AlignProp).

What each step does (why the numbers differ beyond implementation quality):
- ours: 4 prompts x n=2 repeats = 8 trajectories in ONE UNet batch (x2 for guidance), DDPM sampler, the
  stage's defaults (RewardConfig): frozen text states cached across steps, the no-graph prefix under
  inference_mode with the LoRA folded into its base weights and the UNet call traced (TorchScript, once per
  shape, in the warm-up step), no gradient checkpointing (no memory budget set), the last step and the VAE decode in the
  graph with autograd keeping no frozen convolution's input (``lean_saves``); "full" adds the eq. 1 diffusion
  loss on 4 paired real latents as 4 more rows of the last graph step's UNet batch;
- AlignProp: train_batch_size = 8 trajectories (the same number of images per step; it has no
  repeats), DDIM (eta 1), the text encoder every step, every UNet call wrapped in checkpointing,
  only the last step's prediction with gradient, VAE decode in the graph, not checkpointed.

One run measures, each in its own process (clean peak memory) and alternating over ``--rounds`` rounds (a busy
machine's drift hits every side alike): ours reward-only, AlignProp, ours full (and with ``--reference`` our
step with every speed switch off, as it ran before issue 18). Prints
``ratio: draft_speedup_vs_alignprop`` (AlignProp's step time / ours, same reward-only objective; > 1 = faster),
``ratio: draft_full_speedup_vs_alignprop`` (AlignProp's reward-only step / our full step) and
``ratio: draft_peak_mem_vs_alignprop`` (ours / theirs, same objective); the "pieces" side (our reward-only step
with the graph's decode and reward in two pieces, ``reward.decode_chunk``: each piece's backward runs before the
next piece is decoded) prints ``draft_pieces_speedup_vs_alignprop`` and ``draft_pieces_peak_mem_vs_alignprop``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["adenocarcinoma with crowded glands", "normal colon mucosa", "adenoma", "mucinous carcinoma"]


def toy_reward(images):
    """Differentiable per-image reward on [0, 1] images: closeness of the pixels to mid grey (both sides)."""
    return -((images - 0.5) ** 2).mean(dim=(1, 2, 3))


def peak_memory_gb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def ensure_pipeline(work: Path, preset: str, resolution: int) -> Path:
    from craft.models.diffusion import ModelConfig, build_components, save_pipeline

    d = work / f"pipe-{preset}-{resolution}"
    if not (d / "model_index.json").is_file():
        comp = build_components(ModelConfig(preset=preset, resolution=resolution), ["adenocarcinoma", "adenoma"])
        save_pipeline(comp.pipeline(), d, {"stage": "bench", "preset": preset})  # no safety checker / extractor
    return d


def ensure_alignprop_venv(work: Path) -> Path:
    venv = work / "alignprop-venv"
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import trl, diffusers, peft; assert trl.__version__ == '0.23.1'"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "trl==0.23.1", "diffusers", "peft"], check=True)
    subprocess.run(check, check=True)
    return py


REFERENCE = dict(
    text_cache=0,
    prefix_inference_mode=False,
    fuse_diffusion_loss=False,
    merge_prefix_lora=False,
    trace_prefix="off",
    lean_saves=False,
)  # pre-issue-18 step


def run_ours(args) -> dict:
    import torch

    from craft.models.accel import autocast
    from craft.models.diffusion import load_pipeline
    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.pipeline)
    unet, vae, te = pipe.unet.to(dev), pipe.vae.to(dev), pipe.text_encoder.to(dev)
    cfg = RewardConfig(k=1, n_repeats=2, sample_steps=args.sample_steps, guidance=args.guidance,
                       diffusion_weight=0.0 if args.no_diffusion_loss else 1.0,
                       lora=LoraSettings(rank=4, alpha=4.0), **(REFERENCE if args.reference else {}),
                       **({"compile_prefix": "on"} if args.compile else {}),
                       **({"decode_chunk": args.decode_chunk} if args.decode_chunk >= 0 else {}))  # fmt: skip
    cfg.validate()
    add_lora(unet, cfg.lora)

    def reward(images, meta):
        return {"total": toy_reward(images)}

    reward.rowwise = True  # each image's reward reads that image alone (RewardConfig.decode_chunk may split the batch)

    model = DraftObjective(unet, vae, te, pipe.tokenizer, pipe.scheduler, reward, cfg)
    if args.reference or args.checkpointing:
        model.enable_gradient_checkpointing()  # the reward stage's loop default before issue 18
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    lat = unet.config.sample_size
    batch = {"prompt": PROMPTS[: args.batch], "label": ["x"] * args.batch,
             "latents": torch.randn(args.batch, 4, lat, lat, generator=gen).to(dev)}  # fmt: skip
    times, warm = [], []
    for i in range(args.warmup + args.iters):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(dev, "auto"):  # what the loop runs: bf16 on CUDA, fp32 on CPU
            loss = model(batch, gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        (times if i >= args.warmup else warm).append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "peak_mem_gb": peak_memory_gb(dev), "device": dev,
            "times": times, "warmup_s": sum(warm), "trajectories_per_step": args.batch * 2}  # fmt: skip


ALIGNPROP_SCRIPT = textwrap.dedent(
    """
    import json, resource, statistics, sys, time
    import torch
    import accelerate
    args = json.loads(sys.argv[1])
    torch.set_num_threads(args["threads"])
    accelerate.PartialState()  # must exist before the DDPO pipeline is built (ENVIRONMENT.md)
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DefaultDDPOStableDiffusionPipeline(pretrained_model_name=args["pipeline"], use_lora=True)
    T = args["sample_steps"]
    cfg = AlignPropConfig(
        num_epochs=args["warmup"] + args["iters"], sample_num_steps=T, sample_guidance_scale=args["guidance"],
        train_batch_size=args["batch"], train_learning_rate=1e-3, truncated_backprop_rand=False,
        truncated_backprop_timestep=T - 1, mixed_precision="bf16" if dev == "cuda" else "no",
        save_freq=10**9, project_kwargs={"project_dir": args["work"]}, log_with=None,
        train_gradient_accumulation_steps=1,
    )
    prompts = args["prompts"]
    state = {"i": 0}
    def prompt_fn():
        state["i"] += 1
        return prompts[state["i"] % len(prompts)], {}
    def reward_fn(images, prompts, metadata):
        images = images.float()
        return -((images - 0.5) ** 2).mean(dim=(1, 2, 3)), {}
    trainer = AlignPropTrainer(cfg, reward_fn, prompt_fn, pipe)
    times = []
    for i in range(args["warmup"] + args["iters"]):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.step(i, i)
        if dev == "cuda":
            torch.cuda.synchronize()
        if i >= args["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print("RESULT " + json.dumps({"median_s": statistics.median(times), "peak_mem_gb": peak, "device": dev,
                                  "times": times, "trajectories_per_step": args["batch"]}))
    """
)


def _result(proc: subprocess.CompletedProcess, name: str) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{name} side failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _merge(runs: list[dict]) -> dict:
    """Rounds of one side: the median over every timed step, the highest peak."""
    times = [t for r in runs for t in r["times"]]
    return dict(
        runs[0], times=times, median_s=statistics.median(times), peak_mem_gb=max(r["peak_mem_gb"] for r in runs)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "sd15", "sd21"])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (ours); AlignProp gets batch x 2")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of every side")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every side")
    ap.add_argument("--reference", action="store_true", help="also time our step with every speed switch off")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-draft"))
    ap.add_argument("--side", default="both", choices=["both", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-diffusion-loss", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--decode-chunk", type=int, default=-1, help=argparse.SUPPRESS)  # -1: RewardConfig's default
    ap.add_argument("--no-compiled", action="store_true", help="skip the compiled-prefix side (reward.compile_prefix)")
    ap.add_argument("--no-pieces", action="store_true", help="skip the decode-in-pieces side (reward.decode_chunk)")
    args = ap.parse_args()
    if args.side == "ours":
        print("RESULT " + json.dumps(run_ours(args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pipe_dir = ensure_pipeline(work, args.preset, args.resolution)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    py = ensure_alignprop_venv(work)
    script = work / "alignprop_side.py"
    script.write_text(ALIGNPROP_SCRIPT)
    payload = {"pipeline": str(pipe_dir), "sample_steps": args.sample_steps, "guidance": args.guidance,
               "batch": args.batch * 2, "iters": args.iters, "warmup": args.warmup, "threads": args.threads,
               "prompts": PROMPTS[: args.batch], "work": str(work / "alignprop-project")}  # fmt: skip

    def ours(*flags: str) -> dict:
        cmd = [sys.executable, __file__, "--side", "ours", "--pipeline", str(pipe_dir), *flags]
        for k in ("preset", "resolution", "sample_steps", "guidance", "batch", "iters", "warmup", "threads"):
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        return _result(subprocess.run(cmd, capture_output=True, text=True, env=env), "ours")

    def theirs() -> dict:
        return _result(subprocess.run([str(py), str(script), json.dumps(payload)], capture_output=True, text=True,
                                      env=env, cwd=str(work)), "alignprop")  # fmt: skip

    sides: dict[str, list[dict]] = {"reward": [], "alignprop": [], "full": [], "compiled": [], "pieces": [],
                                    "reference": []}  # fmt: skip
    load = [os.getloadavg()[0]]
    runs = {"reward": lambda: ours("--no-diffusion-loss"), "alignprop": theirs, "full": ours}
    if not args.no_compiled:  # reward.compile_prefix=on: the prefix's UNet compiled (its warm-up step compiles)
        runs["compiled"] = lambda: ours("--no-diffusion-loss", "--compile")
    if not args.no_pieces:  # reward.decode_chunk = batch: the graph's 2 x batch images decoded in two pieces
        runs["pieces"] = lambda: ours("--no-diffusion-loss", "--decode-chunk", str(args.batch))
    if args.reference:
        runs["reference"] = lambda: ours("--no-diffusion-loss", "--reference")
    order = list(runs)
    for r in range(args.rounds):  # each round starts with another side: a falling or rising load hits all alike
        for key in order[r % len(order) :] + order[: r % len(order)]:
            sides[key].append(runs[key]())
        load.append(os.getloadavg()[0])
    res = {k: _merge(v) for k, v in sides.items() if v}
    print(f"config: preset={args.preset} resolution={args.resolution} sample_steps={args.sample_steps} K=1 n=2 "
          f"batch={args.batch} guidance={args.guidance} threads={args.threads} device={res['reward']['device']} "
          f"rounds={args.rounds} load1={min(load):.2f}-{max(load):.2f} cpus={os.cpu_count()}")  # fmt: skip
    names = {
        "reward": "ours, reward only (DRaFT-1)",
        "full": "ours, full step (+ eq. 1 L_diff)",
        "alignprop": "AlignProp (TRL 0.23.1), reward only",
        "reference": "ours, reference path, reward only",
        "compiled": "ours, reward only, compiled prefix (reward.compile_prefix=on)",
        "pieces": f"ours, reward only, decode in pieces of {args.batch} (reward.decode_chunk={args.batch})",
    }
    for key, r in res.items():
        print(f"{names[key]}: median step {r['median_s']:.3f} s over {len(r['times'])} steps "
              f"({r['trajectories_per_step']} trajectories/step), peak memory {r['peak_mem_gb']:.3f} GB "
              f"({'max_memory_allocated' if r['device'] == 'cuda' else 'peak RSS'})")  # fmt: skip
    ap_s = res["alignprop"]["median_s"]
    print(f"ratio: draft_speedup_vs_alignprop = {ap_s / res['reward']['median_s']:.3f}")
    print(f"ratio: draft_full_speedup_vs_alignprop = {ap_s / res['full']['median_s']:.3f}")
    print(f"ratio: draft_peak_mem_vs_alignprop = {res['reward']['peak_mem_gb'] / res['alignprop']['peak_mem_gb']:.3f}")
    print(f"ratio: draft_full_peak_mem_vs_alignprop = "
          f"{res['full']['peak_mem_gb'] / res['alignprop']['peak_mem_gb']:.3f}")  # fmt: skip
    if "compiled" in res:
        c = res["compiled"]
        compile_s = max(c["warmup_s"] - args.warmup * c["median_s"], 0.0)  # the warm-up step(s) beyond a normal step
        saved = res["reward"]["median_s"] - c["median_s"]
        print(f"compiled prefix: compile {compile_s:.1f} s in the warm-up step (inductor; its cache under /tmp makes "
              f"later processes faster), saves {saved:.3f} s a step: break-even after "
              f"{compile_s / saved:.0f} steps" if saved > 0 else "compiled prefix: no faster per step")  # fmt: skip
        print(f"ratio: draft_compiled_speedup_vs_alignprop = {ap_s / c['median_s']:.3f}")
        print(
            f"ratio: draft_compiled_peak_mem_vs_alignprop = {c['peak_mem_gb'] / res['alignprop']['peak_mem_gb']:.3f}"
        )
    if "pieces" in res:
        pc = res["pieces"]
        print(f"ratio: draft_pieces_speedup_vs_alignprop = {ap_s / pc['median_s']:.3f}")
        print(f"ratio: draft_pieces_peak_mem_vs_alignprop = {pc['peak_mem_gb'] / res['alignprop']['peak_mem_gb']:.3f}")
    if "reference" in res:
        print(
            f"ratio: draft_fast_speedup_vs_reference = {res['reference']['median_s'] / res['reward']['median_s']:.3f}"
        )


if __name__ == "__main__":
    main()
