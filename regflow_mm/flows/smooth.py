"""C-infinity mixture transforms on the interval [0, 1] and on the circle (smooth-flows paper, section 4).

Building blocks, all element-wise and batched over arbitrary leading shapes:

* ramp ``rho(x) = exp(-alpha / x**beta)`` for ``x > 0`` and 0 otherwise (C-infinity, all derivatives
  vanish at 0);
* generalised sigmoid ``sigma(x) = rho(x) / (rho(x) + rho(1 - x))``, a C-infinity bijection of [0, 1]
  whose derivative is a bump supported on [0, 1];
* a unimodal component ``g(x) = sigma(a (x - b) + 1/2)`` (concentration ``a``, location ``b``),
  rescaled to map [0, 1] onto itself (interval) or wrapped over the integers (circle), mixed with the
  identity ``(1 - c) F(x) + c x``;
* a mixture ``f(x) = sum_k w_k [(1 - c_k) F_k(x) + c_k x]`` with softmax weights.

``f`` maps [0, 1] onto [0, 1] monotonically with f(0) = 0, f(1) = 1. On the circle the density
``f'`` is periodic and C-infinity across the seam because every component has compact support inside
``(-1, 2)`` and is summed over its three integer shifts. ``f' >= min_k c_k > 0`` keeps the log-density
bounded and the numerical inverse well conditioned.

Stiffness. A flow potential -kT log q used for dynamics needs bounded curvature. Every bump has compact
support, so where it falls to the floor c the log-density falls by up to log(1/c) over a distance that
shrinks like 1/a: the second derivative of log f' there grows like a^2 (the flanks of a gap between
components). With a bounded concentration ``a <= a_max`` (``SmoothTransformConfig.a_max``) the derivatives
of log f' are bounded for every parameter value; :func:`stiffness_bound` gives the bounds.

Parameters come unconstrained (e.g. from a conditioner network) and are mapped by
:func:`constrain_params`; every one of them, including the concentration of circle components, is free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn import functional as F

DOMAINS = ("interval", "circle")

# Smallest alpha for which the bump sigma' of the ramp exp(-alpha / x**beta) is unimodal: below it the
# bump has a local minimum at 1/2. Solving sigma'''(1/2) = 0 gives alpha = sqrt(3)/2 (beta = 1) and
# sqrt(6)/8 (beta = 2); the published code used slightly smaller rounded values (0.8656721, 0.3052033).
ALPHA_FLOOR = {1: math.sqrt(3.0) / 2.0, 2: math.sqrt(6.0) / 8.0}

# Inputs of the ramp closer than this to 0 or 1 are clamped: there exp(-alpha / x**beta) < exp(-3000)
# for every admissible alpha, i.e. exactly 0 in float64, and clamping keeps all autograd paths finite.
_RAMP_EPS = 1e-4

N_RAW_PER_COMPONENT = 5  # weight logit, concentration a, location b, identity mix c, ramp alpha


class SmoothParams(NamedTuple):
    """Constrained mixture parameters, each of shape ``S + (K,)`` for inputs of shape ``S``.

    ``log_w``: log mixture weights (log-softmax); ``a``: concentration (> ``a_min``, 1/width);
    ``b``: location in (0, 1); ``c``: identity mixing in (c_min, 1); ``alpha``: ramp steepness.
    """

    log_w: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    alpha: torch.Tensor


@dataclass(frozen=True)
class SmoothTransformConfig:
    """Hyper-parameters of a smooth mixture transform.

    ``domain``: 'interval' or 'circle'; ``n_components``: K; ``beta``: ramp power (1 or 2);
    ``a_min``: smallest concentration (>= 1 on the circle so a component's support fits in one period);
    ``c_min``: floor of the identity mixing, hence of the density f' >= c_min;
    ``alpha_max``: alpha lies in (floor(beta), floor(beta) + alpha_max);
    ``a_max``: None (concentration unbounded, a = a_min + softplus) or the largest concentration
    (a = a_min + (a_max - a_min) sigmoid), which bounds the curvature of log f' (:func:`stiffness_bound`).
    """

    domain: str = "interval"
    n_components: int = 8
    beta: int = 1
    a_min: float = 1.0
    c_min: float = 1e-3
    alpha_max: float = 10.0
    a_max: float | None = None

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.beta not in ALPHA_FLOOR:
            raise ValueError(f"beta must be 1 or 2 (ramp exp(-alpha/x^beta)), got {self.beta!r}")
        if self.n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {self.n_components}")
        if self.domain == "circle" and self.a_min < 1.0:
            raise ValueError(f"circle components need a_min >= 1 (support inside one period), got {self.a_min}")
        if self.a_min <= 0.0:
            raise ValueError(f"a_min must be positive, got {self.a_min}")
        if not 0.0 < self.c_min < 1.0:
            raise ValueError(f"c_min must lie in (0, 1), got {self.c_min}")
        if self.alpha_max <= 0.0:
            raise ValueError(f"alpha_max must be positive, got {self.alpha_max}")
        if self.a_max is not None and not self.a_max > self.a_min:
            raise ValueError(f"a_max must exceed a_min = {self.a_min} (or be None: unbounded), got {self.a_max}")

    @property
    def n_raw(self) -> int:
        """Unconstrained numbers per transformed element: 5 K."""
        return N_RAW_PER_COMPONENT * self.n_components


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def initial_raw(config: SmoothTransformConfig, identity_mix: float = 0.1) -> torch.Tensor:
    """Unconstrained parameters (5K,) of a near-identity transform: equal weights, locations on a grid
    (k + 1/2)/K, widths 2/K (neighbouring bumps overlap, the sum is nearly flat), ramp alpha at 1 + floor.
    Use as the bias of a zero-initialised conditioner output layer."""
    k = config.n_components
    grid = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    a0 = torch.full((k,), max(k / 2.0, config.a_min + 0.5), dtype=torch.float64)
    if config.a_max is None:
        a_raw = _inv_softplus(a0 - config.a_min)
    else:
        a_raw = torch.logit((a0.clamp(max=0.5 * (config.a_min + config.a_max)) - config.a_min)
                            / (config.a_max - config.a_min))
    c_init = identity_mix if identity_mix > config.c_min else 0.5 * (1.0 + config.c_min)
    c0 = torch.full((k,), (c_init - config.c_min) / (1.0 - config.c_min), dtype=torch.float64)
    alpha0 = torch.full((k,), 1.0 / config.alpha_max, dtype=torch.float64)
    raw = torch.stack([torch.zeros(k, dtype=torch.float64), a_raw,
                       torch.logit(grid), torch.logit(c0), torch.logit(alpha0)], dim=0)
    return raw.reshape(-1).float()


def constrain_params(raw: torch.Tensor, config: SmoothTransformConfig) -> SmoothParams:
    """Map unconstrained ``raw`` of shape ``S + (5K,)`` (blocks: weights, a, b, c, alpha) to SmoothParams."""
    if raw.shape[-1] != config.n_raw:
        raise ValueError(f"expected {config.n_raw} raw parameters per element (5 x {config.n_components} "
                         f"components), got {raw.shape[-1]}")
    w, a, b, c, alpha = raw.unflatten(-1, (N_RAW_PER_COMPONENT, config.n_components)).unbind(-2)
    return SmoothParams(
        log_w=torch.log_softmax(w, dim=-1),
        a=config.a_min + (F.softplus(a) if config.a_max is None else (config.a_max - config.a_min) * torch.sigmoid(a)),
        b=torch.sigmoid(b),
        c=config.c_min + (1.0 - config.c_min) * torch.sigmoid(c),
        alpha=ALPHA_FLOOR[config.beta] + config.alpha_max * torch.sigmoid(alpha),
    )


def ramp(x: torch.Tensor, alpha: torch.Tensor, beta: int = 1) -> torch.Tensor:
    """C-infinity ramp ``exp(-alpha / x**beta)`` for x > 0, 0 for x <= 0."""
    positive = x > 0
    xs = torch.where(positive, x, torch.ones_like(x))
    return torch.where(positive, torch.exp(-alpha / xs**beta), torch.zeros_like(x))


def generalized_sigmoid(u: torch.Tensor, alpha: torch.Tensor, beta: int = 1, derivative: bool = True):
    """``sigma(u) = rho(u) / (rho(u) + rho(1 - u))`` and its derivative (the bump; None if not
    ``derivative``), extended by 0 below 0 and 1 above 1.

    Computed as ``sigmoid(log rho(u) - log rho(1 - u))`` so nothing under- or overflows.
    """
    us = u.clamp(_RAMP_EPS, 1.0 - _RAMP_EPS)
    v = 1.0 - us
    z = alpha * (v.pow(-beta) - us.pow(-beta))
    s = torch.sigmoid(z)
    # Outside (eps, 1 - eps) s is 0 or 1 and ds 0 to machine precision; where() keeps those exact.
    inside = (u > _RAMP_EPS) & (u < 1.0 - _RAMP_EPS)
    s_out = torch.where(inside, s, (u >= 0.5).to(s.dtype))
    if not derivative:
        return s_out, None
    ds = s * torch.sigmoid(-z) * alpha * beta * (us.pow(-beta - 1) + v.pow(-beta - 1))
    return s_out, torch.where(inside, ds, torch.zeros_like(ds))


def _component(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, beta: int,
               derivative: bool = True):
    """g(x) = sigma(a (x - b) + 1/2) and g'(x) (None if not ``derivative``)."""
    s, ds = generalized_sigmoid(a * (x - b) + 0.5, alpha, beta, derivative)
    return s, (a * ds if derivative else None)


def component_cdf(x: torch.Tensor, params: SmoothParams, config: SmoothTransformConfig, derivative: bool = True):
    """Unimodal component CDFs F_k(x) and densities F_k'(x) (None if not ``derivative``), shape ``S + (K,)``.

    Interval: ``(g(x) - g(0)) / (g(1) - g(0))``. Circle: ``sum_{m=-1,0,1} g(x + m) - g(m)``, the lift of
    the wrapped component with F(0) = 0, F(1) = 1 (needs a >= 1, b in [0, 1] and x in [0, 1]).
    """
    xk = x.unsqueeze(-1)
    a, b, alpha, beta = params.a, params.b, params.alpha, config.beta
    if config.domain == "interval":
        g, dg = _component(xk, a, b, alpha, beta, derivative)
        g0, _ = _component(torch.zeros_like(a), a, b, alpha, beta, False)
        g1, _ = _component(torch.ones_like(a), a, b, alpha, beta, False)
        norm = g1 - g0
        return (g - g0) / norm, (dg / norm if derivative else None)
    # The support of g has width 1/a <= 1, so at most one shift m puts u_m = a (x + m - b) + 1/2 inside
    # (0, 1): the smallest m with u_m >= 0. Shifts below it give g = 0, shifts above it g = 1, so the
    # three-term sum needs one sigmoid evaluation. The pieces agree to all orders where m switches.
    u0 = a * (xk - b) + 0.5
    m = torch.ceil(-u0 / a).clamp(-1.0, 1.0).detach()
    s, ds = generalized_sigmoid(u0 + a * m, alpha, beta, derivative)
    g_shifts = sum(_component(torch.full_like(a, float(k)), a, b, alpha, beta, False)[0] for k in (-1, 0, 1))
    cdf = s + (1.0 - m) - g_shifts
    return cdf, (a * ds if derivative else None)


def mixture_cdf(x: torch.Tensor, params: SmoothParams, config: SmoothTransformConfig, derivative: bool = True):
    """Smooth mixture transform ``f(x)`` and its derivative ``f'(x) > 0`` (None if not ``derivative``).

    ``f(x) = sum_k w_k [(1 - c_k) F_k(x) + c_k x]``; x of shape S in [0, 1], params of shape S + (K,).
    """
    cdf, pdf = component_cdf(x, params, config, derivative)
    w = params.log_w.exp()
    y = (w * ((1.0 - params.c) * cdf + params.c * x.unsqueeze(-1))).sum(-1)
    if not derivative:
        return y, None
    return y, (w * ((1.0 - params.c) * pdf + params.c)).sum(-1)


def stiffness_bound(config: SmoothTransformConfig, n_grid: int = 20001, n_alpha: int = 41) -> tuple[float, float]:
    """Bounds (B1, B2) on |d log f'/dx| and |d^2 log f'/dx^2| over x in [0, 1], valid for every parameter
    value the config admits (mixture weights, locations, identity mixing, ramp steepness); needs ``a_max``.

    With f' = sum_k B_k, f'' = sum_k A_k, f''' = sum_k C_k and every B_k > 0: |f''| / f' <= max_k |A_k| / B_k
    and |f'''| / f' <= max_k |C_k| / B_k. Per component, y = a (x - b) + 1/2 and normaliser n in [1/2, 1]
    (interval: n = g(1) - g(0) >= sigma(1) - 1/2 for a >= 1 and b in [0, 1]; circle: n = 1):
    B = w (1 - c) (a sigma'(y) / n + c / (1 - c)), A = w (1 - c) a^2 sigma''(y) / n,
    C = w (1 - c) a^3 sigma'''(y) / n, so |A| / B <= a S2 and |C| / B <= a^2 S3 with
    S_j = sup_y |sigma^(j)(y)| / (sigma'(y) + eps), eps = c_min / (2 a_max) (both increase with a). Hence
    B1 = a_max S2 and, as (log f')'' = f'''/f' - (f''/f')^2, B2 = a_max^2 (S3 + S2^2). The suprema are
    taken on ``n_grid`` points y in (0, 1) and ``n_alpha`` ramp steepnesses alpha over the admitted range.
    """
    if config.a_max is None:
        raise ValueError("stiffness_bound needs a bounded concentration: set SmoothTransformConfig.a_max")
    eps = config.c_min / (2.0 * config.a_max)
    y = torch.linspace(0.0, 1.0, n_grid, dtype=torch.float64)[1:-1]
    floor = ALPHA_FLOOR[config.beta]
    s2 = s3 = 0.0
    for alpha in torch.linspace(floor, floor + config.alpha_max, n_alpha, dtype=torch.float64):
        yy = y.clone().requires_grad_(True)
        _, d1 = generalized_sigmoid(yy, alpha, config.beta)
        (d2,) = torch.autograd.grad(d1.sum(), yy, create_graph=True)
        (d3,) = torch.autograd.grad(d2.sum(), yy)
        d1 = d1.detach()
        s2 = max(s2, float((d2.detach().abs() / (d1 + eps)).max()))
        s3 = max(s3, float((d3.abs() / (d1 + eps)).max()))
    return config.a_max * s2, config.a_max ** 2 * (s3 + s2 ** 2)
