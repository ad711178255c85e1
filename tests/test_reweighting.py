"""Reweighting, free energies and TFEP against analytic harmonic-oscillator answers."""
from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch
from scipy.stats import norm

from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import build_flow
from regflow_mm.sampling import (delta_f_bar, delta_f_exp, draw_weighted_samples, flow_delta_f,
                                 parse_torsion_predicate, state_delta_f, tfep_delta_f, torsion_state,
                                 train_tfep_map, weighted_histogram, weighted_mean)
from regflow_mm.flows import sample_flow

T = 300.0
KT = 0.00831446261815324 * T


def well(k: float, centre=(0.0, 0.0, 0.0)) -> openmm.System:
    """One particle in U = k/2 |x - centre|^2 (k kJ/mol/nm^2, centre nm)."""
    system = openmm.System()
    system.addParticle(12.0)
    force = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name, value in zip(("k", "x0", "y0", "z0"), (k, *centre)):
        force.addGlobalParameter(name, value)
    force.addParticle(0, [])
    system.addForce(force)
    return system


def evaluator(system):
    return EnergyEvaluator.from_system(system, T, n_workers=0, platform="Reference")


def gaussian_flow(mean, std):
    flow = build_flow(1, "identity", "gaussian", kT=KT, dtype=torch.float64)
    flow.transform.set_gaussian(mean=mean, std=std)
    return flow


K_A, K_B = 200.0, 450.0
SIGMA_A = math.sqrt(KT / K_A)


def test_reweighted_expectations_match_analytic():
    flow = gaussian_flow([0.3 * SIGMA_A, 0.0, 0.0], 1.3 * SIGMA_A)
    samples = draw_weighted_samples(flow, evaluator(well(K_A)), 20_000, chunk_size=6000, seed=1, progress=False,
                                    observables={"x": lambda x: x[:, 0, 0], "r2": lambda x: (x[:, 0] ** 2).sum(-1)})
    assert samples.n == 20_000 and samples.n_nonfinite == 0
    assert 0.3 < samples.ess()["ess"] < 0.99
    for name, exact in (("x", 0.0), ("r2", 3 * SIGMA_A**2)):
        mean, err = weighted_mean(samples.observables[name], samples.log_w)
        assert abs(mean - exact) < 6 * err, name
        _, boot = weighted_mean(samples.observables[name], samples.log_w, error="bootstrap", n_bootstrap=100)
        assert 0.7 < boot / err < 1.4  # delta method and bootstrap agree
    x = samples.observables["x"]
    density, d_err, edges = weighted_histogram(x, samples.log_w, bins=20, value_range=(-4 * SIGMA_A, 4 * SIGMA_A))
    centres = 0.5 * (edges[1:] + edges[:-1])
    exact = norm.pdf(centres, scale=SIGMA_A) / (norm.cdf(4) - norm.cdf(-4))
    assert np.all(np.abs(density - exact) < 6 * d_err + 1e-12)
    # A state free energy: A = {x < 0.5 sigma}, B = {x > 0.5 sigma}, exact -ln(P_B / P_A).
    result = state_delta_f(samples.log_w, x < 0.5 * SIGMA_A, x > 0.5 * SIGMA_A)
    exact_df = -math.log(norm.sf(0.5) / norm.cdf(0.5))
    assert abs(result["delta_f"] - exact_df) < 6 * result["ddelta_f"]
    assert result["ddelta_f"] < 0.05


