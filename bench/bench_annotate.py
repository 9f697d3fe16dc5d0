"""Annotation throughput against a local OpenAI-compatible server that adds a fixed latency per request.

The ideal for a client holding ``concurrency`` requests in flight against a server answering each in
``latency`` seconds is concurrency / latency requests per second; the ratio below says how close the
annotate stage (thread pool, HTTP client, validation, committed part files, final merge) gets to it.

    .venv/bin/python bench/bench_annotate.py [--n 96] [--concurrency 8] [--latency 0.2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from craft.annotate.run import AnnotateConfig, main  # noqa: E402
from craft.data.demo import DemoConfig, generate  # noqa: E402
from tests.annotate_server import ScriptedServer  # noqa: E402


def run(n: int, concurrency: int, latency: float, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ds = Path(tmp) / "demo-cxr"
        generate(DemoConfig(modality="cxr", n=n, seed=0, resolution=64), ds)
        cfg = AnnotateConfig(
            backend="openai",
            model="bench-vlm",
            concurrency=concurrency,
            batch_size=batch_size,
            max_retries=0,
            progress=False,
        )
        with ScriptedServer(latency_s=latency) as srv:
            cfg.base_url = srv.base_url
            t0 = time.perf_counter()
            summary = main(cfg, ds, Path(tmp) / "out")
            wall = time.perf_counter() - t0
        assert summary["done"] == n, summary
        first = min(x.t for x in srv.seen)
        last = max(t for t, _ in srv.replies)
        return {"wall_s": wall, "busy_s": last - first, "requests": len(srv.seen), "max_in_flight": srv.max_in_flight}


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="images (one request each)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the server waits before answering")
    ap.add_argument("--batch-size", type=int, default=8, help="answers per committed part file")
    args = ap.parse_args()
    r = run(args.n, args.concurrency, args.latency, args.batch_size)
    throughput = r["requests"] / r["wall_s"]
    ideal = args.concurrency / args.latency
    print(f"requests: {r['requests']}  wall: {r['wall_s']:.2f} s  max in flight: {r['max_in_flight']}")
    print(
        f"throughput: {throughput:.1f} req/s  ideal: {ideal:.1f} req/s (concurrency {args.concurrency} / latency "
        f"{args.latency} s; lower bound on wall {args.n / ideal:.2f} s)"
    )
    steady = r["requests"] / r["busy_s"]
    print(f"steady state (first request to last reply, no setup or merge): {steady:.1f} req/s")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"ratio: annotate_throughput_vs_ideal = {throughput / ideal:.3f}")
    print(f"ratio: annotate_steady_throughput_vs_ideal = {steady / ideal:.3f}")


if __name__ == "__main__":
    main_cli()
