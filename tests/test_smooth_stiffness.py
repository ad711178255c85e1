"""Stiffness of smooth-flow potentials: the mixture's flanks (bounded only through a_max), the analytic
bound of ``stiffness_bound``, and the logit-affine interval map with its closed-form curvature bound."""
from __future__ import annotations

import math

import pytest
import torch

from regflow_mm.flows.smooth import (SmoothParams, SmoothTransformConfig, constrain_params, initial_raw,
                                     mixture_cdf, stiffness_bound)
from regflow_mm.flows import SequentialFlow
from regflow_mm.flows.smooth_coupling import SmoothCouplingLayer, logistic_map, probit_map

F64 = torch.float64


def _log_density_derivatives(config, params, x):
    """d/dx and d^2/dx^2 of log f'(x) (N,) for one parameter set (1, K) broadcast over x (N,)."""
    x = x.clone().requires_grad_(True)
    p = SmoothParams(*(q.expand(x.shape[0], -1) for q in params))
    ell = torch.log(mixture_cdf(x, p, config)[1])
    (d1,) = torch.autograd.grad(ell.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    return d1.detach(), d2


def _one_component(config, a, c, alpha=None, b=0.5):
    t = lambda v: torch.tensor([[v]], dtype=F64)  # noqa: E731
    from regflow_mm.flows.smooth import ALPHA_FLOOR
    return SmoothParams(t(0.0), t(a), t(b), t(c), t(ALPHA_FLOOR[config.beta] if alpha is None else alpha))


def _jitter(layer, seed: int, scale: float = 0.3) -> None:
    """Move every parameter of ``layer`` off its identity initialisation (seeded), so the conditioners matter."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_mixture_flank_curvature_grows_like_a_squared():
    """The diagnosis of issue 12: a bump falling onto the identity floor is a spring whose stiffness grows
    at least like a^2 with the concentration (a^2 (log(a/c))^4: 210x for a 10x narrower bump), unbounded
    without a_max."""
    config = SmoothTransformConfig("interval", 1, c_min=1e-3)
    x = torch.linspace(0.0, 1.0, 40001, dtype=F64)
    peak = {a: float(_log_density_derivatives(config, _one_component(config, a, 1e-3), x)[1].abs().max())
            for a in (2.0, 20.0)}
    assert peak[2.0] > 1e3  # already stiff at a = 2: the flank of the bump on a floor of 1e-3
    assert 100.0 < peak[20.0] / peak[2.0] < 1000.0


@pytest.mark.parametrize("domain", ["interval", "circle"])
def test_stiffness_bound_holds_for_every_parameter_value_and_is_attained(domain):
    config = SmoothTransformConfig(domain, 4, c_min=0.01, a_max=4.0)
    b1, b2 = stiffness_bound(config)
    assert math.isfinite(b2) and b1 > 0 and b2 > 0
    x = torch.linspace(0.0, 1.0, 10001, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    worst1 = worst2 = 0.0
    for _ in range(10):  # random parameters far from the initialisation, concentrations up to a_max
        raw = initial_raw(config).to(F64) + 3.0 * torch.randn(1, config.n_raw, generator=gen, dtype=F64)
        params = constrain_params(raw, config)
        assert float(params.a.max()) <= 4.0 and float(params.c.min()) >= 0.01
        d1, d2 = _log_density_derivatives(config, params, x)
        worst1, worst2 = max(worst1, float(d1.abs().max())), max(worst2, float(d2.abs().max()))
    # the sharpest admissible bump: one component at a_max on the floor, smallest ramp steepness
    d1, d2 = _log_density_derivatives(config, _one_component(config, 4.0, 0.01), x)
    worst1, worst2 = max(worst1, float(d1.abs().max())), max(worst2, float(d2.abs().max()))
    assert worst1 <= b1 and worst2 <= b2
    assert worst2 >= 0.1 * b2  # the bound is within a factor 10 of what one bump reaches


def test_a_max_bounds_the_concentration_and_is_validated():
    config = SmoothTransformConfig("interval", 8, a_max=3.0)
    params = constrain_params(torch.tensor([[50.0] * config.n_raw], dtype=F64), config)
    assert float(params.a.max()) <= 3.0
    init = constrain_params(initial_raw(config).to(F64), config)
    assert torch.allclose(init.a, torch.full_like(init.a, 2.0))  # (a_min + a_max) / 2 when K/2 is larger
    assert torch.allclose(init.c, torch.full_like(init.c, 0.1))
    with pytest.raises(ValueError, match="a_max must exceed a_min"):
        SmoothTransformConfig("interval", 8, a_max=1.0)
    with pytest.raises(ValueError, match="needs a bounded concentration"):
        stiffness_bound(SmoothTransformConfig("interval", 8))


def test_logistic_map_round_trip_log_det_and_curvature_bound():
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(500, generator=gen, dtype=F64) * 0.998 + 0.001
    mu = 2.0 * torch.randn(500, generator=gen, dtype=F64)
    s = math.log(2.0) * torch.tanh(torch.randn(500, generator=gen, dtype=F64))
    v, ld = logistic_map(u, mu, s)
    back, ld_inv = logistic_map(v, mu, s, inverse=True)
    # v up to 1 - 1e-9 here: logit(v) keeps ~7 fewer digits there
    assert float((back - u).abs().max()) < 1e-10 and float((ld + ld_inv).abs().max()) < 1e-8
    uu = u.clone().requires_grad_(True)
    (dv,) = torch.autograd.grad(logistic_map(uu, mu, s)[0].sum(), uu)
    assert torch.allclose(dv.log(), ld, atol=1e-10)
    # along z = logit(u): d^2/dz^2 log|dv/du| lies in [-exp(2 s)/2, 1/2] for every z, mu and s
    z = torch.linspace(-30.0, 30.0, 6001, dtype=F64)
    for scale in (-math.log(2.0), 0.0, math.log(2.0)):
        for shift in (-3.0, 0.0, 5.0):
            zz = z.clone().requires_grad_(True)
            ell = logistic_map(torch.sigmoid(zz), torch.tensor(shift, dtype=F64), torch.tensor(scale, dtype=F64))[1]
            (g1,) = torch.autograd.grad(ell.sum(), zz, create_graph=True)
            (g2,) = torch.autograd.grad(g1.sum(), zz)
            assert float(g2.max()) <= 0.5 + 1e-9 and float(g2.min()) >= -math.exp(2 * scale) / 2 - 1e-9
            if scale or shift:  # not vacuous (the identity map has none)
                assert float(g2.max() - g2.min()) > 0.2


def test_probit_map_round_trip_log_det_and_exact_curvature():
    gen = torch.Generator().manual_seed(0)
    u = torch.special.ndtr(torch.randn(500, generator=gen, dtype=F64))
    mu = 0.5 * torch.randn(500, generator=gen, dtype=F64)
    s = math.log(2.0) * torch.tanh(torch.randn(500, generator=gen, dtype=F64))
    v, ld = probit_map(u, mu, s)
    back, ld_inv = probit_map(v, mu, s, inverse=True)
    # z ~ N(0, 1), |z'| < 6 here; above, 1 - v keeps too few digits in float64 (Phi(z) rounds to 1 at z ~ 8.2)
    assert float(torch.special.ndtri(v).abs().max()) < 6.0
    assert float((back - u).abs().max()) < 1e-9 and float((ld + ld_inv).abs().max()) < 1e-8
    uu = u.clone().requires_grad_(True)
    (dv,) = torch.autograd.grad(probit_map(uu, mu, s)[0].sum(), uu)
    assert torch.allclose(dv.log(), ld, atol=1e-9)
    # along z = Phi^-1(u): d^2/dz^2 log|dv/du| = 1 - exp(2 s) exactly, for every z and mu (to round-off,
    # which grows like exp(z^2 / 2) eps in the upper tail)
    z = torch.linspace(-5.0, 5.0, 1001, dtype=F64)
    for scale in (-math.log(2.0), 0.0, 0.3):
        for shift in (-3.0, 0.0, 2.0):
            zz = z.clone().requires_grad_(True)
            ell = probit_map(torch.special.ndtr(zz), torch.tensor(shift, dtype=F64), torch.tensor(scale, dtype=F64))[1]
            (g1,) = torch.autograd.grad(ell.sum(), zz, create_graph=True)
            (g2,) = torch.autograd.grad(g1.sum(), zz)
            torch.testing.assert_close(g2, torch.full_like(g2, 1.0 - math.exp(2 * scale)), atol=1e-7, rtol=0)


def test_stacked_probit_layers_give_a_normal_density_in_z():
    """One interval coordinate, three unconditioned probit layers on a uniform prior: log q(u) along
    z = Phi^-1(u) is exactly the log-density of N(m, S^2) in z minus log Phi'(z) (the change to u), with
    S and m composed from the layers' scales and shifts."""
    flow = SequentialFlow([SmoothCouplingLayer(["interval"], [0], hidden=(4,), interval="probit")
                           for _ in range(3)]).double()
    scales, shifts = [0.5, -0.3, 0.2], [0.4, -1.0, 0.7]
    with torch.no_grad():
        for layer, sc, sh in zip(flow.layers, scales, shifts):
            layer.conditioner.bias.copy_(torch.tensor([sh, math.atanh(sc / layer.max_log_scale)], dtype=F64))
    # data -> noise applies the layers' inverse maps: z0 = (z - mu) e^-s, in order
    z = torch.linspace(-5.0, 5.0, 101, dtype=F64)
    _, logdet = flow(torch.special.ndtr(z)[:, None])
    m, S = 0.0, 1.0  # z = S z0 + m composes the forward maps, applied in reverse order
    for sc, sh in reversed(list(zip(scales, shifts))):
        m, S = math.exp(sc) * m + sh, math.exp(sc) * S
    normal = torch.distributions.Normal(torch.tensor(m, dtype=F64), torch.tensor(S, dtype=F64))
    log_phi = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logdet.detach(), normal.log_prob(z) - log_phi, atol=1e-9, rtol=0)


