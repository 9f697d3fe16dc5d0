"""One entry point for every training step: one process, ``torchrun`` inside the pod, or a multi-node job.

The KFP training components call :func:`run_step` with the stage's ``step`` function (by name) and its
keyword arguments. What it does depends on what the pod was compiled with (``pipelines/resources.py`` from
the profile's ``resources`` section, :class:`ResourcesConfig`):

- 1 GPU (or none): ``step(**kwargs)`` in this process, exactly as before.
- ``CRAFT_NPROC_PER_NODE`` = N > 1 (``gpus: N``): the same call re-executed under
  ``torchrun --standalone --nproc_per_node N`` in this pod. The training loop (``craft.train.loop``) is
  accelerate/DDP-aware: each rank trains on its slice of every batch, rank 0 writes checkpoints and the
  stage's output; rank 0's returned metrics come back through a JSON file.
- ``CRAFT_SCALE_OUT`` set (``nodes: M`` > 1): this pod only orchestrates. It stages the input artifacts on
  the object store, submits a Kubeflow Trainer ``TrainJob`` (or a ``PyTorchJob``, ``resources.scale_out``)
  built by :mod:`craft.trainjob`, streams its conditions until it ends, then downloads the output artifacts.
  Each node runs ``python -m craft.launch node SPEC``: it fetches the inputs, runs the same call under
  ``torchrun`` with the ``PET_*`` rendezvous the Trainer (or the training operator) injects, and node 0
  uploads the outputs.

Checkpoints: with ``CRAFT_CHECKPOINT_ROOT`` set (on training tasks by pipelines/resources.py; kfp.local passes
task env too, so local runs mirror to their own store under their own run id) the stage's ``loop.upload_uri``
becomes ``ROOT/<run id>/<task name>``: stable across retries of the task, so a retried pod (or a restarted
node) resumes from the newest checkpoint on the object store (``craft.train.loop``). Unset (a stage run by
hand, ``craft train ...``): local checkpoints only.

Only the DDP-aware stages may run as several processes (:data:`DDP_STEPS`): the baselines, encoders, probes
and evaluation write their outputs from every process and are refused, by name, when the profile asks.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The pipeline's resource steps (pipelines/resources.py DEFAULT_RESOURCES), in pipeline order.
STEPS = (
    "dataset-version", "data", "validate", "annotate", "pretrain", "finetune", "encoders", "probe", "baselines",
    "dpo", "craft", "controlnet", "evaluate", "champion", "gate", "register",
)  # fmt: skip
# Steps whose component runs on the GPU image (components/images.py gpu_component).
GPU_STEPS = frozenset(
    {"pretrain", "finetune", "encoders", "probe", "baselines", "dpo", "craft", "controlnet", "evaluate"}
)
# Steps whose stage trains with craft.train.loop and writes its output from rank 0 only: they may run as
# several processes (DDP for pretrain/finetune/controlnet; DDP over prompts for the CRAFT reward stage).
DDP_STEPS = frozenset({"pretrain", "finetune", "craft", "controlnet"})

ENV_NPROC = "CRAFT_NPROC_PER_NODE"  # processes per pod (torchrun --nproc_per_node), set when gpus > 1
ENV_SCALE_OUT = "CRAFT_SCALE_OUT"  # JSON of the multi-node job (craft.trainjob.ScaleOut), set when nodes > 1
ENV_CHECKPOINT_ROOT = "CRAFT_CHECKPOINT_ROOT"  # s3:// root of per-run/per-task checkpoints (training tasks)

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DURATION = re.compile(r"^([0-9]+)\s*(s|m|h|d)?$")


class LaunchError(RuntimeError):
    """The step could not be launched, or its processes / job failed; the message says which and why."""


# ---------------------------------------------------------------- the profile's `resources` section


@dataclass
class StepResources:
    """What one pipeline step asks of the cluster; a field left null keeps the step's default
    (pipelines/resources.py DEFAULT_RESOURCES)."""

    gpus: int | None = None  # GPUs per pod (per node with nodes > 1): the nvidia.com/gpu limit; > 1 runs torchrun
    gpu_product: str | None = None  # node selector nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3
    nodes: int | None = None  # > 1: a multi-node TrainJob / PyTorchJob of `gpus` GPUs per node (DDP steps only)
    cpu: str | None = None  # CPU request = limit per pod (per node), a Kubernetes quantity: "8", "500m"
    memory: str | None = None  # memory request = limit per pod (per node): "64Gi"
    ephemeral_storage: str | None = None  # pod-local disk for artifacts, work dirs and checkpoints: "200Gi"
    timeout: str | int | None = None  # wall-clock limit per attempt: seconds, or "90m", "12h", "2d"

    def validate(self) -> None:
        if self.gpus is not None and self.gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {self.gpus}")
        if self.nodes is not None and self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if (self.nodes or 1) > 1 and not self.gpus:
            raise ValueError(f"nodes: {self.nodes} needs gpus >= 1 per node (multi-node training is for GPU nodes)")
        for name in ("cpu", "memory", "ephemeral_storage"):
            value = getattr(self, name)
            if value is not None and not _QUANTITY.match(str(value)):
                raise ValueError(f"{name}: {value!r} is not a Kubernetes quantity (e.g. '8', '500m', '64Gi')")
        if self.timeout is not None:
            timeout_seconds(self.timeout)


def timeout_seconds(value: str | int) -> int:
    """Seconds of a timeout written as seconds or with a unit.

    >>> [timeout_seconds(v) for v in (90, "90", "45m", "12h", "2d")]
    [90, 90, 2700, 43200, 172800]
    """
    m = _DURATION.match(str(value).strip())
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"timeout: {value!r} is not a positive duration (seconds, or a number with s, m, h or d)")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]


@dataclass
class ResourcesConfig:
    """The profile's ``resources`` section: per pipeline step what its pods ask for, and how steps scale out.

    ``steps`` is keyed by the step names of pipelines/resources.py (``dataset-version``, ``data``, ``validate``,
    ``annotate``, ``pretrain``, ``finetune``, ``encoders``, ``probe``, ``baselines``, ``dpo``, ``craft``, ``controlnet``,
    ``evaluate``, ``champion``, ``gate``, ``register``); a step not named keeps its defaults. Read when the
    pipeline is compiled from the profile (pipelines/craft_pipeline.py); a run cannot change it.
    """

    steps: dict[str, StepResources] = field(default_factory=dict)  # step name -> its sizes
    # engine of multi-node steps: Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1), or the training
    # operator's PyTorchJob (kubeflow.org/v1) on clusters without Trainer v2
    scale_out: Literal["trainjob", "pytorchjob"] = "trainjob"
    trainer_runtime: str = "torch-distributed"  # the TrainJob's runtimeRef (a ClusterTrainingRuntime name)
    # s3:// root under which training steps of cluster runs keep their checkpoints, per run and task (a retried
    # pod resumes from there); "" switches it off. kfp.local runs mirror to their own store and run id too.
    checkpoints: str = "s3://craft/checkpoints"
    # where the pod-local scratch volume (sized by ephemeral_storage) is mounted: the local root of the
    # pipeline root's artifacts, /minio for KFP's default minio://mlpipeline/v2/artifacts, /s3 for s3://
    scratch_mount: str = "/minio"

    def step(self, step: str) -> StepResources:
        """The settings of pipeline step ``step`` (a name of :data:`STEPS`; all null when the profile names none)."""
        if step not in STEPS:
            raise ValueError(f"unknown pipeline step {step!r} (known: {', '.join(STEPS)})")
        return self.steps.get(step) or StepResources()

    def validate(self) -> None:
        """Refuse what a step cannot do: GPUs on a CPU step, several processes for a one-process stage."""
        unknown = sorted(set(self.steps) - set(STEPS))
        if unknown:
            raise ValueError(f"steps: unknown step {unknown[0]!r} (the pipeline's steps: {', '.join(STEPS)})")
        for step, r in self.steps.items():
            if r.gpus and step not in GPU_STEPS:
                raise ValueError(f"steps.{step}.gpus: the {step} step runs on the CPU image; "
                                 f"only {sorted(GPU_STEPS)} take GPUs")  # fmt: skip
            if step not in DDP_STEPS and ((r.gpus or 0) > 1 or (r.nodes or 1) > 1):
                raise ValueError(
                    f"steps.{step}: the {step} step runs as one process (its stage writes its output from every "
                    f"rank); more than one GPU or node is for {sorted(DDP_STEPS)}"
                )
        if self.checkpoints and not self.checkpoints.startswith("s3://"):
            raise ValueError(f"checkpoints must be an s3:// prefix or empty, got {self.checkpoints!r}")
        if not self.scratch_mount.startswith("/"):
            raise ValueError(f"scratch_mount must be an absolute path, got {self.scratch_mount!r}")


# ---------------------------------------------------------------- artifacts and the call


@dataclass
class Artifact:
    """A KFP artifact a step reads or writes: its path in this pod and its URI (for the multi-node path)."""

    path: str
    uri: str = ""
    output: bool = False

    @classmethod
    def read(cls, artifact) -> Artifact | None:
        """An input artifact (a ``kfp.dsl.Input[...]``); None for an unconnected optional input."""
        return None if artifact is None else cls(str(artifact.path), str(getattr(artifact, "uri", "") or ""))

    @classmethod
    def write(cls, artifact) -> Artifact:
        """An output artifact (a ``kfp.dsl.Output[...]``): the stage writes a folder at its path."""
        return cls(str(artifact.path), str(getattr(artifact, "uri", "") or ""), output=True)


def resolve_target(target: str):
    """The function named ``module:function``."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise LaunchError(f"target {target!r} is not of the form module:function")
    return getattr(importlib.import_module(module), name)


