"""The one interface every flow layer implements.

A ``Flow`` is a bijection ``y = f(x)`` that returns its outputs together with
``log|det df/dx|`` per sample, bgflow-style, with an ``inverse`` switch::

    y, logdet = layer(x)                 # logdet: (B,)
    x, logdet_inv = layer(y, inverse=True)   # logdet_inv == -logdet at matching points

Convention used throughout regflow-mm: the *forward* direction maps latent noise
to the flow space of a representation (noise -> data). For autoregressive layers
this is the single-pass, fast direction; data -> noise may be sequential.

Inputs are ``(B, D)`` tensors. Layers never change ``D``.
"""
from __future__ import annotations

import abc
from typing import Sequence

import torch
from torch import nn


class Flow(nn.Module, abc.ABC):
    """Bijection on R^D (or on a product of intervals and circles) with exact log-det."""

    def forward(self, x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``x`` (B, D) -> ``(y (B, D), log|det J| (B,))``; ``inverse=True`` runs f^-1."""
        if x.dim() != 2:
            raise ValueError(f"flow layers take (batch, dim) tensors, got shape {tuple(x.shape)}")
        return self._inverse(x) if inverse else self._forward(x)

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise -> data direction."""

    @abc.abstractmethod
    def _inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise direction."""


class SequentialFlow(Flow):
    """Composition ``f_n o ... o f_1``; log-dets add up."""

    def __init__(self, layers: Sequence[Flow]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def _forward(self, x):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def _inverse(self, y):
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer(y, inverse=True)
            logdet = logdet + ld
        return y, logdet
