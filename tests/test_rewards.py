"""CRAFT rewards (eqs. 2-6): hand-computed cases, shapes, refusals, and gradients to the pixels."""

import doctest
import math

import pytest
import torch

import craft.losses as L


def test_doctests():
    res = doctest.testmod(L)
    assert res.attempted > 0 and res.failed == 0


def test_vdc_ccs_sfs_are_rowwise_cosines():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 1.0], [1.0, 1.0]])
    want = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    for fn in (L.vdc_reward, L.ccs_reward, L.sfs_reward):
        torch.testing.assert_close(fn(a, b), want)


def test_dd_reward_is_log_likelihood_of_true_class():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    z = math.exp(1) + math.exp(2) + math.exp(3)
    want = torch.tensor([3 - math.log(z), -math.log(3)])
    torch.testing.assert_close(L.dd_reward(logits, y), want)
    with pytest.raises(ValueError, match="labels outside"):
        L.dd_reward(logits, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="expected logits"):
        L.dd_reward(logits, torch.tensor([0]))


def test_clinical_reward_weighted_sum_and_defaults():
    comps = {"vdc": torch.tensor([0.2, 0.4]), "ccs": torch.tensor([0.1, 0.0]), "dd": torch.tensor([-2.0, -0.5]),
             "sfs": torch.tensor([0.5, 1.0])}  # fmt: skip
    torch.testing.assert_close(L.clinical_reward(comps), torch.tensor([0.2 + 0.1 - 0.4 + 0.5, 0.4 + 0.0 - 0.1 + 1.0]))
    assert L.DEFAULT_REWARD_WEIGHTS["dd"] == 0.2  # appendix J default
    w = {"vdc": 1.0, "ccs": 2.0, "dd": 0.5, "sfs": 0.0}
    torch.testing.assert_close(L.clinical_reward(comps, w), torch.tensor([0.2 + 0.2 - 1.0, 0.4 - 0.25]))
    no_sfs = {k: v for k, v in comps.items() if k != "sfs"}  # prompt-only: SFS skipped
    torch.testing.assert_close(L.clinical_reward(no_sfs), torch.tensor([-0.1, 0.3]))
    with pytest.raises(ValueError, match="'vdc' is missing"):
        L.clinical_reward({"ccs": comps["ccs"], "dd": comps["dd"]})
    with pytest.raises(ValueError, match="has no weight"):
        L.clinical_reward({**comps, "vdcc": comps["vdc"]})


def test_shape_errors_name_the_reward():
    with pytest.raises(ValueError, match="vdc_reward"):
        L.vdc_reward(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="sfs_reward"):
        L.sfs_reward(torch.zeros(2), torch.zeros(2))


def test_rewards_are_differentiable():
    x = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8)
    w = torch.randn(8, 3)
    r = L.clinical_reward({"vdc": L.vdc_reward(x, t), "ccs": L.ccs_reward(x, t), "dd": L.dd_reward(x @ w, torch.tensor([0, 1, 2, 0])),
                           "sfs": L.sfs_reward(x, t)})  # fmt: skip
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