def checkpoint_prefix(run_id: str, task: str) -> str:
    """``$CRAFT_CHECKPOINT_ROOT/<run_id>/<task>``, or "" when the root is unset (a stage run by hand)."""
    root = os.environ.get(ENV_CHECKPOINT_ROOT, "").strip().rstrip("/")
    if not root:
        return ""
    if not root.startswith("s3://"):
        raise LaunchError(f"{ENV_CHECKPOINT_ROOT}={root!r} is not an s3:// prefix")
    if not run_id or not task or "{{" in run_id + task:
        raise LaunchError(f"checkpoints under {root} need the run id and task name (got {run_id!r}, {task!r})")
    return f"{root}/{_safe(run_id)}/{_safe(task)}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "x"


def run_step(target: str, kwargs: dict[str, Any], *, config: str | None = None, run_id: str = "",
             task: str = "") -> dict[str, float]:  # fmt: skip
    """Run ``target(**kwargs)`` (a stage's pipeline ``step``) as the pod was sized: see the module docstring.

    ``kwargs`` values may be :class:`Artifact` (passed on as local paths) and must otherwise be JSON values.
    ``config``: the stage config section (``pretrain``, ``reward``, ``ti`` ...) whose ``loop.upload_uri``
    receives the checkpoint prefix; ``run_id`` and ``task`` make that prefix per run and task.
    Returns the step's metrics (rank 0's).
    """
    kwargs = dict(kwargs)
    overrides = [str(o) for o in kwargs.get("overrides") or []]
    for item in overrides:
        if item.split("=", 1)[0].strip().startswith("resources."):
            raise LaunchError(
                f"override {item!r}: resources are compiled into the pipeline (`craft pipeline compile --profile P` "
                "with the profile's resources section), a run cannot change them"
            )
    prefix = checkpoint_prefix(run_id, task)
    if config and prefix and not any(o.split("=", 1)[0].strip() == f"{config}.loop.upload_uri" for o in overrides):
        overrides.append(f"{config}.loop.upload_uri={prefix}")
        print(f"launch: checkpoints of {config} mirrored to {prefix}", flush=True)
    if "overrides" in kwargs:
        kwargs["overrides"] = overrides
    scale_out = os.environ.get(ENV_SCALE_OUT, "").strip()
    if scale_out:
        from craft.trainjob import ScaleOut, run_job

        if not prefix:
            raise LaunchError(f"a multi-node step stages its artifacts under {ENV_CHECKPOINT_ROOT}, which is not set")
        return run_job(ScaleOut.from_json(scale_out), target, kwargs, prefix, run_id=run_id, task=task)
    nproc = nproc_per_node()
    local = {k: (v.path if isinstance(v, Artifact) else v) for k, v in kwargs.items()}
    if nproc == 1:
        return resolve_target(target)(**local)
    return torchrun(target, local, nproc)


