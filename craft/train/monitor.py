"""Training-side over-optimisation monitor for CRAFT reward finetuning (issue 21).

A LoRA trained against one frozen critic can learn what that critic rewards rather than what the classes
look like (reward hacking: the critic's reward climbs while an independent judge's verdict falls). Every
``monitor.every`` steps (and once before the first step) the monitor samples images for a fixed set of
HELD-OUT prompts (training rows removed from the reward training set, stratified by class, the same noise
at every reading) and records, in ``monitor.jsonl``:

- ``critic_reward``: the training critic's reward (eq. 6 with the run's weights) and its components;
- ``critic_views``: the same critic's reward averaged over random augmented views of the same images
  (resized crop, flip, noise: ``RewardAugment``); a gap that opens between the two is a reward that does
  not hold across renderings;
- ``critic_acc``: how often the critic's probe reads the intended class;
- ``referee_reward`` / ``referee_acc``: the same two readings by a REFEREE, a second encoder + probe trained
  like the critic but with another seed and architecture (the encoder stage's ``referee`` role). It is
  never the evaluator and never the ground-truth oracle: those stay with the evaluate stage, so choosing a
  checkpoint here can never look at the numbers the gate judges (tests/test_reward_isolation.py).

Each reading also keeps a snapshot of the adapter (``step-NNNNNNN/``, the layout ``load_adapters`` reads), so
the evaluate side can later trace the evaluator's CAS and the oracle along the same steps (the
over-optimisation curve), and ``select`` picks the checkpoint the stage saves by one training-side signal
(``critic``, ``views`` or ``referee``: the highest reading; ``last`` = the final weights, the paper's behaviour), with
optional early stopping after ``patience`` readings without improvement.

``select: held`` is a trust region on the reward that does not hold across views. Each reading's UNHELD gain is
how much the critic's reward has risen since step 0 minus how much its reading over augmented views has risen:
``(critic_reward - critic_reward@0) - (critic_views - critic_views@0)``. A LoRA that learns what the classes look
like raises both (the views reading follows the clean one); a LoRA that learns the critic's blind spots raises the
clean reading only, and the gap grows. ``held`` keeps the last reading before the unheld gain first exceeds
``hold_tolerance`` (step 0, the start, when the first reading after it already does), and ``patience`` readings
past that point end training. Like the others it reads only the critic, on training prompts held out of the
reward set, so the evaluator and the oracle stay out of it (issue 21: "the reward must hold across views").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from craft.io import atomic_write_bytes
from craft.models.adapters import MONITOR_DIR, MONITOR_LOG  # the layout the evaluate side reads
from craft.models.adapters import read_monitor_log as read_log  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"  # the objective's trainable tensors at a reading, by parameter name
SIGNALS = {"critic": "critic_reward", "views": "critic_views", "referee": "referee_reward"}
SELECTS = ("last", *SIGNALS, "held")
UNHELD = "critic_unheld"  # a reading's reward gain since step 0 that its views reading does not share


@dataclass
class MonitorConfig:
    """``reward.monitor``: held-out readings during reward finetuning, snapshots, checkpoint selection."""

    every: int = 0  # steps between readings (0 = off: no held-out rows, no readings, the paper's run)
    prompts: int = 16  # training rows held out of the reward training set (stratified by class) to read on
    samples_per_prompt: int = 2  # images per held-out prompt at every reading (fixed noise)
    views: int = 4  # augmented views for ``critic_views`` (crop/flip/noise as ``reward.augment``'s)
    seed: int = 4321  # the held-out choice and the readings' noise (the same trajectories at every reading)
    select: Literal["last", "critic", "views", "referee", "held"] = "last"  # the signal that picks the saved weights
    patience: int = 0  # stop after this many readings without improvement of ``select`` (0 = never stop early);
    # for ``held``: this many readings after the unheld gain first passed ``hold_tolerance``
    min_delta: float = 0.0  # what counts as an improvement of the selection signal
    hold_tolerance: float = 0.1  # ``held``: the largest unheld reward gain (eq. 6 units) a kept reading may have
    snapshots: bool = True  # keep the adapter of every reading (for the evaluator's curve, after training)

    def validate(self) -> None:
        if self.every < 0 or self.prompts < 1 or self.samples_per_prompt < 1 or self.views < 0:
            raise ValueError(f"monitor: every must be >= 0, prompts and samples_per_prompt >= 1, views >= 0 "
                             f"(got {self.every}, {self.prompts}, {self.samples_per_prompt}, {self.views})")  # fmt: skip
        if self.select not in SELECTS:
            raise ValueError(f"monitor.select must be {', '.join(SELECTS)}; got {self.select!r}")
        if self.select in ("views", "held") and self.views < 1:
            raise ValueError(f"monitor.select={self.select} needs monitor.views >= 1")
        if not self.hold_tolerance >= 0:
            raise ValueError(f"monitor.hold_tolerance must be >= 0, got {self.hold_tolerance}")
        if self.patience < 0:
            raise ValueError(f"monitor.patience must be >= 0, got {self.patience}")
        if (self.select != "last" or self.patience) and self.every < 1:
            raise ValueError("monitor.select / monitor.patience need readings: set monitor.every > 0")
        if self.patience and self.select == "last":
            raise ValueError("monitor.patience needs a signal to wait on: set monitor.select (critic, views, referee, "
                             "held)")  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.every > 0


def holdout_rows(labels: list[str], n: int, seed: int) -> list[int]:
    """``n`` row indices spread over the classes (round robin over a seeded shuffle of each class's rows)."""
    if n >= len(labels):
        raise ValueError(f"monitor.prompts={n} would hold out all {len(labels)} training rows; lower it")
    g = torch.Generator().manual_seed(seed)
    by: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by.setdefault(y, []).append(i)
    queues = {y: [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()] for y, rows in sorted(by.items())}
    out: list[int] = []
    while len(out) < n:
        for y in sorted(queues):
            if queues[y] and len(out) < n:
                out.append(queues[y].pop())
    return sorted(out)


class Judge:
    """One frozen encoder + probe read as the reward reads it: eq. 6's total, its components, probe accuracy."""

    def __init__(self, cam, weights: dict[str, float]):
        self.cam, self.weights = cam, weights

    def __call__(self, images: torch.Tensor, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        from craft.losses import clinical_reward

        comps = self.cam(images, meta["label"], meta["prompt"], references=meta.get("reference"))
        comps = {k: v for k, v in comps.items() if k in self.weights}
        comps["total"] = clinical_reward(comps, self.weights)
        emb = self.cam.encoder.encode_images(images)
        y = self.cam.probe.label_indices(meta["label"])
        comps["acc"] = (self.cam.probe(emb).argmax(-1) == y.to(emb.device)).float()
        return comps


class RewardMonitor:
    """The loop's ``validate`` callback for the reward stage: readings, snapshots, selection, early stopping."""

    def __init__(self, cfg: MonitorConfig, meta: dict[str, Any], critic: Judge, referee: Judge | None,
                 augment, work_dir: Path, snapshot_fn) -> None:  # fmt: skip
        """``meta``: the held-out rows ("prompt", "label", optional "gen_prompt" and "reference" [N, 3, H, W]);
        ``augment``: the ``RewardAugment`` whose crop/flip/noise the views use (``cfg.views`` of them);
        ``snapshot_fn(dir)`` writes the current adapter into ``dir`` (the final adapter's layout)."""
        if cfg.select == "referee" and referee is None:
            raise ValueError("monitor.select=referee needs a referee encoder and probe (the encoder stage's referee "
                             "role); none was given to the reward stage")  # fmt: skip
        self.cfg, self.meta, self.critic, self.referee = cfg, meta, critic, referee
        self.augment, self.snapshot_fn = augment, snapshot_fn
        self.dir = Path(work_dir) / MONITOR_DIR
        self.rows: list[dict[str, Any]] = []
        if (self.dir / MONITOR_LOG).is_file():  # resume: the readings of the interrupted run
            self.rows = [json.loads(x) for x in (self.dir / MONITOR_LOG).read_text().splitlines() if x.strip()]

    # ------------------------------------------------------------------ state
    def forget_after(self, step: int) -> None:
        """Drop readings past ``step`` (a resumed run repeats the steps after its checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._write()

    @property
    def stopped_at(self) -> int | None:
        """The step at which early stopping ended training, if it did."""
        return next((r["step"] for r in self.rows if r.get("stop")), None)

    def best(self) -> dict[str, Any] | None:
        """The reading ``select`` picks: the highest signal (the earliest among equals); for ``held`` the last one
        before the unheld gain first passes ``hold_tolerance``."""
        if self.cfg.select == "last" or not self.rows:
            return None
        if self.cfg.select == "held":
            return self.rows[_held_prefix(self.rows, self.cfg.hold_tolerance) - 1]
        key = SIGNALS[self.cfg.select]
        return max(self.rows, key=lambda r: (r[key], -r["step"]))

    def _write(self) -> None:
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
        atomic_write_bytes(self.dir / MONITOR_LOG, text.encode())

    # ------------------------------------------------------------------ one reading
    @torch.no_grad()
    def read(self, objective, step: int) -> dict[str, Any]:
        """Sample the held-out prompts with the current weights and read every signal."""
        from craft.train.reward import augmented_view

        images = objective.sample_images(self.meta.get("gen_prompt", self.meta["prompt"]), self.cfg.seed,
                                         self.cfg.samples_per_prompt)  # fmt: skip
        k = self.cfg.samples_per_prompt
        meta = {key: _tile(v, k) for key, v in self.meta.items() if key != "gen_prompt"}
        row: dict[str, Any] = {"step": int(step)}
        for name, judge in (("critic", self.critic), ("referee", self.referee)):
            if judge is None:
                continue
            r = judge(images, meta)
            row[f"{name}_reward"] = float(r["total"].mean())
            row[f"{name}_acc"] = float(r["acc"].mean())
            row.update({f"{name}_{c}": float(v.mean()) for c, v in r.items() if c not in ("total", "acc")})
        if self.cfg.views:
            g = torch.Generator().manual_seed(self.cfg.seed + 1)  # the same views at every reading
            totals = [
                self.critic(augmented_view(images, self.augment, g), meta)["total"] for _ in range(self.cfg.views)
            ]
            row["critic_views"] = float(torch.stack(totals).mean())
        return row

    def __call__(self, objective, step: int, out_dir=None, writer=None) -> bool:
        """Record a reading at ``step``; returns True when early stopping says training should end here."""
        if any(r["step"] == step for r in self.rows):
            return bool(self.stopped_at is not None and self.stopped_at <= step)
        row = self.read(objective, step)
        if "critic_views" in row:
            first = self.rows[0] if self.rows else row  # the step-0 reading: the start the gains are measured from
            row[UNHELD] = unheld_gain(row, first)
        if self.cfg.snapshots or self.cfg.select != "last":
            snap = self.dir / f"step-{step:07d}"
            self.snapshot_fn(snap)
            _save_trainable(objective, snap / TRAINABLE_FILE)
            row["snapshot"] = snap.name
        stop = False
        if self.cfg.patience and self.rows and self.cfg.select == "held":  # readings past the trust region
            both = [*self.rows, row]
            stop = len(both) - _held_prefix(both, self.cfg.hold_tolerance) >= self.cfg.patience
        elif self.cfg.patience and self.rows:  # readings since the signal last improved (by more than min_delta)
            stop = _trailing_flat([*self.rows, row], SIGNALS[self.cfg.select], self.cfg.min_delta) >= self.cfg.patience
        row["stop"] = stop
        self.rows.append(row)
        self._write()
        if writer is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    writer.add_scalar(f"monitor/{k}", v, step)
        log.info("monitor step %d: %s", step, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        return stop

    def restore_selected(self, objective) -> dict[str, Any] | None:
        """Load the selected reading's trainable tensors into ``objective``; returns that reading (None: last)."""
        from safetensors.torch import load_file

        best = self.best()
        if best is None:
            return None
        state = load_file(str(self.dir / best["snapshot"] / TRAINABLE_FILE))
        params = dict(objective.named_parameters())
        missing = [n for n in state if n not in params]
        if missing:
            raise ValueError(f"{self.dir / best['snapshot']}: snapshot names {missing[0]!r}, not in the model")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        return best


def unheld_gain(row: dict[str, Any], first: dict[str, Any]) -> float:
    """The critic's reward gain since ``first`` (the step-0 reading) that its views reading does not share."""
    return (row["critic_reward"] - first["critic_reward"]) - (row["critic_views"] - first["critic_views"])


def _held_prefix(rows: list[dict[str, Any]], tolerance: float) -> int:
    """How many readings from the start keep their unheld gain within ``tolerance`` (at least 1: step 0's is 0)."""
    n = 0
    for r in rows:
        if n and unheld_gain(r, rows[0]) > tolerance:
            break
        n += 1
    return n


def _trailing_flat(rows: list[dict[str, Any]], key: str, min_delta: float) -> int:
    """How many readings at the end of ``rows`` came after the last one that improved on all before it."""
    best, last_improved = float("-inf"), 0
    for i, r in enumerate(rows):
        if i == 0 or r[key] > best + min_delta:
            last_improved = i
        best = max(best, r[key])
    return len(rows) - 1 - last_improved


def _tile(v: Any, k: int) -> Any:
    """Each held-out row repeated ``k`` times in a row (sample j of prompt i sits at i * k + j)."""
    if isinstance(v, torch.Tensor):
        return v.repeat_interleave(k, dim=0)
    return [x for x in v for _ in range(k)]


def _save_trainable(objective, path: Path) -> None:
    from safetensors.torch import save

    state = {n: p.detach().float().cpu().contiguous() for n, p in objective.named_parameters() if p.requires_grad}
    atomic_write_bytes(path, save(state))
