"""Preference evaluation: judge rankings -> Bradley-Terry scores with bootstrap CIs; checklist audits.

CRAFT 4.2.6 / app. D-E: for each case (a held-out prompt with its target diagnosis) a judge ranks the
images that the variants generated, best to worst. Rankings become pairwise wins, aggregated by a
Bradley-Terry model (P(i beats j) = p_i / (p_i + p_j)), fitted by choix (its ILSR maximum-likelihood
estimate) with a tiny symmetric prior (``prior`` virtual wins each way per pair) so that a variant
that always wins or always loses still has a finite score. Confidence intervals come from a case bootstrap
(resample cases with replacement, refit). The rank-1 share is the fraction of cases a variant is
ranked first (app. E's "top-1 selection rate"). CRAFT 4.2.7's checklist audit asks a judge whether
each checklist attribute is present in an image; the pass rate is the share of attributes passed.

Judges are plain callables, so any backend plugs in:
- ``judge(case: Case) -> list[str]``: the variant names of ``case.candidates`` best to worst. The
  case's candidates are shown to the judge under neutral letters in a seeded random order
  (``collect_rankings`` blinds them; ``Case.candidates`` maps a letter to an image) and the letters
  it returns are mapped back to variants. An MLLM backend from ``craft/annotate/backends.py``
  is wrapped as such a callable (prompt it with ``case.target``, ``case.prompt`` and the images).
- ``evaluator_judge(score)``: ranks by ``score(image, case)``, e.g. the evaluator's CAS of each image.
- ``mllm_pair_judge(backend, ...)``: an MLLM choosing between the two images of a pair in one request
  (DPO's preference pairs, CRAFT sec. 4.1.2: "MedGemma selecting the preferred image from two
  seed-varied LoRA samples per pair"); every decision is written to ``decisions.jsonl``.
- ``audit_judge(image, target, checklist) -> dict[attribute, bool]`` for ``checklist_audit``
  (``mllm_audit_judge`` wraps an MLLM backend as one).

How the wiring calls this: build one ``Case`` per held-out prompt with every variant's image, call
``collect_rankings(cases, judge)``, then ``preference_table(rankings, variants)`` -> DataFrame
(variant, bt_score, ci_low, ci_high, rank1_share) for metrics.json and the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One ranking task: the target diagnosis, the synthesis prompt and the candidate images.

    ``candidates`` maps a neutral letter ("A", "B", ...) to an image; ``case_id`` identifies the
    held-out prompt. A judge sees only these fields, never the variant names.
    """

    case_id: str
    target: str
    prompt: str
    candidates: dict[str, Any]


@dataclass
class BlindedCase:
    """A ``Case`` plus the hidden letter -> variant key used to map the judge's answer back."""

    case: Case
    key: dict[str, str] = field(repr=False)


def blind(case_id: str, target: str, prompt: str, images: Mapping[str, Any], rng: np.random.Generator) -> BlindedCase:
    """Present ``images`` ({variant: image}) under letters in a random order (CRAFT app. D: randomized, no names)."""
    variants = list(images)
    if len(variants) > 26:
        raise ValueError(f"case {case_id}: {len(variants)} candidates exceed 26 letters")
    order = rng.permutation(len(variants))
    letters = string.ascii_uppercase[: len(variants)]
    key = {letters[k]: variants[i] for k, i in enumerate(order)}
    return BlindedCase(Case(case_id, target, prompt, {L: images[v] for L, v in key.items()}), key)


def collect_rankings(cases: Sequence[BlindedCase], judge: Callable[[Case], Sequence[str]]) -> list[list[str]]:
    """Ask ``judge`` to rank each case; returns variant names best to worst per case.

    The judge must return every candidate letter exactly once (a strict ranking, as in app. D).
    """
    out = []
    for bc in cases:
        ranking = [str(x).strip().upper() for x in judge(bc.case)]
        if sorted(ranking) != sorted(bc.key):
            raise ValueError(
                f"case {bc.case.case_id}: judge returned {ranking}, expected a permutation of {sorted(bc.key)}"
            )
        out.append([bc.key[L] for L in ranking])
    return out


