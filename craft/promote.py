"""Promotion gates: a candidate reaches production only if its evaluation beats (or holds) the champion's.

Champion vs challenger: when a production model exists, the pipeline's evaluate step scores it beside
the new candidate with the same evaluator, prompts, seeds and test split, and the gates compare those
two numbers (never a number an earlier run produced with its own evaluator). The decision is a pure
function, :func:`evaluate_gates`, of the candidate's and champion's metric dicts and a
:class:`GatesConfig`. The pipeline's gate step decides whether the run registers a **candidate**
(:func:`register_step`, which never moves production); ``craft promote NAME --version V`` (what CI runs,
.github/workflows/promote.yml) re-checks that version's stored evaluation against the reviewed gates
file and is the only thing that moves the ``production`` alias (:func:`promote_version`).

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
the others); when the evaluation scored a champion, a relative bound: the candidate may regress by at
most ``tolerance`` (``cas >= champion_cas - tolerance``); and with ``vs_zero_shot`` the candidate must
beat the untuned base (the evaluation's ``zero_shot`` variant) by that margin. The effective threshold
is the strictest. A gate whose metric the candidate does not report fails when ``required``, else it is
skipped with a note. configs/gates.yaml says why each number is what it is.
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
    # margin by which the candidate must beat the untuned base scored in the same evaluation; null = none
    vs_zero_shot: float | None = None

    def validate(self) -> None:
        if self.tolerance is not None and (self.tolerance < 0 or math.isnan(self.tolerance)):
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.vs_zero_shot is not None and math.isnan(self.vs_zero_shot):
            raise ValueError("vs_zero_shot must be a number")
        if self.absolute is not None and math.isnan(self.absolute):
            raise ValueError("absolute must be a number")


@dataclass
class GatesConfig:
    """Promotion gates (configs/gates.yaml, section ``gates``); candidate versus production."""

    # CAS (higher is better): at least `absolute`, at most `tolerance` below the champion
    cas: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.3, tolerance=0.01, vs_zero_shot=0.0))
    # low-alignment tail rate (lower is better): at most `absolute`, at most `tolerance` above production
    low_alignment_rate: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.5, tolerance=0.02))
    # ground-truth oracle accuracy (demo data); absent on real collections, so not required by default
    oracle_accuracy: MetricGate = field(
        default_factory=lambda: MetricGate(absolute=0.5, tolerance=0.02, required=False)
    )
    # memorization: near-duplicates of training images; any is a failure (absolute max 0, no comparison)
    near_duplicates: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.0, tolerance=None))
    # downstream classifier accuracy on real test images (higher is better)
    downstream_accuracy: MetricGate = field(default_factory=lambda: MetricGate(absolute=0.5, tolerance=0.02))

    def validate(self) -> None:
        for name, gate in self.gates().items():
            if (
                gate.enabled
                and gate.required
                and gate.absolute is not None
                and gate.absolute <= 0
                and name in HIGHER_IS_BETTER
            ):
                raise ValueError(f"gates.{name}: a required gate needs a floor above 0 (got {gate.absolute})")

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

    def failure_text(self) -> str:
        """Each failing gate with its value and threshold, e.g. ``low_alignment_rate 0.766 > max 0.5``."""

        def one(r: GateResult) -> str:
            higher = r.name in HIGHER_IS_BETTER
            if r.candidate is None:
                return f"{r.name}: {r.message}"
            if r.threshold is None:
                return f"{r.name} {r.candidate:.4g}: {r.message}"
            return (
                f"{r.name} {r.candidate:.4g} {'<' if higher else '>'} {'min' if higher else 'max'} {r.threshold:.4g}"
            )

        return "; ".join(one(r) for r in self.failures)

    def table(self) -> str:
        """Plain-text table, one line per gate."""

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        lines = [f"{'gate':<20} {'result':<7} {'candidate':>10} {'champion':>10} {'threshold':>10}  note"]
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


def evaluate_gates(
    candidate: dict[str, Any],
    production: dict[str, Any] | None,
    gates: GatesConfig,
    zero_shot: dict[str, Any] | None = None,
) -> GateDecision:
    """Decide whether ``candidate`` may replace ``production`` (the champion scored in the same evaluation;
    None: nothing in production yet). ``zero_shot``: the untuned base's numbers from that evaluation.

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
                notes.append("no champion value to compare" if production else "no champion")
            else:
                rel = prod - gate.tolerance if higher else prod + gate.tolerance
                bounds.append(rel)
                notes.append(f"champion {prod:.4g} {'-' if higher else '+'} {gate.tolerance:.4g}")
        if gate.vs_zero_shot is not None:
            base = _number(zero_shot, name, "zero-shot")
            if base is None:
                notes.append("no zero-shot value to compare")
            else:
                bounds.append(base + gate.vs_zero_shot if higher else base - gate.vs_zero_shot)
                notes.append(f"zero-shot {base:.4g} {'+' if higher else '-'} {gate.vs_zero_shot:.4g}")
        threshold = (max(bounds) if higher else min(bounds)) if bounds else None
        if threshold is None:
            passed = True
        else:
            passed = cand >= threshold if higher else cand <= threshold
        verdict = "ok" if passed else ("below" if higher else "above") + " threshold"
        results.append(GateResult(name, passed, cand, prod, threshold, f"{verdict} ({'; '.join(notes)})"))
    return GateDecision(all(r.passed for r in results), results)


