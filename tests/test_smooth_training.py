"""Training smooth flows: reverse KL through the root-found (sampling) direction, and the trainer's combined
objective w_nll NLL + w_fm FM + lambda_kl KL, checked against quadrature, finite differences and a hand sum."""
import math

import numpy as np
import pytest
import torch

from regflow_mm.flows.boltzmann import BoltzmannFlow
from regflow_mm.flows.priors import UniformBox
from regflow_mm.flows.smooth_coupling import smooth_coupling_flow
from regflow_mm.representations.base import Representation
from regflow_mm.training.couplings import derived_seed
from regflow_mm.training.objectives import reverse_kl_loss
from regflow_mm.training.trainer import _STREAM_KL, TrainConfig, Trainer

F64 = torch.float64
KAPPA, MU, SIGMA = 2.0, 0.3, 0.12  # von Mises concentration and mean (circle), bump width (interval)


def _toy_u(y):
    """Reduced energy (kT) on [0, 1] x circle: von Mises in phi times a Gaussian bump in r whose centre moves
    with phi (so the coupling layers must learn a conditional)."""
    r, phi = y[:, 0], y[:, 1]
    bump_centre = 0.5 + 0.15 * torch.sin(2 * math.pi * phi)
    return -KAPPA * torch.cos(2 * math.pi * (phi - MU)) + (r - bump_centre) ** 2 / (2 * SIGMA ** 2)


def _quadrature_grid(n_r=100, n_phi=200):
    """Gauss-Legendre nodes in r on [0, 1] and the periodic trapezoid rule in phi: (points (n_r n_phi, 2), weights)."""
    nodes, weights = np.polynomial.legendre.leggauss(n_r)
    r, w_r = (nodes + 1) / 2, weights / 2
    phi = np.arange(n_phi) / n_phi
    grid = np.stack(np.meshgrid(r, phi, indexing="ij"), -1).reshape(-1, 2)
    return torch.tensor(grid, dtype=F64), torch.tensor(np.repeat(w_r, n_phi) / n_phi, dtype=F64)


GRID, WEIGHTS = _quadrature_grid()
LOG_Z = math.log(float((WEIGHTS * torch.exp(-_toy_u(GRID))).sum()))


class _SeededPrior:
    """Uniform prior drawing from its own seeded generator: the same seed gives the same latent batch."""

    def __init__(self, seed, dim=2):
        self.prior = UniformBox(dim).double()
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n):
        return self.prior.sample(n, generator=self.generator)

    def log_prob(self, z):
        return self.prior.log_prob(z)


def _identity(y):
    return y, y.new_zeros(y.shape[0])


def _toy_flow(seed, n_layers, n_components, hidden, perturb=0.0):
    torch.manual_seed(seed)
    flow = smooth_coupling_flow(["interval", "circle"], n_layers=n_layers, n_components=n_components,
                                hidden=hidden, analytic="inverse").double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=gen, dtype=F64))
    return flow


def _kl_quadrature(flow):
    """KL(q || p) by quadrature with the analytic density of q (the data -> noise direction), and int q."""
    with torch.no_grad():
        log_q = flow(GRID, inverse=True)[1]
    q = torch.exp(log_q)
    return float((WEIGHTS * q * (log_q + _toy_u(GRID) + LOG_Z)).sum()), float((WEIGHTS * q).sum())


def test_quadrature_normalisation_is_converged():
    finer_grid, finer_weights = _quadrature_grid(200, 400)
    assert abs(math.log(float((finer_weights * torch.exp(-_toy_u(finer_grid))).sum())) - LOG_Z) < 1e-10


def test_reverse_kl_training_through_root_finding_reaches_quadrature_optimum():
    """Reverse KL alone, samples by root finding: E_q[log q + u] falls to its bound -log Z (KL >= 0)."""
    flow = _toy_flow(0, n_layers=4, n_components=6, hidden=(32,))
    kl0, mass0 = _kl_quadrature(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for step in range(150):
        loss, _ = reverse_kl_loss(flow, _SeededPrior(step), _identity, _toy_u, 256)
        opt.zero_grad()
        loss.backward()
        opt.step()
    kl1, mass1 = _kl_quadrature(flow)
    with torch.no_grad():
        estimate, parts = reverse_kl_loss(flow, _SeededPrior(10_000), _identity, _toy_u, 4096)
    assert abs(mass0 - 1) < 1e-6 and abs(mass1 - 1) < 1e-6  # q is a normalised density on the box
    assert kl0 > 3.0, kl0  # the near-identity start is far from the target (measured 3.85 nats)
    assert -1e-8 < kl1 < 0.05, kl1  # measured 0.015 nats after 150 steps
    assert parts["n_nonfinite"] == 0
    assert abs(estimate.item() + LOG_Z - kl1) < 1e-2  # Monte Carlo vs quadrature: 1e-2 is ~4 standard errors
    assert all(layer.rootfinding_stats.n_failed == 0 for layer in flow.layers)


def test_reverse_kl_gradient_through_root_finding_matches_finite_differences():
    """d KL / d theta via implicit gradients equals a central difference with the same latent batch, for one
    conditioner weight of the first (sampling-side) layer, whose effect reaches the later layers through
    their inputs and conditioner inputs, and along a random direction in all parameters."""
    flow = _toy_flow(1, n_layers=3, n_components=4, hidden=(16,), perturb=0.3)

    def loss():
        return reverse_kl_loss(flow, _SeededPrior(11), _identity, _toy_u, 64)[0]

    params = list(flow.parameters())
    grads = torch.autograd.grad(loss(), params)
    weight = flow.layers[0].conditioner.net[0].weight
    i = params.index(weight)
    k = int(grads[i].abs().argmax())
    h = 1e-5
    with torch.no_grad():
        weight.view(-1)[k] += h
        up = loss().item()
        weight.view(-1)[k] -= 2 * h
        down = loss().item()
        weight.view(-1)[k] += h
    fd = (up - down) / (2 * h)
    assert abs(grads[i].view(-1)[k].item()) > 1e-3
    assert abs(fd - grads[i].view(-1)[k].item()) < 1e-4 * abs(fd), (fd, grads[i].view(-1)[k].item())

    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(12 + j), dtype=F64)
                 for j, p in enumerate(params)]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = loss().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = loss().item()
        for p, d in zip(params, direction):
            p.add_(h * d)
    fd = (up - down) / (2 * h)
    assert abs(fd - analytic) < 1e-4 * abs(fd), (fd, analytic)


