"""FlowIndependenceMove and the hybrid runner against exact harmonic-oscillator answers."""
from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from openmmtools import cache, testsystems
from openmmtools.mcmc import MCMCSampler, SequenceMove
from openmmtools.states import SamplerState, ThermodynamicState
from openmmtools.utils import deserialize, serialize

from regflow_mm.flows import BoltzmannFlow, build_flow
from regflow_mm.sampling import FlowIndependenceMove, SeededLangevinDynamicsMove, run_hybrid_mc

T = 300.0
KT = 0.00831446261815324 * T
K = 250.0  # kJ/mol/nm^2
SIGMA = np.sqrt(KT / K)  # nm, exact std of each coordinate


def gaussian_flow(mean, std, kT=KT) -> BoltzmannFlow:
    """Exact Gaussian N(mean, std^2 I_3) on one particle's absolute coordinates (float64)."""
    flow = build_flow(1, "identity", "gaussian", kT=kT, dtype=torch.float64)
    flow.transform.set_gaussian(mean=mean, std=std)
    return flow


@pytest.fixture
def oscillator():
    ho = testsystems.HarmonicOscillator(K=K * unit.kilojoule_per_mole / unit.nanometer**2, mass=39.948 * unit.amu)
    return ThermodynamicState(ho.system, T * unit.kelvin), SamplerState(ho.positions)


def reference_cache():
    return cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))


def statistical_error(x: np.ndarray) -> float:
    """Standard error of the mean of a correlated series (pymbar statistical inefficiency)."""
    from pymbar import timeseries

    g = timeseries.statistical_inefficiency(x)
    return float(np.std(x, ddof=1) * np.sqrt(g / x.size))


def test_exact_flow_accepts_every_proposal(oscillator):
    thermo, sampler_state = oscillator
    move = FlowIndependenceMove(gaussian_flow(0.0, SIGMA), batch_size=64, seed=3)
    ctx_cache = reference_cache()
    for _ in range(150):
        move.apply(thermo, sampler_state, context_cache=ctx_cache)
    assert move.n_proposed == 150
    assert move.n_accepted == 150
    assert move.statistics == {"n_proposed": 150, "n_accepted": 150, "n_rejected_nonfinite": 0,
                               "n_rejected_chirality": 0}


def test_other_temperature_uses_that_states_potential(oscillator):
    """At 2T the exact flow of T is mismatched: acceptance drops below 1 (u is the state's)."""
    thermo, sampler_state = oscillator
    hot = copy.deepcopy(thermo)
    hot.temperature = 2 * T * unit.kelvin
    move = FlowIndependenceMove(gaussian_flow(0.0, SIGMA), seed=4)
    ctx_cache = reference_cache()
    for _ in range(100):
        move.apply(hot, sampler_state, context_cache=ctx_cache)
    assert move.n_accepted < 90


@pytest.mark.parametrize("md_steps", [0, 5])
def test_mismatched_flow_chain_matches_analytic_moments(oscillator, md_steps):
    """Hybrid (Langevin + flow) and flow-only chains: mean 0 and variance sigma^2 within 6 sigma."""
    thermo, sampler_state = oscillator
    flow_move = FlowIndependenceMove(gaussian_flow([0.5 * SIGMA, 0.0, -0.3 * SIGMA], 1.4 * SIGMA), seed=11)
    moves = [flow_move]
    if md_steps:
        moves.insert(0, SeededLangevinDynamicsMove(random_seed=5, timestep=2.0 * unit.femtosecond,
                                                   collision_rate=5.0 / unit.picosecond, n_steps=md_steps))
    sampler = MCMCSampler(thermo, sampler_state, move=SequenceMove(moves))
    ctx_cache = reference_cache()
    x = np.empty((3000, 3))
    for i in range(x.shape[0]):
        sampler.run(1, context_cache=ctx_cache)
        x[i] = sampler.sampler_state.positions.value_in_unit(unit.nanometer)[0]
    assert 0.3 < flow_move.acceptance_rate < 0.95  # mismatched, yet mixing
    for d in range(3):
        err = statistical_error(x[:, d])
        assert abs(x[:, d].mean()) < 6 * err
        sq = x[:, d] ** 2
        assert abs(sq.mean() - SIGMA**2) < 6 * statistical_error(sq)