# ------------------------------------------------------------------------------------------ evaluation view


def gate_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The gates' view of an evaluation's metrics.json: ``{"candidate", "champion", "zero_shot"}`` blocks of
    gate keys (``champion`` None when no production model was scored; its ``version`` names it)."""
    cand = metrics.get("candidate")
    if not isinstance(cand, dict):
        cand = {k: metrics.get(k) for k in GATE_ORDER}  # a flat metrics file (the candidate alone)
    champ = metrics.get("champion") if isinstance(metrics.get("champion"), dict) else None
    zs = metrics.get("zero_shot") if isinstance(metrics.get("zero_shot"), dict) else None
    return {"candidate": cand, "champion": champ, "zero_shot": zs}


def decide(view: dict[str, Any], cfg: GatesConfig) -> GateDecision:
    """evaluate_gates on a :func:`gate_view`."""
    return evaluate_gates(view["candidate"], view["champion"], cfg, view.get("zero_shot"))


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """An evaluation's metrics.json (schema in the module docstring); errors name the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: metrics file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: metrics must be a JSON object with keys {', '.join(GATE_ORDER)}")
    return data


def gates_source(gates: str) -> tuple[GatesConfig, dict[str, Any]]:
    """The gates of profile/file ``gates`` (never overridden) and a record of where they came from."""
    import hashlib

    from craft.config import load_stage_config, resolve_profile, to_dict

    cfg = load_stage_config("gates", gates, [])
    path = resolve_profile(gates)
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()
    return cfg, {"file": str(path), "gates_sha256": digest[:16], "gates": to_dict(cfg)}


# ------------------------------------------------------------------------------------------ promotion


@dataclass
class PromotionOutcome:
    model: str
    version: str
    production_before: str | None
    promoted: bool
    decision: GateDecision
    gates: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "production_before": self.production_before,
            "promoted": self.promoted,
            "decision": self.decision.to_dict(),
            "gates": self.gates,
        }


def promote_version(
    model: str,
    version: str,
    registry,
    *,
    gates: str | None = None,
    dry_run: bool = False,
    actor: str = "",
    reason: str = "",
) -> PromotionOutcome:
    """Move ``production`` of ``model`` to ``version`` if the gates pass on its stored evaluation.

    The evaluation must have scored the model that is in production NOW as its champion (or none, when
    nothing is in production): a champion that changed since means the comparison is stale and the
    promotion is refused (re-run the pipeline). ``gates``: a profile name or YAML path whose ``gates``
    section applies; default the profile the version was trained with (its lineage), the same gates the
    run's own gate step used. The move is a compare-and-swap on the alias; the history entry records
    who, when, why, the gates file and its digest, and the decision.
    """
    info = registry.get_version(model, version)
    lineage = info["lineage"]
    source = gates or lineage.get("profile") or "gates"
    cfg, record = gates_source(source)
    view = gate_view(info["metrics"])
    current = registry.get_production(model)
    current_version = current["version"] if current else None
    evaluated = (view["champion"] or {}).get("version")
    decision = decide(view, cfg)
    if evaluated != current_version and version != current_version:
        stale = GateResult("champion", False, None, None, None,
                           f"evaluated against champion {evaluated or '(none)'}, but production is now "
                           f"{current_version or '(none)'}: re-run the pipeline to compare with it")  # fmt: skip
        decision = GateDecision(False, [*decision.results, stale])
    promoted = False
    if decision.passed and not dry_run and version != current_version:
        registry.promote(
            model,
            version,
            expected_current=current_version,
            actor=actor,
            reason=reason or "gates passed",
            details={"gates": record, "decision": decision.to_dict(), "evaluation_uri": lineage.get("evaluation_uri")},
        )
        promoted = True
    return PromotionOutcome(model, version, current_version, promoted, decision, record)


