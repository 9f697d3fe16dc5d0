"""Wall time of the demo pipeline per stage: the whole KFP pipeline under kfp.local, as `craft demo` runs it.

Runs ``pipelines.local.run_local`` (SubprocessRunner, loopback SeaweedFS for the registry) for a
profile and prints every task's wall time (tasks run one at a time: from the previous task's last
written file to this one's), the run's wall time, the quickest task's time (the per-task floor:
process start, imports, artifact copies) and the wall time against a budget.

    .venv/bin/python bench/bench_demo_stages.py --profile demo-histo              # profile settings
    .venv/bin/python bench/bench_demo_stages.py --profile demo-histo --budget-min 60 stage.key=value ...

Prints `time: <task> = <s>` lines, `time: per-task floor = <s>` and
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
    ap.add_argument("overrides", nargs="*", help="pipeline-wide overrides stage.key=value")
    args = ap.parse_args()

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
    print(f"ratio: {name}_wall_vs_budget = {wall / (args.budget_min * 60):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
