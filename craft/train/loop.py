"""A generic accelerate training loop with exact resume, reused by every training stage.

The stage supplies a ``torch.nn.Module`` whose ``forward(batch, generator)`` returns a dict with a
scalar ``"loss"`` (plus any scalars to log), a dataset (a dict of equal-length columns: tensors, lists,
or the lazy pixel / latent / text-state columns of ``craft.data.loader``, which produce only the rows of
the current batch), and optionally a ``validate(model, step, out_dir, writer)`` callback (returning True ends
training at that step: early stopping). The loop gives:

- one code path for 1 process (CPU or GPU) and ``torchrun --nproc_per_node N`` (DDP: gloo on CPU,
  NCCL on GPU; ``accelerate launch --cpu`` would start only one process, ENVIRONMENT.md);
- mixed precision (bf16 on GPU, fp32 on CPU by default), optional gradient checkpointing, EMA of the
  trainable weights by ``diffusers.training_utils.EMAModel`` (its decay warm-up and schedule);
- a batch order that is a pure function of (seed, step, rank): resuming at step s needs no saved
  dataloader state and consumes exactly the batches an uninterrupted run would;
- checkpoints every N steps (model, optimizer, LR scheduler, EMA, all RNG states, step) written
  atomically, optionally mirrored to an ``s3://`` prefix (``upload_uri``, newest ``keep_checkpoints`` kept
  there too), and exact resume from the newest one: local, or with an empty local folder (a retried pod, a
  restarted node) the newest one on the object store, downloaded first;
- batches fetched through a torch ``DataLoader`` (``data_workers`` processes decode ahead of the step);
- NaN/inf detection: the run stops with ``NonFiniteLossError`` before the bad update, and the
  last good checkpoint stays on disk;
- TensorBoard event files under ``OUT/tb`` and a tqdm progress bar.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from craft.data import loader
from craft.io import atomic_dir, atomic_write_json

CKPT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step-(\d{7,})$")


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping shared by every training stage."""

    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32  # per process; the global batch is batch_size x processes
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # decay after warm-up
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    ema_decay: float = 0.0  # EMA of the trainable weights (0 = off): the decay's ceiling (diffusers EMAModel `decay`)
    ema_min_decay: float = 0.0  # the decay's floor (set it to ema_decay for a constant decay after the first update)
    ema_update_after_step: int = 0  # steps before the EMA starts averaging (till then it copies the weights)
    ema_warmup: bool = False  # decay 1 - (1 + t)^-ema_power (diffusers use_ema_warmup), else (1 + t) / (10 + t)
    ema_power: float = 2 / 3  # exponent of the warm-up schedule (2/3 long runs, 3/4 shorter ones; diffusers' note)
    checkpoint_every: int = 0  # steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    validate_every: int = 0  # steps between validation samples (0 = only at the end)
    log_every: int = 10  # steps between TensorBoard scalars
    seed: int = 0  # seeds weights-independent randomness: batch order, noise, dropout
    threads: int = 0  # torch CPU threads per process (0 = leave the default)
    upload_uri: str = ""  # s3:// prefix: mirror each checkpoint there and resume from it ("" = off)
    progress: bool = True  # tqdm progress bar on the main process
    data_workers: int = 0  # DataLoader worker processes decoding batches ahead (0 = in the training process)
    encode_batch: int = 64  # images per VAE forward when a stage encodes (and caches) its latents
    encode_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # VAE encode precision; auto: bf16 on CUDA, fp32 on CPU
    # AdamW as one fused kernel over all parameters instead of a Python loop per tensor: the same update (allclose;
    # tests/test_fast_path.py), 4.4x faster on the tiny UNet + text encoder (362 tensors) on CPU (issue 18)
    fused_optimizer: bool = True

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay > 0 and not 0.0 <= self.ema_min_decay <= self.ema_decay:
            raise ValueError(f"ema_min_decay must be in [0, ema_decay={self.ema_decay}], got {self.ema_min_decay}")
        if self.ema_update_after_step < 0 or self.ema_power <= 0:
            raise ValueError(f"ema_update_after_step must be >= 0 and ema_power > 0 (got {self.ema_update_after_step}, "
                             f"{self.ema_power})")  # fmt: skip
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.data_workers < 0 or self.encode_batch < 1:
            raise ValueError(f"data_workers must be >= 0 and encode_batch >= 1 (got {self.data_workers}, "
                             f"{self.encode_batch})")  # fmt: skip
        if self.encode_dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"encode_dtype must be auto, fp32 or bf16, got {self.encode_dtype!r}")
        if self.upload_uri and not self.upload_uri.startswith("s3://"):
            raise ValueError(f"upload_uri must start with s3://, got {self.upload_uri!r}")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    step: int  # last completed step
    logs: dict[str, float]  # last step's scalars
    checkpoint: Path | None  # newest checkpoint directory
    ema: dict[str, torch.Tensor] | None = None  # EMA weights of the trainable parameters (by name)
    resumed_from: int = 0  # step the run started from (0 = fresh)
    history: list[dict[str, float]] = field(default_factory=list)
    ema_applied: bool = False  # the model's trainable weights are the EMA weights (ema_decay > 0)
    stopped_early: bool = False  # the validate callback ended training before cfg.steps (early stopping)


