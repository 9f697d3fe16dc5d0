"""``craft experiment paper-table``: the papers' comparisons on a demo profile, mean and sd over seeds.

One command trains every variant the tables need and evaluates them under one protocol, then writes
a section of RESULTS.md (and ``results.json`` beside the runs):

- CRAFT Table 1: VDC, CCS, DD, SFS, CAS for Real, the zero-shot base (CRAFTS stage 2), TI, TI+LoRA,
  DPO and CRAFT (DRaFT-K reward LoRA), scored by the EVALUATOR (never the critic; sec. 4.1.4);
- Table 2: TI+LoRA, TI+LoRA trained on the enriched prompts, CRAFT (is prompt enrichment enough?);
- Table 4: CRAFT with a single reward (VDC, CCS, DD or SFS only) and leave-one-out (all but one);
- Table 14: low-alignment rate (share strictly below the real images' 25th CAS percentile) and the
  10th percentile of CAS;
- the ground-truth oracle's accuracy per variant and the CAS-oracle rank correlation;
- the critic's own training reward per variant on the held-out prompts (did DRaFT raise what it
  optimised, relative to TI+LoRA?);
- CRAFTS: stage 2 with and without L_corr + L_cate (eqs. 8-13), class separability of its samples
  (oracle accuracy, silhouette in the evaluator's embedding).

What varies with the seed: stage-2 fine-tuning, every adapter's training (``loop.seed``), DPO's pair
seeds and the evaluation's sampling noise. What is shared by all seeds of a profile: the dataset, its
annotations, the frozen critic and evaluator (and their probes) and CRAFTS stage 1 — the paper's
frozen parts. Every step writes a ``.done.json`` marker last; a rerun skips finished steps and the
training loops resume from their checkpoints, so an interrupted experiment continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from craft.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

REWARDS = ("vdc", "ccs", "dd", "sfs")
DONE = ".done.json"

# variant name -> how the tables label it
LABELS = {
    "real": "Real (held-out images)",
    "zero_shot": "Zero-shot (CRAFTS stage 2)",
    "ti": "Textual inversion",
    "ti_lora": "TI+LoRA",
    "ti_lora_enriched": "TI+LoRA + enriched prompts",
    "dpo": "DPO",
    "craft": "CRAFT (DRaFT-1, all rewards; the profile's settings)",
    "craft_paper": "CRAFT, the paper's settings (whole update, last step)",
    "crafts_no_losses": "CRAFTS stage 2 without L_corr, L_cate",
    **{f"craft_only_{k}": f"CRAFT, {k.upper()} only" for k in REWARDS},
    **{f"craft_without_{k}": f"CRAFT without {k.upper()}" for k in REWARDS},
    "craft_monitored": "CRAFT, paper settings (monitored)",
    "craft_views": "CRAFT + critic reads 4 augmented views",
    "craft_select": "CRAFT + checkpoint chosen by the referee",
    "craft_regularised": "CRAFT + eq. 1 L_diff weight 4",
    "craft_combined": "CRAFT + views + referee choice + L_diff 4",
    "craft_ensemble": "CRAFT + reward averaged over 3 critics",
    "craft_half_update": "CRAFT + half the LoRA update kept",
    "craft_anchored_select": "CRAFT + L_diff 4 + referee choice",
    "craft_half_select": "CRAFT + half update of the referee's choice",
    "craft_half_held": "CRAFT + half update of the last reading that holds across views",
}

# The tables' main CRAFT row ("craft") is CRAFT as the profile ships it to users (the demo profiles keep half of the
# update, demo-cxr that of the step the referee reads best: reward.update_scale and reward.monitor, issue 21). The
# paper's method (the whole LoRA update kept, the last step's weights saved) is the row beside it ("craft_paper") and
# the base of Table 4's single-reward / leave-one-out rows and of the remedies: PAPER turns the profile's choices off
PAPER = ["reward.update_scale=1.0", "reward.monitor.every=0", "reward.monitor.select=last"]

# Issue 21: remedies against reward hacking, each a reward-stage config on top of CRAFT (every one monitored, so each
# has an over-optimisation curve; the first is the paper's settings with the monitor only, the "old" curve)
MONITORED = ["reward.monitor.every=25", "reward.monitor.prompts=16", "reward.monitor.samples_per_prompt=2"]
VIEWS, SELECT, REGULARISED, ENSEMBLE, HALF = (
    ["reward.augment.views=4"],
    ["reward.monitor.select=referee"],
    ["reward.diffusion_weight=4"],
    ["reward.ensemble=2"],  # the critic + critic-1 + critic-2 (encoder.ensemble_seeds), trained in shared/
    ["reward.update_scale=0.5"],  # the LoRA scale as the regulariser: start + 0.5 * (trained - start)
)
REMEDIES: dict[str, list[str]] = {
    "craft_monitored": [],
    "craft_views": VIEWS,
    "craft_select": SELECT,
    "craft_regularised": REGULARISED,
    "craft_combined": [*VIEWS, *SELECT, *REGULARISED],
    "craft_ensemble": ENSEMBLE,
    "craft_half_update": HALF,
    # added after the first six remedies' 3-seed results (so not an independent test): the two that helped on both
    # profiles without the views (which lowered cxr CAS in every seed): eq. 1's anchor and the referee's choice
    "craft_anchored_select": [*REGULARISED, *SELECT],
    # added after the 32 px demo-histo chains (RESULTS.md): demo-cxr's CRAFT since then
    "craft_half_select": [*HALF, *SELECT],
    # added after demo-cxr's 9 paper-table seeds with it (RESULTS.md): demo-cxr's CRAFT since then, read as the
    # shipped row is (32 held-out prompts), to see what it keeps where the critic's gain does hold across views
    "craft_half_held": [*HALF, "reward.monitor.select=held", "reward.monitor.prompts=32"],
}


@dataclass
class Plan:
    """What one paper-table run trains and where."""

    profile: str
    root: Path
    seeds: list[int]
    overrides: list[str]
    table4: bool = True  # 8 more reward runs per seed (single-reward and leave-one-out)
    crafts_ablation: bool = True  # stage 2 again without its losses, per seed
    table4_seeds: int | None = None  # train the Table 4 variants for seeds 0..K-1 only (None: every seed)
    # issue 21: the REMEDIES to train (each monitored; a referee encoder is trained for them)
    remedies: list[str] = field(default_factory=list)

    def table4_for(self, seed: int) -> bool:
        return self.table4 and (self.table4_seeds is None or seed < self.table4_seeds)

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    def seed_dir(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"


def _done(path: Path) -> dict[str, Any] | None:
    marker = path / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_step(path: Path, fn, timings: dict[str, float], name: str) -> dict[str, Any]:
    """Run ``fn()`` unless ``path`` holds a finished marker; record its wall time; the marker is written last.

    An exclusive lock beside ``path`` (released by the OS if the process dies) keeps two processes on
    one root (``--first-seed``) from training the same step: the second waits, then reuses the result.
    """
    import fcntl

    have = _done(path)
    if have is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            have = _done(path)  # finished by the process that held the lock
            if have is None:
                t0 = time.time()
                log.info("paper-table: %s -> %s", name, path)
                metrics = fn()
                have = {"step": name, "seconds": time.time() - t0, "metrics": _plain(metrics)}
                atomic_write_json(path / DONE, have)
    timings[name] = have["seconds"]
    return have


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, int | float | str | bool) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def reward_variants(table4: bool) -> dict[str, dict[str, float]]:
    """Variant -> the FULL reward-weight mapping it trains with: CRAFT as the profile ships it, CRAFT at the paper's
    settings and, when ``table4``, CRAFT Table 4's rows (at the paper's settings, like the row they are read against).
    """
    from craft.losses import DEFAULT_REWARD_WEIGHTS

    full = dict(DEFAULT_REWARD_WEIGHTS)
    out = {"craft": full, "craft_paper": dict(full)}
    if table4:
        for k in REWARDS:  # a single reward keeps its default weight; the others are off
            out[f"craft_only_{k}"] = {r: (full[r] if r == k else 0.0) for r in REWARDS}
        for k in REWARDS:
            out[f"craft_without_{k}"] = {**full, k: 0.0}
    return out


def _weights_overrides(w: dict[str, float]) -> list[str]:
    return [f"reward.reward_weights.{k}={v}" for k, v in w.items()]


def train_shared(plan: Plan, timings: dict[str, float]) -> dict[str, Path]:
    """Dataset, annotations, critic + evaluator encoders and probes, CRAFTS stage 1 (shared by all seeds)."""
    from craft import steps
    from craft.annotate.run import annotate_step
    from craft.train import crafts
    from craft.train.encoder import encoder_step
    from craft.train.probe import probe_step

    s, p, o = plan.shared, plan.profile, plan.overrides
    d = {k: s / k for k in ("data", "annotations", "critic", "evaluator", "critic_probe", "evaluator_probe",
                            "pretrain")}  # fmt: skip
    run_step(d["data"], lambda: steps.prepare_dataset(d["data"], p, o), timings, "data")
    run_step(d["annotations"], lambda: annotate_step(d["data"], d["annotations"], p, o), timings, "annotate")
    for role in ("critic", "evaluator"):
        run_step(d[role], lambda r=role: encoder_step(d["data"], d["annotations"], r, d[r], p, o), timings,
                 f"encoder-{role}")  # fmt: skip
        pd_ = d[f"{role}_probe"]
        run_step(pd_, lambda r=role, q=pd_: probe_step(d[r], d["data"], q, p, o), timings, f"probe-{role}")
    from craft.config import load_stage_config

    # the monitor's referee (issue 21): for the remedies, or where the profile's CRAFT (the "craft" row) is monitored
    if plan.remedies or load_stage_config("reward", p, o).monitor.enabled:
        d["referee"], d["referee_probe"] = s / "referee", s / "referee_probe"
        run_step(d["referee"], lambda: encoder_step(d["data"], d["annotations"], "referee", d["referee"], p, o),
                 timings, "encoder-referee")  # fmt: skip
        run_step(d["referee_probe"], lambda: probe_step(d["referee"], d["data"], d["referee_probe"], p, o), timings,
                 "probe-referee")  # fmt: skip
    n_extra = max(load_stage_config("reward", p, over).ensemble for over in
                  [o, *([*PAPER, *MONITORED, *REMEDIES[r], *o] for r in plan.remedies)])  # fmt: skip
    for k in range(1, n_extra + 1):  # the reward ensemble's extra critics (issue 21): the critic's arch, other seeds
        m, mp = f"critic-{k}", f"critic-{k}_probe"
        d[m], d[mp] = s / m, s / mp
        run_step(d[m], lambda r=m: encoder_step(d["data"], d["annotations"], r, d[r], p, o), timings, f"encoder-{m}")
        run_step(d[mp], lambda r=m, q=mp: probe_step(d[r], d["data"], d[q], p, o), timings, f"probe-{m}")
    run_step(d["pretrain"], lambda: crafts.step("pretrain", d["data"], d["pretrain"], p, o), timings, "pretrain")
    return d


def train_seed(plan: Plan, seed: int, shared: dict[str, Path], timings: dict[str, float]) -> dict[str, Path]:
    """Every generator variant of one seed; returns variant -> model or adapter dir (adapters sit on zero_shot)."""
    from craft.train import baselines, crafts, reward

    sd, p = plan.seed_dir(seed), plan.profile
    o = [*plan.overrides, *(f"{st}.loop.seed={seed}" for st in ("finetune", "reward", "ti", "ti_lora", "dpo")),
         f"dpo.seed={seed}"]  # fmt: skip
    data, ann = shared["data"], shared["annotations"]
    critic, cprobe = shared["critic"], shared["critic_probe"]
    v: dict[str, Path] = {"zero_shot": sd / "finetune"}
    run_step(v["zero_shot"], lambda: crafts.step("finetune", data, v["zero_shot"], p, o, base=str(shared["pretrain"])),
             timings, "finetune")  # fmt: skip
    base = str(v["zero_shot"])
    if plan.crafts_ablation:
        v["crafts_no_losses"] = sd / "finetune-no-losses"
        off = [*o, "finetune.corr_weight=0", "finetune.cate_weight=0"]
        run_step(v["crafts_no_losses"], lambda: crafts.step("finetune", data, v["crafts_no_losses"], p, off,
                 base=str(shared["pretrain"])), timings, "finetune-no-losses")  # fmt: skip
    v["ti"] = sd / "ti"
    run_step(v["ti"], lambda: baselines.step("ti", data, base, v["ti"], p, o), timings, "ti")
    for name, extra in (("ti_lora", []), ("ti_lora_enriched", ["ti_lora.prompts=enriched"])):
        v[name] = sd / name
        run_step(v[name], lambda n=name, e=extra: baselines.step("ti_lora", data, base, v[n], p, [*o, *e],
                 annotations_dir=ann, start_dir=v["ti"]), timings, name)  # fmt: skip
    v["dpo"] = sd / "dpo"
    run_step(v["dpo"], lambda: baselines.step("dpo", data, base, v["dpo"], p, o, annotations_dir=ann,
             critic_dir=critic, probe_dir=cprobe, start_dir=v["ti_lora"]), timings, "dpo")  # fmt: skip
    from craft.config import load_stage_config

    # where the reward LoRA starts: the profile's pipeline.craft_start, as in the pipeline (craft.plan)
    start = v["ti_lora"] if load_stage_config("pipeline", p, plan.overrides).craft_start == "ti_lora" else None
    for name, w in reward_variants(plan.table4_for(seed)).items():
        v[name] = sd / name
        over = [*([] if name == "craft" else PAPER), *o, *_weights_overrides(w)]  # "craft": the profile's settings
        run_step(v[name], lambda n=name, ov=over: reward.step(data, ann, critic, cprobe, base, v[n], p, ov,
                 start_dir=start, referee_dir=shared.get("referee"), referee_probe_dir=shared.get("referee_probe"),
                 ensemble=_members(shared, p, ov)), timings, name)  # fmt: skip
        check_reused(v[name], load_stage_config("reward", p, over))
    for name in plan.remedies:
        v[name] = sd / name
        over = [*PAPER, *MONITORED, *REMEDIES[name], *o]
        run_step(v[name], lambda n=name, ov=over: reward.step(data, ann, critic, cprobe, base, v[n], p, ov,
                 start_dir=start, referee_dir=shared["referee"], referee_probe_dir=shared["referee_probe"],
                 ensemble=_members(shared, p, ov)), timings, name)  # fmt: skip
        check_reused(v[name], load_stage_config("reward", p, over))
    return v


def check_reused(d: Path, cfg) -> None:
    """A finished reward variant (perhaps from a run before the tables' CRAFT row became the profile's setting) must
    have been trained with the update scale and checkpoint choice its row now stands for; else a clear error, never
    a row under the wrong label."""
    got = json.loads((d / "lineage.json").read_text())["config"]
    mon = got.get("monitor") or {}
    want = {"update_scale": cfg.update_scale, "monitor.every": cfg.monitor.every, "monitor.select": cfg.monitor.select,
            "monitor.hold_tolerance": cfg.monitor.hold_tolerance}  # fmt: skip
    have = {
        "update_scale": got.get("update_scale", 1.0),
        "monitor.every": mon.get("every", 0),
        "monitor.select": mon.get("select", "last"),
        "monitor.hold_tolerance": mon.get("hold_tolerance", 0.1),
    }
    diff = [f"reward.{k}={have[k]} (this row needs {want[k]})" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError(f"{d}: finished with other settings than its row: {', '.join(diff)}; move the folder away "
                         "to train it again")  # fmt: skip


def _members(shared: dict[str, Path], profile: str, overrides: list[str]) -> list[tuple[Path, Path]]:
    """The extra critics (encoder, probe) a reward run with ``overrides`` averages over (``reward.ensemble``)."""
    from craft.config import load_stage_config

    n = load_stage_config("reward", profile, overrides).ensemble
    return [(shared[f"critic-{k}"], shared[f"critic-{k}_probe"]) for k in range(1, n + 1)]


def _variant_spec(d: Path, base: str):
    """How the evaluate step loads a paper-table variant: a full model folder, or an adapter on ``base``."""
    from craft.evaluate import run as ev

    return ev.VariantSpec(str(d)) if (d / "model_index.json").is_file() else ev.VariantSpec(base, str(d))


def _evaluate(cfg, shared: dict[str, Path], specs: dict[str, Any], out: Path) -> dict[str, Any]:
    """``craft.evaluate.run.main`` on the run's shared data, evaluator and critic (the critic read for its reward)."""
    from craft.evaluate import run as ev
    from craft.models.encoders import load_encoder

    return ev.main(cfg, shared["data"], shared["annotations"], specs, shared["evaluator"], shared["evaluator_probe"],
                   out, critic_identity=load_encoder(shared["critic"]).identity, critic_dir=shared["critic"],
                   critic_probe_dir=shared["critic_probe"])  # fmt: skip


