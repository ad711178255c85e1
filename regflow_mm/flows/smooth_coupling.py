"""Smooth coupling layers on products of intervals [0, 1] and circles (flow coordinates in [0, 1)).

A :class:`SmoothCouplingLayer` transforms a subset of the coordinates with the C-infinity mixture
transforms of :mod:`regflow_mm.flows.smooth`, whose parameters (weights, concentrations, locations,
identity mixing, ramp steepness, and a rotation for circle coordinates) are all outputs of a conditioner
network of the remaining coordinates. The conditioner embeds circle inputs as ``(cos 2 pi x, sin 2 pi x)``
so it is smooth and periodic across the seam, and uses SiLU activations so the density stays C-infinity.

Which direction is analytic is configurable: ``analytic='inverse'`` (default) evaluates the mixture on
data -> noise (densities and forces of data analytic; sampling needs root finding),
``analytic='forward'`` evaluates it on noise -> data (sampling analytic; densities of data need the
numerical inverse, and forces of data then need its second derivatives).
Both directions have exact log-dets and gradients to second order.

Interval coordinates (bonds, angles and narrow torsions of internal coordinates) can instead take a
conditional logit-affine map (``interval='logistic'``): ``v = sigmoid(exp(s) logit(u) + mu)`` with shift
``mu`` and log-scale ``s = max_log_scale tanh(.)`` from the conditioner, analytic in both directions. Along its
own coordinate z = logit(u) it has log-derivative ``s + log sigmoid'(z') - log sigmoid'(z)``, z' = exp(s) z + mu,
whose second derivative lies in [-exp(2 s) / 2, 1/2]: its stiffness is bounded for every parameter value.
The mixture's compact-support bumps are not: where a bump falls to the identity floor the log-density drops
by up to log(1/c) over a fraction of the bump's width (``smooth.stiffness_bound``), and on the stiff
coordinates (a C-H bond, a methyl hydrogen's improper torsion) such a flank is a spring far stiffer than the
force field's (BENCHMARKS.md, issue 12). Circle coordinates always use the mixtures.

``interval='probit'`` is the same with the standard normal CDF Phi in place of the sigmoid:
``v = Phi(exp(s) Phi^-1(u) + mu)``, log-derivative ``s - (z'^2 - z^2) / 2`` along z = Phi^-1(u), whose second
derivative is exactly ``1 - exp(2 s)``. Stacked on a uniform prior, the flow's density along each such
coordinate is a normal density in z with a conditional mean and scale: with the representation's
``open_map='normal'`` (u = Phi((t - m) / s)) the flow potential along a bond is quadratic in log r, the
shape of the force field's harmonic bond, so force matching can fit the bond's stiffness without the
over-stiff centre a logistic profile needs to match Gaussian tails.

Which coordinates condition the torsions (``circle_conditioning``). With 'all' (default) one conditioner sees
every untransformed coordinate. Its inputs are standardised, and a C-H bond's standard deviation is ~0.003 nm, so
an O(1) slope per standard deviation, which costs the likelihood nothing, lets a backbone torsion's mixture or
rotation turn by a good part of a circle per 0.01 nm of hydrogen motion: a stiff spring in the flow potential
(hydrogen modes up to 3 fs^-1 against the force field's 0.6; BENCHMARKS.md, issue 12). With 'circles' the circle
coordinates get a conditioner of their own that sees the untransformed circles only, while intervals still see
everything: the flow factorises as q(circles) q(the rest | circles), no loss of generality (chain rule). With
'torsions' the narrow torsions (intervals, ``torsion_dims``) join the circles' group. Both remove the stiffest
modes at equilibrium frames, but neither made Langevin on aldp's flow potential stable (BENCHMARKS.md).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import nn

from ..representations.internal import log_sigmoid_grad
from .base import SequentialFlow
from .coupling import CouplingLayer
from .priors import default_prior
from .rootfinding import RootFindingConfig, RootFindingStats, implicit_inverse
from .smooth import DOMAINS, SmoothParams, SmoothTransformConfig, constrain_params, initial_raw, mixture_cdf

ANALYTIC = ("forward", "inverse")
INTERVAL_MAPS = ("mixture", "logistic", "probit")
CIRCLE_CONDITIONING = ("all", "circles", "torsions")


def _logit(u: torch.Tensor) -> torch.Tensor:
    """logit of u in [0, 1]; 0 and 1 (reached only by rounding) are moved to the nearest interior float."""
    eps = torch.finfo(u.dtype).tiny
    uc = u.clamp(eps, 1.0 - torch.finfo(u.dtype).eps / 2)
    return torch.log(uc) - torch.log1p(-uc)


def logistic_map(u: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor, inverse: bool = False):
    """Logit-affine bijection of (0, 1): ``v = sigmoid(exp(s) logit(u) + mu)`` (``inverse``: its inverse) and
    log |dv/du| of the map applied, elementwise, all of the same shape."""
    z = _logit(u)
    if inverse:
        z_out = (z - mu) * torch.exp(-log_scale)
        logdet = -log_scale + log_sigmoid_grad(z_out) - log_sigmoid_grad(z)
    else:
        z_out = torch.exp(log_scale) * z + mu
        logdet = log_scale + log_sigmoid_grad(z_out) - log_sigmoid_grad(z)
    return torch.sigmoid(z_out), logdet


def probit_map(u: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor, inverse: bool = False):
    """Probit-affine bijection of (0, 1): ``v = Phi(exp(s) Phi^-1(u) + mu)`` (``inverse``: its inverse) and
    log |dv/du| of the map applied, elementwise, all of the same shape. In float64, u within ~1e-16 of 1
    (z > 8.2) rounds to 1 and is moved to the nearest interior float."""
    eps = torch.finfo(u.dtype).eps
    z = torch.special.ndtri(u.clamp(torch.finfo(u.dtype).tiny, 1.0 - eps / 2))
    z_out = (z - mu) * torch.exp(-log_scale) if inverse else torch.exp(log_scale) * z + mu
    logdet = (-log_scale if inverse else log_scale) - 0.5 * (z_out * z_out - z * z)
    return torch.special.ndtr(z_out), logdet


_AFFINE_MAPS = {"logistic": logistic_map, "probit": probit_map}


def open_map_for(interval: str) -> str:
    """The representation's ``open_map`` that an ``interval`` map is meant for: 'normal' under 'probit' (a
    normal density along each bond), 'logistic' otherwise."""
    return "normal" if interval == "probit" else "logistic"


def _mixture_fn(x: torch.Tensor, params: Sequence[torch.Tensor], derivative: bool = True, *,
                config: SmoothTransformConfig):
    return mixture_cdf(x, SmoothParams(*params), config, derivative)


class SmoothConditioner(nn.Module):
    """MLP from conditioning coordinates (B, C) in [0, 1) to raw parameters (B, n_out).

    Circle coordinates enter as (cos 2 pi x, sin 2 pi x), interval coordinates as 2 x - 1. The output
    layer starts at zero weight and bias ``init`` (a near-identity transform). With C = 0 the
    parameters are learned constants.
    """

    def __init__(self, domains: Sequence[str], init: torch.Tensor, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        self.register_buffer("is_circle", torch.tensor([d == "circle" for d in domains], dtype=torch.bool))
        n_in = sum(2 if d == "circle" else 1 for d in domains)
        self.n_cond = len(domains)
        if self.n_cond == 0:
            self.net = None
            self.bias = nn.Parameter(init.clone())
            return
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        out = nn.Linear(width, init.numel())
        nn.init.zeros_(out.weight)
        with torch.no_grad():
            out.bias.copy_(init)
        self.net = nn.Sequential(*layers, out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, C + n_circle) smooth, seam-free features."""
        angle = 2.0 * math.pi * x[:, self.is_circle]
        return torch.cat([2.0 * x[:, ~self.is_circle] - 1.0, torch.cos(angle), torch.sin(angle)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            return self.bias.to(x.dtype).expand(x.shape[0], -1)
        return self.net(self.embed(x))


class SmoothCouplingLayer(CouplingLayer):
    """Coupling layer: coordinates ``transformed`` are mapped by smooth mixtures conditioned on the rest.

    ``domains``: 'interval' or 'circle' for each of the D coordinates (all in [0, 1]; circles are [0, 1)
    with 0 ~ 1). ``n_components``: mixture size K; ``beta``: ramp power; ``hidden``: conditioner widths;
    ``analytic``: which direction evaluates the mixture in closed form; ``rootfinding``: inverse settings;
    ``circle_shift``: add a conditioned rotation to circle coordinates; ``c_min``: density floor.
    ``interval``: 'mixture' (smooth mixtures on interval coordinates too), 'logistic' or 'probit' (the
    logit- and probit-affine maps of the module docstring, log-scale bounded by ``max_log_scale``);
    ``a_max``: None or the largest mixture concentration (``SmoothTransformConfig.a_max``).
    ``circle_conditioning``: 'all', 'circles' (circle parameters from the untransformed circles only) or
    'torsions' (every torsion, circle or narrow interval, from the untransformed torsions only; needs
    ``torsion_dims``, the indices of the torsion coordinates); module docstring.
    Root-finding statistics of this layer are in ``self.rootfinding_stats``.
    """

    def __init__(self, domains: Sequence[str], transformed: Sequence[int], n_components: int = 8, beta: int = 1,
                 hidden: Sequence[int] = (64, 64), analytic: str = "inverse",
                 rootfinding: RootFindingConfig = RootFindingConfig(), circle_shift: bool = True,
                 c_min: float = 1e-3, interval: str = "mixture", max_log_scale: float = math.log(2.0),
                 a_max: float | None = None, circle_conditioning: str = "all",
                 torsion_dims: Sequence[int] | None = None):
        super().__init__()
        domains = list(domains)
        bad = [d for d in domains if d not in DOMAINS]
        if bad:
            raise ValueError(f"domains must be 'interval' or 'circle', got {bad[:3]}")
        if analytic not in ANALYTIC:
            raise ValueError(f"analytic must be 'forward' or 'inverse', got {analytic!r}")
        if interval not in INTERVAL_MAPS:
            raise ValueError(f"interval must be one of {INTERVAL_MAPS}, got {interval!r}")
        if not max_log_scale > 0:
            raise ValueError(f"max_log_scale must be > 0 (bound of the affine map's log-scale), got {max_log_scale}")
        if circle_conditioning not in CIRCLE_CONDITIONING:
            raise ValueError(f"circle_conditioning must be one of {CIRCLE_CONDITIONING}, got {circle_conditioning!r}")
        if circle_conditioning == "torsions" and torsion_dims is None:
            raise ValueError("circle_conditioning='torsions' needs torsion_dims (the indices of the torsion coordinates)")
        transformed = sorted(set(int(i) for i in transformed))
        if not transformed or transformed[0] < 0 or transformed[-1] >= len(domains):
            raise ValueError(f"transformed must be non-empty indices in [0, {len(domains)}), got {transformed}")
        mask = torch.zeros(len(domains), dtype=torch.bool)
        mask[transformed] = True
        self._init_coupling(mask, allow_all=True)
        conditioning = self._idx_b.tolist()
        self.analytic = analytic
        self.rootfinding = rootfinding
        self.rootfinding_stats = RootFindingStats()
        self.domains = domains
        # Saved in flow files (persistent), so it stays next to the skeleton's ``_idx_b``.
        self.register_buffer("idx_cond", self._idx_b.clone())
        self.register_buffer("idx_int", torch.tensor([i for i in transformed if domains[i] == "interval"],
                                                     dtype=torch.long))
        self.register_buffer("idx_circ", torch.tensor([i for i in transformed if domains[i] == "circle"],
                                                      dtype=torch.long))
        self.config_int = SmoothTransformConfig("interval", n_components, beta, a_min=1.0, c_min=c_min, a_max=a_max)
        self.config_circ = SmoothTransformConfig("circle", n_components, beta, a_min=1.0, c_min=c_min, a_max=a_max)
        self.interval = interval
        self.max_log_scale = float(max_log_scale)
        self.n_raw_int = 2 if interval in _AFFINE_MAPS else self.config_int.n_raw
        self.circle_shift = circle_shift and len(self.idx_circ) > 0
        n_int, n_circ = len(self.idx_int), len(self.idx_circ)
        init_int = torch.zeros(2) if interval in _AFFINE_MAPS else initial_raw(self.config_int)  # identity: mu = s = 0
        init_circ = [initial_raw(self.config_circ).repeat(n_circ)] + ([torch.zeros(n_circ)] if self.circle_shift else [])
        self.circle_conditioning = circle_conditioning
        if circle_conditioning == "all":
            self.conditioner = SmoothConditioner([domains[i] for i in conditioning],
                                                 torch.cat([init_int.repeat(n_int)] + init_circ), hidden)
        else:
            # The "soft" group (circles; with 'torsions' also the narrow torsions) has its own conditioner that
            # sees only the untransformed members of the group; the other intervals see every coordinate.
            soft = set(i for i, d in enumerate(domains) if d == "circle")
            if circle_conditioning == "torsions":
                soft |= set(int(i) for i in torsion_dims)
            int_soft = [k for k, i in enumerate(self.idx_int.tolist()) if i in soft]
            int_hard = [k for k, i in enumerate(self.idx_int.tolist()) if i not in soft]
            cond_soft = [i for i in conditioning if i in soft]
            self.register_buffer("idx_cond_soft", torch.tensor(cond_soft, dtype=torch.long))
            # raw interval parameters come as [hard | soft]; this permutation puts them back in idx_int order
            self.register_buffer("int_order", torch.argsort(torch.tensor(int_hard + int_soft, dtype=torch.long)))
            self.n_int_hard = len(int_hard)
            self.conditioner = SmoothConditioner([domains[i] for i in conditioning], init_int.repeat(len(int_hard)),
                                                 hidden)
            self.conditioner_soft = SmoothConditioner([domains[i] for i in cond_soft],
                                                      torch.cat([init_int.repeat(len(int_soft))] + init_circ), hidden)

    def _params(self, x: torch.Tensor):
        """One conditioner pass: (interval params, circle params, circle shift or None). Interval params of
        'logistic' and 'probit': (mu, log-scale s), each (B, n_int)."""
        n_int, n_circ = len(self.idx_int), len(self.idx_circ)
        k_int, k_circ = self.n_raw_int, self.config_circ.n_raw
        batch = x.shape[0]
        raw = self.conditioner(x[:, self.idx_cond])
        if self.circle_conditioning == "all":
            raw_int, rest = raw[:, : n_int * k_int].reshape(batch, n_int, k_int), raw[:, n_int * k_int:]
        else:
            soft = self.conditioner_soft(x[:, self.idx_cond_soft])
            n_soft = n_int - self.n_int_hard
            raw_int = torch.cat([raw.reshape(batch, self.n_int_hard, k_int),
                                 soft[:, : n_soft * k_int].reshape(batch, n_soft, k_int)], dim=1)[:, self.int_order]
            rest = soft[:, n_soft * k_int:]
        # rest: the circles' mixture parameters, then their rotations
        raw_circ = rest[:, : n_circ * k_circ].reshape(batch, n_circ, k_circ)
        shift = torch.sigmoid(rest[:, n_circ * k_circ:]) if self.circle_shift else None
        if self.interval in _AFFINE_MAPS:
            p_int = (raw_int[..., 0], self.max_log_scale * torch.tanh(raw_int[..., 1]))
        else:
            p_int = constrain_params(raw_int, self.config_int)
        return p_int, constrain_params(raw_circ, self.config_circ), shift

    def _closed_form(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_int, p_circ, shift = self._params(u)
        v = u.clone()
        logdet = u.new_zeros(u.shape[0])
        if len(self.idx_int) and self.interval in _AFFINE_MAPS:
            y, ld = _AFFINE_MAPS[self.interval](u[:, self.idx_int], *p_int)
            v[:, self.idx_int] = y
            logdet = logdet + ld.sum(-1)
        elif len(self.idx_int):
            y, dy = mixture_cdf(u[:, self.idx_int], p_int, self.config_int)
            v[:, self.idx_int] = y.clamp(0.0, 1.0)  # f maps [0, 1] onto itself; remove rounding overshoot
            logdet = logdet + torch.log(dy).sum(-1)
        if len(self.idx_circ):
            t = u[:, self.idx_circ]
            if shift is not None:
                t = torch.remainder(t - shift, 1.0)
            y, dy = mixture_cdf(t, p_circ, self.config_circ)
            if shift is not None:
                y = torch.remainder(y + shift, 1.0)
            v[:, self.idx_circ] = y
            logdet = logdet + torch.log(dy).sum(-1)
        return v, logdet

    def _root_found(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_int, p_circ, shift = self._params(v)
        u = v.clone()
        logdet = v.new_zeros(v.shape[0])
        if len(self.idx_int) and self.interval in _AFFINE_MAPS:  # analytic inverse, no root finding
            x, ld = _AFFINE_MAPS[self.interval](v[:, self.idx_int], *p_int, inverse=True)
            u[:, self.idx_int] = x
            logdet = logdet + ld.sum(-1)
        for idx, params, config in ((self.idx_int, p_int, self.config_int), (self.idx_circ, p_circ, self.config_circ)):
            if not len(idx) or (config is self.config_int and self.interval in _AFFINE_MAPS):
                continue
            t = v[:, idx]
            circle = config.domain == "circle" and shift is not None
            if circle:
                t = torch.remainder(t - shift, 1.0)
            fn = functools.partial(_mixture_fn, config=config)
            x = implicit_inverse(fn, t, tuple(params), self.rootfinding, self.rootfinding_stats)
            _, dx = mixture_cdf(x, params, config)
            if circle:
                x = torch.remainder(x + shift, 1.0)
            u[:, idx] = x
            logdet = logdet - torch.log(dx).sum(-1)
        return u, logdet

    def _forward(self, x):
        return self._closed_form(x) if self.analytic == "forward" else self._root_found(x)

    def _inverse(self, y):
        return self._root_found(y) if self.analytic == "forward" else self._closed_form(y)


def coupling_splits(dim: int, n_layers: int, seed: int = 0) -> list[list[int]]:
    """Transformed index sets for ``n_layers`` couplings: pairs of complementary random halves.

    With ``dim == 1`` every layer transforms the single coordinate unconditionally.
    """
    if dim < 1 or n_layers < 1:
        raise ValueError(f"need dim >= 1 and n_layers >= 1, got dim={dim}, n_layers={n_layers}")
    if dim == 1:
        return [[0] for _ in range(n_layers)]
    gen = torch.Generator().manual_seed(seed)
    splits = []
    while len(splits) < n_layers:
        perm = torch.randperm(dim, generator=gen).tolist()
        half = sorted(perm[: dim // 2])
        splits += [half, sorted(perm[dim // 2:])]
    return splits[:n_layers]


def smooth_coupling_flow(domains: Sequence[str], n_layers: int = 4, splits: Sequence[Sequence[int]] | None = None,
                         seed: int = 0, **layer_kwargs) -> SequentialFlow:
    """Stack of :class:`SmoothCouplingLayer` over coordinates with the given ``domains``.

    ``splits``: transformed indices per layer (default :func:`coupling_splits`, seeded);
    ``layer_kwargs``: passed to every layer (n_components, beta, hidden, analytic, rootfinding, ...).
    """
    splits = coupling_splits(len(domains), n_layers, seed) if splits is None else splits
    return SequentialFlow([SmoothCouplingLayer(domains, s, **layer_kwargs) for s in splits])


def smooth_architecture(representation, n_layers: int = 4, n_components: int = 8, beta: int = 1,
                        hidden: Sequence[int] = (64, 64), analytic: str = "inverse", circle_shift: bool = True,
                        c_min: float = 1e-3, n_bins: int = 16, tol: float | None = None, max_passes: int = 60,
                        n_newton: int = 2, on_failure: str = "raise", seed: int = 0, interval: str = "mixture",
                        max_log_scale: float = math.log(2.0), a_max: float | None = None,
                        circle_conditioning: str = "all"):
    """Architecture builder ``'smooth'`` for ``build_flow``: (smooth coupling flow, uniform prior on the box).

    Needs a representation with ``domain == 'box'`` (internal coordinates): its ``circular`` dimensions
    (torsions) are circles, the others (bonds, angles) intervals. ``seed`` fixes the coupling splits.
    ``interval='logistic'`` or 'probit' (bounded stiffness on bonds, angles and narrow torsions; for flow
    potentials used in dynamics, 'probit' with the representation's ``open_map='normal'``, ``open_map_for``)
    or 'mixture'; ``max_log_scale``, ``a_max``, ``circle_conditioning``: see :class:`SmoothCouplingLayer`.
    """
    if getattr(representation, "domain", None) != "box":
        raise ValueError("architecture 'smooth' needs a [0, 1]^D flow space: use representation='internal'")
    domains = ["circle" if bool(c) else "interval" for c in representation.circular]
    rootfinding = RootFindingConfig(n_bins=n_bins, tol=tol, max_passes=max_passes, n_newton=n_newton,
                                    on_failure=on_failure)
    transform = smooth_coupling_flow(domains, n_layers=n_layers, seed=seed, n_components=n_components, beta=beta,
                                     hidden=tuple(hidden), analytic=analytic, rootfinding=rootfinding,
                                     circle_shift=circle_shift, c_min=c_min, interval=interval,
                                     max_log_scale=max_log_scale, a_max=a_max,
                                     circle_conditioning=circle_conditioning,
                                     torsion_dims=range(representation.n_bonds + representation.n_angles,
                                                        representation.dim))
    return transform, default_prior(representation)