def nproc_per_node() -> int:
    """Processes per pod from ``CRAFT_NPROC_PER_NODE`` (1 when unset)."""
    raw = os.environ.get(ENV_NPROC, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise LaunchError(f"{ENV_NPROC}={raw!r} is not a positive process count")
    return int(raw)


def torchrun(target: str, kwargs: dict[str, Any], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
             master: tuple[str, int] | None = None) -> dict[str, float] | None:  # fmt: skip
    """Run ``target(**kwargs)`` in ``nproc`` processes under torchrun; rank 0's return value comes back.

    One node: ``--standalone`` (a local rendezvous on a free port). Several: this node's ``node_rank`` of
    ``nnodes`` with the static rendezvous at ``master``. Returns None on nodes other than 0.
    """
    with tempfile.TemporaryDirectory(prefix="craft-launch-") as tmp:
        spec = Path(tmp) / "call.json"
        result = Path(tmp) / "result.json"
        spec.write_text(json.dumps({"target": target, "kwargs": kwargs, "result": str(result)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if nnodes == 1:
            cmd.append("--standalone")
        else:
            if master is None:
                raise LaunchError("a multi-node torchrun needs the master address and port")
            cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", master[0],
                    "--master_port", str(master[1])]  # fmt: skip
        cmd += ["-m", "craft.launch", "worker", str(spec)]
        print(f"launch: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            raise LaunchError(f"torchrun ({nproc} processes on node {node_rank} of {nnodes}) exited with "
                              f"{proc.returncode}: {target} failed (its log is above)")  # fmt: skip
        if not result.is_file():
            if node_rank == 0:
                raise LaunchError(f"{target}: rank 0 finished without writing its result")
            return None
        return json.loads(result.read_text())


# ---------------------------------------------------------------- process entry points


def _worker(call_file: str) -> None:
    """One torchrun process: call the target; rank 0 writes the result."""
    spec = json.loads(Path(call_file).read_text())
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # stages place frozen parts on "cuda" (the critic, the VAE) before accelerate starts: make that this
        # rank's GPU, not GPU 0 for every rank
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    res = resolve_target(spec["target"])(**spec["kwargs"])
    if int(os.environ.get("RANK", "0")) == 0:
        from craft.io import atomic_write_json

        atomic_write_json(spec["result"], {k: float(v) for k, v in (res or {}).items()})


def _node(spec_uri: str) -> None:
    """One node of a multi-node job: fetch inputs, torchrun, and on node 0 upload outputs and the result."""
    from craft.trainjob import run_node

    run_node(spec_uri)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("worker", "node"):
        raise SystemExit("usage: python -m craft.launch worker CALL.json | node s3://.../spec.json")
    (_worker if argv[0] == "worker" else _node)(argv[1])


if __name__ == "__main__":
    main()
