"""Numerical inverse of element-wise monotone transforms with exact implicit gradients (paper section 5).

Forward solve: vectorised multi-bin bisection. Each pass evaluates ``f`` on a grid of ``n_bins - 1``
interior points of every element's bracket at once, so a pass shrinks all brackets by ``n_bins``
(plain bisection is ``n_bins = 2``); the bracket width bounds the error, and a secant start plus
safeguarded Newton steps polish the root inside the final bracket. ``f``'s parameters are computed once
by the caller (one conditioner pass per call) and only broadcast over the grid.

Gradients: :func:`implicit_inverse` is a custom autograd Function using the inverse function theorem,
``dx/dy = 1 / f'(x)`` and ``dx/dtheta = -d_theta f(x) / f'(x)`` (paper eqs. 8-9). ``theta`` are tensors
that may depend on anything upstream (conditioner weights *and* conditioner inputs), so gradients reach
all of them. Its backward is itself a differentiable autograd Function, so double backward works
(forces of a density computed through an inverted layer, and their gradients for force matching).
The log-det of the inverse, ``-log f'(x)``, is ordinary autograd of ``f'`` at the returned ``x``,
which yields paper eqs. 10-11.

Non-convergence (non-finite values, ``y`` outside ``f``'s range, bracket wider than ``tol`` after
``max_passes``) is counted in a :class:`RootFindingStats` and raises or warns, never silently.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# fn(x, params, derivative=True) -> (f(x), f'(x) or None if not derivative); x of shape S (S + (G,) for a
# grid), params of shape S + trailing (S + (1,) + trailing for a grid). f must be increasing on [lo, hi].
MonotoneFn = Callable[[torch.Tensor, Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_TOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-10}


class InverseNotConvergedError(RuntimeError):
    """Raised when the numerical inverse failed for some elements and ``on_failure='raise'``."""


class RootFindingWarning(RuntimeWarning):
    """Issued when the numerical inverse failed for some elements and ``on_failure='warn'``."""


@dataclass(frozen=True)
class RootFindingConfig:
    """Settings of the numerical inverse.

    ``n_bins``: grid bins per pass (K of the paper; 2 is bisection); ``tol``: bracket width in x
    (None: 1e-6 in float32, 1e-10 in float64); ``max_passes``: passes before giving up;
    ``n_newton``: Newton polish steps inside the final bracket; ``on_failure``: 'raise' or 'warn'.
    """

    n_bins: int = 16
    tol: float | None = None
    max_passes: int = 60
    n_newton: int = 2
    on_failure: str = "raise"

    def __post_init__(self):
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (2 is plain bisection), got {self.n_bins}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol}")
        if self.max_passes < 1 or self.n_newton < 0:
            raise ValueError("max_passes must be >= 1 and n_newton >= 0")
        if self.on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn', got {self.on_failure!r}")

    def tolerance(self, dtype: torch.dtype) -> float:
        """Absolute tolerance in x for this dtype."""
        return self.tol if self.tol is not None else DEFAULT_TOL.get(dtype, 1e-6)


@dataclass
class RootFindingStats:
    """Running counts of numerical inversions (kept per layer; reset with :meth:`reset`)."""

    n_calls: int = 0
    n_elements: int = 0
    n_failed: int = 0
    n_passes_last: int = 0
    max_bracket_last: float = 0.0
    max_residual_last: float = 0.0
    failures: list = field(default_factory=list)

    def reset(self) -> None:
        self.n_calls = self.n_elements = self.n_failed = self.n_passes_last = 0
        self.max_bracket_last = self.max_residual_last = 0.0
        self.failures.clear()


def _grid_params(params: Sequence[torch.Tensor], ndim: int) -> list[torch.Tensor]:
    return [p.unsqueeze(ndim) for p in params]


@torch.no_grad()
def solve_monotone(fn: MonotoneFn, y: torch.Tensor, params: Sequence[torch.Tensor],
                   config: RootFindingConfig = RootFindingConfig(), stats: RootFindingStats | None = None,
                   lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Solve ``f(x; params) = y`` for x in [lo, hi], element-wise; returns x (shape of y), no graph.

    Multi-bin bisection until every bracket is narrower than the tolerance, then Newton polish.
    """
    params = [p.detach() for p in params]
    y = y.detach()
    tol = config.tolerance(y.dtype)
    eps = torch.finfo(y.dtype).eps
    n = config.n_bins
    ndim = y.dim()
    gparams = _grid_params(params, ndim)
    x_lo = torch.full_like(y, lo)
    x_hi = torch.full_like(y, hi)
    f_lo, _ = fn(x_lo, params, derivative=False)
    f_hi, _ = fn(x_hi, params, derivative=False)
    in_range = (y >= f_lo - 8 * eps) & (y <= f_hi + 8 * eps)
    steps = torch.arange(1, n, dtype=y.dtype, device=y.device) / n
    passes = 0
    while passes < config.max_passes and bool(((x_hi - x_lo) > tol).any()):
        width = (x_hi - x_lo).unsqueeze(-1)
        grid = x_lo.unsqueeze(-1) + width * steps
        f_grid, _ = fn(grid, gparams, derivative=False)
        below = f_grid <= y.unsqueeze(-1)
        idx = below.sum(-1, keepdim=True)  # bin holding the root, 0 .. n-1 (f is monotone)
        f_ext = torch.cat([f_lo.unsqueeze(-1), f_grid, f_hi.unsqueeze(-1)], dim=-1)
        x_ext = torch.cat([x_lo.unsqueeze(-1), grid, x_hi.unsqueeze(-1)], dim=-1)
        x_lo, x_hi = x_ext.gather(-1, idx).squeeze(-1), x_ext.gather(-1, idx + 1).squeeze(-1)
        f_lo, f_hi = f_ext.gather(-1, idx).squeeze(-1), f_ext.gather(-1, idx + 1).squeeze(-1)
        passes += 1
    # Secant start inside the bracket, then Newton steps kept inside it (the bracket bounds the error).
    slope = f_hi - f_lo
    t = torch.where(slope > 0, (y - f_lo) / torch.where(slope > 0, slope, torch.ones_like(slope)), 0.5)
    x = x_lo + t.clamp(0.0, 1.0) * (x_hi - x_lo)
    for _ in range(config.n_newton):
        fx, dfx = fn(x, params)
        x = torch.minimum(torch.maximum(x - (fx - y) / dfx, x_lo), x_hi)
    fx, _ = fn(x, params, derivative=False)
    bracket = x_hi - x_lo
    ok = torch.isfinite(x) & torch.isfinite(fx) & in_range & (bracket <= tol)
    n_bad = int((~ok).sum())
    if stats is not None:
        stats.n_calls += 1
        stats.n_elements += y.numel()
        stats.n_failed += n_bad
        stats.n_passes_last = passes
        stats.max_bracket_last = float(bracket.max()) if bracket.numel() else 0.0
        stats.max_residual_last = float((fx - y).abs().max()) if y.numel() else 0.0
    if n_bad:
        msg = (f"numerical inverse failed for {n_bad} of {y.numel()} elements (tol {tol:g}, {passes} passes "
               f"of {n} bins; {int((~in_range).sum())} inputs outside the range of f, "
               f"{int((~torch.isfinite(fx)).sum())} non-finite): check inputs lie in [{lo}, {hi}], "
               "raise max_passes or loosen tol for this dtype")
        if stats is not None:
            stats.failures.append(msg)
        if config.on_failure == "raise":
            raise InverseNotConvergedError(msg)
        warnings.warn(msg, RootFindingWarning, stacklevel=3)
    return x


