"""Basin statistics of chains: sign changes of a torsion and block-averaged means of correlated series.

A chain's crossings are counted between consecutive chain states (for a hybrid MD/flow chain: after each MD
segment and after each flow move), so that a flow move that lands in the other basin counts as one crossing,
as an MD segment that ends there does.
"""
from __future__ import annotations

import math

import numpy as np

from regflow_mm.importance import normalized_weights


def sign_changes(angles: np.ndarray) -> int:
    """Number of sign changes of a (T,) angle series (rad); 0 counts as negative."""
    positive = np.asarray(angles) > 0
    return int(np.count_nonzero(positive[1:] != positive[:-1]))


def block_mean_error(x: np.ndarray, n_blocks: int, log_w: np.ndarray | None = None) -> tuple[float, float]:
    """(Weighted) mean of a (T,) time series and its standard error from ``n_blocks`` contiguous blocks.

    The blocks' (weighted) means are treated as independent: blocks much longer than the series'
    correlation time give an honest error, shorter ones underestimate it. NaN error with fewer than 2
    blocks of non-zero weight."""
    x = np.asarray(x, dtype=np.float64)
    w = np.ones_like(x) if log_w is None else normalized_weights(log_w) * x.size
    mean = float(np.sum(w * x) / np.sum(w))
    blocks = [(xb, wb) for xb, wb in zip(np.array_split(x, n_blocks), np.array_split(w, n_blocks)) if wb.sum() > 0]
    if len(blocks) < 2:
        return mean, math.nan
    means = np.array([np.sum(wb * xb) / np.sum(wb) for xb, wb in blocks])
    return mean, float(means.std(ddof=1) / math.sqrt(len(blocks)))


def walkers_mean_error(x: np.ndarray, n_blocks: int = 10) -> tuple[float, float]:
    """Mean of a (T, W) series over T steps and W independent walkers, with a block error: each walker's
    series in ``n_blocks`` contiguous blocks, the W block errors combined as sqrt(sum err^2) / W."""
    x = np.asarray(x, dtype=np.float64)
    stats = [block_mean_error(x[:, w], min(n_blocks, x.shape[0])) for w in range(x.shape[1])]
    return float(np.mean([s[0] for s in stats])), float(math.sqrt(sum(s[1] ** 2 for s in stats)) / len(stats))