# ------------------------------------------------------------------------------ trainer's combined objective

class _BoxRepresentation(Representation):
    """One particle in the unit box, x[0] periodic: flow space y = x (a circle and two intervals), log det 0."""

    name = "toy_box"
    domain = "box"

    def __init__(self):
        super().__init__(1, 3)
        self.circular[0] = True

    def to_flow_space(self, x):
        x = self.positions(x)
        return x.reshape(x.shape[0], 3), x.new_zeros(x.shape[0])

    def from_flow_space(self, y):
        y = self._check_flow(y)
        return y.reshape(y.shape[0], 1, 3), y.new_zeros(y.shape[0])


def _particle_u(x):
    """u(x) in kT of (B, 1, 3) positions: von Mises in x0, harmonic in x1, x2."""
    x = x[:, 0]
    return -1.5 * torch.cos(2 * math.pi * (x[:, 0] - 0.2)) + ((x[:, 1:] - 0.5) ** 2).sum(1) / 0.05


def test_trainer_combined_loss_is_the_weighted_sum_of_nll_fm_and_reverse_kl(tmp_path):
    torch.manual_seed(4)
    transform = smooth_coupling_flow(["circle", "interval", "interval"], n_layers=2, n_components=3, hidden=(8,),
                                     analytic="inverse")
    flow = BoltzmannFlow(_BoxRepresentation(), transform, UniformBox(3), kT=2.5).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(5)
    x = (0.05 + 0.9 * torch.rand(64, 1, 3, generator=gen, dtype=F64)).requires_grad_(True)
    (grad_u,) = torch.autograd.grad(_particle_u(x).sum(), x)
    data = (x.detach(), -grad_u)  # positions, F / kT
    w_nll, w_fm, lambda_kl = 0.7, 0.05, 0.3
    config = TrainConfig(method="nll+fm", w_nll=w_nll, w_fm=w_fm, lambda_kl=lambda_kl, kl_batch_size=16,
                         batch_size=32, epochs=2, dtype="float64", device="cpu", seed=6, log_every=1)
    trainer = Trainer(flow, config, tmp_path, data, reduced_energy_torch=_particle_u, progress=False)
    params = list(flow.parameters())
    for step in (0, 1):
        loss, parts = trainer._loss(step)
        rows, _ = trainer.batch_indices(step)
        xb, fb = data[0][rows], data[1][rows]
        nll = -flow.log_prob(xb).mean()
        xg = xb.clone().requires_grad_(True)
        (score,) = torch.autograd.grad(flow.log_prob(xg).sum(), xg, create_graph=True)
        fm = (fb - score).pow(2).sum((1, 2)).mean()
        z = torch.rand(16, 3, dtype=F64, generator=torch.Generator().manual_seed(derived_seed(6, _STREAM_KL, step, 0)))
        y, logdet = flow.transform(z)  # root finding (analytic='inverse')
        log_q = -logdet  # uniform prior, identity representation
        samples = y.reshape(-1, 1, 3)
        torch.testing.assert_close(flow.log_prob(samples.detach()), log_q.detach(), rtol=0, atol=1e-9)
        kl = (log_q + _particle_u(samples)).mean()
        expected = w_nll * nll + w_fm * fm + lambda_kl * kl
        assert parts["nll"] == pytest.approx(nll.item(), rel=1e-12)
        assert parts["force_matching"] == pytest.approx(fm.item(), rel=1e-12)
        assert parts["reverse_kl"] == pytest.approx(kl.item(), rel=1e-12)
        assert min(abs(w_nll * nll.item()), abs(w_fm * fm.item()), abs(lambda_kl * kl.item())) > 0.05  # all count
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
        for g_trainer, g_hand in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
            torch.testing.assert_close(g_trainer, g_hand, rtol=1e-9, atol=1e-12)
    summary = trainer.fit()  # the combined objective trains end to end (EMA copy, checkpoints) without failures
    rows = [r for r in trainer.records if r["kind"] == "train"]
    assert summary["step"] == 4 and all(math.isfinite(r["loss"]) and "reverse_kl" in r for r in rows)
    assert all(layer.rootfinding_stats.n_failed == 0 for layer in flow.transform.layers)
