"""Importance reweighting of flow samples: weights, ESS, observables, histograms.

Flow samples x ~ q carry importance log-weights log w = log(p/q) = -u(x) - log q(x) + const (u in kT;
the flow energy -log q enters with a plus sign: log w = -u + u_flow, u_flow = -log q). Self-normalised
estimates E_p[f] ~ sum_i w_i f_i / sum_i w_i come with delta-method standard errors
(var ~ sum_i w_i^2 (f_i - mu)^2 / (sum_i w_i)^2), or bootstrap ones on request. The weights
themselves (log w, ESS, normalisation) are defined in ``regflow_mm.importance``.
Samples whose u or log q is not finite get weight 0 (log w = -inf) and are counted, never dropped
silently: they still count in N, so they lower the ESS.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np
from scipy.special import logsumexp

from regflow_mm.data.dataset import dihedrals
from regflow_mm.flows.sampling import sample_flow
from regflow_mm.importance import kish_ess, log_weights, normalized_weights
from regflow_mm.progress import progress_bar

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightedSamples:
    """Flow samples reduced to what estimates need (positions are not kept).

    log_q, reduced_energy (kT), log_w: (N,); torsions: name -> (N,) rad in (-pi, pi];
    is_l: (N,) bool or None; observables: name -> (N, ...) values of user functions.
    """

    log_q: np.ndarray
    reduced_energy: np.ndarray
    log_w: np.ndarray
    torsions: dict[str, np.ndarray]
    is_l: np.ndarray | None
    observables: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return int(self.log_w.size)

    @property
    def n_nonfinite(self) -> int:
        """Samples with weight 0 because u or log q was not finite."""
        return int(np.sum(~np.isfinite(self.log_w)))

    def ess(self) -> dict:
        """Kish ESS as a fraction of N (``regflow_mm.importance.kish_ess``)."""
        return kish_ess(self.log_w)


def draw_weighted_samples(flow, evaluator, n: int, chunk_size: int = 4096, seed: int = 0,
                          molecular_system=None, observables: dict[str, Callable] | None = None,
                          progress: bool = True) -> WeightedSamples:
    """Stream ``n`` flow samples in chunks: log q, u (``evaluator.reduced_energy``), log w, torsions.

    evaluator: ``EnergyEvaluator`` (or any object with ``reduced_energy(x (B, n, 3) nm) -> (B,)``).
    molecular_system: gives the torsions (``.torsions``) and chirality (``.is_l``) recorded per sample.
    observables: name -> f(x (B, n_atoms, 3) nm) -> (B, ...) evaluated per chunk.
    Chunk k uses torch seed ``seed + k``: one seed reproduces the run.
    """
    if n < 1 or chunk_size < 1:
        raise ValueError(f"n and chunk_size must be positive, got {n} and {chunk_size}")
    observables = dict(observables or {})
    torsion_idx = dict(getattr(molecular_system, "torsions", {}) or {})
    parts: dict[str, list] = {"log_q": [], "u": [], "is_l": []}
    parts.update({f"t:{k}": [] for k in torsion_idx})
    parts.update({f"o:{k}": [] for k in observables})
    bar = progress_bar(total=n, unit="sample", desc="flow samples", disable=not progress, dynamic_ncols=True)
    done, chunk = 0, 0
    try:
        while done < n:
            m = min(chunk_size, n - done)
            x, log_q = sample_flow(flow, m, seed + chunk, chunk_size)
            finite_x = np.isfinite(x).all(axis=(1, 2))
            u = np.full(m, np.inf)
            if finite_x.any():
                u[finite_x] = evaluator.reduced_energy(x[finite_x])
            parts["log_q"].append(log_q)
            parts["u"].append(u)
            x_safe = np.where(finite_x[:, None, None], x, 0.0)
            if molecular_system is not None and hasattr(molecular_system, "is_l"):
                parts["is_l"].append(np.asarray(molecular_system.is_l(x_safe)) & finite_x)
            if torsion_idx:
                angles = dihedrals(x_safe, list(torsion_idx.values()))
                for j, name in enumerate(torsion_idx):
                    parts[f"t:{name}"].append(np.where(finite_x, angles[:, j], np.nan))
            for name, fn in observables.items():
                parts[f"o:{name}"].append(np.asarray(fn(x)))
            done += m
            chunk += 1
            bar.update(m)
    finally:
        bar.close()
    log_q = np.concatenate(parts["log_q"])
    u = np.concatenate(parts["u"])
    samples = WeightedSamples(
        log_q=log_q, reduced_energy=u, log_w=log_weights(log_q, u),
        torsions={k: np.concatenate(parts[f"t:{k}"]) for k in torsion_idx},
        is_l=np.concatenate(parts["is_l"]) if parts["is_l"] else None,
        observables={k: np.concatenate(parts[f"o:{k}"]) for k in observables})
    if samples.n_nonfinite:
        log.warning("%d of %d flow samples have non-finite u or log q: weight 0", samples.n_nonfinite, samples.n)
    return samples


def weighted_mean(values, log_w, error: str = "delta", n_bootstrap: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Self-normalised E_p[f] from values (N,) or (N, k) and log-weights (N,) -> (mean, standard error).

    error: "delta" (delta method) or "bootstrap" (``n_bootstrap`` resamples of the N samples).
    Values at zero-weight samples are ignored (they may be NaN).
    """
    w = normalized_weights(log_w)
    f = np.asarray(values, dtype=np.float64)
    if f.shape[0] != w.size:
        raise ValueError(f"values have {f.shape[0]} rows but log_w has {w.size}")
    f = np.where((w > 0).reshape((-1,) + (1,) * (f.ndim - 1)), f, 0.0)
    wb = w.reshape((-1,) + (1,) * (f.ndim - 1))
    mean = np.sum(wb * f, axis=0)
    if error == "delta":
        err = np.sqrt(np.sum(wb ** 2 * (f - mean) ** 2, axis=0))
    elif error == "bootstrap":
        rng = np.random.default_rng(seed)
        stats = []
        for _ in range(n_bootstrap):
            idx = rng.integers(0, w.size, w.size)
            total = w[idx].sum()
            if total > 0:
                stats.append(np.sum(wb[idx] * f[idx], axis=0) / total)
        err = np.std(np.array(stats), axis=0, ddof=1)
    else:
        raise ValueError(f"error must be 'delta' or 'bootstrap', got {error!r}")
    return mean, err