# ------------------------------------------------------------------------------------------ pipeline steps


def _gate_html(decision: GateDecision, model: str, view: dict[str, Any]) -> str:
    import html

    champ = view.get("champion") or {}
    rows = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{'skip' if r.skipped else 'PASS' if r.passed else 'FAIL'}</td>"
        f"<td>{html.escape(str(r.candidate))}</td><td>{html.escape(str(r.production))}</td>"
        f"<td>{html.escape(str(r.threshold))}</td><td>{html.escape(r.message)}</td></tr>"
        for r in decision.results
    )
    verdict = ("passed: the candidate will be registered (production moves only by `craft promote`)"
               if decision.passed else f"REFUSED: {decision.failure_text()}")  # fmt: skip
    return (
        f"<html><body><h1>Promotion gate for {html.escape(model)}</h1>"
        f"<p>Champion: {html.escape(str(champ.get('version') or '(none in production)'))}. "
        f"Decision: <b>{html.escape(verdict)}</b>.</p>"
        "<table border=1 cellpadding=4><tr><th>gate</th><th>result</th><th>candidate</th><th>champion</th>"
        f"<th>threshold</th><th>note</th></tr>{rows}</table></body></html>"
    )


def gate_step(
    results_dir: str | os.PathLike,
    html_path: str | os.PathLike,
    profile: str,
    overrides: list[str],
    model: str,
    decision_dir: str | os.PathLike | None = None,
):
    """Pipeline gate: the candidate versus the champion scored in the same evaluation; moves nothing.

    Gates come from the profile (which extends configs/gates.yaml), never from the run's overrides.
    Returns (passed, metrics for the UI); writes decision.json into ``decision_dir``.
    """
    from craft.config import check_run_overrides
    from craft.io import atomic_write_json, atomic_write_text

    check_run_overrides(overrides)
    model = model or Path(profile).stem  # the registry name defaults to the profile's name
    cfg, record = gates_source(profile)
    view = gate_view(read_metrics(Path(results_dir) / "metrics.json"))
    decision = decide(view, cfg)
    atomic_write_text(html_path, _gate_html(decision, model, view))
    if decision_dir is not None:
        out = {"model": model, "champion": (view["champion"] or {}).get("version"), "gates": record,
               "passed": decision.passed, "failures": decision.failure_text(), "decision": decision.to_dict()}  # fmt: skip
        atomic_write_json(Path(decision_dir) / "decision.json", out)
    ui = {"passed": float(decision.passed), "n_failing_gates": float(len(decision.failures))}
    for r in decision.results:
        if isinstance(r.candidate, (int, float)):
            ui[f"candidate_{r.name}"] = float(r.candidate)
    print(decision.table())
    print(f"gate: {'passed' if decision.passed else 'REFUSED: ' + decision.failure_text()}")
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
        from craft.models.adapters import LORA_FILE, load_adapters

        load_adapters(pipe, adapter_dir)
        if (Path(adapter_dir) / LORA_FILE).is_file():
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        lineage["adapter_lineage"] = read_lineage(adapter_dir)
    return save_pipeline(pipe, out_dir, lineage)


