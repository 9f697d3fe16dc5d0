"""The over-optimisation curve, evaluation side (issue 21): a reward adapter trained with ``reward.monitor`` is traced
step by step by the evaluate stage (evaluator CAS, oracle accuracy at every snapshot) and the report plots it.

Runs the real reward stage (continuing a TI+LoRA adapter as the demo does; 2 steps, a reading at every step:
snapshots at steps 0, 1, 2) and the real evaluate stage on the tiny reward-side world. Two anchors tie the curve
to the stage's own numbers: the step-0 snapshot is the TI+LoRA start sampled on the stage's noise with its class
tokens, so its CAS and oracle accuracy equal the ti_lora variant's; the adapter the reward stage saved is the
selected snapshot, so the curve at the selected step equals the CRAFT variant's.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from craft.evaluate import run as ev


def ti_lora_start(base, data, out):
    """A TI+LoRA adapter to continue (the demo's ``pipeline.craft_start``): one token per class at its phrase's
    embedding, a fresh LoRA (B = 0). Its snapshots carry the tokens but not adapter.json's class -> token map."""
    from craft.data.manifest import read_meta
    from craft.models.diffusion import load_pipeline
    from craft.train.baselines import add_class_tokens
    from craft.train.reward import LoraSettings, add_lora, save_adapters

    pipe = load_pipeline(base)
    tokens = {c: f"<tok-{i}>" for i, c in enumerate(read_meta(data).classes)}
    ids = add_class_tokens(pipe.tokenizer, pipe.text_encoder, {t: c for c, t in tokens.items()})
    table = pipe.text_encoder.get_input_embeddings().weight
    embeds = {t: table[i].detach().clone() for t, i in zip(sorted(tokens.values()), ids)}
    lora = LoraSettings(rank=2, alpha=2.0)
    add_lora(pipe.unet, lora)
    return save_adapters(out, unet=pipe.unet, lora=lora, embeddings=embeds, info={"class_tokens": tokens})


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    from craft.config import load_stage_config
    from craft.train import probe, reward
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("curve")
    w = reward_world(tmp, evaluator=True)
    probe.main(load_stage_config("probe", None, ["epochs=2"]), tmp / "evaluator", w["data"], tmp / "eval_probe")
    small = ["loop.steps=2", "loop.batch_size=2", "loop.threads=2", "loop.progress=false", "sample_steps=2",
             "loop.lr=0.05", "monitor.every=1", "monitor.prompts=2", "monitor.samples_per_prompt=1",
             "monitor.views=1"]  # fmt: skip  # a large lr: the snapshots' images differ visibly
    start = ti_lora_start(w["base"], w["data"], tmp / "ti_lora")
    reward.main(load_stage_config("reward", None, small), w["data"], w["ann"], w["critic"], w["probe"], w["base"],
                tmp / "craft", start_dir=start)  # fmt: skip
    cfg = ev.EvaluateConfig(candidate="craft", max_prompts=4, samples_per_prompt=1, steps=2, guidance=2.0, batch_size=8,
                            grid_per_class=1)  # fmt: skip
    cfg.memorization.enabled = cfg.downstream.enabled = cfg.preferences.enabled = False
    # wiring: thresholds no tiny oracle can fail, so it scores (tests/test_oracle_calibration.py checks refusals)
    cfg.oracle = ev.OracleSettings(n=64, epochs=1, n_check=16, min_accuracy=None, cache_dir=str(tmp / "oracle"),
                                   calibration=ev.CalibrationThresholds(0.0, 0.0, 1.0))  # fmt: skip
    cfg.curves = ev.CurveSettings(prompts=1000, samples_per_prompt=1)  # every held-out prompt: comparable to variants
    cfg.validate()
    variants = {"ti_lora": ev.VariantSpec(str(w["base"]), str(start)),
                "craft": ev.VariantSpec(str(w["base"]), str(tmp / "craft"))}  # fmt: skip
    out = tmp / "eval"
    ev.main(cfg, w["data"], w["ann"], variants, tmp / "evaluator", tmp / "eval_probe", out)
    return tmp, out, w, cfg


def test_every_reading_becomes_a_curve_row_scored_by_the_evaluator_and_the_oracle(traced):
    from craft.train.monitor import read_log

    tmp, out, _, _ = traced
    log = read_log(tmp / "craft")
    assert [r["step"] for r in log] == [0, 1, 2]  # the start and one reading per step
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["curves"]) == {"craft"}  # the TI+LoRA adapter has no monitor log: no curve
    curve = m["curves"]["craft"]
    assert [r["step"] for r in curve] == [r["step"] for r in log]  # one row per reading, none dropped
    for reading, row in zip(log, curve):
        assert {k: row[k] for k in reading} == reading  # every monitor field carried over as recorded
        assert math.isfinite(row["evaluator_cas"]) and 0.0 <= row["oracle_accuracy"] <= 1.0, row
        assert 0.0 <= row["evaluator_low_alignment_rate"] <= 1.0
    info = m["curves_meta"]["craft"]
    lineage = json.loads((tmp / "craft" / "lineage.json").read_text())["monitor"]
    assert info["select"] == "last" and info["selected_step"] == lineage["selected_step"] == 2
    assert info["oracle"] == "scored" and info["prompts"] == m["protocol"]["n_prompts"]

    # step 0 is the TI+LoRA start on the stage's own noise and class tokens: the ti_lora variant's numbers
    base = m["variants"]["ti_lora"]
    assert curve[0]["evaluator_cas"] == pytest.approx(base["cas"], abs=1e-9)
    assert curve[0]["oracle_accuracy"] == pytest.approx(base["oracle_accuracy"], abs=1e-9)
    # the saved adapter is the selected snapshot: the curve there is the CRAFT variant's evaluation
    at = next(r for r in curve if r["step"] == info["selected_step"])
    assert at["evaluator_cas"] == pytest.approx(m["variants"]["craft"]["cas"], abs=1e-9)
    assert at["oracle_accuracy"] == pytest.approx(m["variants"]["craft"]["oracle_accuracy"], abs=1e-9)
    # and the two ends are different weights: one adapter sampled for every row would make them equal
    assert abs(curve[-1]["evaluator_cas"] - curve[0]["evaluator_cas"]) > 1e-4, curve


