"""`torchrun --nproc_per_node 2` runs the real `craft train` command with DDP (gloo on CPU); the launcher
(craft.launch) runs a stage as 2 processes, resumes a killed run from the object store, and runs it as a
two-node job whose nodes are local processes (there is no cluster here)."""

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


# ---------------------------------------------------------------- through the launcher (issue 17)

REPO = Path(__file__).resolve().parents[1]
STAGE = [
    "model.resolution=32", "model.unet_channels=[8,16]", "model.vae_channels=[8,16]", "model.text_hidden=16",
    "model.text_layers=1", "model.max_length=16", "autoencoder.steps=0", "loop.steps=4", "loop.batch_size=2",
    "loop.checkpoint_every=2", "loop.progress=false", "loop.threads=1", "sample_per_class=0",
]  # fmt: skip


def _pretrain(data: Path, out: Path, target: str = "craft.train.crafts:step", run_id: str = "", task: str = ""):
    """The pretrain component's call into the launcher (components/crafts.py), on local folders."""
    from craft.launch import Artifact, run_step

    args = dict(stage="pretrain", dataset_dir=Artifact(str(data)), model_dir=Artifact(str(out), output=True),
                profile="", overrides=list(STAGE), base="")  # fmt: skip
    return run_step(target, args, config="pretrain", run_id=run_id, task=task)


def pretrain_killed_after_first_checkpoint_upload(**kwargs):
    """The real pretrain step, except that rank 0 is SIGKILLed right after it committed its first checkpoint
    to the object store: a pod killed mid-run, at a deterministic point (racing a kill from outside is not)."""
    import signal

    from craft.storage.objectstore import ObjectStore
    from craft.train.crafts import step

    real = ObjectStore.upload_dir

    def upload_then_die(self, local_dir, uri, **kw):
        manifest = real(self, local_dir, uri, **kw)
        if "/checkpoints/step-" in uri:
            os.kill(os.getpid(), signal.SIGKILL)
        return manifest

    ObjectStore.upload_dir = upload_then_die
    return step(**kwargs)


