"""Metrics against hand-computed values on small known inputs."""
import math

import numpy as np
import pytest
import torch

from regflow_mm.flows.base import Flow
from regflow_mm.training import metrics


def test_log_weights_failures_get_zero_weight():
    lw = metrics.log_weights(np.array([1.0, 2.0, 0.5]), np.array([3.0, np.inf, np.nan]))
    np.testing.assert_array_equal(lw, [-4.0, -np.inf, -np.inf])  # log(exp(-u)/q) = -3 - 1
    with pytest.raises(ValueError, match="matching"):
        metrics.log_weights(np.zeros(3), np.zeros(2))


def test_kish_ess_known_values():
    assert metrics.kish_ess(np.zeros(100))["ess"] == pytest.approx(1.0)
    assert metrics.kish_ess(np.full(7, 3.2))["ess"] == pytest.approx(1.0)
    # w = (1, 1, 0, 0): (sum w)^2 / sum w^2 / N = 4 / 2 / 4
    assert metrics.kish_ess(np.array([0.0, 0.0, -np.inf, -np.inf]))["ess"] == pytest.approx(0.5)
    # w = (1, 2): 9 / 5 / 2
    assert metrics.kish_ess(np.log([1.0, 2.0]))["ess"] == pytest.approx(0.9)
    assert metrics.kish_ess(np.full(4, -np.inf))["ess"] == 0.0


def test_kish_ess_drop_top_is_reported():
    res = metrics.kish_ess(np.array([math.log(1e6), 0.0, 0.0, 0.0]), drop_top_fraction=0.25)
    assert res["ess"] == pytest.approx(0.75)  # three equal weights left, N still counts all four
    assert res["n_used"] == 3 and res["drop_top_fraction"] == 0.25
    with pytest.raises(ValueError, match="NaN"):
        metrics.kish_ess(np.array([0.0, np.nan]))


def test_energy_w1_of_shifted_distribution_is_the_shift():
    u = np.linspace(-5.0, 5.0, 101)
    res = metrics.energy_w1(u, u + 2.5, None)
    assert res["e_w1"] == pytest.approx(2.5)
    assert res["weighted"] is False


def test_energy_w1_weighted_resampling_follows_the_weights():
    # all weight on the sample with u = 5: every resampled energy is 5, W1 = mean |u_md - 5|
    res = metrics.energy_w1(np.array([0.0, 1.0, 2.0, 3.0]), np.array([10.0, 5.0]), np.array([-np.inf, 0.0]),
                            n_resample=50, seed=3)
    assert res["e_w1"] == pytest.approx(3.5)
    assert res["n_resampled"] == 50
    # equal weights over many samples: resampled W1 close to the shift
    rng = np.random.default_rng(0)
    md = rng.normal(size=20000)
    res = metrics.energy_w1(md, rng.normal(size=20000) + 1.0, np.zeros(20000), seed=1)
    assert res["e_w1"] == pytest.approx(1.0, abs=0.05)


def test_energy_w1_clipping_is_explicit_and_counted():
    res = metrics.energy_w1(np.array([0.0]), np.array([2000.0]), None, energy_clip_kT=1000.0)
    assert res["e_w1"] == pytest.approx(1000.0)
    assert res["n_clipped"] == 1 and res["energy_clip_kT"] == 1000.0
    assert metrics.energy_w1(np.array([0.0]), np.array([2000.0]), None)["e_w1"] == pytest.approx(2000.0)


def test_torus_distance_wraps():
    c = metrics.torus_cost_matrix(np.array([[0.1]]), np.array([[2 * np.pi - 0.1]]))
    assert c[0, 0] == pytest.approx(0.04)
    c = metrics.torus_cost_matrix(np.array([[np.pi - 0.1, 0.0]]), np.array([[-np.pi + 0.1, np.pi]]))
    assert c[0, 0] == pytest.approx(0.04 + np.pi ** 2)


def test_torsion_w2_shift_across_the_periodic_boundary():
    rng = np.random.default_rng(0)
    md = rng.uniform(-np.pi, np.pi, size=(40, 2))
    shifted = (md + 0.3 + np.pi) % (2 * np.pi) - np.pi  # rotates points across +-pi
    res = metrics.torsion_w2(md, shifted, None)
    assert res["t_w2"] == pytest.approx(0.3 * math.sqrt(2), rel=1e-9)
    # weighted: all weight on one flow sample at (pi - 0.05, 0); MD at (-pi + 0.05, 0): distance 0.1
    res = metrics.torsion_w2(np.array([[-np.pi + 0.05, 0.0]]), np.array([[0.0, 1.0], [np.pi - 0.05, 0.0]]),
                             np.array([-np.inf, 0.0]), n_resample=5)
    assert res["t_w2"] == pytest.approx(0.1)


