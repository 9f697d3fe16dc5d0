"""Promotion gates: a candidate reaches production only if its evaluation beats (or holds) production's.

The decision is a pure function, :func:`evaluate_gates`, of two metric dicts and a :class:`GatesConfig`;
:func:`main` wires it to the registry (read production's metrics, register the candidate, move the
pointer with a compare-and-swap). The pipeline's last step, ``craft promote`` and the CI workflow
(.github/workflows/promote.yml) all run this same function.

Candidate metrics schema (``metrics.json`` written by the evaluation stage; one JSON object; other keys
are carried along and ignored here):

==================== ======= ===================================================================
key                  better  meaning
==================== ======= ===================================================================
cas                  higher  Clinical Alignment Score, mean(VDC, CCS, DD, SFS) from the separate
                             evaluator encoder (CRAFT, evaluation section)
low_alignment_rate   lower   share of generated images whose CAS falls below the 25th percentile
                             of real-image CAS (the low-alignment tail of CRAFT)
oracle_accuracy      higher  accuracy of the independent ground-truth oracle on generated images
                             (demo data only; absent or null on real collections: gate skipped)
near_duplicates      must 0  generated images that are near-copies of training images (memorization)
downstream_accuracy  higher  accuracy of a classifier trained with the synthetic images, on real test
==================== ======= ===================================================================

Each gate has an absolute bound (``absolute``: a minimum for higher-is-better metrics, a maximum for
the others) and, when a production model exists and reports the metric, a relative bound: the
candidate may regress by at most ``tolerance`` (``cas >= production_cas - tolerance``). The effective
threshold is the stricter of the two. A gate whose metric the candidate does not report fails when
``required``, else it is skipped with a note.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HIGHER_IS_BETTER = ("cas", "oracle_accuracy", "downstream_accuracy")
LOWER_IS_BETTER = ("low_alignment_rate", "near_duplicates")
GATE_ORDER = ("cas", "low_alignment_rate", "oracle_accuracy", "near_duplicates", "downstream_accuracy")


@dataclass
class MetricGate:
    """One metric's bounds."""

    # false: the gate is not evaluated at all (reported as skipped)
    enabled: bool = True
    # absolute bound: minimum for higher-is-better metrics, maximum for lower-is-better; null = none
    absolute: float | None = None
    # allowed regression versus production (same units as the metric); null = do not compare
    tolerance: float | None = 0.0
    # a missing or null candidate metric fails the gate (true) or skips it with a note (false)
    required: bool = True

    def validate(self) -> None:
        if self.tolerance is not None and (self.tolerance < 0 or math.isnan(self.tolerance)):
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.absolute is not None and math.isnan(self.absolute):
            raise ValueError("absolute must be a number")


@dataclass
class GatesConfig:
    """Promotion gates (configs/gates.yaml, section ``gates``); candidate versus production."""

    # CAS (higher is better): at least `absolute`, at most `tolerance` below production
    cas: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.0, tolerance=0.01))
    # low-alignment tail rate (lower is better): at most `absolute`, at most `tolerance` above production
    low_alignment_rate: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.5, tolerance=0.02))
    # ground-truth oracle accuracy (demo data); absent on real collections, so not required by default
    oracle_accuracy: MetricGate = field(
        default_factory=lambda: MetricGate(absolute=0.5, tolerance=0.02, required=False)
    )
    # memorization: near-duplicates of training images; any is a failure (absolute max 0, no comparison)
    near_duplicates: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.0, tolerance=None))
    # downstream classifier accuracy on real test images (higher is better)
    downstream_accuracy: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.0, tolerance=0.02))

    def gates(self) -> dict[str, MetricGate]:
        return {name: getattr(self, name) for name in GATE_ORDER}


@dataclass
class GateResult:
    """The outcome of one gate; ``threshold`` is the effective bound the candidate was held to."""

    name: str
    passed: bool
    candidate: float | None
    production: float | None
    threshold: float | None
    message: str
    skipped: bool = False


@dataclass
class GateDecision:
    passed: bool
    results: list[GateResult]

    @property
    def failures(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        """Plain-text table, one line per gate."""

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        lines = [f"{'gate':<20} {'result':<7} {'candidate':>10} {'production':>10} {'threshold':>10}  note"]
        for r in self.results:
            state = "skip" if r.skipped else ("PASS" if r.passed else "FAIL")
            lines.append(
                f"{r.name:<20} {state:<7} {fmt(r.candidate):>10} {fmt(r.production):>10} {fmt(r.threshold):>10}"
                f"  {r.message}"
            )
        return "\n".join(lines)


def _number(metrics: dict[str, Any] | None, key: str, where: str) -> float | None:
    if not metrics or metrics.get(key) is None:
        return None
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} metric {key!r} must be a number or null, got {value!r}")
    return float(value)


