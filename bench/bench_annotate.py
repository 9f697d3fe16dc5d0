"""Annotation throughput against a local OpenAI-compatible server that adds a fixed latency per request.

The ideal for a client holding ``concurrency`` requests in flight against a server answering each in
``latency`` seconds is concurrency / latency requests per second; the ratio below says how close the
annotate stage (thread pool, HTTP client with a keep-alive pool sized to the concurrency, validation,
committed part files, final merge) gets to it.

The server (tests/annotate_server.py: it checks every response_format with jsonschema, ~2.5 ms of
Python per request, inside its latency: each reply leaves ``latency`` seconds after its request arrived, as the
ideal assumes) runs in its OWN process, as a real server would run on its own machine: in the
client's process its work would hold the client's GIL and be charged to the client. It still shares
this machine's cores. The modules a run imports once per process (httpx, httpcore, pyarrow) are imported before
the clock starts; their import is start-up, not throughput.

    .venv/bin/python bench/bench_annotate.py [--n 512] [--concurrency 16] [--latency 0.2]

Prints `ratio: annotate_throughput_vs_ideal` (whole run, setup and merge included) and
`ratio: annotate_steady_throughput_vs_ideal` (first request to last reply), the seconds before the
first request and after the last reply, and the load average.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from craft.annotate.run import AnnotateConfig, main  # noqa: E402
from craft.data.demo import DemoConfig, generate  # noqa: E402


def _serve(conn, latency: float) -> None:
    """Child process: run the scripted server until told to stop, then report what it saw."""
    from tests.annotate_server import ScriptedServer

    with ScriptedServer(latency_s=latency) as srv:
        conn.send(srv.base_url)
        conn.recv()
        conn.send(
            {
                "first": min((x.t for x in srv.seen), default=float("nan")),
                "last": max((t for t, _ in srv.replies), default=float("nan")),
                "requests": len(srv.seen),
                "max_in_flight": srv.max_in_flight,
            }
        )


def run(n: int, concurrency: int, latency: float, batch_size: int) -> dict:
    import httpcore  # noqa: F401  (start-up imports, outside the clock; httpx imports httpcore on its first client)
    import httpx  # noqa: F401
    import pyarrow.parquet  # noqa: F401

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
        parent, child = mp.get_context("spawn").Pipe()
        proc = mp.get_context("spawn").Process(target=_serve, args=(child, latency), daemon=True)
        proc.start()
        try:
            cfg.base_url = parent.recv()
            t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in both processes
            summary = main(cfg, ds, Path(tmp) / "out")
            t1 = time.monotonic()
            parent.send("stop")
            seen = parent.recv()
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        assert summary["done"] == n, summary
        return {
            "wall_s": t1 - t0,
            "busy_s": seen["last"] - seen["first"],
            "before_first_s": seen["first"] - t0,
            "after_last_s": t1 - seen["last"],
            "requests": seen["requests"],
            "max_in_flight": seen["max_in_flight"],
        }


def main_cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="images (one request each)")
    ap.add_argument("--concurrency", type=int, default=16)
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
    print(f"before the first request: {r['before_first_s']:.3f} s; after the last reply: {r['after_last_s']:.3f} s")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    print(f"ratio: annotate_throughput_vs_ideal = {throughput / ideal:.3f}")
    print(f"ratio: annotate_steady_throughput_vs_ideal = {steady / ideal:.3f}")


if __name__ == "__main__":
    main_cli()