def build_lineage(
    *,
    dataset_dir: str | os.PathLike,
    validation_dir: str | os.PathLike,
    validation_uri: str,
    results_dir: str | os.PathLike,
    evaluation_uri: str,
    profile: str,
    overrides: list[str],
    run_id: str,
    run_name: str,
    pipeline_version: str,
    parents: dict[str, Any],
) -> dict[str, Any]:
    """The audit record of a registered version (DESIGN.md, "The loop users live in")."""
    from craft.steps import dataset_ref
    from craft.version import code_version

    ref = dataset_ref(dataset_dir)
    report_file = Path(validation_dir) / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    view = gate_view(read_metrics(Path(results_dir) / "metrics.json"))
    return {
        "dataset": ref.to_dict(),
        "dataset_version": ref.version,
        "validation": {
            "ok": report.get("ok") is True,
            "report_uri": validation_uri,
            "n_rows": report.get("n_rows"),
            "n_failures": len(report.get("failures") or []),
        },  # fmt: skip
        "profile": profile,
        "overrides": list(overrides),
        "code_version": code_version(),
        "run": {"id": run_id, "name": run_name, "pipeline_version": pipeline_version},
        "parents": {**parents, "champion": (view["champion"] or {}).get("version")},
        "evaluation_uri": evaluation_uri,
    }


def register_step(
    base_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    results_dir: str | os.PathLike,
    profile: str,
    overrides: list[str],
    model: str,
    lineage: dict[str, Any],
    out_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Pipeline register: export the candidate, register it with ``lineage``, point ``candidate`` at it.

    Never moves ``production``: that is ``craft promote`` (CI). The gates are re-checked here (a
    hand-started register of a failing candidate is refused too). Writes registered.json into ``out_dir``.
    """
    import tempfile

    from craft.config import check_run_overrides, load_stage_config
    from craft.io import atomic_write_json
    from craft.storage.registry import CANDIDATE, open_registry

    check_run_overrides(overrides)
    model = model or Path(profile).stem  # the registry name defaults to the profile's name
    cfg, _ = gates_source(profile)
    metrics = read_metrics(Path(results_dir) / "metrics.json")
    view = gate_view(metrics)
    decision = decide(view, cfg)
    if not decision.passed:
        raise RuntimeError(f"{model}: the candidate does not pass the gates: {decision.failure_text()}")
    registry = open_registry(
        load_stage_config("registry", profile, overrides), load_stage_config("storage", profile, overrides)
    )
    stored = {**{k: view["candidate"].get(k) for k in GATE_ORDER}, **view}  # flat keys: the candidate's
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(base_dir, adapter_dir, Path(tmp) / "model")
        version = registry.register(model, model_dir, stored, lineage)
    current = registry.get_alias(model, CANDIDATE)
    if not current or current["version"] != version:
        registry.set_alias(model, CANDIDATE, version, actor="pipeline", reason="gates passed in the pipeline",
                           details={"run": lineage.get("run"), "decision": decision.to_dict()})  # fmt: skip
    production = registry.get_production(model)
    line = (f"{model}: registered version {version} as candidate (dataset {lineage['dataset']['name']} "
            f"{lineage['dataset']['version']}); production unchanged "
            f"({production['version'] if production else 'none'}): promote with `craft promote {model} "
            f"--version {version}`")  # fmt: skip
    print(line)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "registered.json", {"model": model, "version": version, "line": line})
    return {"registered": 1.0}


def champion_step(out_dir: str | os.PathLike, profile: str, overrides: list[str], model: str) -> str:
    """Pipeline champion: download the version in production into ``out_dir``; returns its id ('' = none).

    With no production model ``out_dir`` holds only ``champion.json`` ({"version": null}) and the
    evaluation scores the candidate alone (the gates' absolute floors still apply).
    """
    from craft.config import check_run_overrides, load_stage_config
    from craft.io import atomic_write_json
    from craft.storage.registry import open_registry

    check_run_overrides(overrides)
    model = model or Path(profile).stem
    registry = open_registry(
        load_stage_config("registry", profile, overrides), load_stage_config("storage", profile, overrides)
    )
    production = registry.get_production(model)
    out = Path(out_dir)
    if production is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / CHAMPION_FILE, {"model": model, "version": None})
        print(f"{model}: nothing in production; the candidate is evaluated alone")
        return ""
    version = production["version"]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        weights = registry.download(model, version, Path(tmp) / "v")
        from craft.io import copy_tree

        copy_tree(weights, out)
    atomic_write_json(out / CHAMPION_FILE, {"model": model, "version": version})
    print(f"{model}: champion is production version {version}")
    return version


CHAMPION_FILE = "champion.json"


def champion_of(model_dir: str | os.PathLike | None) -> str | None:
    """The production version a champion artifact holds (None: no champion)."""
    if not model_dir:
        return None
    f = Path(model_dir) / CHAMPION_FILE
    return json.loads(f.read_text()).get("version") if f.is_file() else None
