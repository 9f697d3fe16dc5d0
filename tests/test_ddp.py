"""`torchrun --nproc_per_node 2` runs the real `craft train` command with DDP (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.crafts_helpers import make_dataset

TINY = [
    "model.resolution=32", "model.unet_channels=[8,16]", "model.vae_channels=[8,16]", "model.text_hidden=16",
    "model.text_layers=1", "model.max_length=16", "autoencoder.steps=2", "autoencoder.batch_size=2",
    "loop.steps=3", "loop.batch_size=2", "loop.checkpoint_every=2", "loop.progress=false", "loop.threads=1",
    "sample_per_class=0",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two interpreter start-ups + imports: ~30-60 s on 2 cores
def test_two_process_ddp_training_via_torchrun(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n=18)
    out = tmp_path / "model"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "craft.cli", "train", "pretrain", "--data", str(data),
        "--out", str(out), *TINY,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpts = sorted((tmp_path / "model.work" / "denoiser" / "checkpoints").glob("step-*"))
    last = ckpts[-1]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 3 and state["world"] == 2
    # each rank keeps its own RNG stream (different noise / dropout per rank), both saved for exact resume
    assert (last / "rng-0.pt").read_bytes() != (last / "rng-1.pt").read_bytes()
    from craft.models.diffusion import load_pipeline, read_lineage

    assert read_lineage(out)["stage"] == "pretrain"
    load_pipeline(out)