@pytest.mark.parametrize("interval", ["logistic", "probit"])
def test_affine_interval_layer_round_trip_exact_log_det_and_conditioned_parameters(interval):
    domains = ["interval", "circle", "interval", "circle", "interval"]
    layer = SmoothCouplingLayer(domains, [0, 1, 2], n_components=4, hidden=(16,), interval=interval).double()
    _jitter(layer, seed=3)
    u = torch.rand(6, 5, generator=torch.Generator().manual_seed(4), dtype=F64)
    v, ld = layer(u)
    back, ld_back = layer(v, inverse=True)
    assert float((back - u).abs().max().detach()) < 1e-9 and float((ld + ld_back).abs().max().detach()) < 1e-9
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda t: layer(t[None])[0][0], u[i])
        assert abs(float(torch.linalg.slogdet(jac)[1] - ld[i])) < 1e-10
    # the interval maps depend on the conditioning coordinates (3, 4), the untouched ones pass through
    assert torch.equal(v[:, 3:], u[:, 3:])
    u2 = u.clone()
    u2[:, 4] = torch.remainder(u2[:, 4] + 0.3, 1.0)
    assert float((layer(u2)[0][:, 0] - v[:, 0]).abs().max()) > 1e-4
    assert layer.n_raw_int == 2
    with pytest.raises(ValueError, match="interval must be one of"):
        SmoothCouplingLayer(domains, [0], interval="spline")
    with pytest.raises(ValueError, match="max_log_scale must be > 0"):
        SmoothCouplingLayer(domains, [0], interval="logistic", max_log_scale=0.0)


