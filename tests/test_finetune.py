"""fine_tune_nll: maximum likelihood on fixed frames reaches the (weighted) Gaussian MLE, deterministically."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from regflow_mm.training.finetune import fine_tune_nll


def _frames(harmonic_oscillator, n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal([0.1, -0.05, 0.0], [0.05, 0.1, 0.08], size=(n, 3))[:, None, :]


def test_fine_tuning_reaches_the_gaussian_mle(harmonic_oscillator):
    x = _frames(harmonic_oscillator)
    flow = harmonic_oscillator.gaussian_flow(0.0, 0.2)
    result = fine_tune_nll(flow, x, steps=600, batch_size=256, lr=0.03, seed=1)
    assert result["n_frames"] == 2000 and result["nll_after"] < result["nll_before"]
    shift = flow.transform.shift.detach().numpy()
    std = flow.transform.log_scale.exp().detach().numpy()
    sample_std = x[:, 0].std(axis=0)
    np.testing.assert_allclose(shift, x[:, 0].mean(axis=0), atol=0.1 * sample_std.min())
    np.testing.assert_allclose(std, sample_std, rtol=0.05)
    exact_nll = 0.5 * np.sum(np.log(2 * np.pi * np.e * sample_std**2))  # NLL of the MLE Gaussian
    assert result["nll_after"] == pytest.approx(exact_nll, abs=0.01)


def test_weights_give_the_weighted_mle_and_seeds_repeat(harmonic_oscillator):
    x = _frames(harmonic_oscillator, 1000)
    x[500:] += 0.2  # a second cluster, weighted 3:1 below
    log_w = np.where(np.arange(1000) >= 500, np.log(3.0), 0.0)
    bad = np.full((3, 1, 3), np.nan)  # non-finite frames are left out
    flows = [harmonic_oscillator.gaussian_flow(0.0, 0.2) for _ in range(2)]
    results = [fine_tune_nll(f, np.concatenate([x, bad]), steps=600, lr=0.03, seed=4,
                             log_weights=np.concatenate([log_w, [0.0, 0.0, 0.0]])) for f in flows]
    assert results[0] == results[1] and results[0]["n_frames"] == 1000
    torch.testing.assert_close(flows[0].transform.shift, flows[1].transform.shift, rtol=0, atol=0)
    weighted_mean = (x[:500, 0].mean(axis=0) + 3 * x[500:, 0].mean(axis=0)) / 4
    np.testing.assert_allclose(flows[0].transform.shift.detach().numpy(), weighted_mean, atol=0.01)


def test_bad_fine_tuning_input_is_refused(harmonic_oscillator):
    flow = harmonic_oscillator.gaussian_flow(0.0, 0.2)
    x = _frames(harmonic_oscillator, 10)
    with pytest.raises(ValueError, match=r"positions must be \(N, 1, 3\)"):
        fine_tune_nll(flow, x[:, 0], steps=5)
    with pytest.raises(ValueError, match="steps >= 1"):
        fine_tune_nll(flow, x, steps=0)
    with pytest.raises(ValueError, match="log_weights must be"):
        fine_tune_nll(flow, x, steps=5, log_weights=np.zeros(3))
    with pytest.raises(ValueError, match="no usable frame"):
        fine_tune_nll(flow, x, steps=5, log_weights=np.full(10, -np.inf))