def _two_processes(mp: pytest.MonkeyPatch) -> None:
    mp.setenv("CRAFT_NPROC_PER_NODE", "2")
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("PYTHONPATH", str(REPO))
    mp.delenv("CRAFT_SCALE_OUT", raising=False)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One uninterrupted run of the pretrain step through the launcher as 2 processes (CRAFT_NPROC_PER_NODE=2)."""
    root = tmp_path_factory.mktemp("launched")
    data = make_dataset(root / "data", n=18)
    with pytest.MonkeyPatch.context() as mp:
        _two_processes(mp)
        mp.delenv("CRAFT_CHECKPOINT_ROOT", raising=False)
        metrics = _pretrain(data, root / "model")
    return data, root / "model", metrics


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{part}/{k}": v for part in ("unet", "text_encoder")
            for f in sorted((model_dir / part).glob("*.safetensors")) for k, v in load_file(str(f)).items()}  # fmt: skip


@pytest.mark.slow  # three interpreters per run (torchrun + 2 ranks): ~30-60 s on 2 cores
def test_two_processes_through_the_launcher_train_the_stage(launched):
    import torch

    from craft.config import load_stage_config
    from craft.data.manifest import read_meta
    from craft.train import crafts

    data, out, metrics = launched
    assert metrics["steps"] == 4.0 and metrics["loss"] == metrics["loss"]  # rank 0's metrics came back, finite
    last = out.with_name("model.work") / "denoiser" / "checkpoints" / "step-0000004"
    assert json.loads((last / "state.json").read_text())["world"] == 2
    assert (last / "rng-0.pt").read_bytes() != (last / "rng-1.pt").read_bytes()
    cfg = load_stage_config("pretrain", None, STAGE)
    init = crafts._components(cfg, read_meta(data), None)  # the same seeded initial weights
    trained = _weights(out)
    changed = [k for k, v in init.unet.state_dict().items() if not torch.equal(v, trained[f"unet/{k}"])]
    assert len(changed) > 0.5 * len(init.unet.state_dict())


@pytest.mark.slow  # two launcher runs of 2 processes each: ~1-2 min on 2 cores
def test_a_killed_run_resumes_from_the_object_store_and_ends_with_the_same_weights(launched, s3_env, tmp_path,
                                                                                   monkeypatch, capfd):  # fmt: skip
    import torch

    from craft.launch import LaunchError
    from craft.storage.objectstore import ObjectStore
    from craft.train.loop import remote_checkpoints

    data, reference, _ = launched
    _two_processes(monkeypatch)
    root = f"s3://{s3_env.make_bucket('ckpt')}/checkpoints"
    monkeypatch.setenv("CRAFT_CHECKPOINT_ROOT", root)
    with pytest.raises(LaunchError, match="torchrun .2 processes on node 0 of 1. exited"):
        _pretrain(data, tmp_path / "pod-1" / "model", "tests.test_ddp:pretrain_killed_after_first_checkpoint_upload",
                  run_id="run-7", task="pretrain-op")  # fmt: skip
    prefix = f"{root}/run-7/pretrain-op"
    store = ObjectStore.from_env()
    assert [s for s, _ in remote_checkpoints(store, prefix)] == [2]  # killed after step 2's upload
    capfd.readouterr()

    # the retried pod: a fresh directory, the same run and task
    metrics = _pretrain(data, tmp_path / "pod-2" / "model", run_id="run-7", task="pretrain-op")
    log = capfd.readouterr().out
    assert f"checkpoints of pretrain mirrored to {prefix}" in log
    assert f"resuming from {prefix}/checkpoints/step-0000002 (step 2, object store)" in log
    assert metrics["steps"] == 4.0
    want, got = _weights(reference), _weights(tmp_path / "pod-2" / "model")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k} differs from the uninterrupted run"
    assert [s for s, _ in remote_checkpoints(store, prefix)] == [2, 4]


class LocalNodes:
    """Stands in for the Kubernetes API and the Trainer controller (no cluster here): creating the TrainJob
    starts its nodes as local processes, each with its own scratch folder (its own disk), the env the manifest
    gives it (secret references resolved as the kubelet would) and the PET_* rendezvous the torch runtime sets."""

    def __init__(self, secrets: dict, base_env: dict, scratch: Path):
        self.secrets, self.base_env, self.scratch, self.procs, self.body = secrets, base_env, scratch, [], None

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.body = body
        trainer = body["spec"]["trainer"]
        env = dict(self.base_env)
        for e in trainer["env"]:
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            env[e["name"]] = self.secrets[ref["name"]][ref["key"]] if ref else e["value"]
        port = str(_free_port())
        for rank in range(trainer["numNodes"]):
            node_env = dict(env, PET_NNODES=str(trainer["numNodes"]), PET_NODE_RANK=str(rank),
                            PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port, PET_NPROC_PER_NODE="1",
                            CRAFT_SCRATCH=str(self.scratch / f"node-{rank}"))  # fmt: skip
            self.procs.append(subprocess.Popen([sys.executable, *trainer["command"][1:]], env=node_env))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if self.body is None:
            raise type("NotFound", (Exception,), {"status": 404})()
        codes = [p.poll() for p in self.procs]
        cond = None
        if any(c not in (None, 0) for c in codes):
            cond = {"type": "Failed", "status": "True", "reason": "NodeFailed", "message": f"exit codes {codes}"}
        elif all(c == 0 for c in codes):
            cond = {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": ""}
        return dict(self.body, status={"conditions": [cond] if cond else []})

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        for p in self.procs:
            p.kill()


@pytest.mark.slow  # 2 nodes x (node process + torchrun + 1 rank): ~1-2 min on 2 cores
def test_two_nodes_through_the_job_path(s3_env, tmp_path):
    """The multi-node path end to end without a cluster: inputs staged on the store, the TrainJob's nodes run
    the stage as one DDP job across two 'disks', node 0 uploads the model, the step downloads it."""
    from craft.launch import Artifact
    from craft.models.diffusion import load_pipeline
    from craft.storage.objectstore import ObjectStore
    from craft.train.loop import remote_checkpoints
    from craft.trainjob import ScaleOut, run_job

    data = make_dataset(tmp_path / "data", n=18)
    bucket = s3_env.make_bucket("nodes")
    prefix = f"s3://{bucket}/checkpoints/run-9/pretrain-op"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CRAFT_"))}
    base_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    secrets = {"mlpipeline-minio-artifact": {"accesskey": s3_env.env["AWS_ACCESS_KEY_ID"],
                                             "secretkey": s3_env.env["AWS_SECRET_ACCESS_KEY"]}}  # fmt: skip
    scale = ScaleOut(engine="trainjob", nodes=2, gpus_per_node=1, image="craft-gpu:test", timeout_s=900,
                     secrets=[{"name": "mlpipeline-minio-artifact",
                               "keys": {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}}])  # fmt: skip
    api = LocalNodes(secrets, base_env, tmp_path / "scratch")
    out = tmp_path / "model"
    overrides = [*STAGE, f"pretrain.loop.upload_uri={prefix}"]  # as run_step adds it
    kwargs = dict(stage="pretrain", dataset_dir=Artifact(str(data)), model_dir=Artifact(str(out), output=True),
                  profile="", overrides=overrides, base="")  # fmt: skip
    try:
        metrics = run_job(scale, "craft.train.crafts:step", kwargs, prefix, run_id="run-9", task="pretrain-op",
                          api=api, namespace="craft", poll_s=0.5)  # fmt: skip
    finally:
        for p in api.procs:
            p.kill()
    assert api.body["spec"]["trainer"]["command"] == ["python", "-m", "craft.launch", "node", f"{prefix}/spec.json"]
    assert metrics["steps"] == 4.0
    load_pipeline(out)  # the model node 0 trained reached the step's output artifact
    store = ObjectStore.from_env()
    [(_, last)] = remote_checkpoints(store, prefix)[-1:]
    ckpt = store.download_dir(last, tmp_path / "last")
    assert json.loads((ckpt / "state.json").read_text())["world"] == 2  # one DDP job across both nodes
    # node 1's RNG state reached node 0's checkpoint through the process group (they share no disk)
    assert (ckpt / "rng-0.pt").read_bytes() != (ckpt / "rng-1.pt").read_bytes()
    assert not (tmp_path / "scratch" / "node-1" / "outputs" / "model" / "model_index.json").exists()


@pytest.mark.slow  # a tiny critic + probe, then torchrun + 2 ranks: ~1 min on 2 cores
@pytest.mark.parametrize("decode_chunk", [0, 1])
def test_the_craft_reward_stage_as_two_processes(tmp_path, monkeypatch, decode_chunk):
    """CRAFT reward finetuning (DRaFT-K against the frozen critic) through the launcher as 2 processes: DDP over
    prompts (each rank draws its own slice of every step's prompts), rank 0 writes the adapter. With
    ``decode_chunk=1`` each rank decodes and backpropagates its images one at a time inside DDP's forward (a
    backward that reaches no parameter, so nothing for DDP to reduce before the step's own)."""
    import shutil

    import pandas as pd

    from craft.config import load_stage_config
    from craft.data.demo import DemoConfig, generate
    from craft.data.manifest import read_manifest
    from craft.launch import Artifact, run_step
    from craft.models.diffusion import ModelConfig, build_components, load_pipeline, save_pipeline
    from craft.train import encoder, probe, reward

    data = tmp_path / "data"
    generate(DemoConfig(modality="histo", n=16, seed=0, resolution=32, images_per_patient=2), data)
    df = read_manifest(data)
    ann = tmp_path / "ann"
    ann.mkdir()
    pd.DataFrame({"image_id": df["image_id"], "enriched_prompt": [f"{lab} tissue with glands" for lab in df["label"]],
                  "status": "ok"}).to_parquet(ann / "annotations.parquet")  # fmt: skip
    shutil.copy(REPO / "craft" / "annotate" / "checklists" / "demo-histo.json", ann / "checklists.json")
    encoder.main(load_stage_config("encoder", None, ["epochs=1", "batch_size=8"]), "critic", data, tmp_path / "critic",
                 ann)  # fmt: skip
    probe.main(load_stage_config("probe", None, ["epochs=2"]), tmp_path / "critic", data, tmp_path / "probe")
    mc = ModelConfig(preset="tiny", resolution=32, unet_channels=[8, 16], vae_channels=[8, 8], text_hidden=16,
                     text_layers=1)  # fmt: skip
    save_pipeline(build_components(mc, ["adenocarcinoma", "adenoma", "normal", "mucinous carcinoma"]).pipeline(),
                  tmp_path / "base", {"stage": "test"})  # fmt: skip
    _two_processes(monkeypatch)
    monkeypatch.delenv("CRAFT_CHECKPOINT_ROOT", raising=False)
    out = tmp_path / "craft"
    args = dict(dataset_dir=Artifact(str(data)), annotations_dir=Artifact(str(ann)),
                critic_dir=Artifact(str(tmp_path / "critic")), probe_dir=Artifact(str(tmp_path / "probe")),
                base=Artifact(str(tmp_path / "base")), model_dir=Artifact(str(out), output=True), profile="",
                overrides=["loop.steps=2", "loop.batch_size=2", "loop.threads=1", "loop.progress=false",
                           "loop.checkpoint_every=1", "sample_steps=2", f"decode_chunk={decode_chunk}"],
                start_dir=None)  # fmt: skip
    m = run_step("craft.train.reward:step", args, config="reward")
    assert m["steps"] == 2.0 and {"reward", "reward_vdc", "reward_dd"} <= set(m)
    last = out.with_name("craft.work") / "draft" / "checkpoints" / "step-0000002"
    assert json.loads((last / "state.json").read_text())["world"] == 2
    assert reward.load_adapters(load_pipeline(tmp_path / "base"), out) is not None