def test_the_report_plots_and_tabulates_the_curve(traced):
    _, out, _, _ = traced
    html = (out / "report.html").read_text()
    fig = html.index("<h2>Over-optimisation curve: craft")
    assert 'alt="Over-optimisation curve: craft' in html[fig:] and "data:image/png;base64," in html[fig:]
    assert "top: training side, bottom: evaluator and oracle" in html
    tab = html.index("<h2>Over-optimisation curve, craft:")
    table = html[tab : html.index("</table>", tab)]
    assert "[training] critic reward" in table and "[evaluate] evaluator CAS" in table
    assert "[evaluate] oracle accuracy" in table and "selected" in table
    assert table.count("</tr>") == 1 + 3  # the header and one row per reading


def test_a_snapshot_named_by_the_log_but_missing_is_an_error_naming_it(traced, tmp_path):
    from craft.evaluate import curves as C
    from craft.train.monitor import read_log

    tmp, _, _, _ = traced
    copy = tmp_path / "craft"
    shutil.copytree(tmp / "craft", copy)
    shutil.rmtree(copy / "monitor" / "step-0000001")
    readings = read_log(copy)
    with pytest.raises(FileNotFoundError, match="step-0000001"):
        C.trace("craft", ev.VariantSpec("unused-base", str(copy)), readings[1:2], cases=None, real_emb=None,
                scorer=None, oracle=None, settings=ev.CurveSettings(), cfg=ev.EvaluateConfig(), meta=None, dev=None,
                work=tmp_path / "work", tau=None)  # fmt: skip


def test_without_a_scoring_oracle_the_evaluator_stays_and_the_oracle_is_null(traced, monkeypatch):
    """A refused (or absent) oracle nulls ``oracle_accuracy`` at every step; the evaluator's readings are unchanged.
    The snapshots' images come from the stage's sample cache (same key): nothing is sampled again."""
    from craft.evaluate import curves as C
    from craft.models.encoders import load_encoder, load_probe
    from craft.train.monitor import read_log

    tmp, out, w, cfg = traced
    m = json.loads((out / "metrics.json").read_text())

    def no_sampling(*a, **k):
        raise AssertionError("a snapshot was sampled again instead of read from the stage's cache")

    monkeypatch.setattr(C, "load_variant_pipeline", no_sampling)
    meta, test_all, checklists = ev.held_out_table(w["data"], w["ann"], cfg.split)
    sub = C.curve_cases(ev.stratified_cap(test_all, cfg.max_prompts, cfg.seed), cfg.curves.prompts, cfg.seed)
    enc = load_encoder(tmp / "evaluator")
    scorer = ev.Scorer(enc, load_probe(tmp / "eval_probe", enc), checklists, cfg.checklist_mode, cfg.embed_batch)
    real_emb = scorer.embed(ev.read_images(w["data"], sub, meta))
    rows, notes = C.trace("craft", ev.VariantSpec(str(w["base"]), str(tmp / "craft")), read_log(tmp / "craft"),
                          cases=sub, real_emb=real_emb, scorer=scorer, oracle=None, settings=cfg.curves, cfg=cfg,
                          meta=meta, dev=torch.device("cpu"), work=ev._work_dir(out), tau=m["real_p25"])  # fmt: skip
    assert [r["oracle_accuracy"] for r in rows] == [None, None, None] and notes == []
    stage = m["curves"]["craft"]
    assert [r["evaluator_cas"] for r in rows] == pytest.approx([r["evaluator_cas"] for r in stage], abs=1e-9)
