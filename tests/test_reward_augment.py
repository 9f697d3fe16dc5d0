"""Augmented-view rewards (issue 21): the critic reads random crops / flips / noisy copies and the reward averages them."""

from __future__ import annotations

import pytest
import torch

from craft.train.reward import RewardAugment, augmented_view, critic_reward


def _images(n: int = 4, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g)


def test_identity_view_reproduces_the_image():
    x = _images()
    out = augmented_view(x, RewardAugment(views=1, crop_scale=1.0, flip=False, noise_std=0.0), torch.Generator())
    assert torch.allclose(out, x, atol=1e-5)


def test_flip_view_is_the_image_or_its_mirror_and_both_occur():
    x = _images(16)
    out = augmented_view(x, RewardAugment(views=1, crop_scale=1.0, flip=True, noise_std=0.0),
                         torch.Generator().manual_seed(1))  # fmt: skip
    same = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_crop_and_noise_change_the_view_and_keep_the_gradient():
    x = _images().requires_grad_(True)
    out = augmented_view(x, RewardAugment(views=1, crop_scale=0.6, flip=True, noise_std=0.05),
                         torch.Generator().manual_seed(2))  # fmt: skip
    assert out.shape == x.shape and 0.0 <= float(out.detach().min()) and float(out.detach().max()) <= 1.0
    assert not torch.allclose(out, x, atol=1e-3)
    (out * torch.linspace(0, 1, 16)).sum().backward()  # a left-right asymmetric read
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


class _MeanCam:
    """Stands in for the critic's CAM: component = mean intensity (flip-invariant) and mean of the left half (not)."""

    def __call__(self, images, labels, prompts, references=None):
        return {"vdc": images.mean((1, 2, 3)), "ccs": images[..., : images.shape[-1] // 2].mean((1, 2, 3))}


def test_critic_reward_averages_the_views_and_is_unchanged_without_them():
    x, meta = _images(), {"label": ["a"] * 4, "prompt": ["p"] * 4}
    w = {"vdc": 1.0, "ccs": 1.0}
    plain = critic_reward(_MeanCam(), w)(x, meta)
    off = critic_reward(_MeanCam(), w, RewardAugment(views=0))(x, meta)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    flips = critic_reward(_MeanCam(), w, RewardAugment(views=8, crop_scale=1.0, flip=True, noise_std=0.0))(x, meta)
    assert torch.allclose(flips["vdc"], plain["vdc"], atol=1e-5)  # mean intensity does not see a flip
    left, right = x[..., :8].mean((1, 2, 3)), x[..., 8:].mean((1, 2, 3))
    share = (flips["ccs"] - right) / (left - right)  # the fraction of the 8 views that were not mirrored
    assert torch.allclose(share * 8, (share * 8).round(), atol=1e-3) and not torch.allclose(flips["ccs"], plain["ccs"])
    from craft.losses import clinical_reward

    assert torch.allclose(flips["total"], clinical_reward({k: flips[k] for k in w}, w))  # eq. 6 on the view means


def test_the_critic_reward_is_rowwise_only_without_views():
    """RewardConfig.decode_chunk scores the graph's images in pieces only for a rowwise reward: the critic's reward
    of image i reads image i alone (pieces give the batch's numbers), its augmented views draw crops per call."""
    x, meta = _images(), {"label": ["a", "b", "a", "b"], "prompt": ["p", "q", "r", "s"]}
    w = {"vdc": 1.0, "ccs": 1.0}
    fn = critic_reward(_MeanCam(), w)
    assert fn.rowwise
    whole = fn(x, meta)["total"]
    pieces = torch.cat([fn(x[i : i + 2], {k: v[i : i + 2] for k, v in meta.items()})["total"] for i in (0, 2)])
    assert torch.equal(pieces, whole)
    assert not critic_reward(_MeanCam(), w, RewardAugment(views=2)).rowwise


def test_augment_settings_parse_and_are_checked():
    from craft.config import load_stage_config

    cfg = load_stage_config("reward", None, ["augment.views=3", "augment.crop_scale=0.7"])
    assert cfg.augment.views == 3 and cfg.augment.crop_scale == 0.7
    with pytest.raises(ValueError, match="augment.crop_scale"):
        load_stage_config("reward", None, ["augment.crop_scale=0"])
