"""Run the pipeline on this machine with kfp.local (no cluster) and summarise what it produced."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def object_store(root: Path) -> Iterator[str]:
    """The object store for a local run: the configured one (CRAFT_S3_ENDPOINT), else a SeaweedFS on loopback.

    The loopback store keeps its data in ``root/store`` across runs (the demo's model registry and
    production pointer) and hands its fresh keys to the pipeline's tasks through the environment.
    """
    if os.environ.get("CRAFT_S3_ENDPOINT"):
        yield os.environ["CRAFT_S3_ENDPOINT"]
        return
    from craft.storage.seaweed import start_s3_server

    server = start_s3_server(root / ".store-server", data_dir=root / "store")
    try:
        with _environ(server.env):
            yield server.endpoint
    finally:
        server.stop()


MODEL_CACHE_DIR = ".model-cache"  # under the run root: the model, oracle and latent caches of a local run


def local_env(root: Path) -> dict[str, str]:
    """What a local run adds to its tasks' environment (they inherit this process's, under the compiled task env).

    ``CRAFT_LOCAL_MODEL_CACHE``: the user's own ``$CRAFT_MODEL_CACHE`` when they set one before the run, else the
    model cache under the run root. kfp.local passes a task the env the
    compiled pipeline sets, and the GPU steps' ``CRAFT_MODEL_CACHE`` is their pod's emptyDir mount path
    (pipelines/resources.py), which a user's machine does not have and a non-root user cannot create;
    ``craft.data.loader.model_cache_dir`` prefers this one. Kept across runs of one root, like ``store``,
    so a second demo reuses the oracle and the latents.
    """
    from craft.data.loader import LOCAL_CACHE_ENV, MODEL_CACHE_ENV

    mine = os.environ.get(LOCAL_CACHE_ENV) or os.environ.get(MODEL_CACHE_ENV)  # the user's choice, set before the run
    return {LOCAL_CACHE_ENV: str(Path(mine).resolve() if mine else Path(root).resolve() / MODEL_CACHE_DIR)}


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_local(
    profile: str,
    overrides: list[str],
    root: str | Path,
    dataset_uri: str = "",
    model_name: str = "",
    base_uri: str = "",
) -> dict[str, Any]:
    """Run the pipeline built from ``profile``'s plan with kfp.local's SubprocessRunner; return a summary of every task.

    The summary holds the run folder, each task's status, duration and logged metrics, and the
    path of the HTML report(s) the run wrote. Tasks that need an object store (the model registry)
    get the configured one or a loopback SeaweedFS (see ``object_store``).
    """
    root = Path(root).resolve()
    with local_session(root), object_store(root) as endpoint:
        summary = _run(profile, overrides, root, dataset_uri, model_name, base_uri)
    summary["object_store"] = endpoint
    return summary


@contextlib.contextmanager
def local_session(root: str | Path) -> Iterator[Path]:
    """kfp.local's SubprocessRunner on pipeline root ``root`` with :func:`local_env`: a pipeline called inside
    runs its tasks here, and everything they write (artifacts, caches) goes under ``root``."""
    from kfp import local

    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = local_env(root)
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    with _environ(env):
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        yield root


def _run(
    profile: str, overrides: list[str], root: Path, dataset_uri: str, model_name: str, base_uri: str
) -> dict[str, Any]:
    from pipelines.craft_pipeline import pipeline_for_profile

    before = {p.name for p in root.iterdir()}
    skip = {"store", ".store-server", MODEL_CACHE_DIR}
    start = time.time()
    error: Exception | None = None
    try:
        pipeline_for_profile(profile, overrides)(profile=profile, overrides=list(overrides), dataset_uri=dataset_uri,
                                                 model_name=model_name, base_uri=base_uri)  # fmt: skip
    except Exception as e:  # summarise what ran, then re-raise below
        error = e
    new = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name not in before | skip), key=lambda p: p.stat().st_mtime
    )
    summary = summarize_run(new[-1]) if new else {"run_dir": None, "tasks": []}
    summary.update(profile=profile, wall_s=round(time.time() - start, 1), ok=error is None)
    summary["decision"] = decision_line(Path(summary["run_dir"]) if summary["run_dir"] else None, error)
    if error is not None:
        summary["error"] = str(error)
        print(format_summary(summary))
        raise error
    return summary


def decision_line(run_dir: Path | None, error: Exception | None = None) -> str:
    """The one line a run ends with: registered as candidate (version), or refused and why."""
    registered = sorted(run_dir.rglob("registered.json")) if run_dir else []
    if registered:
        return json.loads(registered[-1].read_text())["line"]
    decisions = sorted(run_dir.rglob("decision.json")) if run_dir else []
    if decisions:
        d = json.loads(decisions[-1].read_text())
        if not d.get("passed"):
            return f"{d.get('model')}: candidate REFUSED by the gates: {d.get('failures')}; nothing registered"
    reports = [p for p in (run_dir.rglob("report.json") if run_dir else []) if "validat" in str(p.parent)]
    for r in reports:
        doc = json.loads(r.read_text())
        if doc.get("ok") is False:
            n = len(doc.get("failures") or [])
            return f"dataset REFUSED by validation ({n} failures, report {r.parent}); nothing trained or registered"
    if error is not None:
        return f"run FAILED before the gate ({str(error).splitlines()[0][:300]}); nothing registered"
    return "no gate decision found in the run folder"


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Read each task folder's executor_output.json: metrics, artifact paths, timing."""
    tasks = []
    reports = []
    for task_dir in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        out_file = task_dir / "executor_output.json"
        info: dict[str, Any] = {"task": task_dir.name, "status": "ok" if out_file.exists() else "failed"}
        files = [p for p in task_dir.rglob("*") if p.is_file()]
        if files:
            first = min(p.stat().st_mtime for p in files)
            last = max(p.stat().st_mtime for p in files)
            info["seconds"] = round(last - first, 1)
        metrics: dict[str, float] = {}
        if out_file.exists():
            data = json.loads(out_file.read_text())
            for name, arts in data.get("artifacts", {}).items():
                for art in arts.get("artifacts", []):
                    meta = art.get("metadata", {})
                    if name == "metrics" or "metrics" in name:
                        metrics.update({k: v for k, v in meta.items() if isinstance(v, (int, float))})
        for html in task_dir.rglob("*"):
            if html.is_file() and (html.suffix == ".html" or html.name in ("report", "html")):
                reports.append(str(html))
        info["metrics"] = metrics
        tasks.append(info)
    return {"run_dir": str(run_dir), "tasks": tasks, "reports": reports}


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table of tasks, statuses and headline metrics, then the report path(s)."""
    rows = [("task", "status", "metrics")]
    for t in summary.get("tasks", []):
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(t.get("metrics", {}).items())[:8])
        rows.append((t["task"], t["status"], metrics))
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"craft run: profile={summary.get('profile')} ok={summary.get('ok')} wall={summary.get('wall_s')}s"]
    lines += [f"  {r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows]
    lines.append(f"run folder: {summary.get('run_dir')}")
    for r in summary.get("reports", []):
        lines.append(f"report: {r}")
    if summary.get("decision"):
        lines.append(summary["decision"])  # last: the one line a user looks for
    return "\n".join(lines)
