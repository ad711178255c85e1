"""Parallel tempering with flow moves: exact per-temperature moments of a harmonic oscillator, errors, aldp."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from openmm import unit
from openmmtools import states, testsystems

from regflow_mm.flows import build_flow
from regflow_mm.sampling.tempering import FlowTempering, check_one_system, flow_tempering_moves, run_flow_tempering

TEMPERATURES = (300.0, 600.0)


def test_flow_tempering_matches_analytic_moments_at_two_temperatures(harmonic_oscillator, statistical_error,
                                                                      tmp_path):
    """Langevin + flow moves in each replica, swaps between 300 K and 600 K: per-state mean 0 and variance
    kT_i/K within 6 sigma; the 300 K flow is mismatched at both temperatures (log q independent of T)."""
    ho = harmonic_oscillator
    path = tmp_path / "q.pt"
    ho.gaussian_flow([0.4 * ho.sigma(), 0.0, -0.3 * ho.sigma()], 1.3 * ho.sigma()).save(path)
    thermo = [ho.thermodynamic_state(t) for t in TEMPERATURES]
    moves = flow_tempering_moves(path, 2, md_steps=5, timestep_fs=10.0, friction_per_ps=5.0, batch_size=64, seed=2)
    engine = FlowTempering(tmp_path / "pt.nc", seed=2, checkpoint_interval=1000)
    engine.create(thermo, ho.positions.value_in_unit(unit.nanometer), moves, n_iterations=1200)
    x = np.stack([engine.step()[:, 0] for _ in range(1200)])  # (T, 2 states, 3)
    flow_stats, swaps = engine.flow_statistics(), engine.swap_acceptance
    engine.close()
    assert all(0.3 < s["acceptance"] < 0.97 for s in flow_stats), flow_stats
    assert 0.1 < swaps < 0.9
    for i, t in enumerate(TEMPERATURES):
        for d in range(3):
            xi = x[:, i, d]
            assert abs(xi.mean()) < 6 * statistical_error(xi)
            sq = xi**2
            assert abs(sq.mean() - ho.sigma(t) ** 2) < 6 * statistical_error(sq), (t, d, sq.mean(), ho.sigma(t) ** 2)


def test_replicas_of_different_systems_are_refused(harmonic_oscillator, tmp_path):
    ho = harmonic_oscillator
    stiff = testsystems.HarmonicOscillator(K=2 * ho.K * unit.kilojoule_per_mole / unit.nanometer**2,
                                           mass=39.948 * unit.amu)
    other = states.ThermodynamicState(stiff.system, 600 * unit.kelvin)
    with pytest.raises(ValueError, match="replica state 1 is another system than state 0"):
        check_one_system([ho.thermodynamic_state(300), other])
    with pytest.raises(ValueError, match="at least two"):
        check_one_system([ho.thermodynamic_state(300)])
    path = tmp_path / "q.pt"
    ho.gaussian_flow(0.0, ho.sigma()).save(path)
    moves = flow_tempering_moves(path, 2, md_steps=0, timestep_fs=1.0, friction_per_ps=1.0)
    engine = FlowTempering(tmp_path / "pt.nc")
    with pytest.raises(ValueError, match="another system"):
        engine.create([ho.thermodynamic_state(300), other], np.zeros((1, 3)), moves, 10)
    with pytest.raises(ValueError, match="temperatures must increase"):
        engine.create([ho.thermodynamic_state(600), ho.thermodynamic_state(300)], np.zeros((1, 3)), moves, 10)
    with pytest.raises(ValueError, match="flow_moves >= 1"):
        flow_tempering_moves(path, 2, md_steps=0, timestep_fs=1.0, friction_per_ps=1.0, flow_moves=0)


def test_flow_tempering_on_aldp_runs_and_resumes(aldp, tmp_path, capsys):
    from regflow_mm.cli import main

    flow_path = tmp_path / "aldp.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(flow_path)
    kwargs = dict(n_replicas=3, t_max_K=450.0, md_steps=10, flow_moves=2, batch_size=8, seed=1, progress=False)
    first = run_flow_tempering(aldp, flow_path, tmp_path / "pt.nc", 3, **kwargs)
    assert first["n_iterations"] == 3 and len(first["flow"]) == 3
    assert all(s["n_proposed"] == 3 * 2 for s in first["flow"])
    resumed = run_flow_tempering(aldp, flow_path, tmp_path / "pt.nc", 5, **kwargs)
    assert resumed["n_iterations"] == 5 and resumed["n_frames"] == 5
    assert all(s["n_proposed"] == 5 * 2 for s in resumed["flow"])  # counters continue from the checkpoint
    assert "phi1_positive_fraction" in resumed
    with pytest.raises(ValueError, match="holds temperatures"):
        run_flow_tempering(aldp, flow_path, tmp_path / "pt.nc", 6, **{**kwargs, "t_max_K": 500.0})
    flow_path.write_bytes(flow_path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed since"):
        run_flow_tempering(aldp, flow_path, tmp_path / "pt.nc", 6, **kwargs)

    other = tmp_path / "other.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(other)
    assert main(["mc-tempering", "aldp", str(other), "--out", str(tmp_path / "cli.nc"), "--iterations", "2",
                 "--replicas", "2", "--t-max", "400", "--md-steps", "5", "--batch-size", "4", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "| flow acceptance at 300.0 K |" in out and err == ""  # --quiet: no progress bar