class NaNEveryThirdFlow(BoltzmannFlow):
    """Test double: a Gaussian BoltzmannFlow whose every third sample is NaN (a broken network)."""

    def sample(self, n, chunk_size=None, generator=None):
        x, log_q = super().sample(n, chunk_size, generator)
        x = x.clone()
        x[::3] = float("nan")
        return x, log_q


def test_nan_proposals_are_rejected_and_counted(oscillator):
    thermo, sampler_state = oscillator
    base = gaussian_flow(0.0, SIGMA)
    flow = NaNEveryThirdFlow(base.representation, base.transform, base.prior, kT=KT)
    move = FlowIndependenceMove(flow, batch_size=30, seed=2)
    ctx_cache = reference_cache()
    for _ in range(60):
        move.apply(thermo, sampler_state, context_cache=ctx_cache)
        assert np.isfinite(sampler_state.positions.value_in_unit(unit.nanometer)).all()
    assert move.n_rejected_nonfinite == 20
    assert move.n_accepted == 40  # the finite ones come from the exact flow


def test_serialization_round_trip_continues_the_same_chain(oscillator, tmp_path):
    thermo, sampler_state = oscillator
    path = tmp_path / "gauss.pt"
    gaussian_flow(0.2 * SIGMA, 1.3 * SIGMA).save(path)
    move = FlowIndependenceMove(path, batch_size=16, seed=7, velocities="redraw")
    ctx_cache = reference_cache()
    for _ in range(21):  # stop inside a batch
        move.apply(thermo, sampler_state, context_cache=ctx_cache)
    state = json.loads(json.dumps(serialize(move)))  # JSON-able, no torch module inside
    restored = deserialize(state)
    assert restored.statistics == move.statistics
    s1, s2 = copy.deepcopy(sampler_state), copy.deepcopy(sampler_state)
    for _ in range(20):
        move.apply(thermo, s1, context_cache=ctx_cache)
        restored.apply(thermo, s2, context_cache=ctx_cache)
    np.testing.assert_array_equal(s1.positions.value_in_unit(unit.nanometer), s2.positions.value_in_unit(unit.nanometer))
    np.testing.assert_array_equal(s1.velocities.value_in_unit(unit.nanometer / unit.picosecond),
                                  s2.velocities.value_in_unit(unit.nanometer / unit.picosecond))
    assert restored.statistics == move.statistics

    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match="changed since"):
        deserialize(json.loads(json.dumps(serialize(move))))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        deserialize(json.loads(json.dumps(serialize(move))))
    with pytest.raises(ValueError, match="in-memory flow"):
        serialize(FlowIndependenceMove(gaussian_flow(0.0, SIGMA)))


def test_bad_inputs_give_clear_errors(oscillator):
    from regflow_mm.systems import get_system

    thermo, _ = oscillator
    move = FlowIndependenceMove(gaussian_flow(0.0, SIGMA))
    with pytest.raises(ValueError, match="particles but the flow models 1"):
        move.apply(thermo, SamplerState(np.zeros((2, 3)) * unit.nanometer), context_cache=reference_cache())
    aldp = get_system("aldp")
    with pytest.raises(ValueError, match="flow models 1 atoms but 'aldp' has 22"):
        FlowIndependenceMove(gaussian_flow(0.0, SIGMA), molecular_system=aldp)
    with pytest.raises(ValueError, match="trained for"):
        FlowIndependenceMove(build_flow(aldp, "cartesian", "gaussian", spec_hash="0" * 64), molecular_system=aldp)
    with pytest.raises(ValueError, match="molecular_system"):
        FlowIndependenceMove(gaussian_flow(0.0, SIGMA), reject_d_chirality=True)


def test_log_q_of_an_unchanged_state_is_not_recomputed(oscillator, monkeypatch):
    """Consecutive flow moves evaluate the flow's log q of the current state once, not per move."""
    import regflow_mm.sampling.moves as moves_module

    calls = []
    original = moves_module.flow_log_prob
    monkeypatch.setattr(moves_module, "flow_log_prob", lambda flow, x: calls.append(1) or original(flow, x))
    thermo, sampler_state = oscillator
    move = FlowIndependenceMove(gaussian_flow(0.3 * SIGMA, 1.5 * SIGMA), seed=5)
    ctx_cache = reference_cache()
    for _ in range(50):
        move.apply(thermo, sampler_state, context_cache=ctx_cache)
    assert len(calls) == 1 and 0 < move.n_accepted < 50
    sampler_state.positions = sampler_state.positions * 1.01  # the state moved (as after dynamics)
    move.apply(thermo, sampler_state, context_cache=ctx_cache)
    assert len(calls) == 2


