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


# ----------------------------------------------------------------------------- MLLM judges (pairwise, audit)
CHECKLISTS = {
    "adenoma": [
        {"attribute": "Glands", "description": "crowded tubules"},
        {"attribute": "Nuclei", "description": "pencil-shaped, stratified"},
    ]
}


def _pil(url: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L")


def _parts(req):
    return req.body["messages"][-1]["content"]


def _darker(n, req):
    """A scripted MLLM: chooses the darker of the two images it was shown, by their labels."""
    from tests.annotate_server import chat_reply

    parts = _parts(req)
    shown = {parts[i]["text"][6]: _pil(parts[i + 1]["image_url"]["url"]) for i in (1, 3)}  # "Image A:" -> image
    pick = min(shown, key=lambda L: np.asarray(shown[L]).mean())
    return chat_reply(f'{{"choice": "{pick}", "reason": "image {pick} is darker"}}')


def _pairs(seed: int, n: int = 8):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ims = {"a": Image.new("RGB", (8, 8), (200, 190 + i, 200)), "b": Image.new("RGB", (8, 8), (20, 30 + i, 20))}
        out.append(P.blind(f"pair-{i}", "adenoma", f"adenoma, crowded glands {i}", ims, rng))
    return out


def test_pair_judge_shows_both_images_in_one_request_and_records_each_decision(tmp_path):
    import hashlib
    import json

    from craft.annotate.backends import OpenAIBackend
    from tests.annotate_server import ScriptedServer

    runs = {}
    for k, seed in enumerate((0, 0, 1)):
        work = tmp_path / f"j{k}"
        with ScriptedServer(script=_darker) as srv:
            backend = OpenAIBackend(model="judge", base_url=srv.base_url, max_retries=0)
            judge = P.mllm_pair_judge(backend, CHECKLISTS, "histo", work, phrases={"adenoma": "tubular adenoma"})
            cases = _pairs(seed)
            for bc in cases:
                ranking = judge(bc.case)
                assert sorted(ranking) == ["A", "B"] and bc.key[ranking[0]] == "b"  # the darker image, wherever shown
            backend.close()
        assert len(srv.seen) == len(cases)  # one request per pair, both images in it
        for req, bc in zip(srv.seen, cases):
            parts = _parts(req)
            assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]
            assert parts[1]["text"] == "Image A:" and parts[3]["text"] == "Image B:"
            text = parts[0]["text"]
            assert "Target diagnosis: tubular adenoma (label 'adenoma')" in text and bc.case.prompt in text
            assert "- Glands: crowded tubules" in text and "- Nuclei: pencil-shaped, stratified" in text
            rf = req.response_format["json_schema"]
            assert rf["name"] == "pair_choice" and rf["schema"]["properties"]["choice"]["enum"] == ["A", "B"]
        runs.setdefault(seed, []).append([bc.key["A"] for bc in cases])  # which sample was shown first
        lines = [json.loads(x) for x in (work / P.DECISIONS).read_text().splitlines()]
        assert [d["pair"] for d in lines] == [bc.case.case_id for bc in cases] and lines == judge.decisions
        for d, bc in zip(lines, cases):
            assert d["letters"] == ["A", "B"] and d["reason"] == f"image {d['choice']} is darker"
            assert bc.key[d["choice"]] == "b" and d["attempts"] == 1 and d["model"] == "judge"
            for L, name in zip(d["letters"], d["images"]):
                assert hashlib.sha256((work / "images" / name).read_bytes()).hexdigest() == d["sha256"][L]
    # the presentation order is random (both samples are shown first sometimes) and reproducible from the seed
    assert runs[0][0] == runs[0][1] != runs[1][0] and {"a", "b"} == set(runs[0][0])


def test_pair_judge_retries_a_bad_answer_then_fails_naming_the_pair(tmp_path):
    import pytest

    from craft.annotate.backends import OpenAIBackend
    from tests.annotate_server import ScriptedServer, chat_reply

    bad = ['{"choice": "C", "reason": "neither"}', "I prefer image A.", '{"choice": "A"}']
    cases = _pairs(0, 2)
    with ScriptedServer(script=lambda n, r: chat_reply(bad[n % 3])) as srv:
        backend = OpenAIBackend(model="judge", base_url=srv.base_url, max_retries=0)
        judge = P.mllm_pair_judge(backend, CHECKLISTS, "histo", tmp_path / "j", max_attempts=3)
        with pytest.raises(ValueError, match=r"pair-1: no valid answer in 3 attempts: keys must be exactly choice"):
            judge(cases[1].case)
        assert len(srv.seen) == 3 and judge.decisions == [] and (tmp_path / "j" / P.DECISIONS).read_text() == ""
        backend.close()
    # one refused answer, then a valid one: the decision records the second attempt
    good = '{"choice": "B", "reason": "clearer glands"}'
    with ScriptedServer(script=lambda n, r: chat_reply(bad[0] if n == 0 else good)) as srv:
        backend = OpenAIBackend(model="judge", base_url=srv.base_url, max_retries=0)
        judge = P.mllm_pair_judge(backend, CHECKLISTS, "histo", tmp_path / "k", keep_images=False)
        assert judge(cases[0].case) == ["B", "A"] and judge.decisions[0]["attempts"] == 2
        assert not list((tmp_path / "k" / "images").iterdir())  # keep_images=False: only the hashes stay
    # a server that constrains decoding to the answer schema never lets the bad choice through
    with ScriptedServer(script=lambda n, r: chat_reply(bad[0]), constrain=True) as srv:
        backend = OpenAIBackend(model="judge", base_url=srv.base_url, max_retries=0)
        judge = P.mllm_pair_judge(backend, CHECKLISTS, "histo", tmp_path / "m")
        assert judge(cases[0].case) == ["A", "B"] and len(srv.seen) == 1
    with pytest.raises(ValueError, match="pair-0: no checklist for class 'adenoma'"):
        P.mllm_pair_judge(backend, {}, "histo", tmp_path / "n")(cases[0].case)


