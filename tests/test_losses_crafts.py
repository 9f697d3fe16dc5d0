"""CRAFTS losses (craft/losses.py) against small hand-computed cases, plus finite gradients."""

import doctest
import math

import pytest
import torch

import craft.losses as L


def test_doctests_pass():
    res = doctest.testmod(L, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted >= 5 and res.failed == 0


def test_cosine_matrix_hand_case():
    m = L.cosine_matrix(torch.tensor([[3.0, 4.0], [4.0, -3.0], [-3.0, -4.0]]))
    expect = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])
    assert torch.allclose(m, expect, atol=1e-6)


def test_semantic_consistency_hand_case():
    # M^Z: orthogonal pair -> off-diagonal 0; M^T: antiparallel pair -> off-diagonal -1.
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    t = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # eq. 10: (1/B^2) * sum (M^Z - M^T)^2 = (0 + 1 + 1 + 0) / 4
    assert L.semantic_consistency_loss(z, t).item() == pytest.approx(0.5)
    # identical relational structure (different dims and scales) -> 0
    assert L.semantic_consistency_loss(t * 5, t).item() == pytest.approx(0.0, abs=1e-7)


def test_category_guidance_hand_case():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # M^Z off-diagonal 0
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two different classes: M^C off-diagonal 0
    t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # s = [1, 1/sqrt 2]
    assert L.category_guidance_loss(z, t, c, mu=0.0, sigma=1.0).item() == pytest.approx(0.0, abs=1e-7)
    c2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # same class: M^C all ones
    s = torch.tensor([1.0, 1.0 / math.sqrt(2.0)])  # cos(c_k, t_k), eq. 11
    mu, sigma = 1.2, 0.5
    w01 = 1.0 / (1.0 + math.exp(-((s[0] + s[1]).item() - mu) / sigma))  # eq. 12
    expect = 2 * w01 * (0.0 - 1.0) ** 2 / 4  # eq. 13: only the two off-diagonal pairs differ
    assert L.category_guidance_loss(z, t, c2, mu, sigma).item() == pytest.approx(expect, rel=1e-6)


def test_category_guidance_takes_fixed_typicality_scores():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # same class: M^C all ones, off-diagonal (0 - 1)^2 = 1
    t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # cos(c, t) = 0: from t, W = sigmoid((0 - 2) / 1)
    from_t = 2 * torch.sigmoid(torch.tensor(-2.0)).item() / 4
    assert L.category_guidance_loss(z, t, c, mu=2.0, sigma=1.0).item() == pytest.approx(from_t, rel=1e-6)
    # s given (scores of the frozen pre-training encoder): W = sigmoid((1 + 1 - 2) / 1) = 0.5, t is not read
    fixed = L.category_guidance_loss(z, t, c, mu=2.0, sigma=1.0, s=torch.tensor([1.0, 1.0]))
    assert fixed.item() == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match=r"s must have shape \[2\]"):
        L.category_guidance_loss(z, t, c, 2.0, 1.0, s=torch.ones(3))


def test_category_weights_grow_with_typicality():
    w = L.typicality_weights(torch.tensor([0.9, 0.1]), mu=1.0, sigma=0.2)
    assert w[0, 0] > w[0, 1] > w[1, 1]
    assert torch.allclose(w, w.T)


def test_typicality_stats_match_all_pairs():
    s = torch.tensor([0.1, 0.5, 0.7, 0.2, 0.9])
    a = s[:, None] + s[None, :]
    mu, sigma = L.typicality_stats(s)
    assert mu == pytest.approx(a.mean().item(), rel=1e-6)
    assert sigma == pytest.approx(a.std(unbiased=False).item(), rel=1e-6)
    assert L.typicality_stats(torch.ones(3))[1] > 0  # floored, weights stay finite


def test_gradients_finite_and_nonzero():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 32, generator=g, requires_grad=True)
    t = torch.randn(6, 16, generator=g)
    c = torch.randn(6, 16, generator=g)
    loss = L.semantic_consistency_loss(z, t) + L.category_guidance_loss(z, t, c, 0.0, 0.5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # a zero latent row must not produce NaN (normalize has an eps)
    z0 = torch.zeros(2, 4, requires_grad=True)
    L.semantic_consistency_loss(z0, torch.ones(2, 3)).backward()
    assert torch.isfinite(z0.grad).all()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="batch sizes differ"):
        L.semantic_consistency_loss(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="sigma"):
        L.category_guidance_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), 0.0, 0.0)