def test_constrained_systems_are_refused():
    diatom = testsystems.Diatom(constraint=True)
    flow = build_flow(2, "identity", "gaussian", kT=KT, dtype=torch.float64)
    thermo = ThermodynamicState(diatom.system, T * unit.kelvin)
    with pytest.raises(ValueError, match="1 constraints: flow proposals do not satisfy them"):
        FlowIndependenceMove(flow).apply(thermo, SamplerState(diatom.positions), context_cache=reference_cache())


def test_hybrid_runner_resumes_without_lost_or_duplicated_frames(tmp_path):
    from regflow_mm.systems import get_system

    aldp = get_system("aldp")
    flow_path = tmp_path / "aldp.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(flow_path)
    kwargs = dict(n_walkers=2, md_steps=20, flow_moves=2, batch_size=8, seed=5, checkpoint_every=2, progress=False)
    full = run_hybrid_mc(aldp, flow_path, tmp_path / "full.h5", 6, **kwargs)
    part = run_hybrid_mc(aldp, flow_path, tmp_path / "part.h5", 4, **kwargs)
    assert part["n_iterations"] == 4
    with h5py.File(tmp_path / "part.h5", "r+") as fh:  # a kill in the middle of the next block
        fh["positions"].resize(5, axis=0)
        fh["accepted"].resize(5, axis=0)
    resumed = run_hybrid_mc(aldp, flow_path, tmp_path / "part.h5", 6, **kwargs)
    assert resumed["n_iterations"] == full["n_iterations"] == 6
    with h5py.File(tmp_path / "full.h5") as a, h5py.File(tmp_path / "part.h5") as b:
        assert b["positions"].shape == a["positions"].shape == (6, 2, 22, 3)
        np.testing.assert_array_equal(a["positions"][:4], b["positions"][:4])
        assert not np.any(np.all(b["positions"][4] == b["positions"][3], axis=(1, 2)))  # no duplicate frame
    counters = resumed["counters"]
    assert sum(c["n_proposed"] for c in counters) == 6 * 2 * 2
    assert all(c["n_accepted"] + c["n_rejected_nonfinite"] + c["n_rejected_chirality"] <= c["n_proposed"]
               for c in counters)
    with pytest.raises(ValueError, match="same settings"):
        run_hybrid_mc(aldp, flow_path, tmp_path / "part.h5", 8, **{**kwargs, "md_steps": 10})


def test_hybrid_file_that_committed_nothing_starts_over(tmp_path):
    """Killed before its first block (the file holds no committed iteration, made with other settings):
    rerunning starts over and gives the frames of a fresh run."""
    from regflow_mm.sampling import hybrid
    from regflow_mm.systems import get_system

    aldp = get_system("aldp")
    flow_path = tmp_path / "aldp.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(flow_path)
    kwargs = dict(n_walkers=2, md_steps=5, flow_moves=1, batch_size=8, seed=3, checkpoint_every=2, progress=False)
    fresh = run_hybrid_mc(aldp, flow_path, tmp_path / "fresh.h5", 2, **kwargs)
    hybrid._create(tmp_path / "killed.h5", aldp, flow_path, "another flow", {"n_walkers": 2, "md_steps": 99}, 7)
    resumed = run_hybrid_mc(aldp, flow_path, tmp_path / "killed.h5", 2, **kwargs)
    assert resumed["n_iterations"] == fresh["n_iterations"] == 2
    with h5py.File(tmp_path / "fresh.h5") as a, h5py.File(tmp_path / "killed.h5") as b:
        np.testing.assert_array_equal(a["positions"][:], b["positions"][:])


class _MirrorMove:
    """A stand-in flow move whose odd proposals are accepted and replace the state by its mirror image (every
    torsion changes sign); even proposals are rejected."""

    def __init__(self):
        self.n_proposed = self.n_accepted = 0

    def apply(self, thermodynamic_state, sampler_state, context_cache=None):
        self.n_proposed += 1
        if self.n_proposed % 2:
            self.n_accepted += 1
            sampler_state.positions = -sampler_state.positions


