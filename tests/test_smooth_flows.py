"""Smooth flows: C-infinity mixture transforms, root-finding inverse, implicit gradients, force matching."""
from __future__ import annotations

import math

import pytest
import torch
import zuko

from regflow_mm.flows.rootfinding import (InverseNotConvergedError, RootFindingConfig, RootFindingStats,
                                          RootFindingWarning, implicit_inverse, passes_needed, solve_monotone)
from regflow_mm.flows.smooth import (ALPHA_FLOOR, SmoothParams, SmoothTransformConfig, constrain_params,
                                     generalized_sigmoid, initial_raw, mixture_cdf, ramp)
from regflow_mm.flows.smooth_coupling import SmoothCouplingLayer, smooth_coupling_flow

F64 = torch.float64
N_FM_STEPS = 150


def _fn(config):
    return lambda x, ps, derivative=True: mixture_cdf(x, SmoothParams(*ps), config, derivative)


def _random_params(config, shape, scale=1.5, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    raw = initial_raw(config).to(dtype) + scale * torch.randn(*shape, config.n_raw, generator=gen, dtype=dtype)
    return constrain_params(raw, config)


def _params(config, w, a, b, c, alpha):
    """SmoothParams of shape (1, K) from explicit constrained values."""
    t = lambda v: torch.tensor([v], dtype=F64)
    return SmoothParams(torch.log(t(w) / t(w).sum()), t(a), t(b), t(c), t(alpha))


def _log_density(config, params):
    """x (N,) -> log f'(x) with one parameter set broadcast over N points."""
    def ell(x):
        p = SmoothParams(*(q.expand(x.shape[0], -1) for q in params))
        return torch.log(mixture_cdf(x, p, config)[1])
    return ell


# ---------------------------------------------------------------------------------------------- transforms

def test_ramp_and_generalized_sigmoid():
    alpha = torch.tensor(1.3, dtype=F64)
    x = torch.tensor([-0.5, 0.0, 0.25, 1.0], dtype=F64)
    assert torch.equal(ramp(x, alpha)[:2], torch.zeros(2, dtype=F64))
    assert torch.allclose(ramp(x, alpha)[2:], torch.exp(-1.3 / x[2:]))
    u = torch.linspace(-0.2, 1.2, 141, dtype=F64, requires_grad=True)
    s, ds = generalized_sigmoid(u, alpha, beta=2)
    assert s[u <= 0].abs().max() == 0 and (s[u >= 1] - 1).abs().max() == 0
    assert torch.isclose(generalized_sigmoid(torch.tensor(0.5, dtype=F64), alpha)[0], torch.tensor(0.5, dtype=F64))
    (auto,) = torch.autograd.grad(s.sum(), u)
    assert torch.allclose(auto, ds, atol=1e-12)
    # the bump and its derivative vanish near the ends (all derivatives vanish at 0 and 1)
    edge = torch.tensor([1e-3, 1 - 1e-3], dtype=F64)
    assert generalized_sigmoid(edge, alpha, 2)[1].max() < 1e-100


@pytest.mark.parametrize("beta", [1, 2])
def test_alpha_floor_is_the_unimodality_threshold(beta):
    """At the floor the bump's curvature at 1/2 is zero: above it unimodal, below it bimodal."""
    def curvature(alpha):
        u = torch.tensor([0.5 - 1e-3, 0.5, 0.5 + 1e-3], dtype=F64)
        d = generalized_sigmoid(u, torch.tensor(alpha, dtype=F64), beta)[1]
        return float(d[0] + d[2] - 2 * d[1])
    floor = ALPHA_FLOOR[beta]
    assert curvature(floor * 1.01) < 0 < curvature(floor * 0.99)
    u = torch.linspace(0.01, 0.99, 981, dtype=F64)
    bump = generalized_sigmoid(u, torch.tensor(floor * 1.01, dtype=F64), beta)[1]
    assert int(bump.argmax()) == 490  # single maximum, at 1/2


@pytest.mark.parametrize("domain", ["interval", "circle"])
def test_mixture_is_monotone_bijection_with_fixed_endpoints(domain):
    config = SmoothTransformConfig(domain=domain, n_components=6)
    params = _random_params(config, (50,), scale=2.0)
    x = torch.linspace(0, 1, 2001, dtype=F64)[:, None].expand(-1, 50)
    p = SmoothParams(*(q.expand(2001, -1, -1) for q in params))
    y, dy = mixture_cdf(x, p, config)
    assert (dy >= config.c_min).all()
    assert (y.diff(dim=0) > 0).all()
    assert y[0].abs().max() < 1e-14 and (y[-1] - 1).abs().max() < 1e-14
    # exact derivative
    xr = torch.rand(7, 50, dtype=F64, requires_grad=True)
    yr, dyr = mixture_cdf(xr, params, config)
    (auto,) = torch.autograd.grad(yr.sum(), xr)
    assert torch.allclose(auto, dyr, atol=1e-12)
    if domain == "circle":  # density and its derivatives wrap: f'(0) = f'(1), f''(0) = f''(1), f'''(0) = f'''(1)
        ends = torch.tensor([0.0, 1.0], dtype=F64)[:, None].expand(-1, 50).clone().requires_grad_(True)
        pe = SmoothParams(*(q.expand(2, -1, -1) for q in params))
        d1 = mixture_cdf(ends, pe, config)[1]
        (d2,) = torch.autograd.grad(d1.sum(), ends, create_graph=True)
        (d3,) = torch.autograd.grad(d2.sum(), ends)
        for d in (d1, d2, d3):
            assert torch.allclose(d[0], d[1], rtol=1e-9, atol=1e-9)


def _jumps(ell, x0, h, period=None):
    """One-sided finite-difference first and second derivatives of ell left and right of x0: |right - left|."""
    offsets = torch.tensor([-2 * h, -h, 0.0, h, 2 * h], dtype=F64)
    pts = x0 + offsets
    if period is not None:
        pts = torch.remainder(pts, period)
    v = ell(pts)
    d1_left, d1_right = (v[2] - v[1]) / h, (v[3] - v[2]) / h
    d2_left, d2_right = (v[2] - 2 * v[1] + v[0]) / h**2, (v[4] - 2 * v[3] + v[2]) / h**2
    return float((d1_right - d1_left).abs()), float((d2_right - d2_left).abs()), float(v.abs().max())


def test_log_density_is_C2_across_component_boundaries_and_seam_but_spline_is_not():
    """Finite-difference jumps of d/dx and d^2/dx^2 log-density: they vanish like h for smooth flows,
    they stay finite at a rational-quadratic spline knot (zuko's spline: its log-density is only C^0)."""
    interval = SmoothTransformConfig(domain="interval", n_components=2)
    circle = SmoothTransformConfig(domain="circle", n_components=2)
    # component 0 has support [b - 1/(2a), b + 1/(2a)] = [0.375, 0.625]: boundary at 0.375
    p_int = _params(interval, [0.7, 0.3], [4.0, 1.5], [0.5, 0.2], [0.05, 0.3], [1.2, 2.0])
    # on the circle component 0 straddles the seam (support [-0.117, 0.217])
    p_circ = _params(circle, [0.6, 0.4], [3.0, 2.0], [0.05, 0.6], [0.05, 0.2], [1.0, 1.5])
    spline = zuko.transforms.MonotonicRQSTransform(
        torch.tensor([0.3, -0.5, 0.8, 0.1], dtype=F64), torch.tensor([-0.4, 0.9, 0.2, -0.3], dtype=F64),
        torch.tensor([0.7, -0.8, 0.5], dtype=F64), bound=1.0)
    knot = spline.horizontal[2].item()
    spline_ell = lambda x: spline.call_and_ladj(x)[1]
    cases = {"boundary": (_log_density(interval, p_int), 0.375, None),
             "seam": (_log_density(circle, p_circ), 0.0, 1.0),
             "spline": (spline_ell, knot, None)}
    res = {k: [_jumps(ell, x0, h, per) for h in (1e-3, 1e-4)] for k, (ell, x0, per) in cases.items()}
    for name in ("boundary", "seam"):
        (j1a, j2a, _), (j1b, j2b, _) = res[name]
        # left/right one-sided differences of a C^3 function differ by O(h): 10x smaller h, 10x smaller jump
        assert j1b < 0.15 * j1a and j2b < 0.15 * j2a, (name, res[name])
    (s1a, s2a, _), (s1b, s2b, _) = res["spline"]
    assert s1b > 0.1 and s2b > 10.0, res["spline"]             # the spline's force jumps at the knot ...
    assert s1b > 0.8 * s1a and s2b > 0.8 * s2a, res["spline"]  # ... and the jumps do not shrink with h


# ----------------------------------------------------------------------------------------------- inverse

@pytest.mark.parametrize("domain", ["interval", "circle"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_accuracy(domain, dtype):
    config = SmoothTransformConfig(domain=domain, n_components=8)
    params = tuple(_random_params(config, (500, 4), scale=1.5, dtype=dtype))
    x = torch.rand(500, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y, dy = mixture_cdf(x, SmoothParams(*params), config)
    stats = RootFindingStats()
    config_rf = RootFindingConfig(n_bins=32)
    x_hat = solve_monotone(_fn(config), y, params, config_rf, stats)
    tol = config_rf.tolerance(dtype)
    assert tol == (1e-6 if dtype == torch.float32 else 1e-10)
    assert stats.n_failed == 0 and stats.max_bracket_last <= tol
    assert stats.n_passes_last == passes_needed(32, tol)
    err = (x_hat - x).abs()
    if dtype == torch.float64:
        assert err.max() <= 1e-10
    else:
        # float32: error bounded by the tolerance plus the conditioning limit (rounding of f) / f'
        eps = torch.finfo(torch.float32).eps
        assert (err <= tol + 4 * eps / dy).all()
        assert (err[dy > 0.5] <= tol).all()
    residual = (mixture_cdf(x_hat, SmoothParams(*params), config)[0] - y).abs()
    assert residual.max() <= (1e-6 if dtype == torch.float32 else 1e-12)


def test_plain_bisection_and_newton_polish():
    config = SmoothTransformConfig(n_components=3)
    params = tuple(_random_params(config, (64,)))
    x = torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(2))
    y, _ = mixture_cdf(x, SmoothParams(*params), config)
    stats = RootFindingStats()
    x_hat = solve_monotone(_fn(config), y, params, RootFindingConfig(n_bins=2, tol=1e-6, n_newton=3), stats)
    assert stats.n_passes_last == 20  # 2^-20 < 1e-6
    assert (x_hat - x).abs().max() < 1e-13  # Newton polishes far below the bracket


def test_nonconvergence_is_reported_never_silent():
    config = SmoothTransformConfig(n_components=3)
    params = tuple(_random_params(config, (8,)))
    y = torch.linspace(0.05, 0.95, 8, dtype=F64)
    y_bad = y.clone()
    y_bad[3] = 1.5  # outside the range of f
    with pytest.raises(InverseNotConvergedError, match="1 of 8"):
        solve_monotone(_fn(config), y_bad, params)
    stats = RootFindingStats()
    with pytest.warns(RootFindingWarning, match="1 of 8"):
        solve_monotone(_fn(config), y_bad, params, RootFindingConfig(on_failure="warn"), stats)
    assert stats.n_failed == 1 and len(stats.failures) == 1
    # a tolerance float32 cannot reach within max_passes
    with pytest.raises(InverseNotConvergedError):
        solve_monotone(_fn(config), y.float(), tuple(p.float() for p in params),
                       RootFindingConfig(tol=1e-12, max_passes=10))
    nan_params = tuple(p.clone() for p in params)
    nan_params[1][2] = float("nan")
    with pytest.raises(InverseNotConvergedError, match="non-finite"):
        solve_monotone(_fn(config), y, nan_params)


def test_layer_counts_and_raises_on_bad_input():
    layer = SmoothCouplingLayer(["interval", "circle"], [0, 1], n_components=3, hidden=(8,)).double()
    y = torch.tensor([[0.3, 0.4], [1.7, 0.2]], dtype=F64)
    with pytest.raises(InverseNotConvergedError):
        layer(y, inverse=False)
    assert layer.rootfinding_stats.n_failed == 1
    with pytest.raises(ValueError, match="domains"):
        SmoothCouplingLayer(["interval", "torus"], [0])
    with pytest.raises(ValueError, match="analytic"):
        SmoothCouplingLayer(["interval"], [0], analytic="both")
    with pytest.raises(ValueError, match="a_min"):
        SmoothTransformConfig(domain="circle", a_min=0.5)


# --------------------------------------------------------------------------------------------- gradients

def _leaf_params(config, shape, seed=0):
    return [p.detach().requires_grad_(True) for p in _random_params(config, shape, seed=seed)]


@pytest.mark.parametrize("domain", ["interval", "circle"])
def test_implicit_gradients_match_finite_differences(domain):
    """gradcheck / gradgradcheck (finite differences) of x = f^-1(y; params) and of log|dx/dy|."""
    config = SmoothTransformConfig(domain=domain, n_components=3)
    params = _leaf_params(config, (2, 2))
    y = torch.tensor([[0.1, 0.45], [0.7, 0.97]], dtype=F64, requires_grad=True)
    fn = _fn(config)
    inverse = lambda y, *ps: implicit_inverse(fn, y, ps)
    inverse_logdet = lambda y, *ps: -torch.log(fn(implicit_inverse(fn, y, ps), ps)[1])
    for f in (inverse, inverse_logdet):
        assert torch.autograd.gradcheck(f, (y, *params), atol=1e-7)
        assert torch.autograd.gradgradcheck(f, (y, *params), atol=1e-6)


def _unrolled_bisection(fn, y, params, n_iter=20):
    """Differentiable reference: bisection with the bracket ends' f-values in the graph, then secant."""
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        below = fn(mid.detach(), params)[0] <= y
        lo, hi = torch.where(below, mid, lo).detach(), torch.where(below, hi, mid).detach()
    f_lo, f_hi = fn(lo, params)[0], fn(hi, params)[0]
    return lo + (y - f_lo) * (hi - lo) / (f_hi - f_lo)


def _unrolled_newton(fn, y, params, n_iter=4):
    x = solve_monotone(fn, y, params)
    for _ in range(n_iter):
        fx, dfx = fn(x, params)
        x = x - (fx - y) / dfx
    return x


def test_implicit_gradients_match_unrolled_solvers():
    """First derivatives vs autograd through an unrolled bisection; second derivatives (double backward)
    vs autograd through unrolled Newton iterations."""
    config = SmoothTransformConfig(domain="circle", n_components=4)
    fn = _fn(config)
    params = _leaf_params(config, (16,), seed=3)
    y = torch.rand(16, dtype=F64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    weights = torch.linspace(0.5, 1.5, 16, dtype=F64)
    x_impl = implicit_inverse(fn, y, params)
    g_impl = torch.autograd.grad((weights * x_impl).sum(), [y, *params])
    g_ref = torch.autograd.grad((weights * _unrolled_bisection(fn, y, params)).sum(), [y, *params])
    for a, b in zip(g_impl, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # double backward: gradient of sum (dx/dy)^2 (a force-matching-like term) w.r.t. y and params
    def second(inverse):
        x = inverse(fn, y, params)
        (dxdy,) = torch.autograd.grad(x.sum(), y, create_graph=True)
        return torch.autograd.grad((weights * dxdy**2).sum(), [y, *params])
    for a, b in zip(second(implicit_inverse), second(_unrolled_newton)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_gradients_reach_conditioner_inputs_through_the_inverse():
    """The root-found direction of a coupling layer: gradients w.r.t. the conditioning coordinates
    (and to second order) match finite differences, and they are not zero."""
    torch.manual_seed(0)
    layer = SmoothCouplingLayer(["circle", "interval", "interval"], [1, 2], n_components=3, hidden=(8,),
                                analytic="inverse").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.rand(2, 3, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    sample = lambda z: layer(z)  # forward = root finding here
    assert torch.autograd.gradcheck(sample, (z,), atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda z: layer(z)[1], (z,), atol=1e-6)
    y, logdet = layer(z)
    (g,) = torch.autograd.grad(y[:, 1:].sum() + logdet.sum(), z)
    assert g[:, 0].abs().min() > 1e-6  # coordinate 0 only conditions: its gradient comes via the conditioner


@pytest.mark.parametrize("analytic", ["forward", "inverse"])
def test_coupling_flow_roundtrip_logdet_and_circle_wrap(analytic):
    torch.manual_seed(1)
    domains = ["circle", "interval", "circle", "interval", "interval"]
    flow = smooth_coupling_flow(domains, n_layers=4, n_components=4, hidden=(16,), analytic=analytic).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z = torch.rand(6, 5, dtype=F64, generator=torch.Generator().manual_seed(6))
    y, logdet = flow(z)
    assert ((y >= 0) & (y <= 1)).all() and ((y[:, [0, 2]] < 1)).all()
    z_back, logdet_inv = flow(y, inverse=True)
    d = z_back - z
    d[:, [0, 2]] -= torch.round(d[:, [0, 2]])  # circles: equal modulo 1
    assert d.abs().max() < 1e-9
    assert (logdet + logdet_inv).abs().max() < 1e-9
    jac = torch.autograd.functional.jacobian(lambda t: flow(t[None])[0][0], z[0])
    assert abs(torch.linalg.slogdet(jac)[1] - logdet[0]) < 1e-9
    # the density is periodic in circle inputs: log q at x and at the same point across the seam agree
    y_seam = y[:1].repeat(2, 1)
    y_seam[0, 0], y_seam[1, 0] = 1e-9, 1.0 - 1e-9
    ld = flow(y_seam, inverse=True)[1]
    assert abs(ld[0] - ld[1]) < 1e-6


def test_every_circle_parameter_comes_from_the_conditioner():
    """Torsion (circle) component concentrations are conditioner outputs: changing the conditioner input
    changes them, and the loss has a gradient with respect to them."""
    torch.manual_seed(2)
    layer = SmoothCouplingLayer(["interval", "circle"], [1], n_components=3, hidden=(8,)).double()
    with torch.no_grad():
        for p in layer.conditioner.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.tensor([[0.2, 0.5], [0.8, 0.5]], dtype=F64)
    _, p_circ, shift = layer._params(x)
    assert not torch.allclose(p_circ.a[0], p_circ.a[1]) and not torch.allclose(p_circ.alpha[0], p_circ.alpha[1])
    assert shift is not None and p_circ.a.shape == (2, 1, 3)
    out = layer.conditioner.net[-1]
    k = layer.config_circ.n_components
    grid = torch.stack([torch.full((50,), 0.3, dtype=F64), torch.linspace(0, 0.98, 50, dtype=F64)], dim=1)
    _, logdet = layer(grid, inverse=True)  # compact components: cover the circle so each one contributes
    (g_bias,) = torch.autograd.grad(logdet.pow(2).sum(), out.bias)
    assert g_bias[k:2 * k].abs().min() > 0  # the block of raw concentrations a


# ------------------------------------------------------------------------------------- force matching toy

def _toy_log_p(x):
    """Unnormalised log-density on circle x [0, 1) times interval [0, 1]."""
    phi, r = x[:, 0], x[:, 1]
    return 2.0 * torch.cos(2 * math.pi * (phi - 0.3)) - (r - 0.5 - 0.15 * torch.sin(2 * math.pi * phi)) ** 2 / 0.02


class _ToyFlow(torch.nn.Module):
    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def log_prob(self, x):
        return self.transform(x, inverse=True)[1]  # uniform prior on the box


def _fm_loss(flow, x, forces):
    try:
        from regflow_mm.training.objectives import force_matching_loss
    except ImportError:
        force_matching_loss = None
    if force_matching_loss is not None:
        return force_matching_loss(flow, x, forces)[0]
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(flow.log_prob(x).sum(), x, create_graph=True)
    return (forces - grad).pow(2).sum(1).mean()


@pytest.mark.parametrize("analytic", ["inverse", "forward"])
def test_force_matching_loss_decreases_on_toy(analytic):
    """Known forces grad log p on a circle x interval; with analytic='forward' the density goes through the
    root finder, so training uses the double backward of the implicit inverse."""
    torch.manual_seed(3)
    flow = _ToyFlow(smooth_coupling_flow(["circle", "interval"], n_layers=2, n_components=4, hidden=(16,),
                                         analytic=analytic)).double()
    gen = torch.Generator().manual_seed(7)
    x_test = torch.rand(256, 2, dtype=F64, generator=gen).requires_grad_(True)
    (f_test,) = torch.autograd.grad(_toy_log_p(x_test).sum(), x_test)
    x_test = x_test.detach()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    loss0 = float(_fm_loss(flow, x_test, f_test).detach())
    for _ in range(N_FM_STEPS):
        x = torch.rand(128, 2, dtype=F64, generator=gen).requires_grad_(True)
        (f,) = torch.autograd.grad(_toy_log_p(x).sum(), x)
        loss = _fm_loss(flow, x.detach(), f)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1 = float(_fm_loss(flow, x_test, f_test).detach())
    assert math.isfinite(loss1) and loss1 < 0.35 * loss0, (loss0, loss1)


# ------------------------------------------------------------------------- aldp smooth Boltzmann generator

def _aldp_flow(aldp, analytic):
    from regflow_mm.flows.factory import build_flow
    flow = build_flow(aldp, "internal", "smooth", n_layers=2, n_components=4, hidden=[16], analytic=analytic,
                      seed=0, dtype=F64)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in flow.transform.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return flow


@pytest.mark.parametrize("analytic", ["inverse", "forward"])
def test_aldp_smooth_boltzmann_flow(aldp, analytic, tmp_path):
    from regflow_mm.flows.io import load_flow
    flow = _aldp_flow(aldp, analytic)
    assert flow.latent_dim == 60 and sum(flow.representation.circular.tolist()) == 19
    layer = flow.transform.layers[0]
    assert {layer.domains[i] for i in layer.idx_circ.tolist()} == {"circle"}
    # sampling and density agree; log-det of the transform equals autograd's Jacobian
    with torch.no_grad():
        x, log_q = flow.sample(4, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(flow.log_prob(x), log_q, atol=1e-8)
        z = flow.prior.sample(3, generator=torch.Generator().manual_seed(10))
        y, logdet = flow.transform(z)
        z_back, logdet_inv = flow.transform(y, inverse=True)
    circ = flow.representation.circular
    d = z_back - z
    d[:, circ] -= torch.round(d[:, circ])
    assert d.abs().max() < 1e-9 and (logdet + logdet_inv).abs().max() < 1e-9
    jac = torch.autograd.functional.jacobian(lambda t: flow.transform(t[None])[0][0], z[0])
    assert abs(torch.linalg.slogdet(jac)[1] - logdet[0]) < 1e-8
    # forces are -dE/dx: check against a central finite difference of the energy along a direction
    x0 = torch.as_tensor(aldp.positions, dtype=F64)[None]
    e, f = flow.energy_and_forces(x0)
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11), dtype=F64)
    h = 1e-6
    fd = (flow.energy(x0 + h * direction) - flow.energy(x0 - h * direction)) / (2 * h)
    assert torch.isfinite(e).all() and torch.allclose(fd, -(f * direction).sum((1, 2)), rtol=1e-5, atol=1e-5)
    # save / load round trip through the architecture registry
    path = tmp_path / "smooth.pt"
    flow.save(path)
    loaded = load_flow(path, system=aldp)
    assert torch.allclose(loaded.log_prob(x0), flow.log_prob(x0), atol=1e-10)


def test_aldp_force_matching_gradient_through_root_finding(aldp):
    """Force matching with the density on the root-found side: parameters get finite, non-zero gradients."""
    from regflow_mm.training.objectives import force_matching_loss
    flow = _aldp_flow(aldp, "forward")
    x0 = torch.as_tensor(aldp.positions, dtype=F64)[None].repeat(2, 1, 1)
    x0 = x0 + 0.002 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(12), dtype=F64)
    forces = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13), dtype=F64)
    loss, _ = force_matching_loss(flow, x0, forces)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in flow.transform.parameters() if p.grad is not None])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    assert all(layer.rootfinding_stats.n_failed == 0 for layer in flow.transform.layers)
