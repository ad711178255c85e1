"""Cartesian representations: mean-free scaled coordinates, and plain absolute coordinates."""
from __future__ import annotations

import math

import torch

from .base import Representation, as_positions


def helmert_basis(n: int, dtype=torch.float64) -> torch.Tensor:
    """(n, n-1) orthonormal basis of the mean-free subspace {v in R^n : sum(v) = 0} (Helmert contrasts)."""
    basis = torch.zeros(n, n - 1, dtype=dtype)
    for k in range(1, n):
        norm = math.sqrt(k * (k + 1))
        basis[:k, k - 1] = 1.0 / norm
        basis[k, k - 1] = -k / norm
    return basis


class CartesianRepresentation(Representation):
    """Centred, scaled Cartesian coordinates in an orthonormal basis of the mean-free subspace.

    y = H^T x / s, flattened to (B, 3N-3), with H the (N, N-1) Helmert basis applied to each of x, y, z
    (H^T annihilates the centre of geometry, so centring is implied) and s one scalar in nm fitted by
    ``fit`` (root mean square of the centred training coordinates). ``from_flow_space`` returns centred
    positions x = H (s y).

    Density: log q(x) = log q_Y(y) - (3N-3) log s is the exact density of the centred configuration
    x - mean(x) with respect to the Lebesgue (3N-3)-volume of the mean-free subspace of R^{3N}, i.e. a
    translation-invariant density; centring + projection has log-det 0 (orthonormal), scaling -(3N-3) log s.
    """

    name = "cartesian"

    def __init__(self, n_atoms: int, scale: float = 1.0):
        if int(n_atoms) < 2:
            raise ValueError(f"CartesianRepresentation needs >= 2 atoms, got {n_atoms}")
        super().__init__(n_atoms, 3 * int(n_atoms) - 3)
        # Built in float64 and cast per call (a float32 buffer cast up would not be orthonormal to 1e-8).
        self._basis64 = helmert_basis(self.n_atoms)
        self.register_buffer("scale", torch.tensor(float(scale), dtype=torch.get_default_dtype()))

    def get_config(self):
        return {"type": self.name, "n_atoms": self.n_atoms}

    @torch.no_grad()
    def fit(self, positions):
        """Set s (nm) to the RMS of the centred positions (B, n_atoms, 3) nm."""
        x = as_positions(positions, self.n_atoms, torch.float64)
        centred = x - x.mean(1, keepdim=True)
        scale = centred.pow(2).mean().sqrt()
        if not scale > 0:
            raise ValueError("CartesianRepresentation.fit: positions have zero spread; give real training data")
        self.scale.fill_(float(scale))
        return self

    def basis(self, like: torch.Tensor) -> torch.Tensor:
        """The (N, N-1) Helmert basis in the dtype and on the device of ``like``."""
        return self._basis64.to(dtype=like.dtype, device=like.device)

    def _logdet(self, batch: int) -> torch.Tensor:
        return (-self.dim * self.scale.log()).expand(batch)

    def to_flow_space(self, x):
        x = self.positions(x)
        y = torch.einsum("na,bnd->bad", self.basis(x), x) / self.scale
        return y.reshape(x.shape[0], self.dim), self._logdet(x.shape[0])

    def from_flow_space(self, y):
        y = self._check_flow(y)
        coords = y.reshape(y.shape[0], self.n_atoms - 1, 3) * self.scale
        return torch.einsum("na,bad->bnd", self.basis(coords), coords), -self._logdet(y.shape[0])


class IdentityRepresentation(Representation):
    """Absolute Cartesian coordinates, no centring or scaling: flow space R^{3N}, y = x.flatten() in nm.

    log q(x) is a density on R^{3N} (Lebesgue measure, nm^-3N); for systems in an external field
    (e.g. a harmonic oscillator) where the centre of mass is not free.
    """

    name = "identity"

    def __init__(self, n_atoms: int):
        super().__init__(n_atoms, 3 * int(n_atoms))

    def to_flow_space(self, x):
        x = self.positions(x)
        return x.reshape(x.shape[0], self.dim), x.new_zeros(x.shape[0])

    def from_flow_space(self, y):
        y = self._check_flow(y)
        return y.reshape(y.shape[0], self.n_atoms, 3), y.new_zeros(y.shape[0])