# ---------------------------------------------------------------- batches


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Dataset indices of ``rank``'s batch at ``step`` (0-based): a pure function, so resume needs no state.

    The index stream is the concatenation of seeded permutations (one per epoch); step k takes the
    k-th window of ``batch_size * world`` indices and each rank its slice of it.

    >>> [batch_indices(4, 2, step=k, seed=0).tolist() for k in range(3)]  # epoch 0 = [0, 1, 3, 2]
    [[0, 1], [3, 2], [1, 3]]
    >>> batch_indices(4, 2, step=0, seed=0, rank=1, world=2).tolist()  # rank 1's half of the window
    [3, 2]
    """
    if n < 1:
        raise ValueError("empty dataset")
    gbs = batch_size * world
    start, stop = step * gbs, (step + 1) * gbs
    out = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
        out.append(perm[lo:hi])
    window = torch.cat(out)
    return window[rank * batch_size : (rank + 1) * batch_size]


take = loader.take  # rows idx of a dict of columns (tensors, lists, lazy columns)
dataset_len = loader.column_len  # the common length of a dict of columns


class StepBatches:
    """The index batches of steps ``start .. end - 1`` for one rank: a re-iterable batch sampler."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int, start: int, end: int):
        self.args, self.start, self.end = (n, batch_size), start, end
        self.seed, self.rank, self.world = seed, rank, world

    def __len__(self) -> int:
        return max(self.end - self.start, 0)

    def __iter__(self):
        for step in range(self.start, self.end):
            yield batch_indices(*self.args, step, self.seed, self.rank, self.world).tolist()


