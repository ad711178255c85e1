"""Latent (prior) distributions of the flows: standard normal on R^D, uniform on [0, 1]^D.

A prior is an ``nn.Module`` so that ``.to(dtype/device)`` moves it with the flow.
``sample(n)`` -> (n, D) tensor; ``log_prob(z)`` (B, D) -> (B,) natural-log density.
"""
from __future__ import annotations

import abc
import math

import torch

from ..torch_utils import DeviceAnchored


class Prior(DeviceAnchored, abc.ABC):
    """Base class: a fixed distribution on D dimensions."""

    name = "prior"

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"prior dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self._register_anchor()

    def get_config(self) -> dict:
        return {"type": self.name, "dim": self.dim}

    def _check(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{self.name} prior expects (batch, {self.dim}) latents, got {tuple(z.shape)}")

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, dim) latent samples."""

    @abc.abstractmethod
    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density (B,) of latents z (B, dim)."""


class StandardNormal(Prior):
    """N(0, I_D): log p(z) = -|z|^2/2 - D/2 log(2 pi)."""

    name = "normal"

    def sample(self, n, generator=None):
        return torch.randn(int(n), self.dim, dtype=self.dtype, device=self.device, generator=generator)

    def log_prob(self, z):
        self._check(z)
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)


class UniformBox(Prior):
    """Uniform on [0, 1]^D (intervals and circles alike): log p = 0 inside, -inf outside."""

    name = "uniform"

    def sample(self, n, generator=None):
        return torch.rand(int(n), self.dim, dtype=self.dtype, device=self.device, generator=generator)

    def log_prob(self, z):
        self._check(z)
        # A spline inverse can land a few ulp outside [0, 1] by rounding (float32: ~1e-7); such points
        # are inside the support, not failures.
        tol = 16 * torch.finfo(z.dtype).eps
        inside = ((z >= -tol) & (z <= 1 + tol)).all(-1)
        return torch.where(inside, z.new_zeros(z.shape[0]), z.new_full((z.shape[0],), -math.inf))


def default_prior(representation) -> Prior:
    """The prior of a representation's flow space: N(0, I) on R^D for real flow spaces, uniform on
    [0, 1]^D for boxes (internal coordinates)."""
    if representation.domain == "box":
        return UniformBox(representation.dim)
    return StandardNormal(representation.dim)


_PRIORS = {cls.name: cls for cls in (StandardNormal, UniformBox)}


def prior_from_config(config: dict) -> Prior:
    """Rebuild a prior from ``Prior.get_config()``."""
    kind = config.get("type")
    if kind not in _PRIORS:
        raise ValueError(f"unknown prior type {kind!r}; known: {sorted(_PRIORS)}")
    return _PRIORS[kind](config["dim"])
