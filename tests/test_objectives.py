"""Objectives equal their formulas on hand-made cases."""
import math

import pytest
import torch

from regflow_mm.flows.base import Flow
from regflow_mm.training.objectives import (force_matching_loss, nll_loss, regflow_loss, regression_scale,
                                            reverse_kl_loss)

D = 3
LOG2 = math.log(2.0)


class _Affine(Flow):
    """y = 2 x + 1 (log|det| = D log 2); the inverse can be made inexact by ``inverse_bias``."""

    def __init__(self, inverse_bias=0.0):
        super().__init__()
        self.inverse_bias = inverse_bias

    def _forward(self, x):
        return 2.0 * x + 1.0, torch.full((x.shape[0],), x.shape[1] * LOG2, dtype=x.dtype)

    def _inverse(self, y):
        return (y - 1.0) / 2.0 + self.inverse_bias, torch.full((y.shape[0],), -y.shape[1] * LOG2, dtype=y.dtype)


def _normal(d=D):
    return torch.distributions.Independent(torch.distributions.Normal(torch.zeros(d, dtype=torch.float64),
                                                                      torch.ones(d, dtype=torch.float64)), 1)


X0 = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 2.0]], dtype=torch.float64)
X1 = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
EPS = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)


def test_regflow_loss_is_exactly_the_formula():
    # f(X0) = [[1, 3, -1], [2, 1, 5]]; residuals to X1: [[0, 1, -1], [1, 0, 4]] -> sq. norms 2, 17
    loss, parts = regflow_loss(_Affine(), X0, X1)
    assert loss.item() == pytest.approx((2 + 17) / 2)
    # target noise lambda_n = 0.5: targets X1 + 0.5 EPS -> residuals [[-.5, 1, -1], [1, .5, 4]] -> 2.25, 17.25
    loss, _ = regflow_loss(_Affine(), X0, X1, lambda_n=0.5, noise=EPS)
    assert loss.item() == pytest.approx((2.25 + 17.25) / 2)
    loss, parts = regflow_loss(_Affine(), X0, X1, regularizer="logdet", lambda_r=1e-2)
    assert parts["logdet"] == pytest.approx((D * LOG2) ** 2)
    assert loss.item() == pytest.approx(9.5 + 1e-2 * (D * LOG2) ** 2)
    loss, parts = regflow_loss(_Affine(inverse_bias=0.1), X0, X1, regularizer="fwd_bwd", lambda_r=2.0)
    assert parts["fwd_bwd"] == pytest.approx(D * 0.01)
    assert loss.item() == pytest.approx(9.5 + 2.0 * D * 0.01)
    with pytest.raises(ValueError, match="regularizer"):
        regflow_loss(_Affine(), X0, X1, regularizer="jacobian")


def test_regflow_standardised_errors_wrap_before_scaling():
    # residuals [[0, 1, -1], [1, 0, 4]]; dim 2 a circle: wrapped -1 -> 0, 4 -> 0; scales (1, 0.5, 0.25)
    scale = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    loss, _ = regflow_loss(_Affine(), X0, X1, circular=torch.tensor([False, False, True]), scale=scale)
    assert loss.item() == pytest.approx((4 + 1) / 2)
    loss, _ = regflow_loss(_Affine(), X0, X1, scale=scale)
    assert loss.item() == pytest.approx((4 + 16 + 1 + 256) / 2)


def test_regression_scale_is_the_spread_on_intervals_and_circles():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    narrow = 0.5 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    across_seam = torch.remainder(0.03 * torch.randn(n, generator=g, dtype=torch.float64), 1.0)  # wraps at 0 / 1
    uniform = torch.rand(n, generator=g, dtype=torch.float64)
    x1 = torch.stack([narrow, across_seam, uniform, across_seam], 1)
    s = regression_scale(x1, circular=torch.tensor([False, True, True, False]))
    assert s[0].item() == pytest.approx(0.01, rel=0.01)
    assert s[1].item() == pytest.approx(0.03, rel=0.01)  # the circular spread, not the seam's ~0.5
    assert s[2].item() == pytest.approx(12 ** -0.5, rel=1e-6)  # capped at a uniform circle's
    assert s[3].item() > 0.4  # the same column as an interval: its linear spread
    with pytest.raises(ValueError, match="finite"):
        regression_scale(torch.tensor([[float("nan"), 0.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="one entry per dimension"):
        regression_scale(x1, circular=torch.tensor([True]))


def test_regflow_noise_from_generator_is_seeded():
    a, _ = regflow_loss(_Affine(), X0, X1, lambda_n=0.1, generator=torch.Generator().manual_seed(3))
    b, _ = regflow_loss(_Affine(), X0, X1, lambda_n=0.1, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item() and a.item() != pytest.approx(9.5)


def test_nll_loss_is_change_of_variables():
    loss, _ = nll_loss(_Affine(), _normal(), X1)
    z = (X1 - 1.0) / 2.0
    expected = -(_normal().log_prob(z) - D * LOG2).mean()
    assert loss.item() == pytest.approx(expected.item())


class _GaussianFlow:
    """log q(x) = N(x; 0, s^2 I) over (B, n, 3): grad_x log q = -x / s^2."""

    def __init__(self, s):
        self.s = s

    def log_prob(self, x):
        return -0.5 * (x / self.s).pow(2).flatten(1).sum(1)


def test_force_matching_loss_hand_computed():
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 2.0, -2.0]]], dtype=torch.float64)
    f = torch.zeros_like(x)
    loss, _ = force_matching_loss(_GaussianFlow(s), x, f)
    # grad log q = -x / 4 -> squared norms 1/16 and 8/16
    assert loss.item() == pytest.approx((1 / 16 + 8 / 16) / 2)
    loss.backward()  # differentiable w.r.t. flow parameters: d/ds of mean |x|^2 / s^4 = -4 * 4.5 / 32
    assert s.grad.item() == pytest.approx(-4 * 4.5 / 2 ** 5)
    with pytest.raises(ValueError, match="equal shapes"):
        force_matching_loss(_GaussianFlow(s), x, f[:1])


def test_reverse_kl_loss_hand_computed():
    prior = _normal()

    def to_cartesian(y):
        return y.reshape(-1, 1, 3), torch.zeros(y.shape[0], dtype=y.dtype)

    def u(x):
        return 0.5 * x.pow(2).flatten(1).sum(1)

    torch.manual_seed(0)
    loss, parts = reverse_kl_loss(_Affine(), prior, to_cartesian, u, 5)
    torch.manual_seed(0)
    z = prior.sample((5,))
    expected = (prior.log_prob(z) - D * LOG2 + 0.5 * (2 * z + 1).pow(2).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item())
    assert parts["n_nonfinite"] == 0
