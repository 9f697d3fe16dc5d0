"""craft experiment paper-table: variant plan, aggregation over seeds, claims, RESULTS.md sections, a toy run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from craft import experiment as ex
from craft.losses import DEFAULT_REWARD_WEIGHTS


def test_table4_variants_carry_full_weight_mappings():
    v = ex.reward_variants(table4=True)
    assert len(v) == 10 and v["craft"] == DEFAULT_REWARD_WEIGHTS == v["craft_paper"]
    assert v["craft_only_dd"] == {"vdc": 0.0, "ccs": 0.0, "dd": DEFAULT_REWARD_WEIGHTS["dd"], "sfs": 0.0}
    assert v["craft_without_sfs"] == {**DEFAULT_REWARD_WEIGHTS, "sfs": 0.0}
    assert list(ex.reward_variants(table4=False)) == ["craft", "craft_paper"]
    # the overrides name every weight, so none is left to a default
    assert len(ex._weights_overrides(v["craft_only_vdc"])) == 4


def test_table4_seeds_limits_the_table4_variants_to_the_first_seeds(tmp_path):
    plan = ex.Plan("demo-histo", tmp_path, [0, 1, 2], [], table4=True, table4_seeds=1)
    assert [plan.table4_for(s) for s in plan.seeds] == [True, False, False]
    assert all(ex.Plan("demo-histo", tmp_path, [0, 1], []).table4_for(s) for s in (0, 1))
    assert not ex.Plan("demo-histo", tmp_path, [0, 1], [], table4=False, table4_seeds=2).table4_for(0)
    with pytest.raises(ValueError, match="table4_seeds"):
        ex.paper_table("demo-histo", 1, tmp_path, tmp_path / "R.md", table4_seeds=0)
    assert not ex.Plan("demo-histo", tmp_path, [2], [], table4_seeds=1).table4_for(2)  # seed 2 of a split run
    with pytest.raises(ValueError, match="first_seed"):
        ex.paper_table("demo-histo", 1, tmp_path, tmp_path / "R.md", first_seed=-1)
    with pytest.raises(ValueError, match="unknown remedy craft_nope; known: craft_monitored"):
        ex.paper_table("demo-histo", 1, tmp_path, tmp_path / "R.md", remedies=["craft_half_select", "craft_nope"])
    assert not list(tmp_path.iterdir())  # refused before any step ran


def _metrics(cas: dict[str, float], critic: dict[str, float], oracle: dict[str, float], rho: float) -> dict:
    return {
        "variants": {
            v: {
                "vdc": c,
                "ccs": c,
                "dd": c,
                "sfs": c,
                "cas": c,
                "low_alignment_rate": 1 - c,
                "cas_p10": c / 2,
                "oracle_accuracy": oracle[v],
                "fidelity": {"silhouette": c / 10},
                "critic_reward": {"total": critic[v], "weights": DEFAULT_REWARD_WEIGHTS},
            }
            for v, c in cas.items()
        },  # fmt: skip
        "oracle": {"cas_vs_oracle": {"spearman": rho}},
    }


def test_aggregate_mean_sd_and_paired_differences():
    seeds = {
        0: _metrics(
            {"ti_lora": 0.4, "craft": 0.5}, {"ti_lora": 1.0, "craft": 1.5}, {"ti_lora": 0.5, "craft": 0.5}, 0.2
        ),
        1: _metrics(
            {"ti_lora": 0.5, "craft": 0.4}, {"ti_lora": 1.0, "craft": 1.2}, {"ti_lora": 0.5, "craft": 0.5}, 0.4
        ),
    }
    agg = ex.aggregate(seeds)
    cell = agg["table"]["craft"]["cas"]
    assert cell["mean"] == pytest.approx(0.45) and cell["sd"] == pytest.approx(0.0707107, rel=1e-5)
    assert cell["per_seed"] == [0.5, 0.4] and cell["n"] == 2
    assert agg["cas_oracle_spearman"]["mean"] == pytest.approx(0.3)
    d = ex.paired_difference(agg, "craft", "ti_lora", "cas")
    assert d["per_seed"] == pytest.approx([0.1, -0.1]) and d["higher"] == 1 and d["lower"] == 1
    assert "MIXED (1 of 2" in ex._verdict(d, "claim")
    crit = ex.paired_difference(agg, "craft", "ti_lora", "critic_reward")
    assert crit["higher"] == 2 and "AGREES" in ex._verdict(crit, "claim")
    tail = ex.paired_difference(agg, "craft", "ti_lora", "low_alignment_rate")  # 1 - cas: lower in seed 0 only
    assert "MIXED" in ex._verdict(tail, "claim", higher_is_claim=False)
    tie = ex.paired_difference(agg, "craft", "ti_lora", "oracle_accuracy")
    assert "NOT SUPPORTED" in ex._verdict(tie, "claim")  # a tie never counts as agreement
    assert ex.paired_difference(agg, "craft", "dpo", "cas") is None


def test_results_md_sections_are_replaced_per_profile(tmp_path):
    md = tmp_path / "RESULTS.md"
    ex.write_section(md, "demo-histo", "## demo-histo\nold")
    ex.write_section(md, "demo-cxr", "## demo-cxr\ncxr")
    ex.write_section(md, "demo-histo", "## demo-histo\nnew")
    text = md.read_text()
    assert text.startswith("# Results") and "new" in text and "old" not in text and "cxr" in text
    assert text.index("demo-histo") < text.index("demo-cxr")  # a replaced section keeps its place


TOY = [
    "data.n=32", "pretrain.autoencoder.steps=1", "pretrain.loop.steps=1", "pretrain.sample_per_class=0",
    "finetune.loop.steps=1", "finetune.sample_per_class=0", "encoder.epochs=1", "probe.epochs=1",
    "reward.loop.steps=1", "reward.sample_steps=2", "ti.loop.steps=1", "ti_lora.loop.steps=1", "dpo.loop.steps=1",
    "dpo.n_pairs=2", "dpo.sample_steps=2", "evaluate.max_prompts=4", "evaluate.samples_per_prompt=1",
    "evaluate.steps=2", "evaluate.oracle.n=32", "evaluate.oracle.epochs=1", "evaluate.oracle.n_check=8",
    "evaluate.oracle.min_accuracy=null", "evaluate.preferences.bootstrap=5", "evaluate.memorization.enabled=false",
]  # fmt: skip


def test_toy_paper_table_end_to_end_and_resume(tmp_path, monkeypatch):
    """One seed, no Table 4: every step runs, RESULTS.md has the tables, a rerun reuses every finished step. The
    CRAFT row is CRAFT as the profile ships it (demo-histo: half of the update), the paper's method beside it."""
    monkeypatch.setenv("CRAFT_MODEL_CACHE", str(tmp_path / "cache"))
    md = tmp_path / "RESULTS.md"
    res = ex.paper_table("demo-histo", 1, tmp_path / "run", md, TOY, table4=False)
    table = res["aggregate"]["table"]
    assert set(table) == {"real", "zero_shot", "crafts_no_losses", "ti", "ti_lora", "ti_lora_enriched", "dpo",
                          "craft", "craft_paper"}  # fmt: skip
    assert table["craft"]["critic_reward"]["n"] == 1 and table["craft"]["cas"]["mean"] is not None
    scale = {v: json.loads((tmp_path / "run" / "seed-0" / v / "lineage.json").read_text())["config"]["update_scale"]
             for v in ("craft", "craft_paper")}  # fmt: skip
    assert scale == {"craft": 0.5, "craft_paper": 1.0}
    assert not (tmp_path / "run" / "shared" / "referee").exists()  # demo-histo's CRAFT is not monitored
    assert set(res["aggregate"]["paired"][0]) == {"craft", "craft_paper"}  # each against TI+LoRA, with intervals
    text = md.read_text()
    for heading in ("Table 1 shape", "Table 2 shape", "Table 14 shape", "CRAFTS: class separability",
                    "Against the papers' claims", "CRAFT against TI+LoRA, seed by seed"):  # fmt: skip
        assert heading in text, heading
    assert "Table 4 shape" not in text  # not trained
    assert text.count("CRAFT >= TI+LoRA on CAS and oracle") == 2
    assert "| CRAFT, the paper's settings (whole update, last step) |" in text
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["seeds"] == [0] and saved["aggregate"]["table"]["craft"]["cas"]["n"] == 1
    marker = tmp_path / "run" / "seed-0" / "craft" / ex.DONE
    before = marker.stat().st_mtime_ns
    again = ex.paper_table("demo-histo", 1, tmp_path / "run", md, TOY, table4=False)  # resumes: nothing retrained
    assert marker.stat().st_mtime_ns == before
    assert again["aggregate"]["table"]["craft"]["cas"] == table["craft"]["cas"]
    # a root from before the CRAFT row became the profile's setting: its "craft" kept the whole update; reusing it
    # under the new label is refused, naming the folder and the setting
    lineage = tmp_path / "run" / "seed-0" / "craft" / "lineage.json"
    old = json.loads(lineage.read_text())
    old["config"]["update_scale"] = 1.0
    lineage.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"seed-0/craft: finished with other settings than its row: "
                                         r"reward.update_scale=1.0 \(this row needs 0.5\)"):  # fmt: skip
        ex.paper_table("demo-histo", 1, tmp_path / "run", md, TOY, table4=False)


