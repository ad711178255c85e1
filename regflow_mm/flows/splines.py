"""Rational-quadratic spline (NSF) transforms and coupling layers, real-line and unit-box/circle versions.

The spline itself is zuko's ``MonotonicRQSTransform`` (bins, knots, inverse by the quadratic formula).
zuko pins both boundary knot derivatives to 1 (identity tails on R); on the unit box we subclass it to
set those two derivatives from the conditioner instead: free for intervals, equal at both ends for
circles, which makes the spline a C^1 diffeomorphism of the circle (Rezende et al. 2020).
"""
from __future__ import annotations

import math

import torch
from zuko.transforms import MonotonicRQSTransform

from .base import SequentialFlow
from .coupling import CouplingLayer
from .nets import CircleFeatures, ResidualMLP, coupling_mask
from .priors import default_prior

SLOPE = 1e-3  # minimum knot derivative (zuko's default)


def _soft_log_derivative(raw: torch.Tensor) -> torch.Tensor:
    # Same soft clipping zuko applies to interior knot derivatives: log-derivative in (log s, -log s).
    return raw / (1 + (raw / math.log(SLOPE)).abs())


class _BoxRQS(MonotonicRQSTransform):
    """zuko's RQS on [-bound, bound] with explicit boundary derivatives exp(soft(lo)), exp(soft(hi))."""

    def __init__(self, widths, heights, derivatives, lo, hi, bound):
        super().__init__(widths, heights, derivatives, bound=bound, slope=SLOPE)
        inner = self.derivatives[..., 1:-1]
        self.derivatives = torch.cat([_soft_log_derivative(lo).exp()[..., None], inner,
                                      _soft_log_derivative(hi).exp()[..., None]], dim=-1)


def n_spline_params(bins: int, domain: str) -> int:
    """Parameters per dimension: K widths, K heights, K-1 interior derivatives (+2 boundary ones on a box)."""
    return 3 * bins - 1 + (2 if domain == "box" else 0)


def rq_spline(x: torch.Tensor, params: torch.Tensor, domain: str, circular: torch.Tensor | None = None,
              bound: float = 5.0, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise monotonic RQ spline.

    x (B, d); params (B, d, n_spline_params). domain "real": spline on [-bound, bound], identity outside.
    domain "box": spline of [0, 1] onto itself; dims with ``circular`` (d,) True get equal boundary
    derivatives (periodic). Returns (y (B, d), log|det| (B,)); with inverse=True, x is the output side
    and the log-det is that of the inverse map.
    """
    bins = (params.shape[-1] + 1) // 3
    widths, heights = params[..., :bins], params[..., bins:2 * bins]
    if domain == "real":
        spline = MonotonicRQSTransform(widths, heights, params[..., 2 * bins:3 * bins - 1], bound=bound, slope=SLOPE)
        offset = 0.0
    else:
        lo, hi = params[..., 3 * bins - 1], params[..., 3 * bins]
        if circular is not None:
            hi = torch.where(circular, lo, hi)
        spline = _BoxRQS(widths, heights, params[..., 2 * bins:3 * bins - 1], lo, hi, bound=0.5)
        offset = 0.5
    if inverse:
        out = spline.inv(x - offset)
        _, ladj = spline.call_and_ladj(out)
        return out + offset, -ladj.sum(-1)
    out, ladj = spline.call_and_ladj(x - offset)
    return out + offset, ladj.sum(-1)


class SplineCoupling(CouplingLayer):
    """Coupling layer: y_A = RQS(x_A; theta(x_B)), y_B = x_B.

    Args:
        mask: (D,) bool, True for the transformed dimensions A.
        domain: "real" (R^D, spline on [-bound, bound], identity tails) or "box" ([0, 1]^D).
        circular: (D,) bool, periodic dimensions (box domain only); the conditioner sees them as (cos, sin).
        bins, hidden, blocks, bound: spline bins, conditioner width and residual blocks, real-line bound.
    """

    def __init__(self, mask, domain: str = "real", circular=None, bins: int = 8, hidden: int = 128,
                 blocks: int = 2, bound: float = 5.0):
        super().__init__()
        mask = self._init_coupling(mask)
        if domain not in ("real", "box"):
            raise ValueError(f"domain must be 'real' or 'box', got {domain!r}")
        circular = torch.zeros_like(mask) if circular is None else torch.as_tensor(circular, dtype=torch.bool)
        if circular.any() and domain != "box":
            raise ValueError("circular dimensions need domain='box' (flow space [0, 1) per circle)")
        self.domain, self.bins, self.bound = domain, int(bins), float(bound)
        self.register_buffer("_circ_a", circular[mask], persistent=False)
        self.n_params = n_spline_params(self.bins, domain)
        self.features = CircleFeatures(circular[~mask])
        n_in = self._idx_b.numel() + self.features.n_circular
        self.net = ResidualMLP(n_in, self._idx_a.numel() * self.n_params, hidden, blocks)

    def _transform(self, x, inverse):
        x_a, x_b = self.split(x)
        params = self.net(self.features(x_b)).reshape(x.shape[0], x_a.shape[1], self.n_params)
        y_a, logdet = rq_spline(x_a, params, self.domain, self._circ_a, self.bound, inverse)
        return self.merge(x, y_a), logdet

    def _forward(self, x):
        return self._transform(x, inverse=False)

    def _inverse(self, y):
        return self._transform(y, inverse=True)


def build_nsf(representation, layers: int = 8, hidden: int = 128, blocks: int = 2, bins: int = 8,
              bound: float = 5.0):
    """NSF coupling flow: N(0, I) prior on R^D, or uniform prior on the unit box with circular torsions."""
    dim, domain = representation.dim, representation.domain
    circular = representation.circular.cpu() if domain == "box" else None
    flows = [SplineCoupling(coupling_mask(dim, i), domain, circular, bins, hidden, blocks, bound)
             for i in range(int(layers))]
    return SequentialFlow(flows), default_prior(representation)