def test_d_chirality_fraction():
    d = np.array([[False, False], [True, False], [False, True], [False, False]])
    res = metrics.d_chirality_fraction(d)
    assert res["d_fraction"] == 0.5 and res["n_d"] == 2
    assert res["d_fraction_per_centre"] == [0.25, 0.25]
    with pytest.raises(ValueError, match="bool"):
        metrics.d_chirality_fraction(np.zeros((3, 1)))


class _Gaussian:
    """Stand-in with BoltzmannFlow's log_prob: standard normal over 3 coordinates."""

    def log_prob(self, x):
        x = x.reshape(x.shape[0], -1).double()
        return -0.5 * (x ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def test_heldout_nll_standard_normal():
    x = torch.zeros(5, 1, 3)
    res = metrics.heldout_nll(_Gaussian(), x, batch_size=2)
    assert res["nll"] == pytest.approx(1.5 * math.log(2 * math.pi))
    assert res["n"] == 5 and res["n_nonfinite"] == 0


class _Affine(Flow):
    def __init__(self, inverse_bias=0.0):
        super().__init__()
        self.inverse_bias = inverse_bias

    def _forward(self, x):
        return 2.0 * x + 1.0, torch.full((x.shape[0],), x.shape[1] * math.log(2.0), dtype=x.dtype)

    def _inverse(self, y):
        return (y - 1.0) / 2.0 + self.inverse_bias, torch.full((y.shape[0],), -y.shape[1] * math.log(2.0),
                                                                  dtype=y.dtype)


def test_invertibility_error():
    z = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = metrics.invertibility_error(_Affine(), z, batch_size=3)
    assert res["max_abs"] < 1e-14 and res["logdet_max_abs"] < 1e-12
    assert metrics.invertibility_error(_Affine(0.1), z)["max_abs"] == pytest.approx(0.1)


def test_plots_write_pngs(tmp_path):
    from regflow_mm.training import plots

    rng = np.random.default_rng(0)
    md, fl = rng.uniform(-3, 3, (200, 2)), rng.uniform(-3, 3, (100, 2))
    lw = rng.normal(size=100)
    assert plots.ramachandran_plot(tmp_path / "r.png", md, fl, lw).stat().st_size > 1000
    assert plots.energy_histogram(tmp_path / "e.png", rng.normal(size=200), np.r_[rng.normal(size=99), np.inf],
                                  lw).stat().st_size > 1000
    rows = [{"step": i, "loss": 1.0 / (i + 1), "kind": "train"} for i in range(5)]
    assert plots.training_curves(tmp_path / "c.png", rows).stat().st_size > 1000
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        plots.ramachandran_plot(tmp_path / "x.png", md[:, :1], fl)


def test_basin_coverage_counts_populations_and_missing_basins():
    from regflow_mm.training.metrics import basin_coverage, basin_labels

    # one (phi, psi) point per basin: beta (-1.4, 2.5), alpha_R (-1.4, -0.7), alpha_L (1.0, 0.5)
    points = np.array([[-1.4, 2.5], [-1.4, -0.7], [1.0, 0.5]])
    assert basin_labels(points[:, 0], points[:, 1]).tolist() == [0, 1, 2]
    assert basin_labels(np.array([np.nan]), np.array([0.0])).tolist() == [-1]
    ref = np.repeat(points, [60, 30, 10], axis=0)          # populations 0.6 / 0.3 / 0.1 unweighted
    ref_log_w = np.log(np.repeat([1.0, 1.0, 2.0], [60, 30, 10]))  # alpha_L doubled: 0.6/0.3/0.2 over 1.1
    flow = np.repeat(points[:2], [500, 500], axis=0)       # never samples alpha_L
    flow_log_w = np.log(np.repeat([3.0, 1.0], [500, 500]))
    res = basin_coverage(ref, ref_log_w, flow, flow_log_w, ["phi1", "psi1"])
    basins = res["residues"]["1"]
    assert basins["alpha_L"]["ref"] == pytest.approx(0.2 / 1.1)
    assert basins["beta"]["flow_reweighted"] == pytest.approx(0.75) and basins["alpha_L"]["flow_raw_count"] == 0
    assert res["n_missing"] == 1
    # a basin below min_population in the reference is not required
    assert basin_coverage(ref, ref_log_w, flow, flow_log_w, ["phi1", "psi1"], min_population=0.5)["n_missing"] == 0


def test_progress_bars_redraw_rarely_into_a_redirected_log():
    import io

    from regflow_mm.progress import LOG_INTERVAL_S, progress_bar

    log = io.StringIO()  # not a terminal
    bar = progress_bar(total=10_000, file=log)
    for _ in range(10_000):
        bar.update(1)
    bar.close()
    assert bar.mininterval >= LOG_INTERVAL_S and bar.maxinterval >= LOG_INTERVAL_S
    assert log.getvalue().count("\r") <= 3  # the first frame and the final one, not one per update