def test_walker_counts_sign_changes_at_every_chain_state():
    """Exact counts: 5 proposals per iteration, every odd one an accepted mirror image (3, 2, 3, 2 per iteration),
    each a sign change of phi, while the stored frames (one per iteration) show only the net change."""
    from regflow_mm.data.dataset import dihedrals
    from regflow_mm.sampling.hybrid import HybridWalker, run_block
    from regflow_mm.systems import get_system

    aldp = get_system("aldp")
    phi = aldp.torsions["phi1"]
    walker = HybridWalker(_MirrorMove(), aldp.positions, np.zeros_like(aldp.positions), md_steps=0, flow_moves=5,
                          timestep_fs=1.0, friction_per_ps=1.0, random_seed=1, watch=[phi])
    thermo = ThermodynamicState(aldp.system, T * unit.kelvin)
    rows = run_block([walker], thermo, 4)
    assert rows["accepted"].ravel().tolist() == [3, 2, 3, 2]  # proposals 1..20: the odd ones
    assert rows["sign_changes"].shape == (4, 1, 1) and rows["sign_changes"].ravel().tolist() == [3, 2, 3, 2]
    frames = dihedrals(rows["positions"][:, 0].astype(np.float64), [phi])[:, 0]
    start = dihedrals(aldp.positions[None], [phi])[0, 0]
    assert np.all(np.sign(frames) == np.sign(start) * np.array([-1, -1, 1, 1]))  # after 3, 5, 8, 10 mirrors
    mirrors = (np.arange(1, 21) + 1) // 2  # after proposal k: ceil(k / 2) mirror images
    positive_after = (start > 0) ^ (mirrors % 2 == 1)  # every proposal, accepted or not, is a chain state
    assert rows["positive_states"].ravel().tolist() == positive_after.reshape(4, 5).sum(axis=1).tolist()
    with pytest.raises(ValueError, match="needs a flow move"):
        HybridWalker(None, aldp.positions, np.zeros_like(aldp.positions), md_steps=10, flow_moves=1, timestep_fs=1.0,
                     friction_per_ps=1.0, random_seed=1).step(thermo)


def test_plain_md_chain_counts_what_its_frames_show(tmp_path):
    """flow_moves = 0 without a flow: plain MD with the hybrid chain's file and statistics; with one chain state
    per iteration the chain's sign changes are those between its frames (and from the start to frame 0)."""
    from regflow_mm.data.dataset import dihedrals
    from regflow_mm.sampling.hybrid import hybrid_summary
    from regflow_mm.systems import get_system

    aldp = get_system("aldp")
    out = tmp_path / "plain.h5"
    summary = run_hybrid_mc(aldp, None, out, 30, n_walkers=2, md_steps=20, flow_moves=0, seed=2, checkpoint_every=7,
                            progress=False)
    assert summary["n_iterations"] == 30 and np.isnan(summary["acceptance"]) and summary["n_chain_states"] == 60
    assert summary["md_cpu_s"] > 0 and np.isnan(summary["cpu_s_per_flow_move"])
    with h5py.File(out) as fh:
        positions = fh["positions"][()]
        assert np.all(fh["accepted"][()] == 0)
    phi = aldp.torsions["phi1"]
    start = dihedrals(aldp.positions[None], [phi])[0, 0] > 0
    for w in range(2):
        signs = np.concatenate([[start], dihedrals(positions[:, w].astype(np.float64), [phi])[:, 0] > 0])
        assert summary["phi1_chain_sign_changes"][w] == int(np.count_nonzero(signs[1:] != signs[:-1]))
    assert hybrid_summary(out)["phi1_chain_sign_changes"] == summary["phi1_chain_sign_changes"]
    # one chain state per iteration, the stored frame: the chain's population is the frames'
    assert summary["phi1_chain_positive_fraction"] == summary["phi1_positive_fraction"]
    with pytest.raises(ValueError, match="needs a flow file"):
        run_hybrid_mc(aldp, None, tmp_path / "x.h5", 2, flow_moves=1, progress=False)
    with pytest.raises(ValueError, match="never move"):
        run_hybrid_mc(aldp, None, tmp_path / "x.h5", 2, md_steps=0, flow_moves=0, progress=False)
