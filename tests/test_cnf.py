"""Teacher CNF: analytic linear flow (transport + exact likelihood) and flow-matching training."""
import math

import pytest
import torch
from torch import nn

from regflow_mm.training.cnf import (FlowMatchingConfig, SolverOptions, TeacherCNF, VelocityMLP,
                                     minibatch_ot_pairing, train_flow_matching)

D = 3


class _Linear(nn.Module):
    """v(t, x) = x A^T: flow map x1 = expm(A) x0, so p1 = N(0, M M^T) with M = expm(A) for a N(0, I) prior."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, t, x):
        return x @ self.a.T


@pytest.fixture
def linear_case():
    gen = torch.Generator().manual_seed(0)
    a = 0.4 * torch.randn(D, D, generator=gen, dtype=torch.float64)
    prior = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64),
                                                   torch.eye(D, dtype=torch.float64))
    m = torch.linalg.matrix_exp(a)
    target = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), m @ m.T)
    cnf = TeacherCNF(_Linear(a), SolverOptions("dopri5", rtol=1e-10, atol=1e-10))
    return cnf, prior, target, m, gen


def test_transport_is_the_matrix_exponential(linear_case):
    cnf, prior, _, m, gen = linear_case
    x0 = torch.randn(6, D, generator=gen, dtype=torch.float64)
    x1 = cnf.transport(x0)
    torch.testing.assert_close(x1, x0 @ m.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(cnf.transport(x1, reverse=True), x0, rtol=1e-8, atol=1e-8)


def test_exact_log_likelihood_matches_gaussian(linear_case):
    cnf, prior, target, _, gen = linear_case
    x = target.sample((7,))
    lp = cnf.log_prob(x, prior, divergence="exact", batch_size=4)
    torch.testing.assert_close(lp, target.log_prob(x), rtol=1e-8, atol=1e-8)
    # a fixed-step solver converges to the same value
    lp_rk4 = cnf.log_prob(x, prior, solver=SolverOptions("rk4", n_steps=40))
    torch.testing.assert_close(lp_rk4, target.log_prob(x), rtol=1e-5, atol=1e-5)


def test_hutchinson_is_unbiased_but_not_exact(linear_case):
    cnf, prior, target, _, gen = linear_case
    x = target.sample((1,)).expand(400, D).contiguous()
    lp = cnf.log_prob(x, prior, divergence="hutchinson", generator=gen)
    assert lp.std() > 1e-3  # stochastic per probe
    assert lp.mean().item() == pytest.approx(target.log_prob(x[:1]).item(), abs=4 * lp.std().item() / 20)
    with pytest.raises(ValueError, match="divergence"):
        cnf.log_prob(x, prior, divergence="trace")


def test_minibatch_ot_pairing_is_optimal_permutation():
    x1 = torch.tensor([[0.0], [10.0], [20.0]])
    x0 = torch.tensor([[19.0], [1.0], [11.0]])
    torch.testing.assert_close(minibatch_ot_pairing(x0, x1), torch.tensor([[1.0], [11.0], [19.0]]))


def test_flow_matching_learns_shifted_gaussian(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(2000, 2) * 0.5 + torch.tensor([3.0, -1.0])
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    vel = VelocityMLP(2, hidden=32, n_layers=2, n_frequencies=2)
    cfg = FlowMatchingConfig(n_steps=300, batch_size=128, lr=3e-3, coupling="minibatch_ot", log_every=50, seed=1)
    log = train_flow_matching(vel, data, prior, cfg, progress=False)
    assert log[-1]["fm_loss"] < 0.5 * log[0]["fm_loss"]
    cnf = TeacherCNF(vel, SolverOptions("rk4", n_steps=20))
    _, x1 = cnf.sample(prior, 1000)
    torch.testing.assert_close(x1.mean(0), torch.tensor([3.0, -1.0]), atol=0.2, rtol=0)
    # save/load round trip gives the same map
    cnf.save(tmp_path / "teacher.pt")
    loaded = TeacherCNF.load(tmp_path / "teacher.pt")
    z = torch.randn(5, 2)
    torch.testing.assert_close(loaded.transport(z), cnf.transport(z))
    # exact likelihood of a learned field is a normalised density: log p of a gaussian-like blob is finite
    assert torch.isfinite(cnf.log_prob(x1[:10], prior)).all()
    with pytest.raises(FileNotFoundError):
        TeacherCNF.load(tmp_path / "missing.pt")


def test_empty_or_nan_teacher_file_is_a_one_line_error(tmp_path):
    from regflow_mm.training.cnf import SolverOptions, TeacherCNF, VelocityMLP

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is not a readable teacher CNF file .*delete it to train the "
                                         r"teacher again$"):
        TeacherCNF.load(empty)
    cnf = TeacherCNF(VelocityMLP(3, hidden=8, n_layers=1), SolverOptions("rk4", n_steps=2))
    with torch.no_grad():
        next(cnf.velocity.parameters()).fill_(float("nan"))
    cnf.save(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="holds non-finite \\(NaN/inf\\) weights: delete it to train the teacher again"):
        TeacherCNF.load(tmp_path / "nan.pt")
