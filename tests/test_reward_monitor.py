"""The reward stage's over-optimisation monitor (issue 21): held-out readings, snapshots, selection, early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from craft.train.monitor import MonitorConfig, RewardMonitor, holdout_rows, read_log


def test_holdout_rows_spread_over_the_classes_and_repeat():
    labels = ["a"] * 10 + ["b"] * 6 + ["c"] * 4
    rows = holdout_rows(labels, 6, seed=3)
    assert rows == holdout_rows(labels, 6, seed=3) and len(set(rows)) == 6
    assert sorted(labels[i] for i in rows) == ["a", "a", "b", "b", "c", "c"]
    assert holdout_rows(labels, 6, seed=4) != rows  # the seed picks which rows of each class
    with pytest.raises(ValueError, match="all 20 training rows"):
        holdout_rows(labels, 20, seed=0)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"select": "referee"}, "need readings"),
        ({"every": 5, "patience": 2}, "needs a signal"),
        ({"every": 5, "select": "views", "views": 0}, "views >= 1"),
        ({"every": 5, "select": "oracle"}, "last, critic, views, referee, held"),
        ({"every": 5, "select": "held", "views": 0}, "views >= 1"),
        ({"every": 5, "select": "held", "hold_tolerance": -0.1}, "hold_tolerance must be >= 0"),
    ],
)
def test_monitor_config_refuses_what_cannot_work(over, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**over).validate()


class _Objective(torch.nn.Module):
    """A stand-in for DraftObjective: one trainable tensor; 'images' are that tensor broadcast (read by the judges)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def sample_images(self, prompts, seed, per_prompt=1):
        return self.w.detach().expand(len(prompts) * per_prompt, 3, 8, 8).clone()


def _judge(curve):
    """A judge whose total reward is curve(w) (w = the objective's weight) and whose accuracy is 1."""

    def read(images, meta):
        w = float(images.flatten()[0]) if images.numel() else 0.0
        n = images.shape[0]
        return {"total": torch.full((n,), curve(w)), "acc": torch.ones(n), "vdc": torch.full((n,), w)}

    return read


def _run(tmp: Path, cfg: MonitorConfig, steps: int):
    from craft.train.reward import RewardAugment

    obj = _Objective()
    snaps = []
    mon = RewardMonitor(cfg, {"prompt": ["p1", "p2"], "label": ["a", "b"]}, _judge(lambda w: w),
                        _judge(lambda w: -((w - 2.0) ** 2)), RewardAugment(), tmp,
                        lambda d: (snaps.append(d.name), d.mkdir(parents=True, exist_ok=True)))  # fmt: skip
    stopped = None
    for step in range(steps + 1):
        with torch.no_grad():
            obj.w.fill_(float(step))  # "training": the weight grows by one per step
        if mon(obj, step):
            stopped = step
            break
    return mon, obj, snaps, stopped


