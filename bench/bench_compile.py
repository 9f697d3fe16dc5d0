"""Regional ``torch.compile`` of the UNet for DRaFT's no-graph prefix: is it worth it at the demo size? (issue 18)

    .venv/bin/python bench/bench_compile.py --threads 1 [--lora]

The prefix (T-K UNet calls without graph) is 71% of a DRaFT-1 step (BENCHMARKS.md, "Where the time goes"), so a
faster no-graph UNet call is the lever left for the 1.5x goal. This times one no-grad UNet call at the DRaFT
bench's shape (batch 16 = 4 prompts x n=2 x guidance 2, 4x16x16 latents, tiny preset, random weights) eager and
compiled (inductor, ``dynamic=False``) in the same process, reports the compile time separately, and with
``--lora`` puts the reward stage's peft LoRA on the UNet first and times the first call after a LoRA update (the
weights change every training step). Prints ``ratio: compile_prefix_speedup`` (eager / compiled per call) and
``ratio: compile_break_even_calls`` (compile seconds / seconds saved per call).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lora", action="store_true", help="the reward stage's LoRA on the UNet (as DRaFT runs it)")
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()

    import torch

    from craft.models.diffusion import ModelConfig, build_components
    from craft.train.reward import LoraSettings, add_lora

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_components(ModelConfig(preset="tiny", resolution=64), ["a", "b"]).unet.eval()
    if args.lora:
        add_lora(unet, LoraSettings())
    x = torch.randn(16, 4, 16, 16)
    t = torch.tensor(500)
    s = torch.randn(16, 32, unet.config.cross_attention_dim)

    def per_call(f) -> float:
        with torch.inference_mode():
            for _ in range(3):
                f()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                f()
        return (time.perf_counter() - t0) / args.calls

    eager = per_call(lambda: unet(x, t, encoder_hidden_states=s).sample)
    compiled_unet = torch.compile(unet, dynamic=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled_unet(x, t, encoder_hidden_states=s)
    compile_s = time.perf_counter() - t0
    compiled = per_call(lambda: compiled_unet(x, t, encoder_hidden_states=s).sample)
    print(f"threads {args.threads}, lora {args.lora}: eager {eager:.4f} s/call, compiled {compiled:.4f} s/call, "
          f"first call (compile) {compile_s:.1f} s")  # fmt: skip
    if args.lora:
        with torch.no_grad():
            for p in unet.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # what one optimizer step does to the LoRA
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled_unet(x, torch.tensor(300), encoder_hidden_states=s)
        print(f"first compiled call after a LoRA update: {time.perf_counter() - t0:.2f} s")
    print(f"ratio: compile_prefix_speedup = {eager / compiled:.3f}")
    saved = eager - compiled
    print(f"ratio: compile_break_even_calls = {compile_s / saved:.0f}" if saved > 0 else
          "ratio: compile_break_even_calls = inf (compiled is not faster)")  # fmt: skip


if __name__ == "__main__":
    main()