@pytest.mark.slow  # ~3.5 min on 2 quiet cores (8 reward runs, 3 evaluations, a referee, 2 more critics)
def test_toy_paper_table_with_the_reward_hacking_remedies(tmp_path, monkeypatch):
    """--remedies: a referee is trained, every remedy is monitored and evaluated (with its curve), and RESULTS.md gets
    the remedies table with a seed-by-seed verdict against TI+LoRA and one curve table per remedy."""
    monkeypatch.setenv("CRAFT_MODEL_CACHE", str(tmp_path / "cache"))
    md = tmp_path / "RESULTS.md"
    toy = [*TOY, "reward.monitor.prompts=4", "reward.monitor.samples_per_prompt=1", "evaluate.curves.prompts=4"]
    # first without the ensemble remedy, as a run root evaluated before that remedy existed ...
    monkeypatch.setattr(ex, "REMEDIES", {k: v for k, v in ex.REMEDIES.items() if k != "craft_ensemble"})
    ex.paper_table("demo-histo", 1, tmp_path / "run", md, toy, table4=False, crafts_ablation=False, remedies=True)
    monkeypatch.undo()
    monkeypatch.setenv("CRAFT_MODEL_CACHE", str(tmp_path / "cache"))
    # ... then with it: the finished steps are reused, the new remedy trains and gets its own evaluation
    res = ex.paper_table("demo-histo", 1, tmp_path / "run", md, toy, table4=False, crafts_ablation=False,
                         remedies=True)  # fmt: skip
    assert (tmp_path / "run" / "seed-0" / "eval-craft_ensemble" / ex.DONE).is_file()
    ens = json.loads((tmp_path / "run" / "seed-0" / "craft_ensemble" / "lineage.json").read_text())
    assert [Path(e).name for e, _ in ens["ensemble"]] == ["critic-1", "critic-2"]
    assert len(set(ens["ensemble_identities"])) == 2
    table = res["aggregate"]["table"]
    assert set(ex.REMEDIES) <= set(table) and table["craft_combined"]["cas"]["mean"] is not None
    assert (tmp_path / "run" / "shared" / "referee" / ex.DONE).is_file()
    lineage = json.loads((tmp_path / "run" / "seed-0" / "craft_combined" / "lineage.json").read_text())
    assert lineage["monitor"]["select"] == "referee" and lineage["config"]["augment"]["views"] == 4
    assert lineage["config"]["diffusion_weight"] == 4.0
    curves = res["aggregate"]["curves"]
    assert set(curves) == set(ex.REMEDIES) and all(len(c) == 2 for c in curves.values())  # steps 0 and 1
    text = md.read_text()
    assert "Reward hacking: CRAFT against TI+LoRA" in text and "Over-optimisation curve, CRAFT + views" in text
    assert text.count("CRAFT >= TI+LoRA on CAS and oracle") == 2 + len(ex.REMEDIES)
    # more samples per prompt on the finished run (the toy tables draw 1): the tables' samples are among them, the
    # paired intervals follow
    import pandas as pd

    more = ex.reevaluate("demo-histo", tmp_path / "run", [0], ["craft_half_update"], 3, toy)
    old = pd.read_parquet(tmp_path / "run" / "seed-0" / "eval" / "per_image.parquet")
    a = old[old["variant"] == "ti_lora"].set_index(["image_id", "sample"])["cas"]
    assert more[0]["n"]["ti_lora"] == 3 * len(a) and set(more[0]["paired"]) == {"craft_half_update"}
    x3 = pd.read_parquet(tmp_path / "run" / "seed-0" / "eval-x3" / "per_image.parquet")
    b = x3[x3["variant"] == "ti_lora"].set_index(["image_id", "sample"])["cas"]
    assert (a - b.reindex(a.index)).abs().max() < 1e-6
    assert "Re-evaluated with 3 samples" in ex.reevaluate_markdown(more, 3)
    with pytest.raises(FileNotFoundError, match="no finished variant 'nope'"):
        ex.reevaluate("demo-histo", tmp_path / "run", [0], ["nope"], 3, toy)