# ---------------------------------------------------------------- checkpoints


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``OUT/checkpoints``, oldest first."""
    root = Path(out_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CKPT_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    st = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": gen.get_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy_keys": torch.from_numpy(st[1].astype(np.int64)),
        "numpy_pos": int(st[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["generator"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _lr_lambda(cfg: LoopConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        if cfg.lr_schedule == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    data: dict[str, Any],
    cfg: LoopConfig,
    out_dir: str | os.PathLike,
    validate: Callable[..., Any] | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``model`` (its parameters with ``requires_grad``) on ``data`` until ``cfg.steps``.

    ``model(batch, generator)`` returns ``{"loss": tensor, ...}``. With ``resume`` the newest
    checkpoint under ``OUT/checkpoints`` is loaded first. ``stop_after`` ends the run after that
    many steps of this call (to simulate an interruption in tests). Returns the final state;
    trained weights are in ``model``: with ``cfg.ema_decay > 0`` they are the EMA weights (also in
    ``TrainResult.ema``), the raw last-step weights stay in the final checkpoint.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    use_cuda = torch.cuda.is_available()
    from craft.models.accel import configure_kernels, resolve_precision

    mp = resolve_precision(cfg.mixed_precision, "cuda" if use_cuda else "cpu")  # auto: bf16 on CUDA, fp32 on CPU
    configure_kernels("cuda" if use_cuda else "cpu")  # TF32 for what stays fp32
    acc = Accelerator(
        cpu=not use_cuda, mixed_precision=mp,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )  # fmt: skip
    rank, world = acc.process_index, acc.num_processes
    n = dataset_len(data)

    if cfg.gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no enable_gradient_checkpointing()")
        model.enable_gradient_checkpointing()
    params = _trainable(model)
    if not params:
        raise ValueError("model has no trainable parameters (nothing has requires_grad=True)")
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                            fused=cfg.fused_optimizer or None)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = _make_ema(params, cfg)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 7919 + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)

    start = 0
    last_good: Path | None = _resume_point(acc, out, cfg) if resume else None
    if last_good is not None:
        start = _load_checkpoint(last_good, model, opt, sched, ema, gen, rank)
    model, opt = acc.prepare(model, opt)
    device = acc.device

    writer = None
    if acc.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps, initial=start, disable=not (cfg.progress and acc.is_main_process), desc="train",
        dynamic_ncols=True,
    )  # fmt: skip
    logs: dict[str, float] = {}
    history: list[dict[str, float]] = []
    step, stopped_early = start, False
    batches = iter(loader.batch_loader(data, StepBatches(n, cfg.batch_size, cfg.seed, rank, world, start, end),
                                       cfg.data_workers, pin_memory=use_cuda))  # fmt: skip
    try:
        while step < end:
            model.train()
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                     for k, v in next(batches).items()}  # fmt: skip
            with acc.autocast():
                res = model(batch, gen)
            loss = res["loss"]
            bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=device)
            if acc.reduce(bad, reduction="sum").item() > 0:
                raise NonFiniteLossError(
                    f"step {step + 1}: loss is {loss.item()} (not finite); stopped before the update. "
                    f"Last good checkpoint: {last_good or 'none'}"
                )
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                gnorm = acc.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            else:
                gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params.values() if p.grad is not None))
            if not torch.isfinite(torch.as_tensor(gnorm)).all():
                raise NonFiniteLossError(
                    f"step {step + 1}: gradient norm is {float(gnorm)} (not finite); stopped before the update. "
                    f"Last good checkpoint: {last_good or 'none'}"
                )
            opt.step()
            sched.step()
            if ema is not None:
                ema.model.step(params.values())  # decay of this step from diffusers' schedule (warm-up, ceiling)
            step += 1
            logs = {k: float(v.detach().float().mean()) for k, v in res.items() if isinstance(v, torch.Tensor)}
            logs["lr"] = sched.get_last_lr()[0]
            logs["grad_norm"] = float(gnorm)
            history.append(dict(logs, step=step))
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if writer is not None and (step % max(cfg.log_every, 1) == 0 or step == end):
                for k, v in logs.items():
                    writer.add_scalar(f"train/{k}", v, step)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                last_good = _save_checkpoint(acc, out, step, model, opt, sched, ema, gen, logs, cfg)
            if validate is not None and cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
                if _run_validation(acc, validate, model, step, out, writer):  # the callback stops training early
                    stopped_early = True
                    if not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                        last_good = _save_checkpoint(acc, out, step, model, opt, sched, ema, gen, logs, cfg)
                    break
        if step >= cfg.steps and start < cfg.steps:
            last_good = _save_checkpoint(acc, out, step, model, opt, sched, ema, gen, logs, cfg)
            _swap_in_ema(params, ema)  # the final validation samples what the stage will save
            if validate is not None:
                _run_validation(acc, validate, model, step, out, writer)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
    acc.wait_for_everyone()
    _swap_in_ema(params, ema)
    # the trained weights live in the caller's module object: prepare() wraps it (DDP), it does not copy it
    ema_named = ema.named() if ema is not None else None
    return TrainResult(
        step, logs, last_good, ema_named, start, history, ema_applied=ema is not None, stopped_early=stopped_early
    )


@dataclass
class _Ema:
    """diffusers' EMAModel over the trainable parameters, plus their names (checkpoints store the EMA by name)."""

    model: Any  # diffusers.training_utils.EMAModel
    names: list[str]  # parameter names in the order of model.shadow_params

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.model.shadow_params))


