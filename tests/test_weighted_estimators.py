"""Weighted-data free energies on a 1-D double well with a known bias: exact answers within 6 sigma."""
import math

import numpy as np
import pytest
from scipy.integrate import quad

from regflow_mm.sampling.free_energy import state_delta_f


def energy(x):  # kT; tilted double well, barrier ~4 kT, minima near -1 and +1
    return 4.0 * (x * x - 1.0) ** 2 + 1.5 * x


def bias(x):  # kT; a metadynamics-like bias that lifts the (more stable) left well
    return 3.0 * np.exp(-((x + 1.0) ** 2) / 0.5)


EXACT = -math.log(quad(lambda x: math.exp(-energy(x)), 0, 4)[0] / quad(lambda x: math.exp(-energy(x)), -4, 0)[0])


def biased_samples(n, rng):
    """Exact iid samples of exp(-(U + V)) by rejection from a uniform proposal on [-2.5, 2.5]."""
    grid = np.linspace(-2.5, 2.5, 20001)
    top = np.max(-(energy(grid) + bias(grid))) + 0.1
    out = []
    while sum(len(o) for o in out) < n:
        x = rng.uniform(-2.5, 2.5, 4 * n)
        out.append(x[rng.random(4 * n) < np.exp(-(energy(x) + bias(x)) - top)])
    return np.concatenate(out)[:n]


def test_iid_weighted_samples_reproduce_the_exact_free_energy():
    x = biased_samples(50_000, np.random.default_rng(1))
    result = state_delta_f(bias(x), x < 0, x > 0)
    assert abs(result["delta_f"] - EXACT) < 6 * result["ddelta_f"]
    assert result["ddelta_f"] < 0.1 and result["p_a"] + result["p_b"] == pytest.approx(1.0)
    boot = state_delta_f(bias(x), x < 0, x > 0, block_size=1, n_bootstrap=300, seed=2)
    assert boot["ddelta_f"] == pytest.approx(result["ddelta_f"], rel=0.25)  # two error estimates agree
    # Unweighted frames would give the biased ensemble's answer, far off: the weights matter.
    plain = state_delta_f(np.zeros_like(x), x < 0, x > 0)
    assert abs(plain["delta_f"] - EXACT) > 20 * plain["ddelta_f"]


def test_bootstrap_error_matches_the_spread_of_independent_estimates():
    rng = np.random.default_rng(3)
    estimates, errors = [], []
    for k in range(60):
        x = biased_samples(2000, rng)
        r = state_delta_f(bias(x), x < 0, x > 0)
        estimates.append(r["delta_f"])
        errors.append(r["ddelta_f"])
    assert np.std(estimates, ddof=1) == pytest.approx(np.mean(errors), rel=0.3)
    assert abs(np.mean(estimates) - EXACT) < 6 * np.std(estimates, ddof=1) / math.sqrt(len(estimates))


def test_block_bootstrap_on_a_correlated_chain():
    """A Metropolis chain on the biased density: blocks longer than the correlation time give honest errors."""
    rng = np.random.default_rng(4)
    n, x, chain = 100_000, -1.0, np.empty(100_000)
    steps, accept = rng.normal(0.0, 0.4, n), np.log(rng.random(n))
    for t in range(n):
        y = x + steps[t]
        if accept[t] < (energy(x) + bias(x)) - (energy(y) + bias(y)):
            x = y
        chain[t] = x
    blocked = state_delta_f(bias(chain), chain < 0, chain > 0, block_size=1000, n_bootstrap=200)
    naive = state_delta_f(bias(chain), chain < 0, chain > 0)
    assert abs(blocked["delta_f"] - EXACT) < 6 * blocked["ddelta_f"]
    assert blocked["ddelta_f"] > 2 * naive["ddelta_f"]  # correlated frames: an iid error overstates precision


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="matching 1-D arrays"):
        state_delta_f(np.zeros(10), np.ones(9, bool), np.ones(10, bool))
    with pytest.raises(ValueError, match="block bootstrap needs"):
        state_delta_f(np.zeros(10), np.ones(10, bool), np.ones(10, bool), block_size=6)
    with pytest.raises(ValueError, match="both need some"):
        state_delta_f(np.zeros(10), np.ones(10, bool), np.zeros(10, bool))


def test_weighted_reference_metrics_equal_duplicated_frames():
    """A frame of weight 2 counts as two frames: E-W1 and T-W2 against weighted references are exact."""
    from regflow_mm.training.metrics import energy_w1, torsion_w2

    rng = np.random.default_rng(5)
    u_ref, u_flow = rng.normal(0, 1, 7), rng.normal(0.5, 1, 9)
    counts = np.array([1, 2, 1, 3, 1, 1, 2])
    weighted = energy_w1(u_ref, u_flow, None, md_log_w=np.log(counts))
    duplicated = energy_w1(np.repeat(u_ref, counts), u_flow, None)
    assert weighted["md_weighted"] and weighted["e_w1"] == pytest.approx(duplicated["e_w1"], abs=1e-12)
    a_ref, a_flow = rng.uniform(-np.pi, np.pi, (7, 2)), rng.uniform(-np.pi, np.pi, (9, 2))
    weighted = torsion_w2(a_ref, a_flow, None, md_log_w=np.log(counts))
    duplicated = torsion_w2(np.repeat(a_ref, counts, axis=0), a_flow, None)
    assert weighted["t_w2"] == pytest.approx(duplicated["t_w2"], abs=1e-9)
    with pytest.raises(ValueError, match="one entry per MD frame"):
        energy_w1(u_ref, u_flow, None, md_log_w=np.zeros(3))
