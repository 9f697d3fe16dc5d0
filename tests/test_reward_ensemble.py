"""The reward averaged over an ensemble of critics (issue 21, ``reward.ensemble``): each component is the mean over
the critic and its independently trained extra members (encoder roles critic-1..critic-N), so a LoRA is rewarded
for what several critics agree on, not for one critic's quirks."""

from __future__ import annotations

import json

import pytest
import torch

from craft.train.reward import RewardAugment, critic_reward


class _Cam:
    """A critic's CAM stand-in: VDC = mean intensity times ``a``, CCS = mean of the left half plus ``b``."""

    def __init__(self, a: float, b: float):
        self.a, self.b = a, b

    def __call__(self, images, labels, prompts, references=None):
        return {"vdc": self.a * images.mean((1, 2, 3)), "ccs": images[..., :8].mean((1, 2, 3)) + self.b,
                "dd": torch.zeros(len(images))}  # fmt: skip


def test_ensemble_reward_is_the_mean_of_the_critics_components_then_eq6():
    from craft.losses import clinical_reward

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    meta, w = {"label": ["a"] * 3, "prompt": ["p"] * 3}, {"vdc": 1.0, "ccs": 0.5}
    cams = [_Cam(1.0, 0.0), _Cam(2.0, 0.3), _Cam(0.5, -0.6)]
    one = [critic_reward(c, w)(x, meta) for c in cams]
    ens = critic_reward(cams, w)(x, meta)
    for k in w:
        assert torch.allclose(ens[k], torch.stack([o[k] for o in one]).mean(0))
    assert "dd" not in ens  # only the weighted components are read
    assert torch.allclose(ens["total"], clinical_reward({k: ens[k] for k in w}, w))
    assert torch.equal(critic_reward([cams[0]], w)(x, meta)["total"], one[0]["total"])  # one critic = the paper's
    # with views, every critic reads the same views: the ensemble of identical critics is the single critic's reward
    aug = RewardAugment(views=3, crop_scale=0.7, flip=True, noise_std=0.02)
    single = critic_reward(cams[0], w, aug)(x, meta)
    twice = critic_reward([cams[0], cams[0]], w, aug)(x, meta)
    assert torch.allclose(single["total"], twice["total"], atol=1e-6)


def test_ensemble_members_are_the_critic_spec_with_their_own_seeds():
    from craft.config import load_stage_config
    from craft.train.encoder import role_spec

    cfg = load_stage_config("encoder", None, [])
    m1, m2 = role_spec(cfg, "critic-1"), role_spec(cfg, "critic-2")
    assert (m1.arch, m1.layers, m1.width) == (cfg.critic.arch, cfg.critic.layers, cfg.critic.width)
    assert [m1.seed, m2.seed] == cfg.ensemble_seeds and cfg.critic.seed not in cfg.ensemble_seeds
    with pytest.raises(ValueError, match=r"critic-1\.\.critic-2.*'critic-3'"):
        role_spec(cfg, "critic-3")
    with pytest.raises(ValueError, match="ensemble seeds must differ"):
        load_stage_config("encoder", None, ["ensemble_seeds=[10, 0]"])  # seed 0 is the critic's


def test_reward_stage_names_a_missing_or_duplicated_member(tmp_path):
    from craft.config import load_stage_config
    from craft.models.encoders import load_encoder
    from craft.train.reward import ensemble_cams, step
    from tests.crafts_helpers import reward_world

    torch.set_num_threads(1)
    w = reward_world(tmp_path, ensemble=1)
    cfg = load_stage_config("reward", None, ["ensemble=1"])
    critic = load_encoder(w["critic"])
    checklists = json.loads((w["ann"] / "checklists.json").read_text())
    with pytest.raises(ValueError, match=r"reward.ensemble=1 needs 1 extra critic .* got 0.*critic-1"):
        ensemble_cams(cfg, [], critic, checklists, "cpu")
    with pytest.raises(ValueError, match="same weights as"):
        ensemble_cams(cfg, [(w["critic"], w["probe"])], critic, checklists, "cpu")  # the critic again
    (member,) = ensemble_cams(cfg, [(tmp_path / "critic-1", tmp_path / "critic-1_probe")], critic, checklists, "cpu")
    assert member.encoder.identity != critic.identity
    with pytest.raises(ValueError, match="ensemble critic 1: needs both an encoder and its probe"):
        step(w["data"], w["ann"], w["critic"], w["probe"], w["base"], tmp_path / "out", None, ["ensemble=1"],
             critic_1_dir=str(tmp_path / "critic-1"))  # fmt: skip
