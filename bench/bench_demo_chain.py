"""What a demo setting costs and what the oracle reads downstream of it: stage 2 -> TI -> TI+LoRA -> CRAFT.

Issue 18 asks for the demo in ten minutes "at settings where each stage's work is worth its time". A setting of
CRAFTS stage 2 is judged by the chain the demo builds on it, not by stage 2 alone: this trains, from the stage-1
model, data, annotations and critic of a finished run, stage 2 with the given overrides, then TI, TI+LoRA and CRAFT
(the reward stage, continuing TI+LoRA) with the profile's settings, through the same ``craft train`` commands a user
runs, and scores stage 2, TI+LoRA and CRAFT with the demo's ground-truth oracle on the held-out protocol of
``bench_demo_stages.py --sampler-accuracy`` (by default 96 prompts x 4 samples: 384 samples, a binomial standard
error of about 0.02). ``--stage2 RUN_OR_MODEL`` reuses an existing stage-2 model (the setting the run was trained at).

    # a finished demo run (kfp.local layout) gives data, annotations, stage 1 and the critic:
    .venv/bin/python bench/bench_demo_chain.py --run runs/demo-bench/craft-demo-histo-... --out /tmp/chain/cos750 \
        finetune.loop.steps=750 finetune.loop.lr=2e-3 finetune.loop.lr_schedule=cosine
    .venv/bin/python bench/bench_demo_chain.py --run RUN --out /tmp/chain/base --stage2 RUN/finetune-op/model
    # a paper-table root (shared/ + seed-N/) instead:
    .venv/bin/python bench/bench_demo_chain.py --paper-table runs/paper-table/demo-cxr --profile demo-cxr ...

Prints `time: <stage> = <s>` and `accuracy: oracle <variant> = <x>` lines. Every step is skipped when its output
is already there, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_paths(run: Path) -> dict[str, Path | None]:
    """Inputs of the chain in a kfp.local demo run folder (one subfolder per task)."""
    encoders = {d.name: d / "encoder" for d in run.glob("encoder-op*") if (d / "encoder" / "lineage.json").is_file()}
    critic = next((e for e in encoders.values() if _json(e / "lineage.json").get("role") == "critic"), None)
    # the probe trained on the critic (paths compared resolved: a run folder may link its tasks' folders)
    probes = [d / "probe" for d in run.glob("probe-op*")]
    probe = next(
        (q for q in probes if critic is not None and _same(_json(q / "probe.json").get("encoder"), critic)), None
    )
    if critic is None or probe is None:
        raise SystemExit(f"{run}: no encoder task with role 'critic' and a probe trained on it (is it a demo run?)")
    return {
        "data": run / "prepare-data-op" / "dataset",
        "annotations": run / "annotate-op" / "annotations",
        "stage1": run / "pretrain-op" / "model",
        "critic": critic,
        "probe": probe,
        "oracle": run.parent / ".model-cache" / "oracle",  # a local run's cache (pipelines.local.local_env)
    }


def _same(a, b) -> bool:
    return a is not None and Path(a).resolve() == Path(b).resolve()


def paper_table_paths(root: Path) -> dict[str, Path | None]:
    """Inputs of the chain in a ``craft experiment paper-table`` root (shared across seeds); the oracle comes from
    the evaluate stage's own default cache, as the paper-table's evaluations read it."""
    s = root / "shared"
    return {"data": s / "data", "annotations": s / "annotations", "stage1": s / "pretrain", "critic": s / "critic",
            "probe": s / "critic_probe", "oracle": None}  # fmt: skip


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def craft(args: list[str], log: Path) -> float:
    """One ``craft`` command (its output to ``log``); seconds; a failure names the log."""
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "craft.cli", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"craft {args[0]} {args[1] if len(args) > 1 else ''} failed (exit {rc}); see {log}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a finished demo run folder (kfp.local layout)")
    src.add_argument("--paper-table", type=Path, help="a paper-table root (shared/, seed-N/)")
    ap.add_argument("--profile", default="demo-histo")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stage2", type=Path, help="reuse this stage-2 model instead of training one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=96, help="held-out prompts scored (stratified by class)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument(
        "overrides", nargs="*", help="stage.key=value for the chain's stages (e.g. finetune.loop.steps=750)"
    )
    args = ap.parse_args()
    p = run_paths(args.run.resolve()) if args.run else paper_table_paths(args.paper_table.resolve())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    T = args.threads
    ov = [f"{s}.loop.{k}" for s in ("finetune", "ti", "ti_lora", "reward") for k in (f"threads={T}", "progress=false")]
    ov += list(args.overrides)
    c = ["-c", args.profile, *ov]
    data = ["--data", str(p["data"])]
    stage2 = args.stage2.resolve() if args.stage2 else out / "stage2"
    times = {}
    if not (stage2 / "model_index.json").is_file():
        times["stage 2"] = craft(["train", "finetune", *data, "--base", str(p["stage1"]), "--out", str(stage2), *c],
                                 out / "finetune.log")  # fmt: skip
    base = ["--base", str(stage2)]
    if not (out / "ti" / "adapter.json").is_file():
        times["ti"] = craft(["train", "ti", *data, *base, "--out", str(out / "ti"), *c], out / "ti.log")
    if not (out / "ti_lora" / "adapter.json").is_file():
        times["ti+lora"] = craft(["train", "ti-lora", *data, *base, "--out", str(out / "ti_lora"), "--ti",
                                  str(out / "ti"), "--annotations", str(p["annotations"]), *c], out / "ti_lora.log")  # fmt: skip
    if not (out / "craft" / "adapter.json").is_file():
        times["craft"] = craft(["train", "reward", *data, "--annotations", str(p["annotations"]), "--critic",
                                str(p["critic"]), "--probe", str(p["probe"]), *base, "--out", str(out / "craft"),
                                "--start", str(out / "ti_lora"), *c], out / "reward.log")  # fmt: skip
    for name, sec in times.items():
        print(f"time: {name} = {sec:.1f} s ({T} threads)", flush=True)
    for name, model in (("stage2", f"{stage2}"), ("ti_lora", f"{stage2}:{out / 'ti_lora'}"),
                        ("craft", f"{stage2}:{out / 'craft'}")):  # fmt: skip
        res = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_demo_stages.py"), "--profile", args.profile, "--threads",
             str(T), "--sampler-accuracy", model, "--dataset", str(p["data"]), "--annotations", str(p["annotations"]),
             *(["--oracle-cache", str(p["oracle"])] if p["oracle"] else []), "--samplers", "dpmpp:8",
             f"evaluate.max_prompts={args.prompts}", f"evaluate.samples_per_prompt={args.samples}"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        line = next((x for x in res.stdout.splitlines() if x.startswith("accuracy:")), None)
        if res.returncode or line is None:
            raise SystemExit(f"scoring {name} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
        print(line.replace("accuracy: oracle dpmpp:8", f"accuracy: oracle {name}"), flush=True)


if __name__ == "__main__":
    main()