def _make_ema(params: dict[str, torch.nn.Parameter], cfg: LoopConfig) -> _Ema | None:
    """``diffusers.training_utils.EMAModel`` configured from ``cfg`` (None when ``ema_decay`` is 0).

    The shadow weights are kept in fp32 whatever the trainable weights' dtype, so a bf16 run still
    averages at full precision.
    """
    if cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    m = EMAModel(list(params.values()), decay=float(cfg.ema_decay), min_decay=float(cfg.ema_min_decay),
                 update_after_step=int(cfg.ema_update_after_step), use_ema_warmup=bool(cfg.ema_warmup),
                 power=float(cfg.ema_power), foreach=True)  # fmt: skip
    m.to(dtype=torch.float32)
    return _Ema(m, list(params))


def _swap_in_ema(params: dict[str, torch.nn.Parameter], ema: _Ema | None) -> None:
    """Copy the EMA weights into the trainable parameters (idempotent; nothing without EMA).

    The EMA weights are every stage's result (the checkpoints keep the raw ones beside them for resuming):
    the loop swaps them in itself, so no stage can save the raw weights by forgetting to.
    """
    if ema is None:
        return
    ema.model.copy_to(params.values())


def _run_validation(acc, validate, model, step: int, out: Path, writer) -> bool:
    """Run ``validate`` on the main process; True on every rank when it returned True (stop training here)."""
    stop = False
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        was = m.training
        m.eval()
        with torch.no_grad():
            stop = validate(m, step, out, writer) is True
        m.train(was)
    acc.wait_for_everyone()
    flag = torch.tensor([1.0 if stop else 0.0], device=acc.device)
    return bool(acc.reduce(flag, reduction="sum").item() > 0)


