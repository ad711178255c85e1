"""BoltzmannFlow: representation + transform (latent -> flow space) + prior, with the system's hash and kT.

    >>> flow = build_flow(get_system("aldp"), "cartesian", "nsf")
    >>> x, log_q = flow.sample(1000)            # x (1000, 22, 3) nm, log q(x) (1000,)
    >>> flow.energy(x)                          # -kT log q(x) in kJ/mol
    >>> flow.save("aldp_nsf.pt"); load_flow("aldp_nsf.pt", system=get_system("aldp"))

log q(x) = log p(z) - log|det dT/dz| + logdet_to(x), with y = T(z) the flow-space point of x and
logdet_to the representation's log-det; its reference measure is the representation's (see its docstring).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..representations.base import Representation
from .base import Flow
from .priors import Prior
from .storage import save_flow


def _chunks(n: int, chunk_size: int | None):
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    step = n if not chunk_size else int(chunk_size)
    for start in range(0, n, max(step, 1)):
        yield start, min(start + step, n)


class BoltzmannFlow(nn.Module):
    """The object the rest of regflow-mm touches. Units: positions nm, energies kJ/mol, forces kJ/mol/nm.

    Args:
        representation: positions <-> flow space bijection (``regflow_mm.representations``).
        transform: Flow mapping latent (B, D) -> flow space (B, D) (forward = noise -> data).
        prior: latent distribution with ``sample(n)`` and ``log_prob(z)`` on D = representation.dim.
        kT: thermal energy of the target in kJ/mol.
        spec_hash: the target system's ``spec_hash`` (None for toy / external systems).
        config: JSON-able description from ``build_flow``; needed by ``save``.
    """

    def __init__(self, representation: Representation, transform: Flow, prior: Prior, kT: float,
                 spec_hash: str | None = None, config: dict | None = None):
        super().__init__()
        if prior.dim != representation.dim:
            raise ValueError(f"prior dimension {prior.dim} != representation dimension {representation.dim}")
        try:
            kT = float(kT)
        except (TypeError, ValueError):
            kT = math.nan
        if not kT > 0 or math.isinf(kT):
            raise ValueError(f"kT must be a positive number in kJ/mol, got {kT!r}")
        self.representation = representation
        self.transform = transform
        self.prior = prior
        self.kT = float(kT)
        self.spec_hash = spec_hash
        self.config = config

    def __repr__(self):
        arch = (self.config or {}).get("architecture", type(self.transform).__name__)
        return (f"BoltzmannFlow({self.representation.name}, {arch}, n_atoms={self.n_atoms}, "
                f"latent_dim={self.latent_dim}, kT={self.kT:.4f} kJ/mol, dtype={self.dtype})")

    @property
    def n_atoms(self) -> int:
        return self.representation.n_atoms

    @property
    def latent_dim(self) -> int:
        return self.representation.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    @property
    def device(self) -> torch.device:
        return self.prior.device

    def positions(self, x) -> torch.Tensor:
        """Validate positions (numpy or torch, (B, n_atoms, 3) nm) and move them to this flow's dtype/device."""
        return self.representation.positions(x)

    def to_flow_space(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, n_atoms, 3) nm -> (y (B, D), log|det dy/dx| (B,))."""
        return self.representation.to_flow_space(x)

    def from_flow_space(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow space (B, D) -> (positions (B, n_atoms, 3) nm, log|det dx/dy| (B,))."""
        return self.representation.from_flow_space(y)

    def _sample(self, n: int, generator):
        z = self.prior.sample(n, generator=generator)
        log_pz = self.prior.log_prob(z)
        y, logdet = self.transform(z)
        x, logdet_rep = self.representation.from_flow_space(y)
        return x, log_pz - logdet - logdet_rep

    def sample(self, n: int, chunk_size: int | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n configurations in the fast (noise -> data) direction.

        Returns x (n, n_atoms, 3) nm and log q(x) (n,). ``chunk_size`` bounds memory for large n
        (wrap in ``torch.no_grad()`` when gradients are not needed). A seeded ``generator`` (or the global
        torch seed) reproduces the draw for the same ``chunk_size``; other chunk sizes draw other noise.
        """
        if int(n) < 0:
            raise ValueError(f"number of samples must be >= 0, got {n}")
        parts = [self._sample(b - a, generator) for a, b in _chunks(int(n), chunk_size)]
        if not parts:
            return (torch.zeros(0, self.n_atoms, 3, dtype=self.dtype, device=self.device),
                    torch.zeros(0, dtype=self.dtype, device=self.device))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        y, logdet_rep = self.representation.to_flow_space(x)
        ok = self.representation.in_support(y)
        if not bool(ok.all()):
            # Out-of-support points get log q = -inf; a safe interior point keeps NaNs out of gradients.
            y = torch.where(ok[:, None], y, torch.full_like(y, 0.5))
        z, logdet = self.transform(y, inverse=True)
        log_q = self.prior.log_prob(z) + logdet + logdet_rep
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))

    def log_prob(self, x, chunk_size: int | None = None) -> torch.Tensor:
        """log q(x) (B,) of positions (B, n_atoms, 3) nm; -inf outside the flow's support."""
        x = self.positions(x)
        parts = [self._log_prob(x[a:b]) for a, b in _chunks(x.shape[0], chunk_size)]
        return torch.cat(parts) if parts else x.new_zeros(0)

    def energy(self, x, chunk_size: int | None = None) -> torch.Tensor:
        """Flow energy -kT log q(x) in kJ/mol, (B,)."""
        return -self.kT * self.log_prob(x, chunk_size)

    def energy_and_forces(self, x, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E (B,) kJ/mol, F = -dE/dx (B, n_atoms, 3) kJ/mol/nm), detached; F = 0 where E = +inf."""
        x = self.positions(x)
        energies, forces = [], []
        for a, b in _chunks(x.shape[0], chunk_size):
            with torch.enable_grad():
                xc = x[a:b].detach().requires_grad_(True)
                e = -self.kT * self._log_prob(xc)
                finite = torch.isfinite(e)
                (grad,) = torch.autograd.grad(torch.where(finite, e, torch.zeros_like(e)).sum(), xc)
            energies.append(e.detach())
            forces.append(-grad)
        if not energies:
            return x.new_zeros(0), x.new_zeros(0, self.n_atoms, 3)
        return torch.cat(energies), torch.cat(forces)

    def forces(self, x, chunk_size: int | None = None) -> torch.Tensor:
        """Flow forces -d(-kT log q)/dx in kJ/mol/nm, (B, n_atoms, 3), by autograd."""
        return self.energy_and_forces(x, chunk_size)[1]

    def save(self, path) -> str:
        """Write config + weights + normalisation + spec_hash + kT to one file; returns its SHA-256."""
        return save_flow(self, path)
