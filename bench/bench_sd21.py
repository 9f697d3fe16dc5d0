"""Stable Diffusion 2.1 on a GPU: the DRaFT-1 step at fp32 vs bf16 and by VAE checkpointing, and sampling speed.

    python bench/bench_sd21.py                 # a CUDA machine (bench/gpu_check.sh runs it there)
    python bench/bench_sd21.py --tiny          # CPU smoke check: the same code on a tiny config (not a figure)

SD 2.1's real architecture is built from its configs, written out below as the stabilityai/stable-diffusion-2-1
snapshot has them (UNet 865M, VAE 84M, OpenCLIP ViT-H text tower 1024 wide, 23 layers), with random weights:
nothing is downloaded. The tokenizer is craft's offline BPE (the text tower's cost depends on its 77 positions,
not on the vocabulary). One process, every row measured side by side on the same models:

- DRaFT-1 step (``craft.train.reward.DraftObjective``, what ``craft train reward`` runs): LoRA r=4 on
  to_q/to_k/to_v/to_out.0, K=1, n=2 repeats, batch 1 prompt, guidance 4 (so the UNet batch is 4), T sampler steps,
  the eq. 1 diffusion loss on one paired latent, UNet grad step checkpointed, a toy differentiable reward (the
  critic VLM is not part of this); AdamW. At 512 and 768 px, fp32 (TF32 matmuls) vs bf16 autocast, and the VAE
  decode in the graph (``off``), checkpointed as one unit (``whole``) or block by block (``blocks``), or in the
  graph one image a piece (``pieces``: ``reward.decode_chunk=1``, each piece's decode and reward backward first).
  Median step time and ``torch.cuda.max_memory_allocated`` (total, and above the weights and optimizer state).
- Evaluation sampling (``craft.sample.generate``): DDIM 20 steps, guidance 4, images/s at fp32 vs bf16.

Prints a table, then ``ratio:`` lines; ``--json PATH`` writes every number. ``--budget-s`` skips the rows that
would start after that many seconds (they print as skipped), so a lease-bounded run still ends with its table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "adenocarcinoma with crowded irregular glands, h&e stained tissue"

# stabilityai/stable-diffusion-2-1 unet/config.json (the 768-px v-prediction model; SD 2.1-base differs only in
# sample_size 64 and upcast_attention false). attention_head_dim is diffusers' name for the head COUNT per level.
SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20), dual_cross_attention=False, use_linear_projection=True,
    upcast_attention=True, num_class_embeds=None,
)  # fmt: skip
# vae/config.json
SD21_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    act_fn="silu", norm_num_groups=32, sample_size=768, scaling_factor=0.18215,
)  # fmt: skip
# text_encoder/config.json (OpenCLIP ViT-H/14's text tower, penultimate layer: 23 of its 24 layers)
SD21_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=512,
)  # fmt: skip
# scheduler/scheduler_config.json (DDIM over the scaled-linear schedule, v-prediction)
SD21_SCHED = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
)  # fmt: skip

# --tiny: the same block types and options at toy widths, for a CPU smoke check of this script
TINY_UNET = dict(
    SD21_UNET, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4),
)  # fmt: skip
TINY_VAE = dict(
    SD21_VAE, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=32,
)  # fmt: skip
TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)  # fmt: skip


def build(tiny: bool, seed: int = 0):
    """(unet, vae, text_encoder, tokenizer, scheduler) with SD 2.1's (or the tiny) configs, random weights, fp32."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from craft.models.diffusion import build_tokenizer

    tok = build_tokenizer(["adenocarcinoma"], max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD21_UNET))
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD21_VAE))
    text_cfg = dict(TINY_TEXT if tiny else SD21_TEXT)
    text_cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for m in (unet, vae, te):
        m.eval()
    return unet, vae, te, tok, DDIMScheduler(**SD21_SCHED)


