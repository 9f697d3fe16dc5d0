"""Preference evaluation: judge rankings -> Bradley-Terry scores with bootstrap CIs; checklist audits.

CRAFT 4.2.6 / app. D-E: for each case (a held-out prompt with its target diagnosis) a judge ranks the
images that the variants generated, best to worst. Rankings become pairwise wins, aggregated by a
Bradley-Terry model (P(i beats j) = p_i / (p_i + p_j)), fitted with Hunter's (2004) MM algorithm
and a tiny symmetric prior (``prior`` virtual wins each way per pair) so that a variant that always
wins or always loses still has a finite score. Confidence intervals come from a case bootstrap
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
- ``audit_judge(image, target, checklist) -> dict[attribute, bool]`` for ``checklist_audit``.

How the wiring calls this: build one ``Case`` per held-out prompt with every variant's image, call
``collect_rankings(cases, judge)``, then ``preference_table(rankings, variants)`` -> DataFrame
(variant, bt_score, ci_low, ci_high, rank1_share) for metrics.json and the report.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


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


def fit_bradley_terry(wins: np.ndarray, prior: float = 0.1, iters: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry log-strengths (mean zero) from a wins matrix, MM algorithm (Hunter 2004).

    p_i <- W_i / sum_j n_ij / (p_i + p_j), with W_i the total wins of i and n_ij the games between i
    and j; ``prior`` virtual wins are added in both directions for every pair (regularises toward
    equal strengths).
    """
    w = np.asarray(wins, dtype=np.float64)
    k = len(w)
    if w.shape != (k, k) or k < 2:
        raise ValueError(f"wins: expected a square matrix of at least 2 variants, got {w.shape}")
    w = w + prior * (1.0 - np.eye(k))
    n = w + w.T
    total = w.sum(1)
    p = np.ones(k)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(1)
        new = total / denom
        new /= np.exp(np.mean(np.log(new)))
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            p = new
            break
        p = new
    s = np.log(p)
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
    boot = np.stack([fit_bradley_terry(np.tensordot(c, per_case, axes=1), prior, iters=500) for c in counts])
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
    image written to a PNG in ``tmp_dir``; an answer that is not a JSON object of booleans covering
    every attribute raises ``ValueError`` naming the target and the answer (no silent default).
    """
    import json
    import tempfile
    from pathlib import Path

    from PIL import Image

    folder = Path(tmp_dir or tempfile.mkdtemp(prefix="craft-judge-"))
    folder.mkdir(parents=True, exist_ok=True)
    counter = iter(range(10**12))

    def judge(image, target: str, checklist: Sequence[Mapping[str, str]], prompt: str = "") -> dict[str, bool]:
        path = folder / f"image-{next(counter):08d}.png"
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        im.save(path)
        items = "\n".join(f"- {a['attribute']}: {a['description']}" for a in checklist)
        text = backend.chat(AUDIT_INSTRUCTION.format(target=target, prompt=prompt or target, items=items),
                            image_path=path).text  # fmt: skip
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


def checklist_pair_judge(audit, checklists: Mapping[str, Sequence[Mapping[str, str]]]) -> Callable[[Case], list[str]]:
    """A ranking judge from an audit judge: candidates ordered by checklist attributes passed, most first.

    Ties keep the blinded order, which ``blind`` drew at random, so no variant is favoured by a tie.
    """

    def judge(case: Case) -> list[str]:
        if case.target not in checklists:
            raise ValueError(f"{case.case_id}: no checklist for class {case.target!r}")
        ck = checklists[case.target]
        passed = {k: sum(audit(img, case.target, ck, case.prompt).values()) for k, img in case.candidates.items()}
        return sorted(case.candidates, key=lambda k: -passed[k])

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
