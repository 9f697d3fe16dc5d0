"""Annotation stage: schema and forbidden terms, the OpenAI-compatible backend against a scripted local
server (retries, 429, malformed answers, resume after a kill, concurrency bound, key handling),
the offline measuring backend on both demo modalities, and the bundled checklists."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from jsonschema import Draft202012Validator

from craft.annotate import checklists as ck
from craft.annotate.backends import Completion, StructuredOutputRefused, backoff_delay, retry_after_seconds
from craft.annotate.run import AnnotateConfig, load_state, main
from craft.annotate.schema import SCHEMAS, enriched_prompt, find_forbidden, forbidden_terms, validate_answer
from craft.data.demo import DemoConfig, generate
from tests.annotate_server import VALID, ScriptedServer, chat_reply, valid_answer

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"


@pytest.fixture(scope="module")
def cxr_small(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ds") / "demo-cxr"
    generate(DemoConfig(modality="cxr", n=32, seed=1, resolution=32), d)
    return d


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    out = {}
    for m in ("histo", "cxr"):
        out[m] = root / f"demo-{m}"
        generate(DemoConfig(modality=m, n=32, seed=3, resolution=96), out[m])
    return out


def cfg_for(server: ScriptedServer, **kw) -> AnnotateConfig:
    base = dict(
        backend="openai",
        model="test-vlm",
        base_url=server.base_url,
        concurrency=4,
        timeout_s=10.0,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        max_attempts=2,
        batch_size=4,
        progress=False,
        price_input_per_mtok=2.5,
        price_output_per_mtok=10.0,
    )
    base.update(kw)
    return AnnotateConfig(**base)


def read(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "annotations.parquet")


# ----------------------------------------------------------------------------- schema
def test_schema_accepts_valid_and_names_the_reason_for_bad_answers():
    classes = list(VALID)
    for label, ans in VALID.items():
        assert validate_answer({"label": label, **ans}, "cxr", label, classes) is None
    good = {"label": "no_finding", **VALID["no_finding"]}
    assert "not one of" in validate_answer({**good, "lung_fields": "cloudy"}, "cxr", "no_finding", classes)
    assert "missing field 'view'" == validate_answer({k: v for k, v in good.items() if k != "view"}, "cxr", "x")
    assert "unexpected field" in validate_answer({**good, "diagnosis": "x"}, "cxr", "no_finding")
    assert "does not echo" in validate_answer({**good, "label": "pneumonia"}, "cxr", "no_finding", classes)
    # label-dependent logic: no_finding cannot carry an enlarged heart even with clean words
    assert "contradicts label" in validate_answer(
        {**good, "cardiac_silhouette": "enlarged", "key_findings": ["sharp_hemidiaphragms"]}, "cxr", "no_finding"
    )
    # forbidden even when negated (text encoders ignore negation)
    r = validate_answer({**good, "description": "No consolidation is seen."}, "cxr", "no_finding", classes)
    assert r is not None and "consolidation" in r
    # another class named in a cardiomegaly answer is diagnosis leakage
    card = {"label": "cardiomegaly", **VALID["cardiomegaly"], "description": "Big heart, maybe pneumonia."}
    assert "pneumonia" in validate_answer(card, "cxr", "cardiomegaly", classes)
    long = {**good, "description": "word " * 41}
    assert "41 words" in validate_answer(long, "cxr", "no_finding")


def test_benign_histology_refuses_malignant_vocabulary():
    ans = {
        "label": "adenoma",
        "tissue_context": "glandular_epithelium",
        "architecture": "crowded_regular_glands",
        "nuclei": "elongated_stratified",
        "stroma": "scant",
        "stain_balance": "balanced",
        "key_findings": ["nuclear_stratification"],
        "description": "Crowded glands with stacked elongated nuclei.",
    }
    classes = ["normal", "adenoma", "adenocarcinoma", "mucinous_carcinoma"]
    assert validate_answer(ans, "histo", "adenoma", classes) is None
    for bad in ("Mild atypia in the glands.", "Focally invasive edge.", "Looks like early carcinoma."):
        reason = validate_answer({**ans, "description": bad}, "histo", "adenoma", classes)
        assert reason is not None and "forbidden term" in reason, bad
    # a closed-vocabulary value can itself be forbidden for a benign label
    r = validate_answer({**ans, "stroma": "desmoplastic"}, "histo", "adenoma", classes)
    assert r is not None and "desmoplastic" in r
    # the malignant class may use the words
    mal = {**ans, "label": "adenocarcinoma", "description": "Invasive glands with atypia.", "stroma": "desmoplastic"}
    assert validate_answer(mal, "histo", "adenocarcinoma", classes) is None
    assert forbidden_terms("histo", "adenocarcinoma", classes) == (r"adenoma\w*", r"mucinous[\s_-]carcinoma\w*")


def test_every_schema_builds_a_prompt_without_placeholders():
    for modality, schema in SCHEMAS.items():
        obj = {"label": "x", "description": "Some visible sign."}
        for name, f in schema.fields.items():
            if f.kind == "enum":
                obj[name] = f.values[0]
            elif f.kind == "enum_list":
                obj[name] = [f.values[0]]
        text = enriched_prompt(obj, modality, "thing")
        assert text.startswith(schema.prefix) and "{" not in text and "_" not in text, text


# ----------------------------------------------------------------------------- structured outputs
def _classes(name: str) -> list[str]:
    return list(json.loads(ck.shipped_path(name).read_text()))


def _sample(schema: dict, rng) -> dict:
    """A random answer the schema allows (lists without repeats: the validator's rule a schema cannot state)."""
    out = {}
    for k, p in schema["properties"].items():
        if p["type"] == "array":
            out[k] = rng.sample(p["items"]["enum"], rng.randint(1, min(p["maxItems"], len(p["items"]["enum"]))))
        else:
            out[k] = rng.choice(p["enum"]) if "enum" in p else "A plain visible sign in this image."
    return out


@pytest.mark.parametrize(
    "modality,classes",
    [("cxr", _classes("chexpert")), ("histo", _classes("demo-histo")), ("histo", _classes("breakhis")),
     ("derm", _classes("fitzpatrick17k")), ("fundus", _classes("origa"))],
)  # fmt: skip
def test_the_answer_schema_and_the_validator_accept_the_same_values(modality, classes):
    """The JSON schema sent as structured output is derived from the vocabulary the parser checks: per label,
    every answer it allows validates, and a categorical value validates exactly when the schema offers it."""
    import random

    rng = random.Random(0)
    schema_of = SCHEMAS[modality]
    for label in classes:
        terms = forbidden_terms(modality, label, classes)
        schema = schema_of.json_schema(label, terms)
        Draft202012Validator.check_schema(schema)
        v = Draft202012Validator(schema)
        for _ in range(10):
            obj = _sample(schema, rng)
            assert v.is_valid(obj) and validate_answer(obj, modality, label, classes) is None, obj
            assert find_forbidden({"p": enriched_prompt(obj, modality, label)}, terms) is None
        base = _sample(schema, rng)
        for name, f in schema_of.fields.items():
            for value in f.values if f.kind != "text" else ():
                obj = {**base, name: value if f.kind == "enum" else [value]}
                assert v.is_valid(obj) == (validate_answer(obj, modality, label, classes) is None), (
                    label,
                    name,
                    value,
                )
        assert not v.is_valid({**base, "extra": "x"}) and not v.is_valid({**base, "label": "something_else"})


def test_requests_carry_the_answer_json_schema_for_their_label(cxr_small, tmp_path):
    with ScriptedServer() as srv:  # the server refuses a response_format that is not a strict-mode JSON schema
        main(cfg_for(srv), cxr_small, tmp_path / "o")
    assert len(srv.seen) == 32
    for s in srv.seen:
        rf = s.response_format
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
        assert rf["json_schema"]["name"] == "cxr_annotation"
        schema = rf["json_schema"]["schema"]
        v = Draft202012Validator(schema)
        assert v.is_valid(json.loads(valid_answer(s.label))) and schema["properties"]["label"]["enum"] == [s.label]
        assert not v.is_valid(json.loads(valid_answer(s.label, lung_fields="cloudy")))
        assert not v.is_valid({**json.loads(valid_answer(s.label)), "diagnosis": s.label})
        # the schema is still described in the instruction (servers on json_object / none rely on it)
        assert '"lung_fields": "one of:' in s.body["messages"][0]["content"]
    nf = next(s for s in srv.seen if s.label == "no_finding").response_format["json_schema"]["schema"]["properties"]
    assert nf["lung_fields"]["enum"] == ["clear"] and nf["opacity_location"]["enum"] == ["none"]
    assert "meniscus_sign" not in nf["key_findings"]["items"]["enum"]  # forbidden for no_finding: not offered


def _sloppy(n, r):
    """A model whose first answer per image breaks the schema (vocabulary, extra key, list length, label echo)."""
    if r.per_image:
        return chat_reply(valid_answer(r.label))
    ans = json.loads(valid_answer(r.label))
    fault = r.n % 4
    if fault == 0:
        ans["lung_fields"] = "cloudy"
    elif fault == 1:
        ans["diagnosis"] = r.label
    elif fault == 2:
        terms = forbidden_terms("cxr", r.label, list(VALID))
        ans["key_findings"] = list(SCHEMAS["cxr"].allowed("key_findings", r.label, terms))[:5]
    else:
        ans["label"] = "pneumonia" if r.label != "pneumonia" else "no_finding"
    return chat_reply(json.dumps(ans))


def test_constrained_decoding_saves_the_retries_malformed_answers_cost(cxr_small, tmp_path):
    """Against a server that constrains json_schema requests, the same sloppy model needs no second answer."""
    runs = {}
    for mode in ("json_object", "json_schema"):
        with ScriptedServer(script=_sloppy, constrain=True) as srv:
            s = main(cfg_for(srv, structured_output=mode, limit=12, concurrency=1), cxr_small, tmp_path / mode)
        df = read(tmp_path / mode)
        assert s["done"] == 12 and (df["status"] == "ok").all() and s["structured_output"] == mode
        runs[mode] = (s["requests"], int(df["attempts"].sum()))
        assert {x.response_format["type"] for x in srv.seen} == {mode}
    assert runs["json_object"] == (24, 24)  # every image answered twice: its first answer was refused
    assert runs["json_schema"] == (12, 12)  # the schema kept each first answer valid


def test_a_server_without_schema_support_stops_the_run_naming_the_setting(cxr_small, tmp_path):
    out = tmp_path / "o"
    with ScriptedServer(supports="json_object") as srv:
        with pytest.raises(StructuredOutputRefused, match=r"annotate\.structured_output=json_object \(or none\)"):
            main(cfg_for(srv), cxr_small, out)
        refused = len(srv.seen)
        assert 1 <= refused < 32  # the run stops: not one failed row per image, no retries of a 400
        assert not (out / "annotations.parquet").exists() and load_state(out).empty
        s = main(cfg_for(srv, structured_output="json_object"), cxr_small, out)
    assert s["done"] == 32 and all(x.response_format == {"type": "json_object"} for x in srv.seen[refused:])
    with ScriptedServer(supports="none") as srv:
        with pytest.raises(StructuredOutputRefused, match=r"response_format type 'json_object'.*=none$"):
            main(cfg_for(srv, structured_output="json_object", limit=2), cxr_small, tmp_path / "o2")
        s = main(cfg_for(srv, structured_output="none", limit=2), cxr_small, tmp_path / "o2")
    assert s["done"] == 2 and srv.seen[-1].response_format is None
    # a 400 about something else is a failed image, not a settings problem
    with ScriptedServer(script=lambda n, r: (400, {}, '{"error": {"message": "image too large"}}')) as srv:
        s = main(cfg_for(srv, limit=2), cxr_small, tmp_path / "o3")
    assert s["failed"] == 2 and read(tmp_path / "o3")["error"].str.contains("HTTP 400").all()


# ----------------------------------------------------------------------------- checklists
@pytest.mark.parametrize(
    "name,modality,n_classes",
    [
        ("fitzpatrick17k", "derm", 20),
        ("chexpert", "cxr", 4),
        ("breakhis", "histo", 8),
        ("origa", "fundus", 2),
        ("demo-histo", "histo", 4),
        ("demo-cxr", "cxr", 4),
    ],
)
def test_bundled_checklists_have_five_attributes_per_class(name, modality, n_classes):
    raw = json.loads(ck.shipped_path(name).read_text())
    assert len(raw) == n_classes
    assert ck.validate_checklist(raw, list(raw), modality) is None
    loaded = ck.load_checklist(name, list(raw), modality)
    for items in loaded.values():
        assert [i["attribute"] for i in items] == list(ck.ATTRIBUTE_SETS[modality])
    assert "missing" in ck.validate_checklist(raw, list(raw) + ["extra_class"], modality)


class FakeChat:
    """A backend whose chat answers come from a list (for checklist generation)."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def chat(self, text, images=(), system=None, response_schema=None):
        self.calls += 1
        return Completion(self.answers.pop(0))


def _checklist(classes, attrs):
    return {c: [{"attribute": a, "description": f"{a} of {c}"} for a in attrs] for c in classes}


def test_checklist_generation_validates_and_retries():
    classes, attrs = ["calm", "stormy"], ck.ATTRIBUTE_SETS["fundus"]
    good = _checklist(classes, attrs)
    missing_class = {"calm": good["calm"]}
    wrong_attrs = _checklist(classes, attrs[:4] + ("Colour",))
    fake = FakeChat([json.dumps(missing_class), json.dumps(wrong_attrs), "```json\n" + json.dumps(good) + "\n```"])
    out = ck.generate_checklist(fake, "toy", "fundus", classes, max_attempts=3)
    assert fake.calls == 3 and list(out) == classes and out["stormy"][0]["attribute"] == "Optic Disc"
    with pytest.raises(ValueError, match="failed after 2 answers: class 'stormy' missing"):
        ck.generate_checklist(FakeChat([json.dumps(missing_class)] * 2), "toy", "fundus", classes, max_attempts=2)


def test_checklist_generation_through_the_openai_backend(cxr_small, tmp_path):
    classes = ["no_finding", "cardiomegaly", "pleural_effusion", "pneumonia"]
    good = _checklist(classes, ck.ATTRIBUTE_SETS["cxr"])

    def script(n, r):
        return chat_reply(json.dumps(good) if r.label is None else valid_answer(r.label))

    with ScriptedServer(script=script) as srv:
        cfg = cfg_for(srv, checklist="generate")
        main(cfg, cxr_small, tmp_path / "out")
        n_first = len(srv.seen)
        main(cfg, cxr_small, tmp_path / "out")  # rerun: checklist reused, images skipped
    assert json.loads((tmp_path / "out" / "checklists.json").read_text()) == good
    assert n_first == 1 + 32 and len(srv.seen) == n_first  # the generated checklist is not paid for twice
    # the checklist request is text only, and asks for the checklist's JSON schema
    assert all(c["type"] == "text" for c in srv.seen[0].body["messages"][-1]["content"])
    rf = srv.seen[0].response_format
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "class_checklists"
    schema = Draft202012Validator(rf["json_schema"]["schema"])
    assert schema.is_valid(good) and not schema.is_valid({c: good[c] for c in classes[:3]})
    assert not schema.is_valid({**good, "pneumonia": good["pneumonia"][:4]})  # five attributes per class
    renamed = [{**i, "attribute": "Colour"} if i["attribute"] == "Color" else i for i in good["pneumonia"]]
    assert not schema.is_valid({**good, "pneumonia": renamed})  # only the modality's attribute names


# ----------------------------------------------------------------------------- OpenAI-compatible backend
def test_happy_path_sends_image_and_bearer_key_but_never_writes_the_key(
    cxr_small, tmp_path, monkeypatch, caplog, capsys
):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    with ScriptedServer() as srv:
        summary = main(cfg_for(srv), cxr_small, out)
    df = read(out)
    assert summary["done"] == 32 and summary["failed"] == 0 and (df["status"] == "ok").all()
    assert summary["requests"] == 32 == len(srv.seen)
    assert summary["cost_usd"] == pytest.approx(32 * (100 * 2.5 + 50 * 10.0) / 1e6)
    assert all(s.headers.get("Authorization") == f"Bearer {KEY}" for s in srv.seen)
    img = srv.seen[0].body["messages"][-1]["content"][1]["image_url"]["url"]
    assert img.startswith("data:image/png;base64,")
    system = srv.seen[0].body["messages"][0]["content"]
    assert "ground truth" in system and "Do not diagnose" in system
    # label conditioning: each request states that image's own label
    labels = dict(zip(df["image_id"], df["label"]))
    assert sorted(s.label for s in srv.seen) == sorted(labels.values())
    prompts = df.set_index("label")["enriched_prompt"]
    assert "enlarged cardiac silhouette" in prompts["cardiomegaly"].iloc[0]
    assert set(df.columns) >= {"image_id", "enriched_prompt", "backend", "model", "prompt_version", "status", "error"}
    blobs = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    logs = caplog.text + "".join(capsys.readouterr())
    assert KEY.encode() not in blobs and KEY not in logs


def test_key_echoed_in_an_error_body_is_scrubbed(cxr_small, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    echo = lambda n, r: (401, {}, f"bad key {r.headers.get('Authorization')}")  # noqa: E731
    with ScriptedServer(script=echo) as srv:
        summary = main(cfg_for(srv, limit=2), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 2 and len(srv.seen) == 2  # 401 is not retried
    assert df["error"].str.contains(r"HTTP 401.*\*\*\*", regex=True).all()
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert KEY.encode() not in blobs and KEY not in caplog.text


def test_closed_vocabulary_violation_is_retried_then_recorded_failed(cxr_small, tmp_path):
    bad = lambda n, r: chat_reply(valid_answer(r.label, lung_fields="cloudy"))  # noqa: E731
    with ScriptedServer(script=bad) as srv:
        summary = main(cfg_for(srv, limit=6, max_attempts=3), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 6 and len(srv.seen) == 6 * 3
    assert (df["status"] == "failed").all() and df["enriched_prompt"].isna().all()
    assert df["error"].str.contains("after 3 answer\\(s\\): field 'lung_fields': 'cloudy' is not one of").all()


def test_forbidden_term_for_no_finding_is_never_kept(cxr_small, tmp_path):
    def script(n, r):
        if r.label == "no_finding":
            return chat_reply(valid_answer(r.label, description="Clear lungs without any opacity."))
        return chat_reply(valid_answer(r.label))

    with ScriptedServer(script=script) as srv:
        main(cfg_for(srv), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    nf = df[df["label"] == "no_finding"]
    assert len(nf) > 0 and (nf["status"] == "failed").all() and nf["enriched_prompt"].isna().all()
    assert nf["error"].str.contains("forbidden term 'opacity'").all()
    assert (df[df["label"] != "no_finding"]["status"] == "ok").all()
    assert sum(s.label == "no_finding" for s in srv.seen) == 2 * len(nf)  # retried once, then failed


def test_transport_error_and_bad_answer_are_retried_then_succeed(cxr_small, tmp_path):
    def script(n, r):
        if r.per_image == 0:
            return 500, {}, "upstream hiccup"
        if r.per_image == 1:
            return chat_reply("{this is not json")
        return chat_reply(valid_answer(r.label))

    with ScriptedServer(script=script) as srv:
        summary = main(cfg_for(srv, limit=8), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["done"] == 8 and (df["status"] == "ok").all()
    assert len(srv.seen) == 8 * 3 and (df["requests"] == 3).all() and (df["attempts"] == 2).all()


def test_retries_exhausted_are_recorded_as_failed(cxr_small, tmp_path):
    with ScriptedServer(script=lambda n, r: (503, {}, "overloaded")) as srv:
        summary = main(cfg_for(srv, limit=3, max_retries=2), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 3 and len(srv.seen) == 3 * 3
    assert df["error"].str.contains("gave up after 3 requests: HTTP 503").all()


def test_malformed_json_answers_fail_with_reason(cxr_small, tmp_path):
    answers = ["I think this is pneumonia.", "[1, 2]", '{"label": "x", "view": ']
    with ScriptedServer(script=lambda n, r: chat_reply(answers[r.per_image % 3])) as srv:
        summary = main(cfg_for(srv, limit=2, max_attempts=3), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 2 and len(srv.seen) == 6
    assert df["error"].str.contains("after 3 answer\\(s\\): malformed JSON").all()  # the last reason is recorded
    # an unreadable 200 body is a transport-level failure: retried inside the backend
    with ScriptedServer(script=lambda n, r: (200, {}, "<html>oops</html>")) as srv2:
        main(cfg_for(srv2, limit=1, max_retries=1), cxr_small, tmp_path / "o2")
    assert len(srv2.seen) == 2 and "unreadable 200 response" in read(tmp_path / "o2")["error"].iloc[0]


def test_429_retry_after_is_honoured(cxr_small, tmp_path):
    def script(n, r):
        if n == 0:
            return 429, {"Retry-After": "1"}, "slow down"
        return chat_reply(valid_answer(r.label))

    with ScriptedServer(script=script) as srv:
        summary = main(cfg_for(srv, limit=2, concurrency=1, backoff_base_s=0.001), cxr_small, tmp_path / "o")
    assert summary["done"] == 2 and len(srv.seen) == 3
    t_429 = srv.replies[0][0]
    assert srv.replies[0][1] == 429
    assert srv.seen[1].t - t_429 >= 0.95  # waited the full Retry-After, not the 1 ms backoff
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_backoff_grows_and_is_capped():
    import random

    rng = random.Random(0)
    d = [backoff_delay(a, 0.5, 4.0, rng) for a in range(8)]
    assert 0.25 <= d[0] <= 0.5 and all(2.0 <= x <= 4.0 for x in d[3:])


def test_concurrency_never_exceeds_the_limit(cxr_small, tmp_path):
    with ScriptedServer(latency_s=0.05) as srv:
        summary = main(cfg_for(srv, concurrency=3, batch_size=5), cxr_small, tmp_path / "o")
    assert summary["done"] == 32
    assert 2 <= srv.max_in_flight <= 3  # requests overlapped, and never more than the limit


def test_rerun_skips_ok_rows_and_redoes_failed_or_changed_ones(cxr_small, tmp_path):
    out = tmp_path / "o"

    def flaky(n, r):  # pneumonia answers break the vocabulary on the first run
        if r.label == "pneumonia":
            return chat_reply(valid_answer(r.label, lung_fields="cloudy"))
        return chat_reply(valid_answer(r.label))

    with ScriptedServer(script=flaky) as srv:
        s1 = main(cfg_for(srv, max_attempts=1), cxr_small, out)
    n_pneu = int((read(out)["label"] == "pneumonia").sum())
    assert s1["failed"] == n_pneu > 0
    with ScriptedServer() as srv2:
        s2 = main(cfg_for(srv2, max_attempts=1), cxr_small, out)
        s3 = main(cfg_for(srv2, max_attempts=1), cxr_small, out)
    assert s2["skipped"] == 32 - n_pneu and len(srv2.seen) == n_pneu and s2["done"] == n_pneu
    assert s3["skipped"] == 32 and s3["requests"] == 0
    with ScriptedServer() as srv3:
        s4 = main(cfg_for(srv3, prompt_version="v2"), cxr_small, out)
    assert s4["done"] == 32 and len(srv3.seen) == 32 and (read(out)["prompt_version"] == "v2").all()


def test_fault_mid_run_keeps_committed_batches(cxr_small, tmp_path, monkeypatch):
    import craft.annotate.run as run_mod

    real, calls = run_mod.commit_part, {"n": 0}

    def failing_commit(out_dir, rows, known=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full (simulated)")
        return real(out_dir, rows, known)

    out = tmp_path / "o"
    monkeypatch.setattr(run_mod, "commit_part", failing_commit)
    with ScriptedServer() as srv, pytest.raises(RuntimeError, match="disk full"):
        main(cfg_for(srv, concurrency=1, batch_size=4), cxr_small, out)
    monkeypatch.setattr(run_mod, "commit_part", real)
    committed = load_state(out)
    # two batches committed before the fault; the batch that hit it is committed on the way out
    assert len(committed) == 12 and (committed["status"] == "ok").all()
    with ScriptedServer() as srv2:
        s = main(cfg_for(srv2), cxr_small, out)
    assert s["skipped"] == 12 and len(srv2.seen) == 20 and len(read(out)) == 32
    assert not list((out / "parts").glob("*.parquet"))  # compacted


def test_resume_after_the_process_is_killed(cxr_small, tmp_path):
    """Kill -9 a run while requests hang; the rerun asks only for what was not committed."""
    release = threading.Event()

    def script(n, r):
        if n >= 10:
            release.wait(30)  # the next requests hang until the process is dead
        return chat_reply(valid_answer(r.label))

    out = tmp_path / "o"
    code = textwrap.dedent(
        f"""
        from craft.annotate.run import AnnotateConfig, main
        cfg = AnnotateConfig(backend="openai", model="test-vlm", base_url={{url!r}}, concurrency=2,
                             batch_size=2, max_retries=0, timeout_s=60, progress=False)
        main(cfg, {str(cxr_small)!r}, {str(out)!r})
        """
    )
    with ScriptedServer(script=script) as srv:
        proc = subprocess.Popen(
            [sys.executable, "-c", code.replace("{url!r}", repr(srv.base_url))],
            cwd=REPO,
            env={**os.environ, "OPENAI_API_KEY": KEY},
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = list((out / "parts").glob("part-*.parquet")) if (out / "parts").is_dir() else []
            if len(parts) >= 5 and len(srv.seen) >= 12:  # 10 answers committed, 2 requests hanging
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        release.set()
    assert not (out / "annotations.parquet").exists()
    committed = load_state(out)
    assert len(committed) == 10 and (committed["status"] == "ok").all()
    with ScriptedServer() as srv2:
        s = main(cfg_for(srv2), cxr_small, out)
    assert s["skipped"] == 10 and len(srv2.seen) == 22 and (read(out)["status"] == "ok").sum() == 32
    asked = {x.image for x in srv2.seen}
    assert len(asked) == 22  # each remaining image once, none of the committed ones again


# ----------------------------------------------------------------------------- offline backend
def test_offline_backend_annotates_both_demo_modalities_from_measurements(demo_dirs, tmp_path):
    for modality, d in demo_dirs.items():
        out = tmp_path / modality
        summary = main(AnnotateConfig(progress=False), d, out)
        df = read(out)
        assert summary["done"] == 32 and (df["status"] == "ok").all() and summary["cost_usd"] == 0
        assert (df["backend"] == "offline").all() and (df["model"] == "measure-v1").all()
        manifest = pd.read_parquet(d / "manifest.parquet").set_index("image_id")
        df = df.set_index("image_id").join(manifest[["attributes"]])
        for label, g in df.groupby("label"):
            # measurements differ between images of one class: the prompts are image-specific
            # (rounded to whole percent, two images may still read the same)
            assert g["enriched_prompt"].nunique() >= 0.75 * len(g), label
            # no prompt carries a term forbidden for its own label
            for text in g["enriched_prompt"]:
                assert validate_answer  # schema module imported
                banned = forbidden_terms(modality, label, list(manifest["label"].unique()))
                from craft.annotate.schema import find_forbidden

                assert find_forbidden({"p": text}, banned) is None, text
        checklists = json.loads((out / "checklists.json").read_text())
        assert sorted(checklists) == sorted(manifest["label"].unique())
        if modality == "cxr":
            card = df[df["label"] == "cardiomegaly"]["enriched_prompt"]
            assert card.str.contains("enlarged cardiac silhouette").all()
            nf = df[df["label"] == "no_finding"]["enriched_prompt"]
            assert nf.str.contains("lung fields: clear; sharp costophrenic angles").all()
            # the measured effusion side agrees with the generator's ground truth
            eff = df[df["label"] == "pleural_effusion"]
            truth = eff["attributes"].map(lambda a: json.loads(a)["effusion_side"])
            said = eff["enriched_prompt"].str.extract(r"blunted (right|left|bilateral) costophrenic")[0]
            assert (said == truth).mean() >= 0.75, list(zip(said, truth))
            # measured cardiothoracic ratio tracks the true one on non-effusion images
            rest = df[df["label"].isin(["no_finding", "cardiomegaly"])]
            ctr = rest["enriched_prompt"].str.extract(r"Heart (\d+)% of chest width")[0].astype(float)
            true = rest["attributes"].map(lambda a: json.loads(a)["ctr"])
            assert np.corrcoef(ctr, true)[0, 1] > 0.7
        else:
            muc = df[df["label"] == "mucinous_carcinoma"]["enriched_prompt"]
            assert muc.str.contains("extracellular mucin lakes").all()
            mucin = df["enriched_prompt"].str.extract(r"pale mucin (\d+)%")[0].astype(float)
            true = df["attributes"].map(lambda a: json.loads(a)["mucin_fraction"])
            assert np.corrcoef(mucin, true)[0, 1] > 0.8
            lumen = df["enriched_prompt"].str.extract(r"open lumina (\d+)%")[0].astype(float)
            assert lumen[df["label"] == "normal"].mean() > lumen[df["label"] == "adenocarcinoma"].mean()


def test_config_refuses_bad_settings():
    from craft.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="model is required"):
        from_dict(AnnotateConfig, {"backend": "openai"}, where="annotate")
    with pytest.raises(ConfigError, match="NAME of an environment variable"):
        from_dict(AnnotateConfig, {"api_key_env": "sk-abc-123"}, where="annotate")
    with pytest.raises(ConfigError, match="concurrency"):
        from_dict(AnnotateConfig, {"concurrency": 0}, where="annotate")


# ----------------------------------------------------------------------------- profile, CLI, component
def test_demo_profiles_annotate_offline_through_the_cli(demo_dirs, tmp_path):
    from typer.testing import CliRunner

    from craft.cli import app
    from craft.config import load_stage_config

    for m in ("histo", "cxr"):
        cfg = load_stage_config("annotate", f"demo-{m}", ["annotate.limit=5"])
        assert cfg.backend == "offline" and cfg.checklist == f"demo-{m}" and cfg.limit == 5
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["annotate", str(demo_dirs["cxr"]), "--out", str(out), "-c", "demo-cxr", "limit=4"])
    assert r.exit_code == 0, r.output
    assert "done 4, failed 0" in r.output and len(read(out)) == 4


def test_component_is_a_thin_cpu_component():
    from components.annotate import annotate_op
    from components.images import CPU_IMAGE

    spec = annotate_op.component_spec
    assert set(spec.inputs) == {"dataset", "profile", "overrides", "dataset_version"} and set(spec.outputs) == {
        "annotations",
        "metrics",
    }
    assert spec.implementation.container.image == CPU_IMAGE
    assert "annotate_step" in " ".join(spec.implementation.container.command)


# ----------------------------------------------------------------------------- local transformers VLM
def _tiny_llava(path: Path) -> Path:
    """A randomly initialised, few-kB LLaVA (CLIP vision tower + Llama) with a processor, built offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([valid_answer("no_finding")] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=8192,
    )
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=fast.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return _tiny_llava(tmp_path_factory.mktemp("vlm") / "tiny-llava")


def test_transformers_backend_runs_a_local_vlm_and_refuses_its_noise(tiny_vlm, cxr_small, tmp_path):
    """The random model's answer goes through the real processor, generate and decode, and fails validation."""
    cfg = AnnotateConfig(backend="transformers", model=str(tiny_vlm), limit=2, max_attempts=1, max_tokens=6)
    cfg.progress = False
    summary = main(cfg, cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 2 and summary["requests"] == 2 and summary["prompt_tokens"] > 2 * 100
    assert df["enriched_prompt"].isna().all() and df["error"].str.contains("JSON").all()
    assert (df["model"] == str(tiny_vlm)).all()


def test_transformers_backend_keeps_a_valid_answer(tiny_vlm, cxr_small, tmp_path, monkeypatch):
    """Same model with generate() injected to emit a valid schema answer for the label named in the prompt."""
    import re

    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_vlm, local_files_only=True)
    seen = []

    def fake_generate(self, input_ids=None, pixel_values=None, **kw):
        import torch

        seen.append(tuple(pixel_values.shape))
        label = re.search(r"\(label '([a-z_]+)'\)", tok.decode(input_ids[0])).group(1)
        answer = torch.tensor([tok.encode(valid_answer(label), add_special_tokens=False)])
        return torch.cat([input_ids, answer], dim=1)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", fake_generate)
    cfg = AnnotateConfig(backend="transformers", model=str(tiny_vlm), limit=4, progress=False)
    summary = main(cfg, cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["done"] == 4 and (df["status"] == "ok").all()
    assert seen and all(s[0] == 1 and s[-2:] == (32, 32) for s in seen)  # the image reached the model
    card = df[df["label"] == "cardiomegaly"]["enriched_prompt"]
    assert card.str.contains("enlarged cardiac silhouette").all()


def test_transformers_backend_shows_several_images_in_one_message(tiny_vlm, cxr_small, monkeypatch):
    """Two labelled images in one chat: the real processor and generate run; the model gets both, in order."""
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from craft.annotate.backends import TransformersBackend

    manifest = pd.read_parquet(cxr_small / "manifest.parquet")
    paths = [cxr_small / p for p in manifest["image_path"].iloc[:2]]
    backend = TransformersBackend(tiny_vlm, max_new_tokens=3)
    c = backend.chat("Which image is better?", images=paths, image_labels=["Image A:", "Image B:"])
    assert c.prompt_tokens > 2 * 16 and 1 <= c.completion_tokens <= 3  # two images' worth of tokens went in
    seen = []
    real = LlavaForConditionalGeneration.generate

    def spy(self, input_ids=None, pixel_values=None, **kw):
        seen.append((backend.processor.decode(input_ids[0]), pixel_values.clone()))
        return real(self, input_ids=input_ids, pixel_values=pixel_values, **kw)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", spy)
    backend.chat("Which image is better?", images=paths[::-1], image_labels=["Image A:", "Image B:"])
    text, pix = seen[0]
    assert text.index("Which image") < text.index("Image A:") < text.index("Image B:")
    one = [backend.processor.image_processor(Image.open(p).convert("RGB"), return_tensors="pt") for p in paths]
    assert (
        pix.shape[0] == 2
        and torch.equal(pix[0], one[1].pixel_values[0])
        and torch.equal(pix[1], one[0].pixel_values[0])
    )


def test_transformers_backend_as_the_pairwise_judge(tiny_vlm, cxr_small, tmp_path, monkeypatch):
    """DPO's pairwise judge on the local VLM: one generate sees both images; its answer is parsed strictly."""
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from craft.annotate.backends import TransformersBackend
    from craft.evaluate import preferences as P

    tok = PreTrainedTokenizerFast.from_pretrained(tiny_vlm, local_files_only=True)
    answers, seen = ['{"choice": "B"}', '{"choice": "B", "reason": "blunted right angle"}'], []

    def fake_generate(self, input_ids=None, pixel_values=None, **kw):
        seen.append(pixel_values.shape[0])
        return torch.cat([input_ids, torch.tensor([tok.encode(answers[len(seen) - 1], add_special_tokens=False)])], 1)

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", fake_generate)
    manifest = pd.read_parquet(cxr_small / "manifest.parquet")
    ims = [Image.open(cxr_small / p) for p in manifest["image_path"].iloc[:2]]
    checklists = json.loads(ck.shipped_path("demo-cxr").read_text())
    judge = P.mllm_pair_judge(TransformersBackend(tiny_vlm), checklists, "cxr", tmp_path / "j")
    assert judge(P.Case("pair-0", "pleural_effusion", "fluid", {"A": ims[0], "B": ims[1]})) == ["B", "A"]
    assert seen == [2, 2] and judge.decisions[0]["attempts"] == 2  # the reasonless answer was asked again
    assert judge.decisions[0]["reason"] == "blunted right angle" and judge.decisions[0]["backend"] == "transformers"


def test_slow_server_times_out_and_is_recorded_failed(cxr_small, tmp_path):
    with ScriptedServer(latency_s=0.6) as srv:
        summary = main(cfg_for(srv, limit=1, timeout_s=0.15, max_retries=1), cxr_small, tmp_path / "o")
    df = read(tmp_path / "o")
    assert summary["failed"] == 1 and len(srv.seen) == 2
    assert "gave up after 2 requests: timeout" in df["error"].iloc[0]


def test_the_image_bytes_reach_the_server_unchanged(cxr_small, tmp_path):
    import base64

    with ScriptedServer() as srv:
        main(cfg_for(srv, limit=1), cxr_small, tmp_path / "o")
    url = srv.seen[0].body["messages"][-1]["content"][1]["image_url"]["url"]
    manifest = pd.read_parquet(cxr_small / "manifest.parquet")
    first = cxr_small / manifest["image_path"].iloc[0]
    assert base64.b64decode(url.split(",", 1)[1]) == first.read_bytes()


def test_cost_cap_stops_new_requests_and_a_rerun_finishes(cxr_small, tmp_path):
    out = tmp_path / "o"
    # each answer costs 100 * 2.5e-6 + 50 * 1e-5 = 0.00075 USD; a cap of 0.0029 allows 4 answers
    with ScriptedServer() as srv:
        s1 = main(cfg_for(srv, concurrency=1, max_cost_usd=0.0029), cxr_small, out)
    assert s1["done"] == 4 and s1["not_started_budget"] == 28 and len(srv.seen) == 4
    with ScriptedServer() as srv2:
        s2 = main(cfg_for(srv2), cxr_small, out)
    assert s2["skipped"] == 4 and s2["done"] == 28 and (read(out)["status"] == "ok").all()


def test_parts_are_compacted_during_a_long_run(cxr_small, tmp_path, monkeypatch):
    import craft.annotate.run as run_mod

    calls, reads = [], []
    real, real_read = run_mod.compact, run_mod.pd.read_parquet
    monkeypatch.setattr(
        run_mod, "compact", lambda out_dir, order, known=None: calls.append(1) or real(out_dir, order, known)
    )
    monkeypatch.setattr(
        run_mod.pd, "read_parquet", lambda p, *a, **k: reads.append(Path(p).name) or real_read(p, *a, **k)
    )
    with ScriptedServer() as srv:
        main(cfg_for(srv, batch_size=1, compact_every_parts=10), cxr_small, tmp_path / "o")
    assert len(calls) == 3 + 1  # after 10, 20, 30 parts, and the final merge
    # the merges use the frames this run wrote; only the merged file is read back (once per merge after the first)
    assert not [r for r in reads if r.startswith("part-")] and reads.count("annotations.parquet") <= 4
    monkeypatch.setattr(run_mod.pd, "read_parquet", real_read)
    assert len(read(tmp_path / "o")) == 32 and not list((tmp_path / "o" / "parts").glob("*"))


def test_instruction_offers_only_values_the_label_may_take():
    from craft.annotate.run import instruction
    from craft.data.manifest import DatasetMeta

    meta = DatasetMeta(name="t", modality="cxr", classes=list(VALID))
    system, _ = instruction(meta, "no_finding")
    offered = json.loads(system[system.index("{") : system.rindex("}") + 1])
    assert offered["lung_fields"] == "one of: clear" and "opacity" not in offered["key_findings"]
    assert "meniscus" not in offered["key_findings"] and "sharp_hemidiaphragms" in offered["key_findings"]
    system, _ = instruction(meta, "pneumonia")
    offered = json.loads(system[system.index("{") : system.rindex("}") + 1])
    assert "clear" not in offered["lung_fields"] and "patchy_opacity" in offered["lung_fields"]