def n_params(m) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def mem_start(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 0
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def mem_peak(dev: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated() if dev.type == "cuda" else None


def time_draft(model, opt, params, batch, dev, precision: str, warmup: int, iters: int) -> dict:
    """Median seconds of full DRaFT-1 steps (forward, backward, clip, AdamW) and the peak memory over them."""
    from craft.models.accel import autocast

    gen = torch.Generator().manual_seed(0)
    base = mem_start(dev)
    times = []
    for i in range(warmup + iters):
        sync(dev)
        t0 = time.perf_counter()
        with autocast(dev, precision):
            res = model(batch, gen)
        loss = res["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite DRaFT loss {float(loss)} ({precision}, {model.cfg.vae_checkpointing})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = mem_peak(dev)
    return {"step_s": statistics.median(times), "times": times, "peak_gib": None if peak is None else peak / 2**30,
            "step_gib": None if peak is None else (peak - base) / 2**30}  # fmt: skip


def time_sampling(pipe, dev, precision: str, n_images: int, steps: int, warmup: int, iters: int) -> dict:
    from craft.sample import generate

    base = mem_start(dev)
    times = []
    for i in range(warmup + iters):
        sync(dev)
        t0 = time.perf_counter()
        imgs = generate(pipe, [PROMPT] * n_images, steps=steps, guidance=4.0, seed=i, batch=n_images,
                        precision=precision)  # fmt: skip
        sync(dev)
        if len(imgs) != n_images:
            raise RuntimeError(f"generate returned {len(imgs)} images, asked for {n_images}")
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = mem_peak(dev)
    return {"seconds": t, "images_per_s": n_images / t, "peak_gib": None if peak is None else peak / 2**30,
            "step_gib": None if peak is None else (peak - base) / 2**30}  # fmt: skip


def _gib(x) -> str:
    return "n/a (CPU)" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke check; its numbers are no figure)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 512 768 (tiny: 32 48)")
    ap.add_argument("--sample-steps", type=int, default=None, help="DRaFT sampler steps T (default 20; tiny 4)")
    ap.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of evaluation sampling")
    ap.add_argument("--eval-images", type=int, default=None, help="images per sampling batch (default 8; tiny 2)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per row (default 3; tiny 1)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs; 1 avoids oversubscription)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip rows that would start after this (0 = none)")
    ap.add_argument("--json", default="", help="write all numbers to this file")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    from craft.models.accel import configure_kernels, resolve_precision
    from craft.models.diffusion import Components, vae_factor
    from craft.train.reward import DraftObjective, LoraSettings, RewardConfig, add_lora

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.tiny:
        ap.error("no CUDA device: SD 2.1 at 512/768 px is not runnable on CPU here; use --tiny for a smoke check")
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    res_list = args.resolutions or ([32, 48] if args.tiny else [512, 768])
    sample_steps = args.sample_steps or (4 if args.tiny else 20)
    iters = args.iters or (1 if args.tiny else 3)
    eval_images = args.eval_images or (2 if args.tiny else 8)
    kernels = configure_kernels(dev)
    precisions = ["no", "bf16"]
    for p in precisions:
        resolve_precision(p, dev)  # refuse early what the device cannot run

    import diffusers
    import transformers

    t0 = time.perf_counter()
    unet, vae, te, tok, sched = build(args.tiny)
    build_s = time.perf_counter() - t0
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, "
        f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "config": "tiny" if args.tiny else "sd21",
        "params_m": {"unet": n_params(unet), "vae": n_params(vae), "text_encoder": n_params(te)},
        "tf32": kernels, "build_s": build_s, "sample_steps": sample_steps, "iters": iters, "warmup": args.warmup,
    }  # fmt: skip
    if dev.type == "cuda":
        info["sdpa_backends"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                 "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}  # fmt: skip
    print("bench_sd21: " + json.dumps(info), flush=True)

    lora = LoraSettings(rank=4, alpha=4.0)  # to_q, to_k, to_v, to_out.0
    add_lora(unet, lora)
    for m in (unet, vae, te):
        m.to(dev)
    cfg = RewardConfig(k=1, n_repeats=2, sample_steps=sample_steps, guidance=4.0, diffusion_weight=1.0, lora=lora)
    cfg.validate()

    def reward(images, meta):  # toy differentiable reward: closeness to mid grey (the critic is not benchmarked)
        return {"total": -((images - 0.5) ** 2).mean(dim=(1, 2, 3))}

    reward.rowwise = True  # image i's reward reads image i alone: the "pieces" rows decode one image at a time

    model = DraftObjective(unet, vae, te, tok, sched, reward, cfg)
    model.enable_gradient_checkpointing()  # the UNet grad step checkpointed, as the real profiles run it
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    pipe = Components(unet, vae, te, tok, sched).pipeline()
    factor = vae_factor(vae)

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    rows, sampling = [], []
    for res in res_list:
        unet.register_to_config(sample_size=res // factor)  # DraftObjective and generate read the size here
        side = res // factor
        paired = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1)).to(dev)
        batch = {"prompt": [PROMPT], "label": ["adenocarcinoma"], "latents": paired}  # latents: the eq. 1 pair
        for precision in precisions:
            for mode in ("off", "whole", "blocks", "pieces"):
                row = {"resolution": res, "precision": precision, "vae": mode}
                if over_budget():
                    rows.append(dict(row, skipped=True))
                    print(f"row {row}: skipped (budget)", flush=True)
                    continue
                # "pieces": the decode in the graph, one image a piece (reward.decode_chunk=1); the others decode
                # the batch at once (decode_chunk=0: auto would choose pieces here on CUDA)
                model.cfg.vae_checkpointing = "off" if mode == "pieces" else mode
                model.cfg.decode_chunk = 1 if mode == "pieces" else 0
                row.update(time_draft(model, opt, params, batch, dev, precision, args.warmup, iters))
                rows.append(row)
                print(f"row {json.dumps(row)}", flush=True)
        model.eval()
        for precision in precisions:
            row = {"resolution": res, "precision": precision, "images": eval_images, "ddim_steps": args.eval_steps}
            if over_budget():
                sampling.append(dict(row, skipped=True))
                print(f"sampling {row}: skipped (budget)", flush=True)
                continue
            row.update(time_sampling(pipe, dev, precision, eval_images, args.eval_steps, args.warmup,
                                     max(1, iters - 1)))  # fmt: skip
            sampling.append(row)
            print(f"sampling {json.dumps(row)}", flush=True)
        model.train()

    report(info, rows, sampling, args.tiny)
    out = {"info": info, "draft": rows, "sampling": sampling, "total_s": time.perf_counter() - t_start}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def report(info: dict, rows: list[dict], sampling: list[dict], tiny: bool) -> None:
    name = {"no": "fp32" + (" (TF32)" if info["tf32"]["tf32_matmul"] else ""), "bf16": "bf16 autocast"}
    label = "TINY CPU SMOKE CHECK (not a GPU figure)" if tiny else f"SD 2.1 architecture on {info['device']}"
    print(f"\n== {label}: DRaFT-1 step (K=1, n=2, batch 1, T={info['sample_steps']}, LoRA r=4), "
          f"median of {info['iters']} after {info['warmup']} warm-up ==")  # fmt: skip
    print(f"{'px':>5} {'precision':<14} {'vae decode':<10} {'step s':>8} {'peak GiB':>10} {'above weights':>14}")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['resolution']:>5} {name[r['precision']]:<14} {r['vae']:<10} {'skipped (budget)':>34}")
            continue
        print(f"{r['resolution']:>5} {name[r['precision']]:<14} {r['vae']:<10} {r['step_s']:>8.3f} "
              f"{_gib(r['peak_gib']):>10} {_gib(r['step_gib']):>14}")  # fmt: skip
    print(f"\n== evaluation sampling: DDIM, guidance 4 ({label}) ==")
    print(f"{'px':>5} {'precision':<14} {'images':>6} {'steps':>5} {'s':>8} {'images/s':>9} {'peak GiB':>10}")
    for r in sampling:
        if r.get("skipped"):
            print(f"{r['resolution']:>5} {name[r['precision']]:<14} skipped (budget)")
            continue
        print(f"{r['resolution']:>5} {name[r['precision']]:<14} {r['images']:>6} {r['ddim_steps']:>5} "
              f"{r['seconds']:>8.3f} {r['images_per_s']:>9.2f} {_gib(r['peak_gib']):>10}")  # fmt: skip

    tag = "tiny" if tiny else "sd21"
    got = {(r["resolution"], r["precision"], r["vae"]): r for r in rows if not r.get("skipped")}
    print()
    for res in sorted({r["resolution"] for r in rows}):
        for mode in ("off", "whole", "blocks"):
            a, b = got.get((res, "bf16", mode)), got.get((res, "no", mode))
            if a and b:
                print(f"ratio: {tag}_{res}_draft_step_time_bf16_vs_fp32_vae_{mode} = {a['step_s'] / b['step_s']:.3f}")
                if a["step_gib"] is not None:
                    print(f"ratio: {tag}_{res}_draft_step_mem_bf16_vs_fp32_vae_{mode} = "
                          f"{a['step_gib'] / b['step_gib']:.3f}")  # fmt: skip
        for precision in ("no", "bf16"):
            p = "fp32" if precision == "no" else "bf16"
            for mode, other in (("blocks", "off"), ("blocks", "whole"), ("pieces", "off")):
                m, o = got.get((res, precision, mode)), got.get((res, precision, other))
                if m and o:
                    print(f"ratio: {tag}_{res}_{p}_draft_step_time_vae_{mode}_vs_{other} = "
                          f"{m['step_s'] / o['step_s']:.3f}")  # fmt: skip
                    if m["step_gib"] is not None:
                        print(f"ratio: {tag}_{res}_{p}_draft_step_mem_vae_{mode}_vs_{other} = "
                              f"{m['step_gib'] / o['step_gib']:.3f}")  # fmt: skip
    samp = {(r["resolution"], r["precision"]): r for r in sampling if not r.get("skipped")}
    for res in sorted({r["resolution"] for r in sampling}):
        a, b = samp.get((res, "bf16")), samp.get((res, "no"))
        if a and b:
            print(
                f"ratio: {tag}_{res}_sampling_images_per_s_bf16_vs_fp32 = {a['images_per_s'] / b['images_per_s']:.3f}"
            )


if __name__ == "__main__":
    main()