def test_delta_f_between_two_oscillators_matches_analytic():
    """Delta F_{A->B} = 3/2 ln(K_B / K_A) kT; by BAR, EXP and from one flow sample set."""
    exact = 1.5 * math.log(K_B / K_A)
    ev_a, ev_b = evaluator(well(K_A, (0.1, 0.0, 0.0))), evaluator(well(K_B, (0.0, -0.05, 0.0)))
    xa, _ = sample_flow(gaussian_flow([0.1, 0.0, 0.0], SIGMA_A), 4000, seed=2)
    xb, _ = sample_flow(gaussian_flow([0.0, -0.05, 0.0], math.sqrt(KT / K_B)), 4000, seed=3)
    bar = delta_f_bar(ev_a.reduced_energy(xa), ev_b.reduced_energy(xa), ev_a.reduced_energy(xb), ev_b.reduced_energy(xb))
    assert abs(bar["delta_f"] - exact) < 2 * bar["ddelta_f"]
    assert bar["ddelta_f"] < 0.05
    exp = delta_f_exp(ev_a.reduced_energy(xa), ev_b.reduced_energy(xa))
    assert abs(exp["delta_f"] - exact) < 3 * exp["ddelta_f"]
    flow = gaussian_flow([0.05, -0.02, 0.0], 1.2 * SIGMA_A)
    xq, log_q = sample_flow(flow, 8000, seed=4)
    fe = flow_delta_f(log_q, ev_a.reduced_energy(xq), ev_b.reduced_energy(xq))
    assert abs(fe["delta_f"] - exact) < 3 * fe["ddelta_f"]


def test_tfep_with_ot_trained_map_matches_analytic():
    """Energy-free map A -> B (OT pairs + RegFlow loss), then TFEP: Delta F = 3/2 ln(K_B/K_A)."""
    exact = 1.5 * math.log(K_B / K_A)
    centre_a, centre_b = (0.0, 0.0, 0.0), (0.3, 0.1, -0.2)
    sys_a, sys_b = well(K_A, centre_a), well(K_B, centre_b)
    # MD stand-in: exact samples of both wells (drawn with exact Gaussian flows).
    xa, _ = sample_flow(gaussian_flow(centre_a, SIGMA_A), 1000, seed=5)
    xb, _ = sample_flow(gaussian_flow(centre_b, math.sqrt(KT / K_B)), 1000, seed=6)
    transform = build_flow(1, "identity", "gaussian", kT=KT, dtype=torch.float64).transform  # an affine Flow
    info = train_tfep_map(transform, xa.reshape(-1, 3), xb.reshape(-1, 3), n_steps=400, batch_size=500, lr=2e-2,
                          seed=0, progress=False)
    assert not info["ot"]["approximate"]
    ev_a, ev_b = evaluator(sys_a), evaluator(sys_b)
    xa_test, _ = sample_flow(gaussian_flow(centre_a, SIGMA_A), 2000, seed=7)
    result = tfep_delta_f(transform, xa_test.reshape(-1, 3),
                          lambda x: ev_a.reduced_energy(x.reshape(-1, 1, 3)),
                          lambda x: ev_b.reduced_energy(x.reshape(-1, 1, 3)))
    assert abs(result["delta_f"] - exact) < max(3 * result["ddelta_f"], 1e-3)
    assert result["forward"]["work_ess"] > 0.9  # the learnt map is close to the exact affine OT map
    # Without the map (identity) the same samples give plain FEP with a far lower work ESS.
    plain = delta_f_exp(ev_a.reduced_energy(xa_test), ev_b.reduced_energy(xa_test))
    assert abs(plain["delta_f"] - exact) > abs(result["delta_f"] - exact) or plain["ddelta_f"] > result["ddelta_f"]


def test_torsion_state_expressions():
    torsions = {"phi1": np.radians([-120.0, 60.0, 10.0, np.nan]), "psi1": np.radians([150.0, 30.0, -40.0, 0.0])}
    in_b = torsion_state(torsions, parse_torsion_predicate("(phi1 > 0) & (abs(psi1) < 90)"))
    np.testing.assert_array_equal(in_b, [False, True, True, False])
    with pytest.raises(ValueError, match="only abs"):
        parse_torsion_predicate("__import__('os').system('true')")
    with pytest.raises(ValueError, match="not allowed"):
        parse_torsion_predicate("phi1.__class__")
    with pytest.raises(ValueError, match="available"):
        torsion_state(torsions, parse_torsion_predicate("phi2 > 0"))
    with pytest.raises(ValueError, match="both need some"):
        state_delta_f(np.zeros(4), np.ones(4, bool), np.zeros(4, bool))
    for bad, why in (("phi1 <", "not a valid expression"), ("-90 < phi1 < 0", "chained comparisons"),
                     ("phi1 + 1", "not a condition"), ("phi1 > 'a'", "'a' is not a number"),
                     ("phi9 > 0", r"unknown torsions \['phi9'\] \(this system has \['phi1', 'psi1'\]\)")):
        with pytest.raises(ValueError, match=f"state expression .*: {why}"):
            parse_torsion_predicate(bad, torsions)