def passes_needed(n_bins: int, tol: float, width: float = 1.0) -> int:
    """Multi-bin bisection passes to shrink a bracket of ``width`` below ``tol``."""
    return max(0, math.ceil(math.log(width / tol) / math.log(n_bins)))


def _local_vjp(fn: MonotoneFn, gx, x, params, create_graph: bool):
    """Gradients of the implicit root: (dL/dy, dL/dparams) = (g / f', -g / f' * d_params f) at fixed x.

    Built on detached leaves so the partial derivative in params does not flow through x(params).
    """
    leaves = [gx.detach().requires_grad_(True), x.detach().requires_grad_(True)]
    leaves += [p.detach().requires_grad_(True) for p in params]
    gx_d, x_d, params_d = leaves[0], leaves[1], leaves[2:]
    fx, dfx = fn(x_d, params_d)
    v = gx_d / dfx
    grads = torch.autograd.grad(fx, params_d, grad_outputs=-v, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params_d)]
    return leaves, [v, *grads]


class _ImplicitInverseBackward(torch.autograd.Function):
    """(g, x, params) -> (g / f'(x), -g d_params f(x) / f'(x)); differentiable, for double backward."""

    @staticmethod
    def forward(ctx, fn, gx, x, *params):
        ctx.fn = fn
        ctx.save_for_backward(gx, x, *params)
        with torch.enable_grad():
            _, outs = _local_vjp(fn, gx, x, params, create_graph=False)
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        gx, x, *params = ctx.saved_tensors
        with torch.enable_grad():
            leaves, outs = _local_vjp(ctx.fn, gx, x, params, create_graph=True)
            pairs = [(o, g) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], leaves, grad_outputs=[g for _, g in pairs],
                                        allow_unused=True) if pairs else [None] * len(leaves)
        return (None, *grads)


class _ImplicitInverse(torch.autograd.Function):
    """y, params -> x with f(x; params) = y, found numerically; gradients by the inverse function theorem."""

    @staticmethod
    def forward(ctx, fn, config, stats, y, *params):
        x = solve_monotone(fn, y, params, config, stats)
        ctx.fn = fn
        ctx.save_for_backward(x, *params)
        return x

    @staticmethod
    def backward(ctx, gx):
        x, *params = ctx.saved_tensors
        grads = _ImplicitInverseBackward.apply(ctx.fn, gx, x, *params)
        return (None, None, None, *grads)


def implicit_inverse(fn: MonotoneFn, y: torch.Tensor, params: Sequence[torch.Tensor],
                     config: RootFindingConfig = RootFindingConfig(),
                     stats: RootFindingStats | None = None) -> torch.Tensor:
    """Differentiable ``x = f^{-1}(y; params)`` on [0, 1] for an increasing element-wise ``fn``.

    ``y``: shape S in [0, 1]; ``params``: tensors of shape S + trailing (they are broadcast over the
    bisection grid by inserting a dimension at ``y.dim()``). Gradients flow to ``y`` and every tensor in
    ``params`` (hence to whatever produced them), to second order.
    """
    for p in params:
        if p.shape[: y.dim()] != y.shape:
            raise ValueError(f"parameter shape {tuple(p.shape)} must start with the input shape {tuple(y.shape)}")
    return _ImplicitInverse.apply(fn, config, stats, y, *params)
