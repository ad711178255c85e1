"""Conditioner networks and helpers shared by the coupling and autoregressive layers."""
from __future__ import annotations

import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """in_features -> hidden -> [residual blocks] -> out_features; the output layer starts at zero.

    Zero output weights make every coupling layer start as the identity map.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 128, blocks: int = 2,
                 activation: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList([
            nn.Sequential(activation(), nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, hidden))
            for _ in range(int(blocks))])
        self.out = nn.Sequential(activation(), nn.Linear(hidden, out_features))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class CircleFeatures(nn.Module):
    """Conditioner inputs: circular dims u in [0, 1) become (cos 2 pi u, sin 2 pi u), others are kept.

    circular (d,) bool; forward x (B, d) -> (B, d + n_circular), continuous on the torus, columns ordered
    as ``feature_sources``. The split is fixed at construction (long index buffers, a Python count) so that
    ``torch.compile`` traces it without a graph break (a boolean mask gives a data-dependent shape).
    """

    def __init__(self, circular):
        super().__init__()
        circular = torch.as_tensor(circular, dtype=torch.bool).reshape(-1)
        self.n_circular = int(circular.sum())
        self.register_buffer("_linear_idx", torch.nonzero(~circular).flatten(), persistent=False)
        self.register_buffer("_circular_idx", torch.nonzero(circular).flatten(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_circular == 0:
            return x
        angle = 2 * math.pi * x.index_select(1, self._circular_idx)
        return torch.cat([x.index_select(1, self._linear_idx), angle.cos(), angle.sin()], dim=-1)


def feature_sources(circular: torch.Tensor) -> torch.Tensor:
    """Which input dimension each column of ``circle_features`` comes from, (d + n_circular,) long."""
    idx = torch.arange(circular.numel())
    return torch.cat([idx[~circular], idx[circular], idx[circular]])


def coupling_mask(dim: int, layer: int) -> torch.Tensor:
    """(dim,) bool, True for the dimensions layer ``layer`` transforms.

    Cycles through even/odd and first-half/second-half splits so that every dimension is transformed
    and conditions the others within four layers.
    """
    if dim < 2:
        raise ValueError(f"coupling layers need dim >= 2, got {dim}")
    idx = torch.arange(dim)
    if layer % 4 < 2:
        return idx % 2 == layer % 2
    first = idx < dim // 2
    return first if layer % 2 == 0 else ~first
