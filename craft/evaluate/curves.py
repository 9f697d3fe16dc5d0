"""The over-optimisation curve, evaluation side (issue 21): the evaluator and the oracle along training steps.

A reward adapter trained with ``reward.monitor.every > 0`` carries ``monitor/monitor.jsonl`` (the critic's,
its augmented views' and the referee's readings on held-out TRAINING prompts, ``craft.train.monitor``) and a
snapshot of the adapter at every reading (``monitor/step-NNNNNNN/``). The reward stage never sees the
evaluator or the oracle; here, after training, each snapshot samples a small fixed set of held-out TEST
prompts (a class-stratified subset of the evaluate stage's own prompts, with the stage's per-(image, sample)
seeds, so every snapshot and every variant starts from the same noise) and is scored with the stage's
evaluator CAS (CRAFT 4.1.4) and, for demo modalities with a calibrated oracle, the oracle's accuracy.

Reward hacking shows as the training-side signals climbing while the evaluator's CAS and the oracle fall
(the metric-gaming concern of the referee report, seed 002, measured along steps). The rows land in metrics.json
under ``curves`` and the report plots them (``craft.evaluate.report.overoptimisation_png``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from craft.evaluate.run import (
    CurveSettings,
    VariantSpec,
    _cached_samples,
    generate,
    load_variant_pipeline,
    sample_seed,
    stratified_cap,
    to_dataset_array,
    variant_prompt,
)

log = logging.getLogger(__name__)


def monitored(specs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """{variant: its monitor readings} for every local adapter variant whose monitor log is not empty."""
    from craft.models.adapters import read_monitor_log as read_log

    out = {}
    for name, spec in specs.items():
        if isinstance(spec, VariantSpec) and spec.adapter and not spec.adapter.startswith("s3://"):
            rows = read_log(spec.adapter)
            if rows:
                out[name] = rows
    return out


def curve_cases(cases: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The curve's prompts: ``n`` of the stage's held-out rows keeping their class proportions (all when fewer).

    A plain head of ``cases`` could hold one class only (cases keep the split's row order)."""
    return stratified_cap(cases, n, seed)


def selection(adapter: str | Path) -> dict[str, Any]:
    """The adapter lineage's ``monitor`` block: {"select", "selected_step"} (empty when the lineage has none)."""
    from craft.models.diffusion import read_lineage

    block = read_lineage(adapter).get("monitor") or {}
    return {k: block[k] for k in ("select", "selected_step") if k in block}


def trace(name: str, spec: VariantSpec, readings: list[dict[str, Any]], *, cases: pd.DataFrame,
          real_emb, scorer, oracle, settings: CurveSettings, cfg, meta, dev, work: Path,
          tau: float | None) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """One row per monitor reading: the reading's fields plus the evaluator's CAS and the oracle's accuracy.

    ``cases``: the curve's held-out rows (``curve_cases``) and ``real_emb`` their real images' evaluator
    embeddings (SFS references); ``scorer``: the stage's evaluator (``run.Scorer``); ``oracle``: a calibrated
    demo oracle or None (then ``oracle_accuracy`` is null at every step); ``tau``: the stage's low-alignment
    threshold (the real images' quantile). Returns (rows, notes).
    """
    from craft.models.adapters import MONITOR_DIR, MONITOR_LOG, read_adapter_meta

    parent = read_adapter_meta(spec.adapter)
    log_path = Path(spec.adapter) / MONITOR_DIR / MONITOR_LOG
    for reading in readings:  # every snapshot the log names must be there before any sampling starts
        snap = Path(spec.adapter) / MONITOR_DIR / str(reading.get("snapshot") or "")
        if reading.get("snapshot") and not snap.is_dir():
            raise FileNotFoundError(f"{log_path}: step {reading['step']} names snapshot {reading['snapshot']!r}, but "
                                    f"{snap} does not exist (an adapter copied without its monitor folder?)")  # fmt: skip
    S = settings.samples_per_prompt
    ids = cases["image_id"].astype(str).tolist()
    labels = [lab for lab in cases["label"].astype(str) for _ in range(S)]
    prompts = [p for p in cases["enriched_prompt"].astype(str) for _ in range(S)]
    seeds = [sample_seed(cfg.seed, i, k) for i in ids for k in range(S)]  # the stage's noise for (image, sample)
    ref = real_emb.repeat_interleave(S, 0)
    sample_cfg = {k: getattr(cfg, k) for k in ("steps", "guidance", "scheduler", "seed")}
    rows, notes, missing = [], [], []
    for reading in readings:
        row = {**reading, "evaluator_cas": None, "evaluator_low_alignment_rate": None, "oracle_accuracy": None}
        snap_name = reading.get("snapshot")
        if not snap_name:  # reward.monitor.snapshots=false: the reading exists, its weights were not kept
            missing.append(int(reading["step"]))
            rows.append(row)
            continue
        snap = Path(spec.adapter) / MONITOR_DIR / str(snap_name)
        sspec = VariantSpec(spec.model, str(snap))

        def make(sspec=sspec, snap=snap):
            pipe, smeta = load_variant_pipeline(sspec, dev)
            # a snapshot carries the run's frozen TI tokens and class -> token map, which must be the adapter's
            if sorted(smeta.get("tokens") or []) != sorted(parent.get("tokens") or []):
                raise ValueError(f"{snap}: textual-inversion tokens {smeta.get('tokens')} differ from the adapter's "
                                 f"{parent.get('tokens')}; the snapshot is not of this adapter's run")  # fmt: skip
            ps = [variant_prompt(p, lab, smeta) for p, lab in zip(prompts, labels)]
            return to_dataset_array(generate(pipe, ps, seeds, cfg), meta)

        key = {"spec": sspec.key(), "prompts": prompts, "seeds": seeds, **sample_cfg}
        imgs = _cached_samples(work, f"{name}-curve-{snap_name}", key, make)
        sc = scorer.score(scorer.embed(imgs), labels, prompts, ref)  # the stage's CAS, CRAFT 4.1.4
        row["evaluator_cas"] = float(np.mean(sc["cas"]))
        if tau is not None:  # strictly below the real images' quantile, as the stage's low-alignment rate
            row["evaluator_low_alignment_rate"] = float(np.mean(sc["cas"] < tau))
        if oracle is not None:
            row["oracle_accuracy"] = float(np.mean(oracle.correct(imgs, labels)))
        rows.append(row)
        log.info("evaluate: curve %s step %d: CAS %.4f", name, reading["step"], row["evaluator_cas"])
    if missing:
        notes.append(f"over-optimisation curve of {name}: no snapshot kept at steps {missing} "
                     "(reward.monitor.snapshots=false), so no evaluator or oracle reading there")  # fmt: skip
    return rows, notes