def evaluate_gates(candidate: dict[str, Any], production: dict[str, Any] | None, gates: GatesConfig) -> GateDecision:
    """Decide whether ``candidate`` may replace ``production`` (None: nothing in production yet).

    >>> g = GatesConfig()
    >>> d = evaluate_gates({"cas": 0.60, "low_alignment_rate": 0.2, "near_duplicates": 0,
    ...                     "downstream_accuracy": 0.8}, {"cas": 0.65}, g)
    >>> d.passed, [r.name for r in d.failures]
    (False, ['cas'])
    """
    if not isinstance(candidate, dict):
        raise ValueError(f"candidate metrics must be a JSON object, got {type(candidate).__name__}")
    results = []
    for name, gate in gates.gates().items():
        higher = name in HIGHER_IS_BETTER
        if not gate.enabled:
            results.append(GateResult(name, True, None, None, None, "disabled in the gates config", skipped=True))
            continue
        cand = _number(candidate, name, "candidate")
        prod = _number(production, name, "production")
        if cand is None or math.isnan(cand):
            if gate.required:
                results.append(GateResult(name, False, cand, prod, None, "candidate does not report this metric"))
            else:
                results.append(GateResult(name, True, None, prod, None, "not reported: skipped", skipped=True))
            continue
        bounds, notes = [], []
        if gate.absolute is not None:
            bounds.append(gate.absolute)
            notes.append(f"{'min' if higher else 'max'} {gate.absolute:.4g}")
        if gate.tolerance is not None:
            if prod is None:
                notes.append("no production value to compare" if production else "no production model")
            else:
                rel = prod - gate.tolerance if higher else prod + gate.tolerance
                bounds.append(rel)
                notes.append(f"production {prod:.4g} {'-' if higher else '+'} {gate.tolerance:.4g}")
        threshold = (max(bounds) if higher else min(bounds)) if bounds else None
        if threshold is None:
            passed = True
        else:
            passed = cand >= threshold if higher else cand <= threshold
        verdict = "ok" if passed else ("below" if higher else "above") + " threshold"
        results.append(GateResult(name, passed, cand, prod, threshold, f"{verdict} ({'; '.join(notes)})"))
    return GateDecision(all(r.passed for r in results), results)


# ------------------------------------------------------------------------------------------ registry