def weighted_histogram(values, log_w, bins: int = 60, value_range: tuple[float, float] = (-math.pi, math.pi)):
    """Reweighted density histogram of a scalar (e.g. a torsion in rad).

    Returns (density (bins,), standard error (bins,), edges (bins + 1,)); density integrates to 1
    over ``value_range`` (weight outside the range is excluded from the normalisation).
    """
    values = np.asarray(values, dtype=np.float64)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    w = normalized_weights(log_w)
    inside = (w > 0) & (values >= edges[0]) & (values <= edges[-1])
    which = np.clip(np.searchsorted(edges, np.where(inside, values, edges[0]), side="right") - 1, 0, bins - 1)
    onehot = np.zeros((w.size, bins))
    onehot[np.flatnonzero(inside), which[inside]] = 1.0
    log_w_in = np.where(inside, np.asarray(log_w, dtype=np.float64), -np.inf)
    p, err = weighted_mean(onehot, log_w_in)
    width = np.diff(edges)
    return p / width, err / width, edges


def log_ratio_of_means(log_a, log_b) -> tuple[float, float]:
    """ln(mean(b) / mean(a)) for positive per-sample quantities given as logs, with delta-method error.

    Both arrays (N,) come from the same N samples (they may be correlated; -inf = 0 allowed).
    """
    log_a = np.asarray(log_a, dtype=np.float64)
    log_b = np.asarray(log_b, dtype=np.float64)
    if log_a.shape != log_b.shape or log_a.ndim != 1:
        raise ValueError(f"log_a and log_b must be matching 1-D arrays, got {log_a.shape} and {log_b.shape}")
    if not (np.isfinite(log_a).any() and np.isfinite(log_b).any()):
        raise ValueError("one of the two sample sets has zero total weight: the ratio is undefined "
                         "(no sample falls in one of the states?)")
    # Each array is scaled by its own maximum: the relative variances below are scale-free, and
    # the means come from log-sum-exp, so weights spanning hundreds of kT do not underflow.
    a, b = np.exp(log_a - log_a.max()), np.exp(log_b - log_b.max())
    n = a.size
    ma, mb = a.mean(), b.mean()
    cov = np.cov(np.stack([a, b]), ddof=1) if n > 1 else np.zeros((2, 2))
    var = (cov[0, 0] / ma**2 + cov[1, 1] / mb**2 - 2.0 * cov[0, 1] / (ma * mb)) / n
    log_ratio = float(logsumexp(log_b) - logsumexp(log_a))
    return log_ratio, float(math.sqrt(max(var, 0.0)))