def evaluate_seed(plan: Plan, seed: int, shared: dict[str, Path], variants: dict[str, Path],
                  timings: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """All variants of one seed under the evaluate protocol (evaluator scores, critic reward beside)."""
    from craft.config import load_stage_config
    from craft.evaluate import run as ev

    base = str(variants["zero_shot"])
    specs: dict[str, Any] = {ev.REAL: ev.REAL}
    for name, d in variants.items():
        specs[name] = _variant_spec(d, base)
    main_specs = {k: v for k, v in specs.items() if k not in REMEDIES}  # remedies: their own evaluation below
    # downstream utility is not in these tables and is the slowest part of evaluate: off unless overridden
    ev_over = [
        "evaluate.downstream.enabled=false",
        *plan.overrides,
        f"evaluate.seed={seed}",
        "evaluate.candidate=craft",
    ]
    cfg = load_stage_config("evaluate", plan.profile, ev_over)
    out = plan.seed_dir(seed) / "eval"

    run_step(out, lambda: _evaluate(cfg, shared, main_specs, out), timings, "evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    outs = []
    if plan.remedies:  # their own evaluation (same seed, so TI+LoRA and CRAFT sample the same images), merged in
        rem = {k: specs[k] for k in (ev.REAL, "ti_lora", "craft", *plan.remedies)}
        out_r = plan.seed_dir(seed) / "eval-remedies"

        run_step(out_r, lambda: _evaluate(cfg, shared, rem, out_r), timings, "evaluate-remedies")
        outs = [out_r]
        have = json.loads((out_r / "metrics.json").read_text())["variants"]
        for r in (r for r in plan.remedies if r not in have):  # a remedy added after this seed's remedies were
            # evaluated: its own evaluation (sample noise depends on (seed, image, k) only: the same noise as the rest)
            out_x = plan.seed_dir(seed) / f"eval-{r}"
            cfg_x = load_stage_config("evaluate", plan.profile, [*ev_over, f"evaluate.candidate={r}"])
            run_step(out_x, lambda r=r, c=cfg_x, o=out_x: _evaluate(c, shared, {ev.REAL: ev.REAL, r: specs[r]}, o),
                     timings, f"evaluate-{r}")  # fmt: skip
            outs.append(out_x)
    for o in outs:
        extra = json.loads((o / "metrics.json").read_text())
        metrics["variants"].update({k: d for k, d in extra["variants"].items() if k in REMEDIES})
        metrics["curves"] = {**(metrics.get("curves") or {}), **(extra.get("curves") or {})}
        metrics["curves_meta"] = {**(metrics.get("curves_meta") or {}), **(extra.get("curves_meta") or {})}
    frames = [pd.read_parquet(o / "per_image.parquet") for o in [out, *outs] if (o / "per_image.parquet").is_file()]
    if frames:  # every CRAFT row against TI+LoRA, paired by prompt and noise, with its interval
        paired = ["craft", "craft_paper", *plan.remedies]
        metrics["paired"] = paired_bootstrap(pd.concat(frames, ignore_index=True), paired, seed=seed)
    return metrics


PAIRED = {"cas": "CAS", "oracle_accuracy": "oracle acc.", "low_alignment_rate": "low-CAS rate"}


def paired_bootstrap(per_image: pd.DataFrame, variants: list[str], ref: str = "ti_lora", n_boot: int = 2000,
                     seed: int = 0, quantile: float = 0.25) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """Each variant minus ``ref`` on CAS, oracle accuracy and the low-CAS rate (share below the real images' P25),
    paired by (held-out prompt, sample): both sample the same noise (``craft.evaluate.run.sample_seed``). The 95%
    interval resamples the prompts (with both of a prompt's samples), so it says how far one seed's difference
    could move on another draw of 32 prompts. Rows of a variant appear once even when two evaluations scored it."""
    from craft.evaluate.metrics import low_alignment_threshold

    df = per_image.drop_duplicates(["variant", "image_id", "sample"])
    real = df[df["variant"] == "real"]["cas"].to_numpy()
    tau = low_alignment_threshold(real, quantile)
    base = df[df["variant"] == ref].set_index(["image_id", "sample"])
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for v in variants:
        other = df[df["variant"] == v].set_index(["image_id", "sample"])
        if other.empty or base.empty:
            continue
        both = base.join(other, lsuffix="_ref", rsuffix="_v", how="inner")
        low_v, low_ref = (both["cas_v"] < tau).astype(float), (both["cas_ref"] < tau).astype(float)
        per = {"cas": both["cas_v"] - both["cas_ref"], "low_alignment_rate": low_v - low_ref}
        if "oracle_correct_v" in both:  # no oracle for the modality: no oracle column
            per["oracle_accuracy"] = both["oracle_correct_v"] - both["oracle_correct_ref"]
        prompts = both.index.get_level_values(0).to_numpy()
        ids, inverse = np.unique(prompts, return_inverse=True)
        draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
        counts = np.stack([np.bincount(d, minlength=len(ids)) for d in draws])[:, inverse]  # prompt weights per draw
        out[v] = {}
        for k, x in per.items():
            x = x.to_numpy(dtype=float)
            if np.isnan(x).any():
                continue
            boot = (counts * x).sum(1) / counts.sum(1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            out[v][k] = {"diff": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(x))}
    return out


# ---------------------------------------------------------------------------------------------- aggregation


def per_seed_row(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """variant -> the scalar numbers the tables show, from one seed's metrics.json."""
    out = {}
    for v, d in metrics["variants"].items():
        row = {k: d.get(k) for k in ("vdc", "ccs", "dd", "sfs", "cas", "low_alignment_rate", "cas_p10",
                                     "oracle_accuracy")}  # fmt: skip
        row["silhouette"] = (d.get("fidelity") or {}).get("silhouette")
        cr = d.get("critic_reward") or {}
        row["critic_reward"] = cr.get("total")
        out[v] = row
    return out


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [float(x) for x in values if x is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _cell(vals: list[float | None]) -> dict[str, Any]:
    """One table cell: mean, sd and count over the seeds that have a value, and the per-seed values."""
    m, sd, n = mean_sd(vals)
    return {"mean": m, "sd": sd, "n": n, "per_seed": vals}


def aggregate(seeds: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd and per-seed values of every (variant, number) plus the CAS-oracle correlation."""
    rows = {s: per_seed_row(m) for s, m in seeds.items()}
    variants = list(dict.fromkeys(v for r in rows.values() for v in r))
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        keys = list(dict.fromkeys(k for r in rows.values() for k in r.get(v, {})))
        table[v] = {}
        for k in keys:
            table[v][k] = _cell([rows[s].get(v, {}).get(k) for s in seeds])
    corr = [((m.get("oracle") or {}).get("cas_vs_oracle") or {}).get("spearman") for m in seeds.values()]
    from craft.train.monitor import UNHELD, unheld_gain

    # over-optimisation curves (issue 21): variant -> step -> number -> mean/sd over the seeds that read that step
    curves: dict[str, dict[int, dict[str, Any]]] = {}
    for m in seeds.values():
        for v, rows in (m.get("curves") or {}).items():
            first = rows[0] if rows else {}
            for r in rows:
                if UNHELD not in r and all(isinstance(x.get(k), float) for x in (r, first)
                                                     for k in ("critic_reward", "critic_views")):  # fmt: skip
                    r = {**r, UNHELD: unheld_gain(r, first)}  # a run from before the monitor recorded it
                at = curves.setdefault(v, {}).setdefault(int(r["step"]), {})
                for k, x in r.items():
                    if isinstance(x, (int, float)) and not isinstance(x, bool) and k != "step":
                        at.setdefault(k, []).append(float(x))
    curves_agg = {v: {st: {k: _cell(xs) for k, xs in d.items()} for st, d in sorted(by.items())}
                  for v, by in curves.items()}  # fmt: skip
    paired = {s: m["paired"] for s, m in seeds.items() if m.get("paired")}  # remedies: per-seed paired intervals
    kept: dict[str, dict[int, Any]] = {}  # monitored rows: the step each seed's selection kept
    for s, m in seeds.items():
        for v, meta in (m.get("curves_meta") or {}).items():
            if meta.get("selected_step") is not None:
                kept.setdefault(v, {})[s] = meta["selected_step"]
    return {"table": table, "cas_oracle_spearman": _cell(corr), "curves": curves_agg, "paired": paired, "kept": kept}


def paired_difference(agg: dict[str, Any], a: str, b: str, key: str) -> dict[str, Any] | None:
    """Per-seed a - b of ``key``: mean, sd, and in how many seeds a is higher."""
    t = agg["table"]
    if a not in t or b not in t or key not in t[a] or key not in t[b]:
        return None
    pairs = [(x, y) for x, y in zip(t[a][key]["per_seed"], t[b][key]["per_seed"]) if x is not None and y is not None]
    if not pairs:
        return None
    diffs = [x - y for x, y in pairs]
    m, sd, n = mean_sd(diffs)
    return {"mean": m, "sd": sd, "n": n, "higher": sum(d > 0 for d in diffs), "lower": sum(d < 0 for d in diffs),
            "per_seed": diffs}  # fmt: skip


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(cell: dict[str, Any] | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "n/a"
    if cell["n"] > 1:
        return f"{cell['mean']:.{digits}f} ± {cell['sd']:.{digits}f}"
    return f"{cell['mean']:.{digits}f}"


def _table(agg: dict[str, Any], variants: list[str], cols: list[tuple[str, str]]) -> str:
    t = agg["table"]
    lines = ["| Method | " + " | ".join(h for h, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for v in variants:
        if v in t:
            lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(_fmt(t[v].get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def _diff_line(d: dict[str, Any] | None, what: str) -> str:
    if d is None:
        return f"{what}: not measured"
    return (f"{what}: {d['mean']:+.3f} ± {d['sd']:.3f} (higher in {d['higher']} of {d['n']} seeds; per seed "
            + ", ".join(f"{x:+.3f}" for x in d["per_seed"]) + ")")  # fmt: skip


def _verdict(d: dict[str, Any] | None, paper: str, higher_is_claim: bool = True) -> str:
    """Agree / disagree with a paper claim that a difference is positive (or negative), seed by seed; ties count against."""
    if d is None:
        return f"{paper} — not measured here"
    wins = d["higher"] if higher_is_claim else d["lower"]
    against = d["lower"] if higher_is_claim else d["higher"]
    if d["n"] and wins == d["n"]:
        word = "AGREES (every seed)"
    elif d["n"] and against == d["n"]:
        word = "DISAGREES (the opposite in every seed)"
    elif wins == 0:
        word = f"NOT SUPPORTED (no seed; {d['n'] - against} of {d['n']} tied)"
    else:
        word = f"MIXED ({wins} of {d['n']} seeds)"
    return f"{paper} — here: {word}"


def _extreme_per_seed(agg: dict[str, Any], variants: list[str], key: str, lowest: bool) -> list[str | None]:
    """Per seed, the variant with the highest (or lowest) ``key`` among ``variants`` (None where one is missing)."""
    t, out = agg["table"], []
    n = max((len(t[v][key]["per_seed"]) for v in variants if v in t and key in t[v]), default=0)
    for i in range(n):
        vals = {v: t[v][key]["per_seed"][i] for v in variants if v in t and key in t[v]}
        if len(vals) < len(variants) or any(x is None for x in vals.values()):
            out.append(None)
            continue
        out.append((min if lowest else max)(vals, key=vals.get))
    return out


def restrict(agg: dict[str, Any], keep: list[int]) -> dict[str, Any]:
    """``agg`` recomputed over the seed positions ``keep`` only (so rows trained on fewer seeds compare like for like)."""
    table = {v: {k: _cell([c["per_seed"][i] for i in keep if i < len(c["per_seed"])]) for k, c in cells.items()}
             for v, cells in agg["table"].items()}  # fmt: skip
    return {**agg, "table": table}


def table4_reading(agg: dict[str, Any], seeds: list[int] | None = None) -> list[str]:
    """CRAFT sec. 4.3 / Table 4 read column by column: each reward moves its own primitive.

    Incremental: among the single-reward variants, the one with reward k should score highest on k.
    Leave-one-out: among the all-but-one variants, the one without k should score lowest on k. Counted
    per seed (the paper reports one run) and against TI+LoRA, where the single-reward LoRAs start.
    """
    only = [f"craft_only_{k}" for k in REWARDS]
    without = [f"craft_without_{k}" for k in REWARDS]
    lines = []
    for k in REWARDS:
        K = k.upper()
        for group, mine, lowest, what in ((only, f"craft_only_{k}", False, f"adding {K} alone gives the highest {K}"),
                                          (without, f"craft_without_{k}", True,
                                           f"leaving {K} out gives the lowest {K}")):  # fmt: skip
            picks = _extreme_per_seed(agg, group, k, lowest)
            ids = seeds if seeds is not None else range(len(picks))
            known = [p for p in picks if p is not None]
            if not known:
                lines.append(f"- CRAFT Table 4: {what} — not measured here")
                continue
            hits = sum(p == mine for p in known)
            word = "AGREES (every seed)" if hits == len(known) else ("DISAGREES (no seed)" if hits == 0
                                                                      else f"MIXED ({hits} of {len(known)} seeds)")  # fmt: skip
            named = "; ".join(f"seed {i}: {LABELS.get(p, p)}" for i, p in zip(ids, picks) if p is not None)
            lines.append(f"- CRAFT Table 4: {what} — here: {word}; per seed: {named}")
        d = paired_difference(agg, f"craft_only_{k}", "ti_lora", k)
        lines.append("  - " + _diff_line(d, f"CRAFT {K} only - TI+LoRA, {K}"))
    return lines


CURVE_COLS = [("critic", "critic_reward"), ("critic, views", "critic_views"), ("unheld gain", "critic_unheld"),
              ("referee", "referee_reward"), ("referee acc.", "referee_acc"), ("evaluator CAS", "evaluator_cas"),
              ("oracle acc.", "oracle_accuracy")]  # fmt: skip


def _paired_lines(paired: dict[Any, dict[str, Any]], variant: str) -> list[str]:
    """Per seed, the paired 95% bootstrap interval of each difference against TI+LoRA, and whether the issue's bar
    fails outside that noise (an interval wholly on the wrong side) or within it."""
    seeds = [(s, p[variant]) for s, p in sorted(paired.items(), key=lambda kv: int(kv[0])) if variant in p]
    if not seeds:
        return []
    out, clear, noise = [], 0, 0
    for s, d in seeds:
        cells = []
        for k, name in PAIRED.items():
            if k in d:
                c = d[k]
                cells.append(f"{name} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]")
        bad = [
            k for k in PAIRED if k in d and ((d[k]["diff"] < 0) if k != "low_alignment_rate" else (d[k]["diff"] > 0))
        ]
        sure = [k for k in bad if (d[k]["hi"] < 0 if k != "low_alignment_rate" else d[k]["lo"] > 0)]
        clear += bool(sure)
        noise += bool(bad) and not sure
        out.append(f"    - seed {s}: " + "; ".join(cells))
    head = (
        f"  - paired by prompt and noise, 95% bootstrap over the prompts: the bar fails outside the interval in "
        f"{clear} of {len(seeds)} seeds, inside it (a difference this sample size cannot tell from none) in {noise}"
    )
    return [head, *out]


def _same_curve(a: dict[Any, dict[str, Any]], b: dict[Any, dict[str, Any]], tol: float = 1e-4) -> bool:
    """Two aggregated curves with the same steps and readings, every mean within ``tol`` (runs on other thread
    counts differ in the last float bits)."""
    if a.keys() != b.keys() or any(a[st].keys() != b[st].keys() for st in a):
        return False
    return all((x["mean"] is None) == (b[st][k]["mean"] is None) and
               (x["mean"] is None or abs(x["mean"] - b[st][k]["mean"]) <= tol)
               for st in a for k, x in a[st].items())  # fmt: skip


def remedies_section(agg: dict[str, Any]) -> list[str]:
    """Issue 21: the CRAFT rows (the profile's, the paper's, each remedy) against TI+LoRA with the done-when check
    seed by seed, and the over-optimisation curve of every monitored row."""
    t = agg["table"]
    names = [r for r in REMEDIES if r in t]
    crafts = [r for r in ("craft", "craft_paper") if r in t]
    if not names and not crafts:
        return []
    cols = [("CAS", "cas"), ("Low-CAS rate", "low_alignment_rate"), ("Oracle acc.", "oracle_accuracy"),
            ("Critic reward (train objective)", "critic_reward")]  # fmt: skip
    s = ["### Reward hacking: CRAFT against TI+LoRA, seed by seed (issue 21)", "",
         "CRAFT as the profile ships it, CRAFT at the paper's settings and each remedy (if any was trained) continue "
         "the TI+LoRA LoRA. The remedies are monitored (a reading of held-out training prompts every 25 steps by the "
         "critic, the critic over 4 augmented views and the referee encoder); selection, where a row has it, reads "
         "one training-side signal: the referee's reward (the rows that name the referee) or the critic's gain that "
         "holds across views (`reward.monitor.select=held`: the last reading before the gain the views do not share, "
         "the 'unheld gain', passes `hold_tolerance`). Evaluator and oracle never reach the training side.", "",
         _table(agg, ["ti_lora", *crafts, *names], cols), ""]  # fmt: skip
    for r in [*crafts, *names]:
        d_cas = paired_difference(agg, r, "ti_lora", "cas")
        d_or = paired_difference(agg, r, "ti_lora", "oracle_accuracy")
        d_tail = paired_difference(agg, r, "ti_lora", "low_alignment_rate")
        ok = [d is not None and d["n"] and d["lower" if i < 2 else "higher"] == 0
              for i, d in enumerate((d_cas, d_or, d_tail))]  # fmt: skip
        verdict = "MET in every seed" if all(ok) else "NOT met"
        s += [f"- {LABELS.get(r, r)}: CRAFT >= TI+LoRA on CAS and oracle, tail no larger — {verdict}",
              "  - " + _diff_line(d_cas, "CAS - TI+LoRA"), "  - " + _diff_line(d_or, "oracle acc. - TI+LoRA"),
              "  - " + _diff_line(d_tail, "low-CAS rate - TI+LoRA")]  # fmt: skip
        s += _paired_lines(agg.get("paired") or {}, r)
    s.append("")
    shown: dict[str, Any] = {}
    for r in [*crafts, *names]:
        curve = agg.get("curves", {}).get(r)
        if not curve:
            continue
        same = next((o for o, c in shown.items() if _same_curve(c, curve)), None)
        if same is not None:  # the same trajectory (a remedy that only changes which weights are saved)
            s += [f"Over-optimisation curve, {LABELS.get(r, r)}: the same training trajectory as {LABELS.get(same, same)} "
                  "(the remedy changes only which weights are saved, not the steps): the same readings, to 1e-4.", ""]  # fmt: skip
            continue
        shown[r] = curve
        kept = (agg.get("kept") or {}).get(r) or {}
        where = (f" The step its selection kept, per seed: {', '.join(f'seed {k}: {v}' for k, v in kept.items())}."
                 if kept else "")  # fmt: skip
        s += [f"Over-optimisation curve, {LABELS.get(r, r)} (mean over seeds; training-side: critic, views, referee; "
              f"evaluate side: evaluator CAS, oracle).{where}", "",
              "| step | " + " | ".join(h for h, _ in CURVE_COLS) + " |", "|---" * (len(CURVE_COLS) + 1) + "|"]  # fmt: skip
        for st, row in curve.items():
            s.append(f"| {st} | " + " | ".join(_fmt(row.get(k)) for _, k in CURVE_COLS) + " |")
        s.append("")
    return s


def render_markdown(result: dict[str, Any]) -> str:
    """The profile's RESULTS.md section."""
    agg, info = result["aggregate"], result["info"]
    t1 = [("VDC", "vdc"), ("CCS", "ccs"), ("DD", "dd"), ("SFS", "sfs"), ("CAS", "cas")]
    main = ["real", "zero_shot", "ti", "ti_lora", "dpo", "craft", "craft_paper"]
    # Table 4's rows are at the paper's settings, so they are read against CRAFT at the paper's settings
    t4 = ["ti_lora", *(f"craft_only_{k}" for k in REWARDS), "craft_paper", *(f"craft_without_{k}" for k in REWARDS)]
    order = list(LABELS)  # the tables' row order; unknown variants last
    gen = sorted((v for v in agg["table"] if v != "real"), key=lambda v: order.index(v) if v in order else len(order))
    d_cas = paired_difference(agg, "craft", "ti_lora", "cas")
    d_tail = paired_difference(agg, "craft", "ti_lora", "low_alignment_rate")
    d_enr = paired_difference(agg, "ti_lora_enriched", "ti_lora", "cas")
    d_enr_craft = paired_difference(agg, "craft", "ti_lora_enriched", "cas")
    d_crit = paired_difference(agg, "craft", "ti_lora", "critic_reward")
    d_crit0 = paired_difference(agg, "craft", "zero_shot", "critic_reward")
    d_or = paired_difference(agg, "craft", "ti_lora", "oracle_accuracy")
    d_p_cas = paired_difference(agg, "craft_paper", "ti_lora", "cas")
    d_p_or = paired_difference(agg, "craft_paper", "ti_lora", "oracle_accuracy")
    d_p_tail = paired_difference(agg, "craft_paper", "ti_lora", "low_alignment_rate")
    d_sil = paired_difference(agg, "zero_shot", "crafts_no_losses", "silhouette")
    d_ora = paired_difference(agg, "zero_shot", "crafts_no_losses", "oracle_accuracy")
    corr = agg["cas_oracle_spearman"]
    s = [
        f"## {result['profile']}",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}; machine: {info['machine']}; finished {info['finished']}; "
        f"wall time {info['wall_seconds'] / 60:.1f} min. Command: `{info['command']}`. "
        "Mean ± sd over seeds; scores from the EVALUATOR (never the training critic). "
        f"Per seed {info['n_prompts']} held-out prompts x {info['samples_per_prompt']} samples per variant.",
        "",
        "### CRAFT Table 1 shape: clinical alignment",
        "",
        _table(agg, main, t1),
        "",
        "### CRAFT Table 2 shape: is prompt enrichment enough?",
        "",
        _table(
            agg,
            ["ti_lora", "ti_lora_enriched", "craft", "craft_paper"],
            [("CAS", "cas"), ("Low-CAS rate", "low_alignment_rate"), ("Oracle acc.", "oracle_accuracy")],
        ),  # fmt: skip
        "",
    ]
    if any(f"craft_only_{k}" in agg["table"] for k in REWARDS):
        # the seeds that trained every Table 4 variant (--table4-seeds K trains them for seeds 0..K-1 only)
        t4_trained = [v for v in t4 if v.startswith("craft_") and v in agg["table"]]

        def _has(v: str, i: int) -> bool:
            return any(i < len(c["per_seed"]) and c["per_seed"][i] is not None for c in agg["table"][v].values())

        have = [i for i in range(len(result["seeds"])) if all(_has(v, i) for v in t4_trained)]
        agg4 = restrict(agg, have) if len(have) < len(result["seeds"]) else agg
        named = ", ".join(str(result["seeds"][i]) for i in have)
        note = ([] if agg4 is agg else [f"The single-reward and leave-one-out variants were trained for seed(s) "
                                        f"{named} only (`--table4-seeds`): every row of this table, TI+LoRA and "
                                        f"CRAFT included, is over seed(s) {named}.", ""])  # fmt: skip
        s += ["### CRAFT Table 4 shape: single rewards and leave-one-out", "", _table(agg4, t4, t1), "", *note,
              *table4_reading(agg, result["seeds"]), ""]  # fmt: skip
    s += [
        "### CRAFT Table 14 shape: the low-alignment tail",
        "",
        _table(agg, gen, [("Mean CAS", "cas"), ("Low-CAS rate", "low_alignment_rate"), ("10th pct CAS", "cas_p10")]),
        "",
        "### Ground truth: the demo oracle and the critic's own reward",
        "",
        _table(
            agg,
            ["real", *gen],
            [("Oracle acc.", "oracle_accuracy"), ("Critic reward (train objective)", "critic_reward")],
        ),  # fmt: skip
        "",
        f"CAS-oracle Spearman rho over generated images: {_fmt(corr)} (n = {corr['n']} seeds).",
        "",
    ]
    s += remedies_section(agg)
    if "crafts_no_losses" in agg["table"]:
        s += [
            "### CRAFTS: class separability of stage-2 samples with and without L_corr + L_cate",
            "",
            _table(
                agg,
                ["zero_shot", "crafts_no_losses"],
                [("Oracle acc.", "oracle_accuracy"), ("Silhouette (evaluator emb.)", "silhouette"), ("CAS", "cas")],
            ),  # fmt: skip
            "",
        ]
    s += [
        "### Against the papers' claims (per-seed paired differences)",
        "",
        "- " + _diff_line(d_cas, "CRAFT - TI+LoRA, CAS"),
        "  - " + _verdict(d_cas, "CRAFT Table 1: CRAFT has higher CAS than TI+LoRA"),
        "- " + _diff_line(d_tail, "CRAFT - TI+LoRA, low-CAS rate"),
        "  - " + _verdict(d_tail, "CRAFT Table 14: CRAFT shrinks the low-alignment tail", higher_is_claim=False),
        "- " + _diff_line(d_enr, "TI+LoRA + enriched prompts - TI+LoRA, CAS"),
        "- " + _diff_line(d_enr_craft, "CRAFT - (TI+LoRA + enriched prompts), CAS"),
        "  - " + _verdict(d_enr_craft, "CRAFT Table 2: enrichment alone does not reach CRAFT"),
        "- " + _diff_line(d_crit, "CRAFT - TI+LoRA, critic reward on held-out prompts"),
        "  - " + _verdict(d_crit, "Reward finetuning raises the critic's reward over TI+LoRA"),
        "- " + _diff_line(d_crit0, "CRAFT - zero-shot, critic reward on held-out prompts"),
        "- " + _diff_line(d_or, "CRAFT - TI+LoRA, oracle accuracy"),
        "- " + _diff_line(d_p_cas, "CRAFT at the paper's settings - TI+LoRA, CAS"),
        "  - " + _verdict(d_p_cas, "CRAFT Table 1 at the paper's settings: CRAFT has higher CAS than TI+LoRA"),
        "- " + _diff_line(d_p_tail, "CRAFT at the paper's settings - TI+LoRA, low-CAS rate"),
        "- " + _diff_line(d_p_or, "CRAFT at the paper's settings - TI+LoRA, oracle accuracy"),
        "- " + _diff_line(d_ora, "CRAFTS with - without its losses, oracle accuracy"),
        "  - " + _verdict(d_ora, "CRAFTS: L_corr + L_cate make classes more separable (oracle)"),
        "- " + _diff_line(d_sil, "CRAFTS with - without its losses, silhouette"),
        "",
        "Stage wall times (seconds, this run; cached steps show the time of the run that made them): "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()),
        "",
    ]
    return "\n".join(s)


def write_section(results_md: Path, profile: str, section: str) -> None:
    """Replace (or append) this profile's block in RESULTS.md, atomically; other profiles' blocks stay."""
    begin, end = f"<!-- paper-table:{profile} -->", f"<!-- /paper-table:{profile} -->"
    head = ("# Results: the papers' tables on the demo modalities\n\nWritten by `craft experiment paper-table` "
            "(see `craft/experiment.py` for what varies with the seed). Rerun a profile to replace its section.\n")  # fmt: skip
    text = results_md.read_text() if results_md.is_file() else head
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(results_md, text)


def machine(threads: int = 0) -> str:
    """This machine in a line; ``threads`` is the per-stage torch thread count the run set (0: the profile's)."""
    import os

    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    th = f"{threads} torch thread(s) per stage" if threads > 0 else "the profile's torch threads"
    return f"{platform.machine()} {os.cpu_count()} cores, {dev}, torch {torch.__version__}, {th}"


def paper_table(profile: str, seeds: int, root: str | Path, results_md: str | Path, overrides: list[str] | None = None,
                table4: bool = True, crafts_ablation: bool = True, command: str = "",
                threads: int = 0, table4_seeds: int | None = None, first_seed: int = 0,
                remedies: bool = False) -> dict[str, Any]:  # fmt: skip
    """Train + evaluate every variant for ``seeds`` seeds, write ``root/results.json`` and the RESULTS.md section.

    ``threads`` > 0 sets every stage's torch CPU threads (before ``overrides``), e.g. 1 to run two
    profiles side by side on a 2-core machine. ``table4_seeds`` = K trains the eight Table 4 variants
    for seeds 0..K-1 only (they are most of a seed's cost); their rows then average K seeds.
    ``first_seed`` = S runs seeds S..S+seeds-1: processes can share one ``root`` (each step is locked
    while it trains, so a second process waits for it and reuses it), and a final run with
    ``first_seed`` 0 and every seed finds them all finished and writes the combined tables.
    ``remedies`` adds the issue-21 variants (``REMEDIES``; True: all of them, a list: those named), a referee
    encoder, their evaluation and curves.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    t0 = time.time()
    over = list(overrides or [])
    if threads > 0:
        over = [*(f"{st}.loop.threads={threads}" for st in ("pretrain", "finetune", "reward", "ti", "ti_lora", "dpo")),
                *(f"{st}.threads={threads}" for st in ("encoder", "probe", "evaluate")), *over]  # fmt: skip
    if table4_seeds is not None and table4_seeds < 1:
        raise ValueError(f"table4_seeds must be >= 1 (or --no-table4), got {table4_seeds}")
    if first_seed < 0:
        raise ValueError(f"first_seed must be >= 0, got {first_seed}")
    names = list(REMEDIES) if remedies is True else list(remedies or [])
    unknown = [r for r in names if r not in REMEDIES]
    if unknown:
        raise ValueError(f"unknown remedy {', '.join(unknown)}; known: {', '.join(REMEDIES)}")
    plan = Plan(profile, Path(root), list(range(first_seed, first_seed + seeds)), over, table4, crafts_ablation,
                table4_seeds, names)  # fmt: skip
    timings: dict[str, float] = {}
    shared = train_shared(plan, timings)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in plan.seeds:
        st: dict[str, float] = {}
        variants = train_seed(plan, seed, shared, st)
        per_seed[seed] = evaluate_seed(plan, seed, shared, variants, st)
        for k, v in st.items():
            timings[f"{k}[{seed}]"] = v
    first = next(iter(per_seed.values()))
    result = {
        "profile": profile,
        "seeds": plan.seeds,
        "aggregate": aggregate(per_seed),
        "timings": timings,
        "info": {
            "machine": machine(threads),
            "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds": time.time() - t0,
            "command": command or f"craft experiment paper-table --profile {profile} --seeds {seeds}",
            "overrides": plan.overrides,
            "n_prompts": first["protocol"]["n_prompts"],
            "samples_per_prompt": first["protocol"]["samples_per_prompt"],
        },  # fmt: skip
    }
    atomic_write_json(plan.root / "results.json", result)
    write_section(Path(results_md), profile, render_markdown(result))
    return result


# ---------------------------------------------------------------------------------------------- fair DPO (issue 21)
# Diffusion-DPO settings tried against its OWN objective on held-out critic-judged pairs (dpo.heldout_pairs): the
# first the demo profiles' old lr 1e-4 (what the sweep moved them from), then learning rate, beta, steps and pairs
# moved one or two at a time (lr1e-3 is the demo profiles' setting now). No evaluator, no oracle.
DPO_GRID: dict[str, list[str]] = {
    "lr1e-4": ["dpo.loop.lr=1e-4"],
    "lr1e-3": ["dpo.loop.lr=1e-3"],
    "lr1e-3_beta500": ["dpo.loop.lr=1e-3", "dpo.beta=500"],
    "lr1e-3_beta5000": ["dpo.loop.lr=1e-3", "dpo.beta=5000"],
    "lr1e-3_steps200": ["dpo.loop.lr=1e-3", "dpo.loop.steps=200"],
    "lr1e-3_steps200_pairs256": ["dpo.loop.lr=1e-3", "dpo.loop.steps=200", "dpo.n_pairs=256"],
    "lr3e-3_steps200_pairs256": ["dpo.loop.lr=3e-3", "dpo.loop.steps=200", "dpo.n_pairs=256"],
}


def tune_dpo(profile: str, root: str | Path, seed: int = 0, overrides: list[str] | None = None,
             heldout_pairs: int = 64, grid: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Train DPO at each ``grid`` setting from a finished paper-table seed (its stage-2 model and TI+LoRA start) and
    read its own objective on held-out pairs; returns (and writes ``ROOT/dpo-tune-seed-S.json``) one row per setting.
    """
    from craft.train import baselines

    root = Path(root)
    plan = Plan(profile, root, [seed], list(overrides or []), table4=False, crafts_ablation=False)
    sd, sh = plan.seed_dir(seed), plan.shared
    need = [sd / "finetune", sd / "ti_lora", sh / "critic", sh / "critic_probe"]
    missing = [str(p) for p in need if _done(p) is None]
    if missing:
        raise FileNotFoundError(f"tune-dpo reads a finished paper-table seed; not finished: {', '.join(missing)} "
                                f"(run `craft experiment paper-table --profile {profile} --first-seed {seed} --seeds 1`)")  # fmt: skip
    o = [*plan.overrides, f"dpo.loop.seed={seed}", f"dpo.seed={seed}", f"dpo.heldout_pairs={heldout_pairs}"]
    rows = []
    for name, extra in (grid or DPO_GRID).items():
        out = sd / "dpo-tune" / name
        timings: dict[str, float] = {}
        run_step(out, lambda out=out, extra=extra: baselines.step("dpo", sh / "data", str(sd / "finetune"), out,
                 profile, [*o, *extra], annotations_dir=sh / "annotations", critic_dir=sh / "critic",
                 probe_dir=sh / "critic_probe", start_dir=sd / "ti_lora"), timings, name)  # fmt: skip
        m = json.loads((out / "lineage.json").read_text())["metrics"]
        rows.append({"setting": name, "overrides": extra, **{k: m.get(k) for k in (
            "heldout_dpo_loss", "heldout_implicit_acc", "train_pairs_dpo_loss", "train_pairs_implicit_acc", "loss",
            "train_seconds")}})  # fmt: skip
    atomic_write_json(root / f"dpo-tune-seed-{seed}.json", rows)
    return rows


def dpo_tune_markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a table (log 2 = 0.693 and accuracy 0 are DPO's values before any update)."""
    lines = ["| setting | overrides | held-out DPO loss | held-out implicit acc. | train-pairs DPO loss | "
             "train-pairs implicit acc. | train s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        f = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "n/a" for k in (
            "heldout_dpo_loss", "heldout_implicit_acc", "train_pairs_dpo_loss", "train_pairs_implicit_acc")]  # fmt: skip
        lines.append(f"| {r['setting']} | {' '.join(r['overrides']) or '(profile)'} | " + " | ".join(f)
                     + f" | {r.get('train_seconds') or 0:.0f} |")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- more samples (issue 21)


def reevaluate(profile: str, root: str | Path, seeds: list[int], variants: list[str], samples_per_prompt: int = 4,
               overrides: list[str] | None = None, ref: str = "ti_lora") -> dict[int, dict[str, Any]]:  # fmt: skip
    """Evaluate finished paper-table variants again with more samples per held-out prompt, for paired differences
    against ``ref`` with more power (issue 21: the per-seed tail bar at 64 samples is mostly noise).

    Sample k's noise depends on (seed, prompt, k) only, so the tables' samples (k = 0, 1 in the demo profiles) are
    among them and the rest are new.
    Writes ``seed-N/eval-x<samples>/`` (resumable: a finished one is read back) and returns, per seed, the variants'
    CAS, oracle accuracy and low-CAS rate and ``paired_bootstrap`` against ``ref``.
    """
    from craft.config import load_stage_config
    from craft.evaluate import run as ev

    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    root = Path(root)
    shared = {k: root / "shared" / k for k in ("data", "annotations", "evaluator", "evaluator_probe", "critic",
                                               "critic_probe")}  # fmt: skip
    out_all = {}
    names = [ref, *(v for v in variants if v != ref)]
    for seed in seeds:
        sd = root / f"seed-{seed}"
        specs: dict[str, Any] = {ev.REAL: ev.REAL}
        for v in names:
            d = sd / v
            if not (d / DONE).is_file():
                raise FileNotFoundError(f"{d}: no finished variant {v!r} (run paper-table with it first)")
            specs[v] = _variant_spec(d, str(sd / "finetune"))  # finetune: the seed's zero-shot base
        over = ["evaluate.downstream.enabled=false", *(overrides or []), f"evaluate.seed={seed}",
                f"evaluate.candidate={names[-1]}", f"evaluate.samples_per_prompt={samples_per_prompt}"]  # fmt: skip
        cfg = load_stage_config("evaluate", profile, over)
        out = sd / f"eval-x{samples_per_prompt}"
        run_step(
            out, lambda c=cfg, sp=specs, o=out: _evaluate(c, shared, sp, o), {}, f"evaluate-x{samples_per_prompt}"
        )
        m = json.loads((out / "metrics.json").read_text())["variants"]
        out_all[seed] = {
            "n": {v: m[v].get("n") for v in names},
            "variants": {v: {k: m[v].get(k) for k in PAIRED} for v in names},
            "paired": paired_bootstrap(pd.read_parquet(out / "per_image.parquet"), names[1:], ref, seed=seed),
        }
    return out_all


def reevaluate_markdown(res: dict[int, dict[str, Any]], samples_per_prompt: int) -> str:
    """One line per (seed, variant): its numbers and the paired difference against the reference with its interval."""
    lines = [
        f"Re-evaluated with {samples_per_prompt} samples per held-out prompt (paired 95% bootstrap over prompts):",
        "",
    ]
    for seed, r in sorted(res.items()):
        ref = next(iter(r["variants"]))
        base = r["variants"][ref]
        lines.append(f"- seed {seed}, {LABELS.get(ref, ref)} (n={r['n'][ref]}): " + ", ".join(
            f"{name} {base[k]:.3f}" for k, name in PAIRED.items() if base.get(k) is not None))  # fmt: skip
        for v, d in r["paired"].items():
            lines.append(f"  - {LABELS.get(v, v)} - {LABELS.get(ref, ref)}: " + "; ".join(
                f"{PAIRED[k]} {c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]" for k, c in d.items()))  # fmt: skip
    return "\n".join(lines)
