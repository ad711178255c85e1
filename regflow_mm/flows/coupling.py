"""The skeleton every coupling layer shares: mask, split into transformed / conditioning parts, merge,
and the input dimension check.

A coupling layer transforms the dimensions A (``mask`` True) conditioned on the others B:
y_A = tau(x_A; theta(x_B)), y_B = x_B. Subclasses (``realnvp.AffineCoupling``,
``splines.SplineCoupling``, ``smooth_coupling.SmoothCouplingLayer``) call ``_init_coupling(mask)``
and implement ``_forward`` / ``_inverse`` with ``split`` and ``merge``; ``forward`` checks D first.
"""
from __future__ import annotations

import torch

from .base import Flow


def check_dim(layer: Flow, x: torch.Tensor) -> None:
    """ValueError unless the inputs (B, D) have D == ``layer.dim``."""
    if x.shape[1] != layer.dim:
        raise ValueError(f"{type(layer).__name__} on {layer.dim} dims got inputs of shape {tuple(x.shape)}")


class CouplingLayer(Flow):
    """Base of the coupling layers: ``dim``, index buffers ``_idx_a`` (transformed) and ``_idx_b``
    (conditioning), ``split(x) -> (x_A, x_B)``, ``merge(x, y_A)`` and the dimension check."""

    def _init_coupling(self, mask, allow_all: bool = False) -> torch.Tensor:
        """Set up from ``mask`` (D,) bool; ``allow_all`` lets a layer transform every dimension (with
        nothing to condition on). Returns the mask as a bool tensor."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if not mask.any() or (mask.all() and not allow_all):
            raise ValueError("coupling mask must transform some but not all dimensions")
        self.dim = mask.numel()
        self.register_buffer("_idx_a", mask.nonzero().flatten(), persistent=False)
        self.register_buffer("_idx_b", (~mask).nonzero().flatten(), persistent=False)
        return mask

    def forward(self, x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2:
            check_dim(self, x)
        return super().forward(x, inverse)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_A (B, |A|), x_B (B, |B|))."""
        return x[:, self._idx_a], x[:, self._idx_b]

    def merge(self, x: torch.Tensor, y_a: torch.Tensor) -> torch.Tensor:
        """``x`` with its A part replaced by ``y_a`` (out of place)."""
        return x.index_copy(1, self._idx_a, y_a)
