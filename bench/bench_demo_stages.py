"""Wall time of the demo pipeline per stage: the whole KFP pipeline under kfp.local, as `craft demo` runs it.

Runs ``pipelines.local.run_local`` (SubprocessRunner, loopback SeaweedFS for the registry) for a
profile and prints every task's wall time (tasks run one at a time: from the previous task's last
written file to this one's), the run's wall time, the quickest task's time (the per-task floor:
process start, imports, artifact copies) and the wall time against a budget.

    .venv/bin/python bench/bench_demo_stages.py --profile demo-histo              # profile settings
    .venv/bin/python bench/bench_demo_stages.py --profile demo-histo --budget-min 60 stage.key=value ...

    .venv/bin/python bench/bench_demo_stages.py --eval-sampling   # only the evaluate step's sampling, two samplers

``--eval-sampling`` times what the evaluate step's sampling costs per generator variant at the demo's scale
(the tiny preset at 64 px, 32 prompts x 2 samples plus the 64 downstream prompts, guidance 4, batch 32)
with today's sampler (DDIM, 15 steps) and the demo's (DPM-Solver++(2M), 8 steps), side by side in one
process, and prints `ratio: eval_sampling_dpmpp8_vs_ddim15 = <new / old>`.

    .venv/bin/python bench/bench_demo_stages.py --sampler-accuracy MODEL[:ADAPTER] --dataset D --annotations A

``--sampler-accuracy`` samples the evaluate step's held-out protocol (the profile's prompts, seeds, guidance)
from a trained generator (a pipeline folder, optionally with an adapter folder: e.g. a demo run's
finetune-op model and reward-op adapter) with each sampler and scores the samples with the demo oracle
(``craft.evaluate.oracle``, trained or read from ``--oracle-cache``): `accuracy: oracle <sampler> = <x>`,
the share of samples both samplers' oracle calls agree on, and `ratio: oracle_accuracy_dpmpp8_vs_ddim15`.

Prints `time: <task> = <s>` lines, `time: per-task floor = <s>` and
`ratio: demo_wall_vs_10min = <wall / 600 s>` (issue 18's goal: the demo in ten minutes on 2 cores) and
`ratio: <profile>_wall_vs_budget = <wall / budget>`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo-histo")
    ap.add_argument("--budget-min", type=float, default=60.0, help="the demo's wall-time budget, minutes")
    ap.add_argument("--root", default="", help="pipeline root (default: a temporary folder)")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--eval-sampling", action="store_true", help="time only the evaluate step's sampling")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --eval-sampling")
    ap.add_argument("--n", type=int, default=128, help="images per sampler for --eval-sampling (128: one variant)")
    ap.add_argument("--sampler-accuracy", default="", help="MODEL_DIR[:ADAPTER_DIR]: oracle accuracy per sampler")
    ap.add_argument("--dataset", default="", help="dataset folder for --sampler-accuracy")
    ap.add_argument("--annotations", default="", help="annotate output for --sampler-accuracy")
    ap.add_argument("--oracle-cache", default="", help="oracle cache folder (default: the evaluate step's)")
    ap.add_argument("--samplers", default="ddim:15,dpmpp:8", help="sampler:steps,... for --sampler-accuracy")
    ap.add_argument("overrides", nargs="*", help="pipeline-wide overrides stage.key=value")
    args = ap.parse_args()
    if args.eval_sampling:
        eval_sampling(args.threads, args.n)
        return
    if args.sampler_accuracy:
        sampler_accuracy(args)
        return

    from pipelines.local import run_local

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="craft-demo-bench-"))
    t0 = time.time()
    summary = run_local(args.profile, list(args.overrides), root)
    wall = time.time() - t0  # includes starting and stopping the loopback object store
    # kfp.local's SubprocessRunner runs one task at a time: a task's wall time is from the previous task's last
    # written file to its own (process start, imports, the work, artifact copies); the first from the run start
    ends = []
    for t in summary["tasks"]:
        files = [f for f in (Path(summary["run_dir"]) / t["task"]).rglob("*") if f.is_file()]
        ends.append((max(f.stat().st_mtime for f in files) if files else t0, t))
    ends.sort(key=lambda x: x[0])
    prev, tasks = t0, []
    for end, t in ends:
        tasks.append((t["task"], end - prev, t["status"]))
        prev = end
    name = Path(args.profile).stem.replace("-", "_")
    for task, sec, status in sorted(tasks, key=lambda x: -x[1]):
        print(f"time: {task} = {sec:.1f} s ({status})")
    print(f"time: wall = {wall:.1f} s ({wall / 60:.1f} min), tasks = {len(tasks)}")
    # the quickest task does almost no work: its time is what kfp.local costs every task (start, imports, copies)
    floor = min(sec for _, sec, _ in tasks) if tasks else 0.0
    print(f"time: per-task floor = {floor:.1f} s (x {len(tasks)} tasks = {floor * len(tasks):.0f} s)")
    print(f"ratio: demo_wall_vs_10min = {wall / 600:.3f}")
    print(f"ratio: {name}_wall_vs_budget = {wall / (args.budget_min * 60):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


def eval_sampling(threads: int, n: int = 128, repeats: int = 2) -> None:
    """Seconds per generator variant of the evaluate step's sampling, DDIM 15 vs DPM-Solver++ 8 (module docstring).

    The two samplers alternate ``repeats`` times in one process and each keeps its best time, so a busy
    machine slows both alike; the weights are random (the cost of a step does not depend on them)."""
    import torch

    from craft.models.diffusion import ModelConfig, build_components
    from craft.sample import generate_seeded

    torch.set_num_threads(threads)
    classes = ["adenocarcinoma", "adenoma", "mucinous", "normal"]
    pipe = build_components(ModelConfig(preset="tiny", resolution=64), classes, seed=0).pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"{classes[i % 4]}, glands" for i in range(n)]
    seeds = list(range(n))
    best = {}
    for _ in range(repeats):
        for name, sched, steps in (("ddim15", "ddim", 15), ("dpmpp8", "dpmpp", 8)):
            t = time.perf_counter()
            generate_seeded(pipe, prompts, seeds, steps=steps, guidance=4.0, scheduler=sched, batch=32)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    for name, sec in best.items():
        print(f"time: eval sampling {name} = {sec:.2f} s per variant ({n} images, {threads} threads)")
    print(f"ratio: eval_sampling_dpmpp8_vs_ddim15 = {best['dpmpp8'] / best['ddim15']:.3f}")


def sampler_accuracy(args) -> None:
    """Oracle accuracy of one generator's held-out samples under each sampler (module docstring)."""
    import numpy as np
    import torch

    from craft.config import load_stage_config
    from craft.evaluate import run as ev

    cfg = load_stage_config("evaluate", args.profile, list(args.overrides))
    torch.set_num_threads(args.threads)
    model, _, adapter = args.sampler_accuracy.partition(":")
    meta, test_all, _ = ev.held_out_table(args.dataset, args.annotations, cfg.split)
    cases = ev.stratified_cap(test_all, cfg.max_prompts, cfg.seed)
    S = cfg.samples_per_prompt
    ids = [i for i in cases["image_id"].astype(str) for _ in range(S)]
    labels = [lbl for lbl in cases["label"].astype(str) for _ in range(S)]
    seeds = [ev.sample_seed(cfg.seed, i, k % S) for k, i in enumerate(ids)]
    oc = cfg.oracle
    if args.oracle_cache:
        oc.cache_dir = args.oracle_cache
    oracle = ev.demo_oracle(args.dataset, meta, oc)  # the evaluate step's oracle for these images
    pipe, ameta = ev.load_variant_pipeline(ev.VariantSpec(model, adapter), torch.device("cpu"))
    prompts = [ev.variant_prompt(p, lbl, ameta) for p, lbl in
               zip([p for p in cases["enriched_prompt"].astype(str) for _ in range(S)], labels)]  # fmt: skip
    correct, secs = {}, {}
    for spec in args.samplers.split(","):
        sched, steps = spec.split(":")
        cfg.scheduler, cfg.steps = sched, int(steps)
        t = time.perf_counter()
        arr = ev.to_dataset_array(ev.generate(pipe, prompts, seeds, cfg), meta)
        secs[spec] = time.perf_counter() - t
        correct[spec] = np.asarray(oracle.correct(arr, labels), dtype=bool)
        print(f"accuracy: oracle {spec} = {correct[spec].mean():.3f} ({len(arr)} samples, {secs[spec]:.1f} s)")
    names = list(correct)
    if len(names) >= 2:
        a, b = correct[names[0]], correct[names[1]]
        print(f"agreement: oracle correct/incorrect {names[0]} vs {names[1]} = {(a == b).mean():.3f}")
        ratio = b.mean() / a.mean() if a.mean() > 0 else float("nan")
        print(f"ratio: oracle_accuracy_{names[1].replace(':', '')}_vs_{names[0].replace(':', '')} = {ratio:.3f}")


if __name__ == "__main__":
    main()