def test_selection_picks_the_referee_peak_while_the_critic_keeps_climbing(tmp_path):
    # the critic rewards w without end; the referee's reward peaks at w = 2: reward hacking in miniature
    cfg = MonitorConfig(every=1, select="referee", views=0)
    mon, obj, snaps, stopped = _run(tmp_path, cfg, steps=5)
    assert stopped is None and [r["step"] for r in mon.rows] == [0, 1, 2, 3, 4, 5]
    assert [r["critic_reward"] for r in mon.rows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert snaps == [f"step-{s:07d}" for s in range(6)]
    best = mon.restore_selected(obj)
    assert best["step"] == 2 and float(obj.w.detach()) == 2.0  # the referee's best, not the critic's best (step 5)
    log = read_log(tmp_path)  # the log sits in monitor/ under the work dir, the layout the adapter carries
    assert log == mon.rows


def test_early_stopping_ends_after_patience_readings_without_improvement(tmp_path):
    cfg = MonitorConfig(every=1, select="referee", patience=2, views=0)
    mon, obj, _, stopped = _run(tmp_path, cfg, steps=10)
    assert stopped == 4 and mon.stopped_at == 4  # best at step 2, no gain at 3 and 4
    assert [r["stop"] for r in mon.rows] == [False, False, False, False, True]
    # a resumed monitor sees the same state, and a repeated reading is not recorded twice
    again = RewardMonitor(cfg, mon.meta, mon.critic, mon.referee, mon.augment, tmp_path, lambda d: None)
    assert again.stopped_at == 4 and again(obj, 4) is True and len(again.rows) == 5
    again.forget_after(3)
    assert [r["step"] for r in again.rows] == [0, 1, 2, 3] and again.stopped_at is None


def test_selection_by_referee_without_a_referee_is_refused(tmp_path):
    from craft.train.reward import RewardAugment

    with pytest.raises(ValueError, match="needs a referee"):
        RewardMonitor(MonitorConfig(every=1, select="referee"), {"prompt": [], "label": []}, _judge(lambda w: w),
                      None, RewardAugment(), tmp_path, lambda d: None)  # fmt: skip


class _Scripted(RewardMonitor):
    """A monitor whose readings come from a script (step -> (critic reward, critic over views)): the selection and
    stopping rules alone, on the shapes the paper-table's readings had (RESULTS.md, issue 21)."""

    def __init__(self, cfg: MonitorConfig, script: dict[int, tuple[float, float]], tmp: Path):
        super().__init__(cfg, {"prompt": ["p"], "label": ["a"]}, _judge(lambda w: w), None, None, tmp,
                         lambda d: d.mkdir(parents=True, exist_ok=True))  # fmt: skip
        self.script = script

    def read(self, objective, step):
        critic, views = self.script[step]
        return {"step": step, "critic_reward": critic, "critic_views": views}


def _drive(mon: RewardMonitor, steps: int) -> tuple[_Objective, int | None]:
    obj = _Objective()
    for step in range(steps):
        with torch.no_grad():
            obj.w.fill_(float(step))
        if mon(obj, step):
            return obj, step
    return obj, None


# critic reward, critic over augmented views: on radiographs the clean reading climbs and the views stay flat; on
# histology the views follow it. The dip back at step 5 must not re-open the trust region (it is a prefix rule)
HACKED = {0: (1.0, 0.5), 1: (1.06, 0.52), 2: (1.25, 0.51), 3: (1.6, 0.5), 4: (2.0, 0.6), 5: (1.02, 0.5)}
FOLLOWED = {0: (2.0, 2.0), 1: (2.1, 2.08), 2: (2.2, 2.15), 3: (2.3, 2.27), 4: (2.25, 2.2), 5: (2.4, 2.36)}


@pytest.mark.parametrize(
    "script, tolerance, kept",
    [
        (HACKED, 0.1, 1),  # unheld gain 0, 0.04, 0.24, ...: step 1 is the last inside 0.1
        (HACKED, 0.01, 0),  # the first reading after the start already fails: the start is kept
        (HACKED, 10.0, 5),  # a tolerance nothing passes: the last reading, as select=last
        (FOLLOWED, 0.1, 5),  # the views share the gain (unheld <= 0.05): nothing is refused
    ],
)
def test_held_keeps_the_last_reading_before_the_unheld_gain_passes_the_tolerance(tmp_path, script, tolerance, kept):
    mon = _Scripted(MonitorConfig(every=1, select="held", hold_tolerance=tolerance), script, tmp_path)
    obj, stopped = _drive(mon, len(script))
    assert stopped is None and len(mon.rows) == len(script)
    c0, v0 = script[0]
    for r in mon.rows:  # every reading records its unheld gain, for the report's curve
        c, v = script[r["step"]]
        assert r["critic_unheld"] == pytest.approx((c - c0) - (v - v0))
    best = mon.restore_selected(obj)
    assert best["step"] == kept and float(obj.w.detach()) == float(kept)  # the kept reading's weights are loaded


@pytest.mark.parametrize("patience, stop", [(1, 2), (2, 3)])
def test_held_with_patience_stops_that_many_readings_past_the_trust_region(tmp_path, patience, stop):
    mon = _Scripted(MonitorConfig(every=1, select="held", patience=patience), HACKED, tmp_path)
    obj, stopped = _drive(mon, len(HACKED))
    assert stopped == stop == mon.stopped_at and mon.restore_selected(obj)["step"] == 1
    # a resumed monitor (the log on disk) agrees, with the gains measured from its step-0 reading
    again = _Scripted(mon.cfg, HACKED, tmp_path)
    assert again.stopped_at == stop and again.best()["step"] == 1


@pytest.mark.parametrize("select", ["views", "held"])
def test_reward_stage_with_monitor_holds_rows_out_and_saves_the_selected_weights(tmp_path, select):
    """The real stage: readings before training and at every step, snapshots in the adapter, the saved LoRA is the
    selected snapshot's, the held-out rows are named in the lineage (and left out of training)."""
    from safetensors.torch import load_file

    from craft.config import load_stage_config
    from craft.train import reward
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(1)
    w = reward_world(tmp_path, referee=True)
    over = ["loop.steps=3", "loop.batch_size=2", "loop.threads=1", "loop.progress=false", "sample_steps=2",
            "loop.lr=0.05", "monitor.every=1", "monitor.prompts=4", "monitor.samples_per_prompt=1",
            "monitor.views=2", f"monitor.select={select}", "monitor.hold_tolerance=0.01"]  # fmt: skip
    cfg = load_stage_config("reward", None, over)
    m = reward.main(cfg, w["data"], w["ann"], w["critic"], w["probe"], w["base"], tmp_path / "craft",
                    referee_dir=w["referee"], referee_probe_dir=w["referee_probe"])  # fmt: skip
    rows = read_log(tmp_path / "craft")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        for k in ("critic_reward", "critic_views", "critic_acc", "referee_reward", "referee_acc"):
            assert k in r and r[k] == r[k], (k, r)  # present and not NaN
        assert (tmp_path / "craft" / "monitor" / r["snapshot"] / "adapter.json").is_file()
    if select == "views":
        best = max(rows, key=lambda r: (r["critic_views"], -r["step"]))
    else:  # the last reading before the critic's gain not shared by its views reading first passes 0.01
        gains = [(r["critic_reward"] - rows[0]["critic_reward"]) - (r["critic_views"] - rows[0]["critic_views"])
                 for r in rows]  # fmt: skip
        best = rows[next((i for i, g in enumerate(gains) if i and g > 0.01), len(rows)) - 1]
    lineage = json.loads((tmp_path / "craft" / "lineage.json").read_text())
    assert lineage["monitor"]["selected_step"] == best["step"] == int(m["selected_step"])
    held = lineage["monitor"]["held_out_image_ids"]
    assert len(held) == 4 and m["monitor_readings"] == 4.0
    saved = load_file(str(tmp_path / "craft" / "pytorch_lora_weights.safetensors"))
    snap = load_file(str(tmp_path / "craft" / "monitor" / best["snapshot"] / "pytorch_lora_weights.safetensors"))
    assert saved.keys() == snap.keys() and all(torch.equal(saved[k], snap[k]) for k in saved)
    if best["step"] != 3:  # the last step's weights differ from the selected ones: selection did something
        last = load_file(str(tmp_path / "craft" / "monitor" / "step-0000003" / "pytorch_lora_weights.safetensors"))
        assert any(not torch.equal(saved[k], last[k]) for k in saved)