def evaluator_judge(score: Callable[[Any, Case], float]) -> Callable[[Case], list[str]]:
    """A blind judge that ranks a case's candidate letters by ``score(image, case)``, highest first.

    For the evaluator ranking ``score`` returns the image's CAS under the evaluator for the case's
    prompt and target (or looks up a CAS computed earlier, keyed by the image's id / path).
    """

    def judge(case: Case) -> list[str]:
        return sorted(case.candidates, key=lambda L: -float(score(case.candidates[L], case)))

    return judge


def rank_by_scores(scores: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """{case_id: {variant: score}} -> rankings (variants, highest score first; ties keep insertion order)."""
    return [sorted(s, key=lambda v: -float(s[v])) for s in scores.values()]


def rankings_from_scores(scores: pd.DataFrame | Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """Rankings from a score table: rows = cases, columns = variants (e.g. CAS), highest first.

    A DataFrame cell that is NaN leaves that variant out of that case (a partial ranking still gives
    the pairwise wins among the variants present). Ties keep column order.
    """
    if isinstance(scores, pd.DataFrame):
        out = []
        for _, row in scores.iterrows():
            row = row.dropna()
            out.append([str(v) for v in sorted(row.index, key=lambda v: -float(row[v]))])
        return out
    return rank_by_scores(scores)


def pairwise_wins(rankings: Sequence[Sequence[str]], variants: Sequence[str]) -> np.ndarray:
    """W[i, j] = number of times variant i was ranked above variant j (each ranking gives all its pairs)."""
    pos = {v: i for i, v in enumerate(variants)}
    w = np.zeros((len(variants), len(variants)))
    for r, ranking in enumerate(rankings):
        unknown = [v for v in ranking if v not in pos]
        if unknown:
            raise ValueError(f"ranking {r}: unknown variant {unknown[0]!r}")
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"ranking {r}: a variant appears twice")
        idx = [pos[v] for v in ranking]
        for a in range(len(idx)):
            w[idx[a], idx[a + 1 :]] += 1
    return w


def fit_bradley_terry(wins: np.ndarray, prior: float = 0.1, max_iter: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry log-strengths (mean zero) from a wins matrix, the ML estimate by ``choix.ilsr_pairwise_dense``.

    ``wins[i, j]``: times i was preferred to j. ``prior`` virtual wins are added in both directions
    for every pair before the fit (regularises toward equal strengths; the fit is the ML estimate of
    the augmented counts, which Hunter's 2004 MM algorithm also converges to).
    """
    import choix

    w = np.asarray(wins, dtype=np.float64)
    k = len(w)
    if w.ndim != 2 or w.shape != (k, k) or k < 2:
        raise ValueError(f"wins: expected a square matrix of at least 2 variants, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("wins: counts must be finite and >= 0")
    if prior < 0:
        raise ValueError(f"prior: {prior} must be >= 0")
    w = w + prior * (1.0 - np.eye(k))
    try:
        s = choix.ilsr_pairwise_dense(w, alpha=0.0, max_iter=max_iter, tol=tol)
    except (RuntimeError, ValueError) as e:  # no convergence / no stationary distribution: no ML estimate exists
        raise ValueError(f"fit_bradley_terry: {e} (a variant that never wins or never loses needs prior > 0)") from e
    if not np.all(np.isfinite(s)):
        raise ValueError(
            "fit_bradley_terry: non-finite strengths (a variant never wins or never loses; use prior > 0)"
        )
    return s - s.mean()


def rank1_share(rankings: Sequence[Sequence[str]], variants: Sequence[str]) -> np.ndarray:
    """Fraction of cases in which each variant is ranked first (CRAFT app. E top-1 selection rate)."""
    first = [r[0] for r in rankings]
    return np.array([first.count(v) / len(rankings) for v in variants]) if rankings else np.zeros(len(variants))


def preference_table(
    rankings: Sequence[Sequence[str]],
    variants: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    prior: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    """Columns variant, bt_score, ci_low, ci_high, rank1_share, sorted by bt_score (best first).

    Bootstrap: resample CASES (whole rankings) with replacement ``n_boot`` times, refit, take the
    percentile interval; each case's pairwise wins are precomputed so a replicate is one weighted sum.
    """
    if not rankings:
        raise ValueError("rankings: empty")
    per_case = np.stack([pairwise_wins([r], variants) for r in rankings])  # (cases, k, k)
    score = fit_bradley_terry(per_case.sum(0), prior)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(rankings), np.full(len(rankings), 1 / len(rankings)), size=n_boot)
    boot = np.stack([fit_bradley_terry(np.tensordot(c, per_case, axes=1), prior) for c in counts])
    lo, hi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    df = pd.DataFrame(
        {
            "variant": list(variants),
            "bt_score": score,
            "ci_low": lo,
            "ci_high": hi,
            "rank1_share": rank1_share(rankings, variants),
        }
    )
    return df.sort_values("bt_score", ascending=False, ignore_index=True)


def checklist_audit(
    items: Sequence[tuple[str, Any, str]],
    checklists: Mapping[str, Sequence[Mapping[str, str]]],
    judge: Callable[[Any, str, Sequence[Mapping[str, str]]], Mapping[str, bool]],
) -> pd.DataFrame:
    """Checklist audit pass rate per variant (CRAFT 4.2.7).

    ``items``: (variant, image, target class); ``checklists``: {class: [{attribute, description}]}
    (the annotation stage's checklists.json); ``judge(image, target, checklist)`` -> {attribute: passed}.
    Returns variant, n_images, pass_rate (share of all attribute checks passed), all_pass_rate
    (share of images passing every attribute).
    """
    rows = []
    for i, (variant, image, target) in enumerate(items):
        if target not in checklists:
            raise ValueError(f"item {i}: no checklist for class {target!r}")
        attrs = [a["attribute"] for a in checklists[target]]
        verdict = judge(image, target, checklists[target])
        missing = [a for a in attrs if a not in verdict]
        if missing:
            raise ValueError(f"item {i}: judge gave no verdict for attribute {missing[0]!r}")
        passed = [bool(verdict[a]) for a in attrs]
        rows.append({"variant": variant, "passed": sum(passed), "checked": len(passed), "all": all(passed)})
    df = pd.DataFrame(rows)
    g = df.groupby("variant", sort=False)
    return pd.DataFrame(
        {
            "n_images": g.size(),
            "pass_rate": g["passed"].sum() / g["checked"].sum(),
            "all_pass_rate": g["all"].mean(),
        }
    ).reset_index()


AUDIT_INSTRUCTION = (
    "You audit one generated medical image. Intended diagnosis: {target}. Generation prompt: {prompt}\n"
    "For each attribute below, answer true if the image shows it as described, false otherwise.\n"
    "{items}\nReply with one JSON object only, mapping each attribute name to true or false."
)


def mllm_audit_judge(backend, tmp_dir: str | None = None) -> Callable[..., dict[str, bool]]:
    """An MLLM backend (``craft.annotate.backends``: openai-compatible or local transformers) as an audit judge.

    ``judge(image, target, checklist, prompt="") -> {attribute: passed}``: one request per image, the
    image written to a PNG in ``tmp_dir``, the answer's JSON schema (one boolean per attribute) sent as
    structured output; an answer that is not a JSON object of booleans covering every attribute raises
    ``ValueError`` naming the target and the answer (no silent default).
    """
    import tempfile
    from pathlib import Path

    from PIL import Image

    from craft.annotate.backends import ResponseSchema

    folder = Path(tmp_dir or tempfile.mkdtemp(prefix="craft-judge-"))
    folder.mkdir(parents=True, exist_ok=True)
    counter = iter(range(10**12))

    def judge(image, target: str, checklist: Sequence[Mapping[str, str]], prompt: str = "") -> dict[str, bool]:
        path = folder / f"image-{next(counter):08d}.png"
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        im.save(path)
        items = "\n".join(f"- {a['attribute']}: {a['description']}" for a in checklist)
        names = [a["attribute"] for a in checklist]
        booleans = {"type": "object", "properties": {a: {"type": "boolean"} for a in names}}
        schema = ResponseSchema("checklist_audit", {**booleans, "required": names, "additionalProperties": False})
        text = backend.chat(AUDIT_INSTRUCTION.format(target=target, prompt=prompt or target, items=items),
                            images=[path], response_schema=schema).text  # fmt: skip
        try:
            obj = json.loads(text[text.index("{") : text.rindex("}") + 1])
        except ValueError as e:
            raise ValueError(f"audit judge ({target}): answer is not a JSON object: {text[:200]!r}") from e
        out = {}
        for a in checklist:
            v = obj.get(a["attribute"]) if isinstance(obj, dict) else None
            if not isinstance(v, bool):
                raise ValueError(
                    f"audit judge ({target}): no true/false for attribute {a['attribute']!r} in {text[:200]!r}"
                )
            out[a["attribute"]] = v
        path.unlink(missing_ok=True)
        return out

    return judge


# ----------------------------------------------------------------------------- pairwise MLLM judge (DPO)
DECISIONS = "decisions.jsonl"
PAIR_SYSTEM = (
    "You are a clinical expert comparing synthetic medical images generated for the same prompt. You choose "
    "the image that better shows the target diagnosis. You must choose exactly one image, even when both are "
    "poor or nearly equal: there is no tie and no abstaining."
)
PAIR_INSTRUCTION = (
    "Target diagnosis: {phrase} (label {target!r}).\n"
    "Generation prompt: {prompt}\n"
    "Clinical checklist of the target diagnosis:\n{items}\n"
    "The candidate images follow, labelled {letters}. Choose the one that better matches the checklist and the "
    "prompt, judging consistency with the target diagnosis, clinical plausibility and visual realism.\n"
    'Answer with one JSON object only: {{"choice": {choices}, "reason": "<one short sentence>"}}.'
)


def pair_answer_schema(letters: Sequence[str]) -> dict[str, Any]:
    """JSON schema of a pairwise answer: ``choice`` one of ``letters``, a ``reason``; what ``parse_pair_answer`` checks."""
    return {
        "type": "object",
        "properties": {"choice": {"type": "string", "enum": list(letters)}, "reason": {"type": "string"}},
        "required": ["choice", "reason"],
        "additionalProperties": False,
    }


def parse_pair_answer(text: str, letters: Sequence[str]) -> tuple[str, str]:
    """(choice, reason) from a pairwise answer; ValueError with the reason for anything else.

    >>> parse_pair_answer('{"choice": "B", "reason": "clearer glands"}', ["A", "B"])
    ('B', 'clearer glands')
    >>> parse_pair_answer('{"choice": "both", "reason": "tie"}', ["A", "B"])
    Traceback (most recent call last):
    ValueError: choice 'both' is not one of A, B
    """
    from craft.annotate.schema import parse_json_answer

    obj = parse_json_answer(text)
    if set(obj) != {"choice", "reason"}:
        raise ValueError(f"keys must be exactly choice and reason, got {sorted(obj)}")
    choice, reason = obj["choice"], obj["reason"]
    if not isinstance(choice, str) or choice not in letters:
        raise ValueError(f"choice {choice!r} is not one of {', '.join(letters)}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("empty reason")
    return choice, reason.strip()


def mllm_pair_judge(
    backend,
    checklists: Mapping[str, Sequence[Mapping[str, str]]],
    modality: str,
    work_dir,
    *,
    phrases: Mapping[str, str] | None = None,
    max_attempts: int = 3,
    keep_images: bool = True,
) -> Callable[[Case], list[str]]:
    """A judge that shows an MLLM both images of a pair in ONE request and takes the one it chooses.

    CRAFT sec. 4.1.2: the DPO baseline's preferred image is chosen by MedGemma "from two seed-varied
    LoRA samples per pair". The request holds the target class, the generation prompt, the class
    checklist and the two images as labelled parts ("Image A:", image, "Image B:", image) in letter
    order; the letters come from ``blind`` (a seeded random order), so which sample is shown first,
    and so any position bias of the judge, is independent of the sample. The answer is
    ``{"choice": "A"|"B", "reason": ...}``, sent as structured output and parsed strictly; a bad
    answer is asked again up to ``max_attempts`` times, then ``ValueError`` names the pair. There is
    no tie and no random tie-break: the judge must pick one. ``backend.compare(PairRequest)`` answers
    (``craft.annotate.backends``: openai-compatible, local transformers, or the offline measurer).

    Every decision is appended to ``work_dir/decisions.jsonl`` (pair id, target, prompt, the letters in
    the order shown, the sha256 of each image sent, choice, reason, attempts), the images kept under
    ``work_dir/images`` unless ``keep_images`` is false. ``judge.decisions`` holds the same records.
    """
    from pathlib import Path

    from PIL import Image

    from craft.annotate.backends import BackendError, PairRequest, ResponseSchema

    folder = Path(work_dir)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    log_path = folder / DECISIONS
    log_path.write_text("")  # one judge, one run: earlier decisions in this folder are not this run's
    decisions: list[dict[str, Any]] = []

    def judge(case: Case) -> list[str]:
        letters = tuple(sorted(case.candidates))
        if len(letters) != 2:
            raise ValueError(f"{case.case_id}: a pairwise judge needs 2 candidates, got {len(letters)}")
        if case.target not in checklists:
            raise ValueError(f"{case.case_id}: no checklist for class {case.target!r}")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id)
        paths, digests = [], {}
        for L in letters:
            im = case.candidates[L]
            im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
            path = folder / "images" / f"{stem}-{L}.png"
            im.save(path)
            paths.append(path)
            digests[L] = hashlib.sha256(path.read_bytes()).hexdigest()
        items = "\n".join(f"- {a['attribute']}: {a['description']}" for a in checklists[case.target])
        user = PAIR_INSTRUCTION.format(
            phrase=(phrases or {}).get(case.target, case.target.replace("_", " ")), target=case.target,
            prompt=case.prompt or case.target, items=items, letters=" and ".join(letters),
            choices=" or ".join(json.dumps(L) for L in letters),
        )  # fmt: skip
        req = PairRequest(case.case_id, tuple(paths), letters, modality, case.target, PAIR_SYSTEM, user,
                          ResponseSchema("pair_choice", pair_answer_schema(letters)))  # fmt: skip
        reason, requests = "no attempt made", 0
        try:
            for attempt in range(1, max_attempts + 1):
                req.attempt = attempt
                try:
                    c = backend.compare(req)
                except BackendError as e:
                    raise BackendError(f"pair judge, {case.case_id}: {e}") from e
                requests += c.requests
                try:
                    choice, why = parse_pair_answer(c.text, letters)
                except ValueError as e:
                    reason = str(e)
                    log.warning("%s: pairwise answer %d/%d refused: %s", case.case_id, attempt, max_attempts, reason)
                    continue
                record = {
                    "pair": case.case_id, "target": case.target, "prompt": case.prompt, "letters": list(letters),
                    "sha256": digests, "images": [p.name for p in paths] if keep_images else None,
                    "choice": choice, "reason": why, "attempts": attempt, "requests": requests,
                    "backend": getattr(backend, "name", type(backend).__name__),
                    "model": str(getattr(backend, "model", "")),
                }  # fmt: skip
                decisions.append(record)
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                return [choice] + [L for L in letters if L != choice]
            raise ValueError(f"pair judge, {case.case_id}: no valid answer in {max_attempts} attempts: {reason}")
        finally:
            if not keep_images:
                for p in paths:
                    p.unlink(missing_ok=True)

    judge.decisions = decisions  # type: ignore[attr-defined]
    judge.path = log_path  # type: ignore[attr-defined]
    return judge


def bradley_terry_bootstrap(
    rankings: Sequence[Sequence[str]],
    variants: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    prior: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """``preference_table`` as a JSON-ready dict for metrics.json: {variant: {bt_score, ci_low, ci_high,
    rank1_share}} under "variants", plus n_cases, n_boot, ci and prior."""
    t = preference_table(rankings, variants, n_boot=n_boot, ci=ci, prior=prior, seed=seed)
    return {
        "variants": {
            r.variant: {k: float(getattr(r, k)) for k in ("bt_score", "ci_low", "ci_high", "rank1_share")}
            for r in t.itertuples()
        },  # fmt: skip
        "order": t["variant"].tolist(),
        "n_cases": len(rankings),
        "n_boot": n_boot,
        "ci": ci,
        "prior": prior,
    }