def _exact_imh_acceptance(sigma_q: float, mu_q: float) -> float:
    """E_{x~p} E_{y~q} min(1, w(y)/w(x)) for p = N(0, 1), q = N(mu_q, sigma_q^2), by quadrature."""
    grid = np.linspace(-12.0, 12.0, 4001)
    h = grid[1] - grid[0]
    p, q = norm.pdf(grid), norm.pdf(grid, mu_q, sigma_q)
    log_w = norm.logpdf(grid) - norm.logpdf(grid, mu_q, sigma_q)
    ratio = np.minimum(1.0, np.exp(log_w[None, :] - log_w[:, None]))  # [x, y]
    return float(p @ ratio @ q * h * h)


@pytest.mark.parametrize("sigma_q,mu_q", [(1.0, 0.0), (1.5, 0.3), (0.8, -0.5)])
def test_imh_acceptance_matches_the_exact_rate_and_the_chain(sigma_q, mu_q):
    """Gaussian target and proposal: the estimate from 200k proposals equals the quadrature within 6 sigma
    (bootstrap), and an independence-MH chain with that proposal accepts at the same rate."""
    from regflow_mm.importance import imh_acceptance, imh_acceptance_change

    exact = _exact_imh_acceptance(sigma_q, mu_q)
    rng = np.random.default_rng(1)
    y = rng.normal(mu_q, sigma_q, 200_000)
    log_w = norm.logpdf(y) - norm.logpdf(y, mu_q, sigma_q)
    est = imh_acceptance(log_w)
    if sigma_q == 1.0 and mu_q == 0.0:
        assert est == pytest.approx(1.0) and exact == pytest.approx(1.0, abs=1e-6)
        return
    se = imh_acceptance_change(log_w, log_w, n_bootstrap=50)["acceptance_a_se"]
    assert abs(est - exact) < 6 * se and se < 0.005
    x, accepted = 0.0, 0  # the chain itself, on the same proposals
    lw_x = norm.logpdf(x) - norm.logpdf(x, mu_q, sigma_q)
    for y_k, lw_y, u in zip(y, log_w, rng.random(y.size)):
        if math.log(u) < lw_y - lw_x:
            x, lw_x, accepted = y_k, lw_y, accepted + 1
    assert abs(accepted / y.size - exact) < 0.01


def test_imh_acceptance_change_is_paired():
    """A better proposal on the same latent draws: the change is resolved far below either rate's error;
    failed samples (weight 0) lower the rate; bad input is refused."""
    from regflow_mm.importance import imh_acceptance, imh_acceptance_change

    z = np.random.default_rng(2).standard_normal(50_000)
    log_w = {s: norm.logpdf(s * z) - norm.logpdf(s * z, 0.0, s) for s in (1.6, 1.5)}  # y = s z ~ N(0, s^2)
    change = imh_acceptance_change(log_w[1.6], log_w[1.5], n_bootstrap=100)
    exact = _exact_imh_acceptance(1.5, 0.0) - _exact_imh_acceptance(1.6, 0.0)
    assert exact > 0 and abs(change["change"] - exact) < 6 * change["change_se"]
    assert change["change_se"] < 0.3 * min(change["acceptance_a_se"], change["acceptance_b_se"])
    failed = log_w[1.5].copy()
    failed[::10] = -np.inf
    assert imh_acceptance(failed) < imh_acceptance(log_w[1.5])
    assert imh_acceptance(np.full(3, -np.inf)) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        imh_acceptance_change(log_w[1.6], log_w[1.5][:10])
    with pytest.raises(ValueError, match="NaN"):
        imh_acceptance(np.array([0.0, np.nan]))
