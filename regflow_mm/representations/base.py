"""The representation interface: a bijection between molecular positions and a flow space.

``to_flow_space(x)``: positions (B, n_atoms, 3) nm -> (y (B, dim), logdet (B,)) and
``from_flow_space(y)`` -> (x, logdet) with logdet_from = -logdet_to at matching points.
``log q(x) = log q_Y(y) + logdet_to`` is then an exact density of ``x`` with respect to the measure
each representation states in its docstring.

``domain`` is ``"real"`` (flow space R^dim) or ``"box"`` ([0, 1]^dim, with the dimensions in
``circular`` periodic, i.e. circles [0, 1)).
"""
from __future__ import annotations

import abc

import numpy as np
import torch

from ..torch_utils import DeviceAnchored


def as_positions(x, n_atoms: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Positions (B, n_atoms, 3) nm (numpy or torch; one (n_atoms, 3) configuration is allowed) -> torch.

    Raises ValueError on a wrong shape or non-finite entries.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"positions must be a numpy array or torch tensor of shape (B, {n_atoms}, 3) nm, "
                         f"got {type(x).__name__}")
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[1:] != (n_atoms, 3):
        raise ValueError(f"positions must have shape (B, {n_atoms}, 3) in nm, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"positions must be floating point (nm), got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"positions contain NaN or inf (configurations {bad}...); remove them first")
    return x.to(dtype=dtype, device=device)


class Representation(DeviceAnchored, abc.ABC):
    """Bijection positions (B, n_atoms, 3) nm <-> flow space (B, dim), with exact log-dets."""

    name = "representation"
    domain = "real"

    def __init__(self, n_atoms: int, dim: int):
        super().__init__()
        if int(n_atoms) < 1:
            raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
        self.n_atoms = int(n_atoms)
        self.dim = int(dim)
        self.register_buffer("circular", torch.zeros(self.dim, dtype=torch.bool), persistent=False)
        self._register_anchor()

    def positions(self, x) -> torch.Tensor:
        """Validate and convert positions to this representation's dtype and device."""
        return as_positions(x, self.n_atoms, self._anchor.dtype, self._anchor.device)

    def in_support(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) bool: flow-space points inside the domain (always True on R^dim)."""
        if self.domain == "box":
            return ((y >= 0) & (y <= 1)).all(-1)
        return torch.ones(y.shape[0], dtype=torch.bool, device=y.device)

    def fit(self, positions) -> "Representation":
        """Fit normalisation on training positions (B, n_atoms, 3) nm; returns self."""
        return self

    def get_config(self) -> dict:
        return {"type": self.name, "n_atoms": self.n_atoms}

    @abc.abstractmethod
    def to_flow_space(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, n_atoms, 3) nm -> (flow-space y (B, dim), log|det dy/dx| (B,))."""

    @abc.abstractmethod
    def from_flow_space(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow-space y (B, dim) -> (positions (B, n_atoms, 3) nm, log|det dx/dy| (B,))."""

    def _check_flow(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2 or y.shape[1] != self.dim:
            raise ValueError(f"{self.name} representation expects flow-space points (B, {self.dim}), "
                             f"got {tuple(y.shape)}")
        return y