def test_offline_evidence_rules_prefer_an_image_of_the_target_class(tmp_path):
    """Each class's measured sign is stronger in images of that class than in others, on most demo pairs."""
    import pandas as pd

    from craft.annotate import measure
    from craft.annotate.backends import class_evidence
    from craft.data.demo import DemoConfig, generate

    for modality, fn in (("histo", measure.measure_histo), ("cxr", measure.measure_cxr)):
        generate(DemoConfig(modality=modality, n=32, seed=0, resolution=64), tmp_path / modality)
        df = pd.read_parquet(tmp_path / modality / "manifest.parquet")
        ms = [(r.label, fn(tmp_path / modality / r.image_path)) for r in df.itertuples()]
        for target in sorted(set(df["label"])):
            own = [class_evidence(modality, target, m) for lab, m in ms if lab == target]
            other = [class_evidence(modality, target, m) for lab, m in ms if lab != target]
            share = np.mean([a > b for a in own for b in other])
            assert share >= 0.8, (modality, target, share)


def test_offline_pair_judge_is_deterministic_and_blind_to_the_order(tmp_path):
    """The offline backend chooses from image measurements: the same image whichever letter it is shown under."""
    import json

    import pandas as pd
    import pytest
    from PIL import Image

    from craft.annotate import checklists as ck
    from craft.annotate.backends import BackendError, OfflineBackend
    from craft.data.demo import DemoConfig, generate

    for modality in ("histo", "cxr"):
        d = tmp_path / modality
        generate(DemoConfig(modality=modality, n=8, seed=1, resolution=64, images_per_patient=1), d)
        df = pd.read_parquet(d / "manifest.parquet")
        ims = {r.image_id: Image.open(d / r.image_path).convert("RGB") for r in df.itertuples()}
        label = dict(zip(df["image_id"], df["label"]))
        checklists = json.loads(ck.shipped_path(f"demo-{modality}").read_text())
        judge = P.mllm_pair_judge(OfflineBackend(), checklists, modality, tmp_path / f"j-{modality}")
        for target in sorted(set(df["label"])):
            x = next(i for i in ims if label[i] == target)
            for y in [i for i in ims if label[i] != target][:3]:
                picks = [judge(P.Case(f"{x}-{y}", target, "", {"A": ims[x], "B": ims[y]}))[0],
                         judge(P.Case(f"{y}-{x}", target, "", {"A": ims[y], "B": ims[x]}))[0],
                         judge(P.Case(f"{x}-{y}", target, "", {"A": ims[x], "B": ims[y]}))[0]]  # fmt: skip
                assert picks in (["A", "B", "A"], ["B", "A", "B"])  # one image, whatever the order; repeatable
        assert all(d["requests"] == 0 and f"{d['target']} evidence" in d["reason"] for d in judge.decisions)
    # a radiograph the measurer cannot read shows no sign and loses; two of them fail naming the pair
    real = next(iter(ims.values()))
    blank = Image.new("RGB", real.size, (128, 128, 128))
    judge = P.mllm_pair_judge(OfflineBackend(), checklists, "cxr", tmp_path / "blank")
    assert judge(P.Case("p1", "cardiomegaly", "", {"A": blank, "B": real})) == ["B", "A"]
    assert "A: not measurable" in judge.decisions[0]["reason"]
    with pytest.raises(BackendError, match="p2: no image could be measured"):
        judge(P.Case("p2", "cardiomegaly", "", {"A": blank, "B": blank}))


def test_mllm_audit_judge_asks_for_one_boolean_per_attribute(tmp_path):
    import json

    from PIL import Image

    from craft.annotate.backends import OpenAIBackend
    from tests.annotate_server import ScriptedServer, chat_reply

    with ScriptedServer(script=lambda n, r: chat_reply(json.dumps({"Glands": True, "Nuclei": False}))) as srv:
        backend = OpenAIBackend(model="judge", base_url=srv.base_url, max_retries=0)
        verdict = P.mllm_audit_judge(backend, str(tmp_path))(
            Image.new("RGB", (8, 8)), "adenoma", CHECKLISTS["adenoma"]
        )
        backend.close()
    assert verdict == {"Glands": True, "Nuclei": False}
    schema = srv.seen[0].response_format["json_schema"]["schema"]
    assert schema["properties"] == {"Glands": {"type": "boolean"}, "Nuclei": {"type": "boolean"}}
    assert [p["type"] for p in _parts(srv.seen[0])] == ["text", "image_url"]
