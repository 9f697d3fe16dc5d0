"""craft.evaluate.preferences: pairwise wins, Bradley-Terry recovery, bootstrap CIs, judges, audits."""

import numpy as np
import pytest

from craft.evaluate import preferences as P


def test_pairwise_wins_by_hand():
    w = P.pairwise_wins([["a", "b", "c"], ["c", "a", "b"]], ["a", "b", "c"])
    assert w.tolist() == [[0, 2, 1], [0, 0, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="ranking 0: unknown variant 'z'"):
        P.pairwise_wins([["z"]], ["a"])


def test_bt_two_players_closed_form():
    # 3 wins vs 1, no prior: p_a / p_b = 3 -> log-strength gap ln 3
    s = P.fit_bradley_terry(np.array([[0, 3], [1, 0]]), prior=0.0)
    assert s[0] - s[1] == pytest.approx(np.log(3), abs=1e-8)
    # an undefeated player stays finite with the prior
    s = P.fit_bradley_terry(np.array([[0, 5], [0, 0]]), prior=0.1)
    assert np.all(np.isfinite(s)) and s[0] > s[1]


def _simulate(true_log, n_cases, rng):
    """Plackett-Luce rankings (consistent with Bradley-Terry pairwise probabilities)."""
    names = list(true_log)
    w = np.exp(np.array(list(true_log.values())))
    out = []
    for _ in range(n_cases):
        left, r = list(range(len(names))), []
        while left:
            p = w[left] / w[left].sum()
            k = rng.choice(len(left), p=p)
            r.append(names[left.pop(k)])
        out.append(r)
    return out


def test_bt_recovers_ordering_and_ci_covers_truth():
    true = {"craft": 1.0, "ti_lora": 0.4, "dpo": 0.0, "zero_shot": -1.4}
    rankings = _simulate(true, 300, np.random.default_rng(0))
    t = P.preference_table(rankings, list(true), n_boot=200, seed=1)
    assert list(t["variant"]) == ["craft", "ti_lora", "dpo", "zero_shot"]
    truth = np.array(list(true.values()))
    truth = truth - truth.mean()
    t = t.set_index("variant")
    for v, s in zip(true, truth):
        assert t.loc[v, "ci_low"] <= s <= t.loc[v, "ci_high"], v
        assert t.loc[v, "ci_low"] <= t.loc[v, "bt_score"] <= t.loc[v, "ci_high"]
    assert t["rank1_share"].sum() == pytest.approx(1.0)
    assert t.loc["craft", "rank1_share"] > t.loc["zero_shot", "rank1_share"]


def test_blinded_judges_map_letters_back():
    rng = np.random.default_rng(0)
    scores = {"c1": {"a": 0.1, "b": 0.9, "c": 0.5}, "c2": {"a": 0.7, "b": 0.2, "c": 0.3}}
    cases = [P.blind(cid, "pneumonia", "prompt", {v: (cid, v) for v in s}, rng) for cid, s in scores.items()]
    assert all(set(bc.case.candidates) == {"A", "B", "C"} for bc in cases)
    assert [bc.key for bc in cases] != [{"A": "a", "B": "b", "C": "c"}] * 2  # shuffled presentation
    want = P.rank_by_scores(scores)
    assert want == [["b", "c", "a"], ["a", "c", "b"]]
    # the evaluator judge sees images only (here (case, variant) tuples standing in for images)
    judge = P.evaluator_judge(lambda img, case: scores[img[0]][img[1]])
    assert P.collect_rankings(cases, judge) == want
    with pytest.raises(ValueError, match="expected a permutation"):
        P.collect_rankings(cases, lambda c: ["A", "A", "B"])


def test_checklist_audit_pass_rates():
    checklists = {
        "pneumonia": [{"attribute": "opacity", "description": "."}, {"attribute": "air", "description": "."}]
    }
    items = [("craft", "x1", "pneumonia"), ("craft", "x2", "pneumonia"), ("zs", "x3", "pneumonia")]
    verdicts = {
        "x1": {"opacity": True, "air": True},
        "x2": {"opacity": True, "air": False},
        "x3": {"opacity": False, "air": False},
    }
    t = P.checklist_audit(items, checklists, lambda img, target, cl: verdicts[img]).set_index("variant")
    assert t.loc["craft", "pass_rate"] == pytest.approx(3 / 4)
    assert t.loc["craft", "all_pass_rate"] == pytest.approx(1 / 2)
    assert t.loc["zs", "pass_rate"] == 0.0 and t.loc["craft", "n_images"] == 2
    with pytest.raises(ValueError, match="no verdict for attribute 'air'"):
        P.checklist_audit(items, checklists, lambda img, target, cl: {"opacity": True})


def test_rankings_from_score_table_and_json_block():
    import pandas as pd

    wide = pd.DataFrame({"a": [0.9, 0.1, np.nan], "b": [0.5, 0.2, 0.3], "c": [0.1, 0.3, 0.6]})
    r = P.rankings_from_scores(wide)
    assert r == [["a", "b", "c"], ["c", "b", "a"], ["c", "b"]]  # NaN: a left out of case 3
    block = P.bradley_terry_bootstrap(r, ["a", "b", "c"], n_boot=50, seed=0)
    assert block["order"][0] == "c" and block["n_cases"] == 3
    assert set(block["variants"]["a"]) == {"bt_score", "ci_low", "ci_high", "rank1_share"}
    assert block["variants"]["c"]["rank1_share"] == pytest.approx(2 / 3)