def test_circle_conditioning_circles_keeps_the_circles_off_the_intervals():
    """'circles': the transformed circles depend on the untransformed circles only (exactly zero gradient on every
    interval input), the intervals on everything; round trip and log-det stay exact; a bad value is an error."""
    domains = ["circle", "interval", "circle", "interval", "interval", "circle"]
    layer = SmoothCouplingLayer(domains, [0, 1, 4], n_components=4, hidden=(16,), interval="probit",
                                circle_conditioning="circles").double()
    _jitter(layer, seed=5)
    u = torch.rand(6, 6, generator=torch.Generator().manual_seed(6), dtype=F64).requires_grad_(True)
    v, ld = layer(u)
    (g_circle,) = torch.autograd.grad(v[:, 0].sum(), u, retain_graph=True)
    assert float(g_circle[:, [1, 3, 4]].abs().max()) == 0.0  # no interval reaches the circle
    assert float(g_circle[:, [2, 5]].abs().min()) > 0.0  # the untransformed circles do
    (g_interval,) = torch.autograd.grad(v[:, 1].sum(), u)
    assert float(g_interval[:, [2, 3, 5]].abs().min()) > 0.0  # intervals see circles and intervals
    back, ld_back = layer(v.detach(), inverse=True)
    assert float((back - u).abs().max().detach()) < 1e-9 and float((ld + ld_back).abs().max().detach()) < 1e-9
    jac = torch.autograd.functional.jacobian(lambda t: layer(t[None])[0][0], u[0].detach())
    assert abs(float(torch.linalg.slogdet(jac)[1] - ld[0])) < 1e-10
    with pytest.raises(ValueError, match="circle_conditioning must be one of"):
        SmoothCouplingLayer(domains, [0], circle_conditioning="bonds")


def test_torsion_conditioning_keeps_every_torsion_off_bonds_and_angles():
    """'torsions': narrow torsions (intervals listed in torsion_dims) join the circles' group: every transformed torsion
    sees the untransformed torsions only, bonds/angles see everything; the log-det stays exact."""
    domains = ["circle", "interval", "circle", "interval", "interval", "circle", "interval"]
    torsions = [4, 5, 6]  # dims 4 and 6: narrow torsions (intervals); 0, 2, 5: circles; 1, 3: bonds/angles
    layer = SmoothCouplingLayer(domains, [0, 1, 4, 6], n_components=4, hidden=(16,), interval="probit",
                                circle_conditioning="torsions", torsion_dims=torsions).double()
    _jitter(layer, seed=7)
    u = torch.rand(5, 7, generator=torch.Generator().manual_seed(8), dtype=F64).requires_grad_(True)
    v, ld = layer(u)
    for out in (0, 4, 6):  # torsions: only the untransformed torsions 2, 5 (and themselves) reach them
        (g,) = torch.autograd.grad(v[:, out].sum(), u, retain_graph=True)
        assert float(g[:, [1, 3]].abs().max()) == 0.0 and float(g[:, [2, 5]].abs().min()) > 0.0
    (g,) = torch.autograd.grad(v[:, 1].sum(), u)
    assert float(g[:, [2, 3, 5]].abs().min()) > 0.0
    jac = torch.autograd.functional.jacobian(lambda t: layer(t[None])[0][0], u[1].detach())
    assert abs(float(torch.linalg.slogdet(jac)[1] - ld[1])) < 1e-10
    with pytest.raises(ValueError, match="needs torsion_dims"):
        SmoothCouplingLayer(domains, [0], circle_conditioning="torsions")