@pytest.mark.slow  # a toy paper-table seed first (~1 min quiet), then two DPO runs
def test_tune_dpo_reads_its_own_objective_per_setting(tmp_path, monkeypatch):
    """tune-dpo on a finished toy seed: one DPO per setting, each with held-out and training-pair DPO numbers; a seed
    that has not finished is refused with the command that finishes it."""
    monkeypatch.setenv("CRAFT_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="--first-seed 0 --seeds 1"):
        ex.tune_dpo("demo-histo", tmp_path / "run", 0, TOY)
    ex.paper_table("demo-histo", 1, tmp_path / "run", tmp_path / "R.md", TOY, table4=False, crafts_ablation=False)
    grid = {"profile": [], "lr": ["dpo.loop.lr=0.05", "dpo.loop.steps=3"]}
    rows = ex.tune_dpo("demo-histo", tmp_path / "run", 0, TOY, heldout_pairs=2, grid=grid)
    assert [r["setting"] for r in rows] == ["profile", "lr"]
    assert all(isinstance(r["heldout_dpo_loss"], float) and 0 <= r["heldout_implicit_acc"] <= 1 for r in rows)
    assert rows[1]["train_pairs_dpo_loss"] != rows[0]["train_pairs_dpo_loss"]  # the settings trained differently
    assert json.loads((tmp_path / "run" / "dpo-tune-seed-0.json").read_text()) == rows
    assert "| lr | dpo.loop.lr=0.05 dpo.loop.steps=3 |" in ex.dpo_tune_markdown(rows)


def test_table4_reading_column_by_column():
    """Each reward's own column: the single-reward variant of k scores highest on k, leave-one-out of k lowest."""

    def seed(flip: bool) -> dict:
        variants = {"ti_lora": {k: 0.1 for k in ex.REWARDS}}
        for k in ex.REWARDS:
            variants[f"craft_only_{k}"] = {j: (0.5 if j == k else 0.2) for j in ex.REWARDS}
            variants[f"craft_without_{k}"] = {j: (0.1 if j == k else 0.4) for j in ex.REWARDS}
        if flip:  # in this seed the CCS-only LoRA scores highest on VDC
            variants["craft_only_ccs"]["vdc"] = 0.9
        return {"variants": variants, "oracle": {}}

    agg = ex.aggregate({0: seed(False), 1: seed(True)})
    lines = ex.table4_reading(agg)
    vdc_only, vdc_loo, vdc_diff = lines[0], lines[1], lines[2]
    assert "highest VDC" in vdc_only and "MIXED (1 of 2 seeds)" in vdc_only and "CRAFT, CCS only" in vdc_only
    assert "lowest VDC" in vdc_loo and "AGREES (every seed)" in vdc_loo
    assert "+0.400" in vdc_diff and "higher in 2 of 2" in vdc_diff
    assert "highest DD — here: AGREES" in lines[6]
    assert ex.table4_reading(ex.aggregate({0: {"variants": {"craft": {"vdc": 0.1}}, "oracle": {}}}))[0].endswith(
        "not measured here"
    )
    # a third seed without the Table 4 variants (--table4-seeds 2): the section says which rows have fewer seeds
    third = {"variants": {v: d for v, d in seed(False)["variants"].items() if v == "ti_lora"}, "oracle": {}}
    agg3 = ex.aggregate({0: seed(False), 1: seed(True), 2: third})
    assert agg3["table"]["craft_only_vdc"]["vdc"]["n"] == 2 and agg3["table"]["ti_lora"]["vdc"]["n"] == 3
    # only seeds that have every variant are read; the others show as n/a
    assert [x.split("; per seed")[0] for x in ex.table4_reading(agg3)] == [x.split("; per seed")[0] for x in lines]
    assert ex.table4_reading(agg3, [0, 1, 2])[0].endswith("seed 0: CRAFT, VDC only; seed 1: CRAFT, CCS only")
    info = {"machine": "m", "finished": "f", "wall_seconds": 60.0, "command": "c", "n_prompts": 4,
            "samples_per_prompt": 1}  # fmt: skip
    md = ex.render_markdown({"profile": "demo-histo", "seeds": [0, 1, 2], "aggregate": agg3, "info": info,
                             "timings": {}})  # fmt: skip
    assert "Table 4 shape" in md and "trained for seed(s) 0, 1 only" in md and "highest VDC" in md
    # that table compares like for like: TI+LoRA over the same two seeds as the Table 4 rows
    t4 = md.split("Table 4 shape")[1].split("###")[0]
    assert "| TI+LoRA | 0.100 ± 0.000 |" in t4 and "| CRAFT, VDC only | 0.500 ± 0.000 |" in t4
    assert ex.restrict(agg3, [0, 1])["table"]["ti_lora"]["vdc"]["n"] == 2


def test_run_step_waits_for_another_process_training_the_same_step(tmp_path):
    """--first-seed runs share a root: a step another process is training is waited for and reused, not redone."""
    import fcntl
    import threading

    step = tmp_path / "seed-0" / "craft"
    step.parent.mkdir(parents=True)
    calls, timings = [], {}
    with open(step.parent / ".craft.lock", "w") as held:  # "the other process" holds the step
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(
            target=lambda: timings.update(got=ex.run_step(step, lambda: calls.append(1), {}, "craft"))
        )
        t.start()
        t.join(0.5)
        assert t.is_alive() and not calls  # waiting on the lock, not training
        ex.atomic_write_json(step / ex.DONE, {"step": "craft", "seconds": 7.0, "metrics": {"cas": 0.5}})
    t.join(5)
    assert not t.is_alive() and not calls and timings["got"]["metrics"] == {"cas": 0.5}
    assert ex.run_step(tmp_path / "fresh", lambda: {"x": 1}, timings, "fresh")["metrics"] == {"x": 1}
    assert timings["fresh"] >= 0


def test_paired_bootstrap_pairs_by_prompt_and_sample_and_flags_clear_failures():
    """The remedies' per-seed intervals: differences paired by (prompt, sample) against TI+LoRA, a bootstrap over the
    prompts, and a failure called clear only when its whole interval lies on the wrong side."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = [{"variant": "real", "image_id": f"r{i}", "sample": 0, "cas": c, "oracle_correct": 1.0}
            for i, c in enumerate(np.linspace(0.4, 0.8, 8))]  # P25 = 0.5  # fmt: skip
    base = rng.uniform(0.3, 0.7, size=(16, 2))
    for v, shift, flip in (("ti_lora", 0.0, 0), ("up", 0.1, 0), ("down", -0.3, 1), ("mixed", 0.0, 0)):
        for i in range(16):
            for k in range(2):
                cas = base[i, k] + shift + (rng.normal(0, 0.2) if v == "mixed" else 0.0)
                rows.append({"variant": v, "image_id": f"p{i}", "sample": k, "cas": cas,
                             "oracle_correct": float((i + k) % 2 == 0) if not flip else 0.0})  # fmt: skip
    df = pd.DataFrame(rows)
    twice = pd.concat([df, df[df["variant"] == "up"]], ignore_index=True)  # scored by two evaluations: counted once
    p = ex.paired_bootstrap(twice, ["up", "down", "mixed", "absent"], n_boot=500)
    assert "absent" not in p
    up = p["up"]["cas"]
    assert up["diff"] == pytest.approx(0.1) and up["lo"] == pytest.approx(0.1) and up["hi"] == pytest.approx(0.1)
    assert up["n"] == 32 and p["up"]["oracle_accuracy"]["diff"] == 0.0
    down = p["down"]
    assert down["oracle_accuracy"]["diff"] == pytest.approx(-0.5) and down["oracle_accuracy"]["hi"] < 0
    assert down["low_alignment_rate"]["lo"] > 0  # everything fell below the real P25
    mixed = p["mixed"]["cas"]
    assert mixed["lo"] < mixed["diff"] < mixed["hi"] and mixed["hi"] - mixed["lo"] > 0.05
    no_oracle = ex.paired_bootstrap(df.drop(columns="oracle_correct"), ["up"], n_boot=50)["up"]
    assert set(no_oracle) == {"cas", "low_alignment_rate"}
    lines = ex._paired_lines({0: p, 1: {"up": p["up"]}}, "down")
    assert "outside the interval in 1 of 1 seeds" in lines[0] and lines[1].startswith("    - seed 0: CAS -0.300")
    assert "outside the interval in 0 of 2 seeds, inside it" in ex._paired_lines({0: p, 1: p}, "up")[0]


def test_table_crafts_are_the_profiles_and_the_papers():
    """The tables' "craft" row is what the profile's users get (half of the update, demo-cxr's of the last reading whose
    gain holds across views: reward.update_scale, reward.monitor); PAPER (the "craft_paper" row, Table 4 and the remedies' base) keeps the whole
    LoRA update of the last step; the remedies keep what they name; a user's override still wins."""
    from craft.config import load_stage_config

    for prof, select in (("demo-cxr", "held"), ("demo-histo", "last")):
        users = load_stage_config("reward", prof, [])
        assert (users.update_scale, users.monitor.select) == (0.5, select)
        assert users.monitor.enabled == (select != "last")
        paper = load_stage_config("reward", prof, [*ex.PAPER])
        assert paper.update_scale == 1.0 and paper.monitor.select == "last" and not paper.monitor.enabled
        half = load_stage_config("reward", prof, [*ex.PAPER, *ex.MONITORED, *ex.REMEDIES["craft_half_update"]])
        assert (half.update_scale, half.monitor.select) == (0.5, "last") and half.monitor.enabled
        both = load_stage_config("reward", prof, [*ex.PAPER, *ex.MONITORED, *ex.REMEDIES["craft_half_select"]])
        assert (both.update_scale, both.monitor.select) == (0.5, "referee")
        assert load_stage_config("reward", prof, [*ex.PAPER, "reward.update_scale=0.7"]).update_scale == 0.7


def test_remedy_curves_from_one_trajectory_are_printed_once():
    """A remedy that only changes which weights are saved (the referee's choice, the half update) has its base run's
    readings: the section says so instead of repeating the table; float noise below 1e-4 still counts as the same."""
    cell = lambda m: {"mean": m, "sd": 0.0, "n": 1, "per_seed": [m]}  # noqa: E731
    base = {0: {"critic_reward": cell(1.0)}, 25: {"critic_reward": cell(1.5)}}
    near = {0: {"critic_reward": cell(1.0 + 5e-5)}, 25: {"critic_reward": cell(1.5)}}
    other = {0: {"critic_reward": cell(1.0)}, 25: {"critic_reward": cell(1.2)}}
    assert ex._same_curve(base, near) and not ex._same_curve(base, other) and not ex._same_curve(base, {0: base[0]})
    table = {v: {"cas": cell(0.5), "oracle_accuracy": cell(0.8), "low_alignment_rate": cell(0.5),
                 "critic_reward": cell(1.0)} for v in ("ti_lora", "craft", "craft_monitored", "craft_select",
                                                        "craft_views")}  # fmt: skip
    text = "\n".join(ex.remedies_section({"table": table, "curves": {"craft_monitored": base, "craft_select": near,
                                                                     "craft_views": other}}))  # fmt: skip
    assert text.count("| step |") == 2
    assert "CRAFT + checkpoint chosen by the referee: the same training trajectory as CRAFT, paper settings" in text


def test_the_curve_names_the_step_each_seed_kept():
    """A monitored row's curve says which reading each seed's selection kept (curves_meta's selected_step), so a
    reader sees where on the curve the shipped weights sit; the unheld gain (select=held) is one of its columns."""
    curve = [{"step": 0, "critic_reward": 1.0, "critic_views": 0.5, "critic_unheld": 0.0},
             {"step": 25, "critic_reward": 1.3, "critic_views": 0.5, "critic_unheld": 0.3}]  # fmt: skip
    seeds = {}
    for s, kept in ((0, 25), (1, 0)):
        variants = {v: {"cas": 0.5, "oracle_accuracy": 0.8, "low_alignment_rate": 0.5} for v in ("ti_lora", "craft")}
        seeds[s] = {"variants": variants, "curves": {"craft": curve},
                    "curves_meta": {"craft": {"select": "held", "selected_step": kept}}}  # fmt: skip
    agg = ex.aggregate(seeds)
    assert agg["kept"] == {"craft": {0: 25, 1: 0}}
    text = "\n".join(ex.remedies_section(agg))
    assert "The step its selection kept, per seed: seed 0: 25, seed 1: 0." in text
    assert " unheld gain |" in text and "| 25 | 1.300 ± 0.000 | 0.500 ± 0.000 | 0.300 ± 0.000 |" in text
    # a curve from before the monitor recorded the unheld gain: computed from its critic readings and step 0's
    old = [{k: v for k, v in r.items() if k != "critic_unheld"} for r in curve]
    old[1]["critic_views"] = 0.45
    again = ex.aggregate({0: {**seeds[0], "curves": {"craft": old}}})
    assert again["curves"]["craft"][25]["critic_unheld"]["mean"] == pytest.approx(0.35)