@dataclass
class PromotionOutcome:
    model: str
    version: str | None  # the candidate's registry version (None when not registered: rejected file)
    production_before: str | None
    promoted: bool
    decision: GateDecision

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "production_before": self.production_before,
            "promoted": self.promoted,
            "decision": self.decision.to_dict(),
        }


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """A candidate's metrics.json (schema in the module docstring); errors name the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: candidate metrics file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: metrics must be a JSON object with keys {', '.join(GATE_ORDER)}")
    return data


def main(
    cfg: GatesConfig,
    candidate: str,
    model: str,
    registry,
    *,
    register_dir: str | os.PathLike | None = None,
    lineage: dict[str, Any] | None = None,
    dry_run: bool = False,
    actor: str = "",
) -> PromotionOutcome:
    """Gate ``candidate`` (a metrics.json path or a registered version id) against production of ``model``.

    On pass (and not ``dry_run``): register ``register_dir`` when given (a metrics-file candidate), then
    move the production pointer, expecting the production version the gate compared against.
    """
    from craft.storage.registry import Registry  # noqa: F401  (type of `registry`)

    production = registry.get_production(model)
    prod_version = production["version"] if production else None
    prod_metrics = registry.get_version(model, prod_version)["metrics"] if prod_version else None
    version: str | None = None
    if Path(candidate).is_file():
        metrics = read_metrics(candidate)
    elif register_dir is None and all(c in "0123456789abcdef" for c in candidate) and len(candidate) == 12:
        version = candidate
        metrics = registry.get_version(model, version)["metrics"]
    else:
        raise FileNotFoundError(f"{candidate}: neither a metrics file nor a registered version id of {model}")
    decision = evaluate_gates(metrics, prod_metrics, cfg)
    promoted = False
    if decision.passed and not dry_run:
        if register_dir is not None:
            lin = dict(lineage or {})
            lineage_file = Path(register_dir) / "lineage.json"
            if not lin and lineage_file.is_file():
                lin = json.loads(lineage_file.read_text())
            version = registry.register(model, register_dir, metrics, lin)
        if version is None:
            raise ValueError(f"{candidate}: a metrics file passes the gate but nothing to promote; pass --register")
        if version != prod_version:
            registry.promote(
                model,
                version,
                expected_current=prod_version,
                actor=actor,
                reason="gates passed",
                details={"gates": decision.to_dict()},
            )
            promoted = True
    return PromotionOutcome(model, version, prod_version, promoted, decision)


# ------------------------------------------------------------------------------------------ pipeline steps


def candidate_metrics(results_dir: str | os.PathLike) -> dict[str, Any]:
    """The gate's view of an evaluation: metrics.json's ``candidate`` block, or the file itself when flat."""
    data = read_metrics(Path(results_dir) / "metrics.json")
    block = data.get("candidate")
    return block if isinstance(block, dict) else data


def _gate_html(decision: GateDecision, model: str, production: str | None) -> str:
    import html

    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{'PASS' if r.passed else 'FAIL'}</td>"
        f"<td>{html.escape(str(r.candidate))}</td><td>{html.escape(str(r.production))}</td>"
        f"<td>{html.escape(str(r.threshold))}</td><td>{html.escape(r.message)}</td></tr>"
        for r in decision.results
    )
    verdict = "passed: the candidate will be registered and promoted" if decision.passed else "REJECTED"
    return (
        f"<html><body><h1>Promotion gate for {html.escape(model)}</h1>"
        f"<p>Production before: {html.escape(production or '(none)')}. Decision: <b>{verdict}</b>.</p>"
        "<table border=1 cellpadding=4><tr><th>gate</th><th>result</th><th>candidate</th><th>production</th>"
        f"<th>threshold</th><th>note</th></tr>{rows}</table></body></html>"
    )


def gate_step(
    results_dir: str | os.PathLike, html_path: str | os.PathLike, profile: str, overrides: list[str], model: str
):
    """Pipeline gate: candidate (evaluation results) versus the registry's production model; moves nothing.

    Returns (passed, metrics for the UI). The register step re-checks under a compare-and-swap, so a
    production move between the two steps cannot promote a candidate that no longer passes.
    """
    from craft.config import load_stage_config
    from craft.io import atomic_write_text
    from craft.storage.registry import open_registry

    model = model or Path(profile).stem  # the registry name defaults to the profile's name
    cfg = load_stage_config("gates", profile, overrides)
    registry = open_registry(
        load_stage_config("registry", profile, overrides), load_stage_config("storage", profile, overrides)
    )
    production = registry.get_production(model)
    prod_version = production["version"] if production else None
    prod_metrics = registry.get_version(model, prod_version)["metrics"] if prod_version else None
    decision = evaluate_gates(candidate_metrics(results_dir), prod_metrics, cfg)
    atomic_write_text(html_path, _gate_html(decision, model, prod_version))
    ui = {"passed": float(decision.passed), "n_failing_gates": float(len(decision.failures))}
    for r in decision.results:
        if isinstance(r.candidate, (int, float)):
            ui[f"candidate_{r.name}"] = float(r.candidate)
    return decision.passed, ui


def export_model(
    base_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None, out_dir: str | os.PathLike
) -> Path:
    """A self-contained pipeline directory for the registry: the base with the adapter merged in.

    LoRA is fused into the UNet weights and textual-inversion tokens are saved with the tokenizer
    and text encoder, so production consumers load it with ``load_pipeline`` alone.
    """
    from craft.models.diffusion import load_pipeline, read_lineage, save_pipeline

    pipe = load_pipeline(base_dir)
    lineage = {"stage": "export", "base_lineage": read_lineage(base_dir)}
    if adapter_dir:
        from craft.train.reward import LORA_FILE, load_adapters

        load_adapters(pipe, adapter_dir)
        if (Path(adapter_dir) / LORA_FILE).is_file():
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        lineage["adapter_lineage"] = read_lineage(adapter_dir)
    return save_pipeline(pipe, out_dir, lineage)


def register_step(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    results_dir: str | os.PathLike,
    profile: str,
    overrides: list[str],
    model: str,
) -> dict[str, float]:
    """Pipeline register: export the candidate, register it and move production (gates re-checked under CAS)."""
    import tempfile

    from craft.config import load_stage_config
    from craft.io import atomic_write_json
    from craft.storage.registry import open_registry

    model = model or Path(profile).stem  # the registry name defaults to the profile's name
    cfg = load_stage_config("gates", profile, overrides)
    registry = open_registry(
        load_stage_config("registry", profile, overrides), load_stage_config("storage", profile, overrides)
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(base_dir, adapter_dir, Path(tmp) / "model")
        metrics_file = atomic_write_json(Path(tmp) / "metrics.json", candidate_metrics(results_dir))
        outcome = main(cfg, str(metrics_file), model, registry, register_dir=model_dir, actor="pipeline")
    if not outcome.decision.passed:
        failing = "; ".join(f"{r.name} ({r.message})" for r in outcome.decision.failures)
        raise RuntimeError(
            f"{model}: production moved since the gate step and the candidate no longer passes: {failing}"
        )
    print(f"{model}: production {outcome.production_before or '(none)'} -> {outcome.version}")
    return {"promoted": float(outcome.promoted)}
