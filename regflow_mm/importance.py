"""Importance weights of flow samples: the one home of log w, Kish ESS, normalised weights, resampling.

Flow samples x ~ q carry importance log-weights log w = log(exp(-u(x)) / q(x)) = -u(x) - log q(x)
(u reduced energy in kT; unnormalised: the partition function is a constant shift). Used by training
metrics and plots, reweighting, free energies and the pipeline; depends on numpy/scipy only, so
every layer may import it.

Conventions: a sample whose u or log q is not finite gets log w = -inf (weight 0) and still counts in
N, so failures lower the ESS; NaN log q is an error (the flow produced an invalid density).

- ``log_weights(log_q, u)`` -> (N,) float64 log w.
- ``kish_ess(log_w, drop_top_fraction=0, n_bootstrap=0, seed=0)`` -> dict: ``ess`` = exp(2 LSE(log w)
  - LSE(2 log w)) / N after dropping the ceil(f N) largest weights, ``n``, ``n_used``,
  ``drop_top_fraction``; with ``n_bootstrap > 0`` also ``ess_fraction_p05`` / ``ess_fraction_p95``
  (5th / 95th percentiles of the ESS fraction over bootstrap resamples of the N samples, numpy
  ``default_rng(seed)``) and ``n_bootstrap``.
- ``normalized_weights(log_w)`` -> (N,) w / sum w.
- ``resample(log_w, n, rng)`` -> (n,) multinomial indices drawn with probabilities w / sum w.
- ``imh_acceptance(log_w)`` -> the stationary acceptance rate of an independence Metropolis-Hastings chain
  proposing from q, estimated from the same samples; ``imh_acceptance_change(log_w_a, log_w_b, ...)``: two
  proposals compared on paired samples (common random numbers), with bootstrap standard errors.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import logsumexp


def log_weights(log_q, reduced_energy) -> np.ndarray:
    """Importance log-weights log w = log(exp(-u) / q) = -u - log q, shape (N,).

    Non-finite u (the evaluator's +inf for failed configurations) or log q gives log w = -inf (weight 0).
    """
    log_q = np.asarray(log_q, dtype=np.float64)
    u = np.asarray(reduced_energy, dtype=np.float64)
    if log_q.shape != u.shape or log_q.ndim != 1:
        raise ValueError(f"log_q and reduced_energy must be matching 1-D arrays, got {log_q.shape} and {u.shape}")
    if np.isnan(log_q).any():
        raise ValueError("log_q contains NaN: the flow produced an invalid density; check the model")
    lw = np.full(u.shape, -np.inf)
    ok = np.isfinite(u) & np.isfinite(log_q)  # failed/overflowing configurations: weight 0
    lw[ok] = -u[ok] - log_q[ok]
    return lw


def _checked(log_w) -> np.ndarray:
    log_w = np.asarray(log_w, dtype=np.float64)
    if log_w.ndim != 1:
        raise ValueError(f"log_w must be 1-D, got shape {log_w.shape}")
    if np.isnan(log_w).any() or np.isposinf(log_w).any():
        raise ValueError("log_w contains NaN or +inf; compute it with log_weights() so failures become -inf")
    return log_w


def drop_top(log_w: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean keep-mask (N,) dropping the ceil(fraction * N) largest log-weights."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"drop_top_fraction must be in [0, 1), got {fraction}")
    keep = np.ones(log_w.shape[0], dtype=bool)
    n_drop = int(math.ceil(fraction * log_w.shape[0])) if fraction > 0 else 0
    if n_drop:
        keep[np.argsort(log_w)[-n_drop:]] = False
    return keep


def _ess_fraction(lw: np.ndarray, n: int) -> float:
    if not np.isfinite(lw).any():
        return 0.0
    return float(np.exp(2.0 * logsumexp(lw) - logsumexp(2.0 * lw)) / n)


def kish_ess(log_w, drop_top_fraction: float = 0.0, n_bootstrap: int = 0, seed: int = 0) -> dict[str, Any]:
    """Kish effective sample size as a fraction of N (after optional dropping of top log-weights).

    ``log_w`` (N,). Returns ``{"ess": float in [0, 1], "n": N, "n_used", "drop_top_fraction"}``;
    N counts all samples (also those with log w = -inf), so failed samples lower the ESS.
    With ``n_bootstrap > 0``: also ``ess_fraction_p05``, ``ess_fraction_p95`` (percentiles of the
    fraction over ``n_bootstrap`` resamples of the N samples with replacement, ``default_rng(seed)``;
    each resample drops its own top fraction) and ``n_bootstrap``.
    """
    log_w = _checked(log_w)
    if log_w.size == 0:
        raise ValueError(f"log_w must be a non-empty 1-D array, got shape {log_w.shape}")
    if int(n_bootstrap) < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    keep = drop_top(log_w, drop_top_fraction)
    out: dict[str, Any] = {"ess": _ess_fraction(log_w[keep], log_w.size), "n": int(log_w.size),
                           "n_used": int(keep.sum()), "drop_top_fraction": float(drop_top_fraction)}
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        fractions = []
        for _ in range(int(n_bootstrap)):
            lw = log_w[rng.integers(0, log_w.size, log_w.size)]
            fractions.append(_ess_fraction(lw[drop_top(lw, drop_top_fraction)], lw.size))
        p05, p95 = np.percentile(fractions, [5.0, 95.0])
        out.update(ess_fraction_p05=float(p05), ess_fraction_p95=float(p95), n_bootstrap=int(n_bootstrap))
    return out


def normalized_weights(log_w) -> np.ndarray:
    """Self-normalised weights w / sum w (N,) from log-weights (N,); -inf gives weight 0."""
    log_w = _checked(log_w)
    if not np.isfinite(log_w).any():
        raise ValueError("all importance weights are zero (no sample has finite u and log q): nothing to reweight")
    return np.exp(log_w - logsumexp(log_w))


def imh_acceptance(log_w) -> float:
    """Stationary acceptance rate of independence Metropolis-Hastings with proposal q, from N samples y ~ q
    and their log-weights (N,):

        alpha = E_{x ~ p} E_{y ~ q} min(1, w(y) / w(x)),

    with the x-expectation self-normalised over the same samples. Sorting the weights ascending,
    w_(1) <= ... <= w_(N), the double sum collapses to sum_k w_(k) (2 (N - k) + 1) / (N sum w): O(N log N).
    A sample of weight 0 (failed, or rejected by the chain's rules) counts as a proposal that is never accepted.
    Checks: equal weights give 1, a single non-zero weight 1/N.
    """
    log_w = _checked(log_w)
    if not np.isfinite(log_w).any():
        return 0.0
    w = np.exp(np.sort(log_w) - log_w.max())  # ascending, largest = 1
    n = w.size
    k = np.arange(1, n + 1)
    return float(np.sum(w * (2.0 * (n - k) + 1.0)) / (n * w.sum()))


def imh_acceptance_change(log_w_a, log_w_b, n_bootstrap: int = 200, seed: int = 0) -> dict[str, float]:
    """Independence-MH acceptance of two proposals a and b (``imh_acceptance``) from paired samples:
    sample i of both comes from the same latent draw (common random numbers), so resampling the pairs
    gives a standard error of the change b - a far below that of either rate.

    Returns acceptance_a, acceptance_b, change (b - a) and their bootstrap standard errors (``*_se``).
    """
    a, b = _checked(log_w_a), _checked(log_w_b)
    if a.shape != b.shape:
        raise ValueError(f"paired log-weights must have the same shape, got {a.shape} and {b.shape}")
    if int(n_bootstrap) < 2:
        raise ValueError(f"n_bootstrap must be >= 2, got {n_bootstrap}")
    rng = np.random.default_rng(seed)
    boot = np.array([[imh_acceptance(a[i]), imh_acceptance(b[i])]
                     for i in (rng.integers(0, a.size, a.size) for _ in range(int(n_bootstrap)))])
    acc_a, acc_b = imh_acceptance(a), imh_acceptance(b)
    se = boot.std(axis=0, ddof=1)
    return {"acceptance_a": acc_a, "acceptance_b": acc_b, "change": acc_b - acc_a, "acceptance_a_se": float(se[0]),
            "acceptance_b_se": float(se[1]), "change_se": float((boot[:, 1] - boot[:, 0]).std(ddof=1))}


def resample(log_w, n: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial resampling: ``n`` indices (n,) drawn with probabilities w / sum w from ``rng``."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if not np.isfinite(log_w).any():
        raise ValueError("all importance weights are zero (every flow sample has infinite energy): cannot resample")
    p = np.exp(log_w - logsumexp(log_w))
    p /= p.sum()
    return rng.choice(log_w.size, size=int(n), replace=True, p=p)

