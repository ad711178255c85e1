"""Elementwise bijections: per-dimension affine map, and the normal CDF that maps R onto (0, 1)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Flow


class ElementwiseAffine(Flow):
    """y = shift + exp(log_scale) * x per dimension; logdet = sum(log_scale).

    With a standard-normal prior alone this is the exact Gaussian N(shift, diag(exp(2 log_scale))).
    """

    def __init__(self, dim: int, shift=None, log_scale=None):
        super().__init__()
        self.dim = int(dim)
        self.shift = nn.Parameter(torch.zeros(self.dim))
        self.log_scale = nn.Parameter(torch.zeros(self.dim))
        if shift is not None or log_scale is not None:
            self.set_gaussian(mean=shift, std=None if log_scale is None else torch.as_tensor(log_scale).exp())

    @torch.no_grad()
    def set_gaussian(self, mean=None, std=None) -> "ElementwiseAffine":
        """Set the map so that N(0, I) -> N(mean, diag(std^2)); mean, std: (D,) or scalars."""
        if mean is not None:
            mean = torch.as_tensor(mean, dtype=self.shift.dtype).reshape(-1)
            self.shift.copy_(mean.expand(self.dim) if mean.numel() == 1 else mean)
        if std is not None:
            std = torch.as_tensor(std, dtype=self.log_scale.dtype).reshape(-1)
            if not (std > 0).all():
                raise ValueError("ElementwiseAffine: standard deviations must be > 0")
            self.log_scale.copy_((std.expand(self.dim) if std.numel() == 1 else std).log())
        return self

    def _check(self, x):
        if x.shape[1] != self.dim:
            raise ValueError(f"ElementwiseAffine of dimension {self.dim} got inputs of shape {tuple(x.shape)}")

    def _forward(self, x):
        self._check(x)
        return self.shift + self.log_scale.exp() * x, self.log_scale.sum().expand(x.shape[0])

    def _inverse(self, y):
        self._check(y)
        return (y - self.shift) * (-self.log_scale).exp(), (-self.log_scale.sum()).expand(y.shape[0])


class NormalCDF(Flow):
    """y = Phi(x), the standard normal CDF, R^D -> (0, 1)^D; logdet = sum log phi(x).

    Used to put real-valued flows (Res-NVP) onto the unit box of internal coordinates; a circle
    dimension is then treated as the interval cut at 0. In float32, |x| > ~5 rounds y to 0 or 1.
    """

    _LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

    def _forward(self, x):
        y = 0.5 * torch.erfc(-x / math.sqrt(2))
        return y, (-0.5 * x * x - self._LOG_SQRT_2PI).sum(-1)

    def _inverse(self, y):
        x = math.sqrt(2) * torch.erfinv(2 * y - 1)
        return x, (0.5 * x * x + self._LOG_SQRT_2PI).sum(-1)


class CircularShift(Flow):
    """Rotation of circle dimensions: y = (x + shift) mod 1 where ``circular``, identity elsewhere; logdet 0.

    A bijection of the unit box whose circular dimensions are circles [0, 1) (internal-coordinate
    torsions): it moves mass around a circle across the 0/1 seam, which a spline that fixes the seam
    cannot. shift: (D,) in circle units (fractions of a turn); entries off ``circular`` are ignored.
    """

    def __init__(self, shift, circular):
        super().__init__()
        circular = torch.as_tensor(circular, dtype=torch.bool)
        shift = torch.as_tensor(shift, dtype=torch.get_default_dtype()).reshape(-1)
        if shift.shape != circular.shape:
            raise ValueError(f"CircularShift: shift {tuple(shift.shape)} and circular {tuple(circular.shape)} "
                             "must both be (D,)")
        self.dim = circular.numel()
        self.register_buffer("shift", torch.where(circular, shift, torch.zeros_like(shift)))
        self.register_buffer("circular", circular)

    def _rotate(self, x, sign):
        if x.shape[1] != self.dim:
            raise ValueError(f"CircularShift of dimension {self.dim} got inputs of shape {tuple(x.shape)}")
        y = torch.where(self.circular, torch.remainder(x + sign * self.shift.to(x.dtype), 1.0), x)
        return y, x.new_zeros(x.shape[0])

    def _forward(self, x):
        return self._rotate(x, 1.0)

    def _inverse(self, y):
        return self._rotate(y, -1.0)


class CircularReflection(Flow):
    """Reflection of circle dimensions: y = (-x) mod 1 where ``reflect``, identity elsewhere; |det| = 1.

    An orientation-reversing bijection of each reflected circle [0, 1) (fixing 0 and 1/2), its own inverse.
    """

    def __init__(self, reflect):
        super().__init__()
        reflect = torch.as_tensor(reflect, dtype=torch.bool)
        self.dim = reflect.numel()
        self.register_buffer("reflect", reflect)

    def _forward(self, x):
        if x.shape[1] != self.dim:
            raise ValueError(f"CircularReflection of dimension {self.dim} got inputs of shape {tuple(x.shape)}")
        return torch.where(self.reflect, torch.remainder(-x, 1.0), x), x.new_zeros(x.shape[0])

    def _inverse(self, y):
        return self._forward(y)
