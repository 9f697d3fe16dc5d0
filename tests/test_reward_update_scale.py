"""``reward.update_scale`` (issue 21: the LoRA scale as a regulariser against reward hacking): the saved weights keep
only a fraction of what reward finetuning moved, start + s * (trained - start)."""

from __future__ import annotations

import pytest
import torch

from craft.train.reward import scale_update, trainable_state


def test_scale_update_interpolates_trainable_tensors_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    start = trainable_state(model)
    assert set(start) == {"0.weight", "0.bias"}
    frozen = model[1].weight.detach().clone()
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    trained = {n: p.detach().clone() for n, p in model[0].named_parameters()}
    kept = scale_update(model, start, 0.25)
    for n, p in model[0].named_parameters():
        assert torch.allclose(p, start[f"0.{n}"] + 0.25 * (trained[n] - start[f"0.{n}"]))
    assert torch.equal(model[1].weight, frozen)
    assert kept == pytest.approx(0.25 * (3 * 4 + 4) ** 0.5, rel=1e-5)  # every entry moved by 1, a quarter kept
    with pytest.raises(ValueError, match="'nope', not a parameter"):
        scale_update(model, {"nope": torch.zeros(1)}, 0.5)


def test_reward_stage_saves_the_scaled_update(tmp_path, monkeypatch):
    """The real stage with update_scale=0.5: what it saves is its start plus half of what training moved (the weights
    are read where the stage hands them to save_adapters), and the config refuses a scale outside (0, 1]."""
    from craft.config import load_stage_config
    from craft.train import reward
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(1)
    w = reward_world(tmp_path)
    seen: dict = {}
    real_train, real_state, real_save = reward.train, reward.trainable_state, reward.save_adapters

    def train(model, *a, **k):
        result = real_train(model, *a, **k)
        seen["model"], seen["trained"] = model, real_state(model)
        return result

    def state(model):
        seen["start"] = real_state(model)
        return seen["start"]

    def save(out_dir, **k):
        seen["saved"] = real_state(seen["model"])
        return real_save(out_dir, **k)

    monkeypatch.setattr(reward, "train", train)
    monkeypatch.setattr(reward, "trainable_state", state)
    monkeypatch.setattr(reward, "save_adapters", save)
    small = ["loop.steps=2", "loop.batch_size=2", "loop.threads=1", "loop.progress=false", "sample_steps=2"]
    cfg = load_stage_config("reward", None, [*small, "update_scale=0.5"])
    m = reward.main(cfg, w["data"], w["ann"], w["critic"], w["probe"], w["base"], tmp_path / "craft")
    start, trained, saved = seen["start"], seen["trained"], seen["saved"]
    assert set(start) == set(trained) == set(saved) and any("lora" in n for n in start)
    moved = [n for n in start if not torch.equal(start[n], trained[n])]
    assert moved, "training moved nothing: the check below would be empty"
    for n in start:
        assert torch.allclose(saved[n], start[n] + 0.5 * (trained[n] - start[n]), atol=1e-7), n
    full = sum(float((trained[n] - start[n]).pow(2).sum()) for n in start) ** 0.5
    assert m["update_norm_kept"] == pytest.approx(0.5 * full, rel=1e-4)
    assert (tmp_path / "craft" / "adapter.json").is_file()
    with pytest.raises(ValueError, match=r"update_scale must be in \(0, 1\]"):
        load_stage_config("reward", None, ["update_scale=1.5"])
