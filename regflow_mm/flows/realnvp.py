"""Res-NVP: affine coupling layers with residual-MLP conditioners and bounded log-scales."""
from __future__ import annotations

import torch

from .base import SequentialFlow
from .coupling import CouplingLayer
from .elementwise import NormalCDF
from .nets import ResidualMLP, coupling_mask
from .priors import StandardNormal


class AffineCoupling(CouplingLayer):
    """y_A = x_A * exp(s(x_B)) + t(x_B), y_B = x_B, with s = m tanh(raw / m) in (-m, m).

    Args:
        mask: (D,) bool, True for the transformed dimensions A.
        hidden, blocks: width and number of residual blocks of the conditioner.
        max_log_scale: m, the bound on |log-scale| per dimension and layer.
    """

    def __init__(self, mask: torch.Tensor, hidden: int = 128, blocks: int = 2, max_log_scale: float = 2.0):
        super().__init__()
        self._init_coupling(mask)
        self.max_log_scale = float(max_log_scale)
        self.net = ResidualMLP(self._idx_b.numel(), 2 * self._idx_a.numel(), hidden, blocks)

    def _params(self, x_b):
        shift, raw = self.net(x_b).chunk(2, dim=-1)
        m = self.max_log_scale
        return shift, m * torch.tanh(raw / m)

    def _forward(self, x):
        x_a, x_b = self.split(x)
        shift, log_s = self._params(x_b)
        return self.merge(x, x_a * log_s.exp() + shift), log_s.sum(-1)

    def _inverse(self, y):
        y_a, y_b = self.split(y)
        shift, log_s = self._params(y_b)
        return self.merge(y, (y_a - shift) * (-log_s).exp()), -log_s.sum(-1)


def build_resnvp(representation, layers: int = 8, hidden: int = 128, blocks: int = 2,
                 max_log_scale: float = 2.0):
    """Res-NVP on R^D with a N(0, I) prior; on a box flow space (internal coordinates) a final
    elementwise normal CDF maps R^D onto (0, 1)^D (circles are then cut at 0)."""
    dim = representation.dim
    flows = [AffineCoupling(coupling_mask(dim, i), hidden, blocks, max_log_scale) for i in range(int(layers))]
    if representation.domain == "box":
        flows.append(NormalCDF())
    return SequentialFlow(flows), StandardNormal(dim)
