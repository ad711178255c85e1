"""Autoregressive NSF whose single-pass direction is noise -> data (an inverse autoregressive flow).

Forward (noise -> data): y_i = RQS(z_i; theta_i(z_<i)), all theta from ONE pass of a masked (MADE)
network on z, so sampling and the log-density of the flow's own samples cost one pass per layer.
Inverse (data -> noise): z_i depends on z_<i, so it takes D sequential passes per layer.

The masked network is zuko's ``MaskedMLP`` (MADE masks from an adjacency matrix); the spline is the
RQS of ``splines.rq_spline``. zuko's own ``MaskedAutoregressiveTransform`` could not be used as is: it
takes one univariate transform for all dims (we mix intervals and circles) and cannot feed circular
inputs to the conditioner as (cos, sin).
"""
from __future__ import annotations

import torch
from torch import nn
from zuko.nn import MaskedMLP

from .base import Flow, SequentialFlow
from .coupling import check_dim
from .nets import CircleFeatures, feature_sources
from .priors import default_prior
from .splines import n_spline_params, rq_spline


class AutoregressiveSpline(Flow):
    """One autoregressive RQS layer over D dims in the order ``order`` (a permutation of range(D)).

    Args:
        order: dims in autoregressive order; dim order[t] is conditioned on order[:t].
        domain, circular, bins, bound: as in ``SplineCoupling``.
        hidden, depth: width and number of hidden layers of the MADE conditioner.
    """

    def __init__(self, order, domain: str = "real", circular=None, bins: int = 8, hidden: int = 128,
                 depth: int = 2, bound: float = 5.0):
        super().__init__()
        order = torch.as_tensor(order, dtype=torch.long)
        dim = order.numel()
        if dim < 2 or sorted(order.tolist()) != list(range(dim)):
            raise ValueError(f"order must be a permutation of range(D) with D >= 2, got {order.tolist()}")
        if domain not in ("real", "box"):
            raise ValueError(f"domain must be 'real' or 'box', got {domain!r}")
        circular = torch.zeros(dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular, dtype=torch.bool)
        if circular.any() and domain != "box":
            raise ValueError("circular dimensions need domain='box'")
        self.dim, self.domain, self.bins, self.bound = dim, domain, int(bins), float(bound)
        self.n_params = n_spline_params(self.bins, domain)
        rank = torch.empty(dim, dtype=torch.long)
        rank[order] = torch.arange(dim)
        source = feature_sources(circular)
        # adjacency[i * P + p, c] = True when parameter p of dim i may see input feature c.
        adjacency = (rank[source][None, :] < rank[:, None]).repeat_interleave(self.n_params, dim=0)
        self.net = MaskedMLP(adjacency, hidden_features=[int(hidden)] * int(depth), activation=nn.SiLU)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("_circular", circular, persistent=False)
        self.features = CircleFeatures(circular)

    def _params(self, z):
        return self.net(self.features(z)).reshape(z.shape[0], self.dim, self.n_params)

    def _forward(self, z):
        check_dim(self, z)
        return rq_spline(z, self._params(z), self.domain, self._circular, self.bound)

    def _inverse(self, y):
        check_dim(self, y)
        z = torch.full_like(y, 0.5) if self.domain == "box" else torch.zeros_like(y)
        # After pass t the first t+1 dims in the order are exact; the last pass's parameters equal
        # those of the final z (no parameter depends on the last dim), so its log-det is exact.
        for _ in range(self.dim):
            params = self._params(z)
            z, logdet = rq_spline(y, params, self.domain, self._circular, self.bound, inverse=True)
        return z, logdet


def build_ar_nsf(representation, layers: int = 4, hidden: int = 256, depth: int = 2, bins: int = 8,
                 bound: float = 5.0):
    """Autoregressive NSF (noise -> data in one pass); orders alternate ascending / descending."""
    dim, domain = representation.dim, representation.domain
    circular = representation.circular.cpu() if domain == "box" else None
    ascending = torch.arange(dim)
    flows = [AutoregressiveSpline(ascending if i % 2 == 0 else ascending.flip(0), domain, circular, bins,
                                  hidden, depth, bound) for i in range(int(layers))]
    return SequentialFlow(flows), default_prior(representation)