def _save_checkpoint(acc, out: Path, step: int, model, opt, sched, ema, gen, logs, cfg: LoopConfig) -> Path:
    """Write ``OUT/checkpoints/step-XXXXXXX`` atomically: rank 0 writes weights/optimizer and every rank's RNG.

    The RNG states (they differ by rank) reach rank 0 through the process group, so ranks on other nodes
    (other disks) are saved too. With ``upload_uri`` rank 0 then commits the checkpoint to the object store
    and drops the ones there older than the newest ``keep_checkpoints``.
    """
    from safetensors.torch import save_file

    path = out / CKPT_DIR / f"step-{step:07d}"
    rng = _gather_objects(acc, _rng_state(gen))
    if acc.is_main_process:
        m = acc.unwrap_model(model)
        with atomic_dir(path) as tmp:
            sd = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}
            save_file(sd, str(tmp / "model.safetensors"))
            if ema is not None:
                save_file({k: v.cpu().contiguous() for k, v in ema.named().items()}, str(tmp / "ema.safetensors"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
            for rank, state in enumerate(rng):
                torch.save(state, tmp / f"rng-{rank}.pt")
            atomic_write_json(tmp / "state.json", {"step": step, "world": acc.num_processes, "logs": logs})
        for old in list_checkpoints(out)[: -max(cfg.keep_checkpoints, 1)]:
            shutil.rmtree(old, ignore_errors=True)
        if cfg.upload_uri:
            from craft.storage.objectstore import ObjectStore

            store = ObjectStore.from_env()
            store.upload_dir(path, f"{cfg.upload_uri.rstrip('/')}/{CKPT_DIR}/{path.name}")
            for _, old_uri in remote_checkpoints(store, cfg.upload_uri)[: -max(cfg.keep_checkpoints, 1)]:
                store.delete_prefix(old_uri)
    acc.wait_for_everyone()
    return path


def _gather_objects(acc, obj) -> list:
    """``obj`` of every rank, in rank order (one process: ``[obj]``)."""
    if acc.num_processes == 1:
        return [obj]
    out = [None] * acc.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


def remote_checkpoints(store, upload_uri: str) -> list[tuple[int, str]]:
    """Committed checkpoints under ``UPLOAD_URI/checkpoints`` on the object store as (step, uri), oldest first."""
    from craft.storage.objectstore import MANIFEST_NAME

    root = f"{upload_uri.rstrip('/')}/{CKPT_DIR}/"
    found: dict[int, str] = {}
    for uri in store.list(root):
        name, _, rest = uri[len(root) :].partition("/")
        m = _CKPT_RE.match(name)
        if m and rest == MANIFEST_NAME:
            found[int(m.group(1))] = root + name
    return sorted(found.items())


def _resume_point(acc, out: Path, cfg: LoopConfig) -> Path | None:
    """The checkpoint this run resumes from: the newest local one; with none and ``upload_uri`` set, the newest
    one on the object store, downloaded first by each node's main process. Every rank must agree on it."""
    if cfg.upload_uri and acc.is_local_main_process and not list_checkpoints(out):
        from craft.storage.objectstore import ObjectStore

        store = ObjectStore.from_env()
        remote = remote_checkpoints(store, cfg.upload_uri)
        if remote:
            step, uri = remote[-1]
            print(f"resuming from {uri} (step {step}, object store)", flush=True)
            store.download_dir(uri, out / CKPT_DIR / f"step-{step:07d}")
    acc.wait_for_everyone()
    ckpts = list_checkpoints(out)
    newest = ckpts[-1] if ckpts else None
    steps = _gather_objects(acc, newest.name if newest else None)
    if len(set(steps)) > 1:
        raise RuntimeError(f"ranks disagree on the checkpoint to resume from {steps} (nodes with different local "
                           f"checkpoints under {out / CKPT_DIR}); set loop.upload_uri so every node reads the same")  # fmt: skip
    return newest


def _load_checkpoint(path: Path, model, opt, sched, ema, gen, rank: int) -> int:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")  # fmt: skip
    o = torch.load(path / "optim.pt", weights_only=True)
    opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    if ema is not None:
        ef = path / "ema.safetensors"
        if not ef.is_file():
            raise ValueError(f"{path}: EMA is on but the checkpoint has no ema.safetensors")
        saved = load_file(str(ef))
        if set(saved) != set(ema.names):
            diff = sorted(set(saved) ^ set(ema.names))
            raise ValueError(f"{ef} does not match the trainable parameters (e.g. {diff[:3]})")
        shadow = [saved[k].to(s.device, s.dtype) for k, s in zip(ema.names, ema.model.shadow_params)]
        # the loop steps the EMA once per optimizer step, so its step count (the decay schedule's t) is the step
        ema.model.load_state_dict({"shadow_params": shadow, "optimization_step": int(state["step"])})
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path}: no RNG state for rank {rank} (saved with world={state.get('world')})")
    _set_rng_state(torch.load(rng_file, weights_only=True), gen)
    return int(state["step"])


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike, ema: bool = False) -> None:
    """Load a checkpoint's model weights (or its EMA weights over the trainable ones) into ``model``."""
    from safetensors.torch import load_file

    path = Path(checkpoint)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if ema:
        apply_ema(model, load_file(str(path / "ema.safetensors")))


def apply_ema(model: torch.nn.Module, ema: dict[str, torch.Tensor]) -> None:
    """Copy EMA weights (by parameter name) into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in ema.items():
            params[k].copy_(v.to(params[k].dtype))
