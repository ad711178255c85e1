"""Flow potentials for dynamics: open support of internal coordinates, the exported smooth-flow force
along an MD trajectory (finite differences), support warnings and reports, the [smooth] pipeline settings."""
from __future__ import annotations

import math
import warnings

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from regflow_mm.export import SupportWarning, flow_force, run_md
from regflow_mm.flows import build_flow
from regflow_mm.pipeline.config import baseline_settings, smooth_settings, validate
from regflow_mm.representations.internal import InternalCoordinates


@pytest.fixture(scope="module")
def frames(aldp):
    """64 configurations near the minimised structure (nm): the 'data' the representations are fitted to."""
    rng = np.random.default_rng(1)
    return aldp.positions[None] + 0.004 * rng.standard_normal((64, aldp.n_atoms, 3))


def _perturbed(flow, scale=0.05, seed=0):
    with torch.no_grad():  # off the near-identity initialisation, so the test sees a non-trivial flow
        g = torch.Generator().manual_seed(seed)
        for p in flow.transform.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.eval()


@pytest.fixture(scope="module", params=["probit", "logistic", "mixture", "probit-torsions"])
def smooth_flow(aldp, frames, request):
    """A small float64 smooth flow on the open support (2 layers, 4 components, 16 hidden), with the
    probit-affine (on the normal open map), the logit-affine or the mixture map on bonds, angles and
    narrow torsions; 'probit-torsions': probit with every torsion conditioned on torsions only."""
    interval, _, conditioning = request.param.partition("-")
    open_map = "normal" if interval == "probit" else "logistic"
    flow = build_flow(aldp, "internal", "smooth", fit_to=frames, dtype=torch.float64, seed=0,
                      representation_options={"support": "open", "open_map": open_map}, n_layers=2,
                      n_components=4, hidden=[16], interval=interval, circle_conditioning=conditioning or "all")
    return _perturbed(flow)


@pytest.mark.parametrize("open_map", ["logistic", "normal"])
def test_open_support_round_trip_and_log_det(aldp, frames, open_map):
    rep = InternalCoordinates.from_topology(aldp.topology, support="open", open_map=open_map).double().fit(frames)
    x = torch.as_tensor(frames[:8])
    u, logdet_to = rep.to_flow_space(x)
    assert ((u > 0) & (u < 1)).all()
    x_back, logdet_from = rep.from_flow_space(u)
    u_back, _ = rep.to_flow_space(x_back)
    torch.testing.assert_close(u_back, u, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_from, -logdet_to, atol=1e-9, rtol=0)
    # the element-wise map internal coordinate v -> u: its log-derivative by autograd equals the analytic one
    bonds, angles, torsions = rep.internal(x)
    from regflow_mm.representations.internal import _wrap

    centred = _wrap(torsions - rep.torsion_offset)
    v = [t.detach().clone().requires_grad_(True) for t in (bonds, angles, centred)]
    z = (rep._open_t(*v) - rep.open_centre) / rep.open_scale
    circ = torch.cat([torch.zeros(rep.n_bonds + rep.n_angles, dtype=torch.bool), rep.circular_torsions])
    cdf = torch.sigmoid(z) if open_map == "logistic" else 0.5 * torch.erfc(-z / math.sqrt(2.0))
    u_v = torch.where(circ, torch.cat([z[:, :-rep.n_torsions], (v[2] + math.pi) / (2 * math.pi)], -1), cdf)
    grads = torch.cat(torch.autograd.grad(u_v.sum(), v), -1)
    expected = -rep._jacobian_log(bonds, angles) + grads.log().sum(-1)
    torch.testing.assert_close(logdet_to, expected, atol=1e-9, rtol=0)


def test_open_support_density_is_positive_far_outside_the_data(aldp, frames):
    """A bond stretched by 50% and an angle bent to 3.1 rad: zero density (energy +inf) in the fitted
    box, finite in the open support, with the box flow's export warning and none for the open one."""
    far = np.array(frames[:2], dtype=np.float64)
    far[0, 1] = far[0, 0] + 1.5 * (far[0, 1] - far[0, 0])  # bond 0-1 (a C-H of the Ace methyl)
    energies = {}
    for support in ("box", "open"):
        flow = build_flow(aldp, "internal", "smooth", fit_to=frames, dtype=torch.float64, seed=0,
                          representation_options={"support": support}, n_layers=2, n_components=4, hidden=[16])
        energies[support] = flow.energy(torch.as_tensor(far)).detach().numpy()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            flow_force(flow, backend="python")
        assert [w.category for w in caught if issubclass(w.category, SupportWarning)] == \
            ([SupportWarning] if support == "box" else [])
        if support == "box":
            assert "{'support': 'open'}" in str(caught[0].message)
            assert "bond of atoms 1-0" in flow.representation.describe_outside(far)
            assert flow.representation.describe_outside(frames) is None
    assert math.isinf(energies["box"][0]) and np.isfinite(energies["box"][1])
    assert np.isfinite(energies["open"]).all()
    # the open map confines without a wall: the energy keeps rising as the bond stretches, and stays finite
    stretched = np.repeat(np.array(frames[1:2], dtype=np.float64), 5, axis=0)
    factors = np.array([1.0, 1.25, 1.5, 2.0, 4.0])
    stretched[:, 1] = stretched[:, 0] + factors[:, None] * (stretched[:, 1] - stretched[:, 0])
    e = flow.energy(torch.as_tensor(stretched)).detach().numpy()
    assert np.isfinite(e).all() and (np.diff(e) > 0).all() and e[-1] - e[0] > 20 * aldp.kT


def _fd_forces(context, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Fourth-order central finite differences of the context's potential energy, kJ/mol/nm."""
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for k in range(3):
            e = {}
            for step in (2, 1, -1, -2):
                y = x.copy()
                y[i, k] += step * h
                context.setPositions(y)
                e[step] = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            out[i, k] = -(-e[2] + 8 * e[1] - 8 * e[-1] + e[-2]) / (12 * h)
    return out


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_exported_forces_match_finite_differences_along_a_1000_step_trajectory(aldp, frames, smooth_flow, backend):
    run = run_md(aldp, frames[0], smooth_flow, mode="flow", integrator="langevin", steps=1000, timestep_fs=1.0,
                 backend=backend, save_every=250, report_every=100, seed=2)
    assert run.finite and run.failure is None and run.steps_done == 1000
    assert len(run.positions) == 5  # steps 0, 250, ..., 1000
    system = openmm.System()
    for i in range(aldp.n_atoms):
        system.addParticle(aldp.system.getParticleMass(i))
    system.addForce(flow_force(smooth_flow, backend=backend))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    for x in run.positions[1:]:
        context.setPositions(x)
        analytic = context.getState(getForces=True).getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer)
        fd = _fd_forces(context, x)
        scale = np.abs(analytic).max()
        assert scale > 1.0
        np.testing.assert_allclose(fd, analytic, rtol=0, atol=1e-5 * scale + 1e-3)


@pytest.fixture(scope="module")
def probit_flow(aldp, frames):
    """One small smooth flow (the probit variant of ``smooth_flow``) for the tests of walkers in one Context."""
    flow = build_flow(aldp, "internal", "smooth", fit_to=frames, dtype=torch.float64, seed=0,
                      representation_options={"support": "open", "open_map": "normal"}, n_layers=2,
                      n_components=4, hidden=[16], interval="probit")
    return _perturbed(flow)


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_flow_force_of_copies_is_the_sum_of_independent_molecules(aldp, frames, probit_flow, backend):
    """A System of 3 copies: energy = the sum of the flow energies, each copy's forces = its own molecule's."""
    def context_of(copies):
        system = openmm.System()
        for _ in range(copies):
            for i in range(aldp.n_atoms):
                system.addParticle(aldp.system.getParticleMass(i))
        system.addForce(flow_force(probit_flow, backend=backend, copies=copies))
        return openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))

    def energy_forces(context, x):
        context.setPositions(x)
        state = context.getState(getEnergy=True, getForces=True)
        return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

    x = frames[[3, 7, 11]]
    energy, forces = energy_forces(context_of(3), x.reshape(-1, 3))
    expected = probit_flow.energy(torch.as_tensor(x)).detach().numpy()
    assert energy == pytest.approx(expected.sum(), rel=1e-10)
    single = context_of(1)
    for k in range(3):
        e_k, f_k = energy_forces(single, x[k])
        assert e_k == pytest.approx(expected[k], rel=1e-10)
        np.testing.assert_allclose(forces[k * aldp.n_atoms:(k + 1) * aldp.n_atoms], f_k, rtol=1e-9,
                                   atol=1e-9 * np.abs(f_k).max())
    with pytest.raises(ValueError, match="copies must be >= 1"):
        flow_force(probit_flow, backend=backend, copies=0)


def test_flow_walkers_in_one_context_equal_separate_runs_and_report_their_own_failures(aldp, frames, probit_flow):
    """One walker in ``run_flow_walkers`` is ``run_md`` exactly (same seed streams, positions and kinetic energies);
    three walkers run independently (each starts at its own frame with its own flow energy); a runaway of one
    walker stops the Context, reported for that walker alone."""
    from regflow_mm.export.dynamics import run_flow_walkers

    kwargs = {"steps": 60, "report_every": 10, "save_every": 20, "seed": 3, "backend": "python"}
    [alone] = run_flow_walkers(aldp, frames[:1], probit_flow, **kwargs)
    single = run_md(aldp, frames[0], probit_flow, mode="flow", integrator="langevin", **kwargs)
    assert alone.finite and single.finite
    np.testing.assert_allclose(alone.positions, single.positions, rtol=0, atol=1e-12)
    np.testing.assert_allclose(alone.kinetic, single.kinetic, rtol=1e-9)  # own velocities vs OpenMM's kinetic energy
    np.testing.assert_allclose(alone.flow_energy, single.flow_energy, rtol=1e-9)
    runs = run_flow_walkers(aldp, frames[[0, 5, 9]], probit_flow, **kwargs)
    assert [r.finite for r in runs] == [True] * 3 and runs[0].positions.shape == (4, aldp.n_atoms, 3)
    np.testing.assert_array_equal(np.stack([r.positions[0] for r in runs]), frames[[0, 5, 9]])
    start_energy = probit_flow.energy(torch.as_tensor(frames[[0, 5, 9]])).detach().numpy()
    np.testing.assert_allclose([r.flow_energy[0] for r in runs], start_energy, rtol=1e-12)
    assert runs[0].n_dof == 3 * aldp.n_atoms - 6 and runs[1].settings["walkers_per_context"] == 3
    # a threshold between the two walkers' starting temperatures: the hotter one runs away at step 0
    t0 = np.array([r.temperature[0] for r in runs[:2]])
    hot = int(np.argmax(t0))
    stopped = run_flow_walkers(aldp, frames[[0, 5]], probit_flow, **{**kwargs, "steps": 20},
                               max_temperature_factor=t0.mean() / aldp.temperature)
    assert stopped[hot].failure["step"] == 0 and stopped[hot].failure["reason"].startswith("ran away")
    assert stopped[1 - hot].failure is None and not stopped[1 - hot].finite
    with pytest.raises(ValueError, match=r"starts must have shape \(walkers, 22, 3\) nm"):
        run_flow_walkers(aldp, frames[0], probit_flow)


def test_nve_on_the_smooth_flow_and_the_force_field_side_by_side(aldp, frames, smooth_flow):
    runs = {mode: run_md(aldp, frames[0], smooth_flow if mode == "flow" else None, mode=mode, integrator="verlet",
                         steps=200, timestep_fs=0.5, report_every=10, seed=0) for mode in ("flow", "forcefield")}
    for run in runs.values():
        assert run.finite and len(run.total) == 21
        # energy conserved to a small fraction of the kinetic energy (kT/2 per DOF)
        assert run.energy_fluctuation_per_dof() < 0.02 * aldp.kT
    assert runs["flow"].n_dof == runs["forcefield"].n_dof == 3 * aldp.n_atoms - 6


def test_bias_runs_the_flow_in_its_own_force_group(aldp, frames, smooth_flow):
    run = run_md(aldp, frames[0], smooth_flow, mode="bias", integrator="langevin", steps=20, backend="python",
                 flow_group=5, report_every=10, seed=0)
    assert run.finite
    energy = smooth_flow.energy(torch.as_tensor(frames[:1])).item()
    assert np.isfinite(run.flow_energy).all() and abs(run.flow_energy[0] - energy) < 1e-6 * max(abs(energy), 1.0)
    assert not np.allclose(run.potential, run.flow_energy)  # the force field is there too
    with pytest.raises(ValueError, match="force group 0 is already used by the force field"):
        run_md(aldp, frames[0], smooth_flow, mode="bias", flow_group=0, steps=1)


def test_a_trajectory_leaving_a_box_support_is_reported_with_step_and_coordinate(aldp, frames):
    """Box with no margin around near-identical frames: Langevin leaves it within a few steps."""
    flow = build_flow(aldp, "internal", "smooth", fit_to=frames[:4], dtype=torch.float64, seed=0,
                      representation_options={"support": "box", "margin": 0.0}, n_layers=1, n_components=2,
                      hidden=[8])
    with pytest.warns(SupportWarning):
        run = run_md(aldp, frames[0], flow, mode="flow", integrator="langevin", steps=500, backend="python",
                     report_every=10, seed=0)
    assert not run.finite and run.failure is not None
    assert 1 <= run.failure["step"] <= 500 and run.steps_done == run.failure["step"]
    assert "left the flow's support" in run.failure["reason"]
    assert any(kind in run.failure["reason"] for kind in ("bond of atoms", "angle of atoms", "torsion of atoms"))
    assert "outside the flow's support [" in run.failure["reason"]
    assert np.isfinite(run.potential).all()  # stopped before any non-finite energy was integrated


def test_smooth_pipeline_settings():
    config = validate({"smooth": {"enabled": True, "time_budget_s": 5, "w_fm": 0.01}})
    settings = smooth_settings(config)
    assert settings["representation_options"]["support"] == "open" and settings["architecture"] == "smooth"
    assert settings["method"] == "nll+fm" and settings["w_fm"] == 0.01 and settings["dtype"] == "float64"
    assert validate({})["smooth"]["enabled"] is False
    from pathlib import Path

    from regflow_mm.pipeline.config import load_config

    example = load_config(Path(__file__).parents[1] / "examples" / "aldp_cpu_smooth.toml")
    assert example["smooth"]["enabled"] and example["smooth"]["time_budget_s"] == example["train"]["time_budget_s"]
    smooth_settings(example)
    assert settings["hyper"]["interval"] == "probit" and settings["representation_options"]["open_map"] == "normal"
    logistic = smooth_settings(validate({"smooth": {"enabled": True, "interval": "logistic"}}))
    assert logistic["hyper"]["interval"] == "logistic" and logistic["representation_options"]["open_map"] == "logistic"
    with pytest.raises(ValueError, match="open_map must be one of"):
        InternalCoordinates.from_topology(__import__("regflow_mm.systems", fromlist=["get_system"])
                                          .get_system("aldp").topology, support="open", open_map="cauchy")
    with pytest.raises(ValueError, match=r"\[smooth\].interval must be 'probit', 'logistic' or 'mixture'"):
        validate({"smooth": {"interval": "spline"}})
    assert settings["hyper"]["circle_conditioning"] == "all"
    circles = smooth_settings(validate({"smooth": {"circle_conditioning": "circles"}}))
    assert circles["hyper"]["circle_conditioning"] == "circles"
    with pytest.raises(ValueError, match=r"\[smooth\].circle_conditioning must be 'circles', 'torsions' or 'all'"):
        validate({"smooth": {"circle_conditioning": "bonds"}})
    with pytest.raises(ValueError, match=r"\[smooth\].backend must be 'torch' or 'python'"):
        validate({"smooth": {"backend": "jax"}})
    with pytest.raises(ValueError, match=r"\[smooth\].nve_ps must be > 0"):
        validate({"smooth": {"nve_ps": 0.0}})
    with pytest.raises(ValueError, match=r"\[smooth\].n_samples must be >= 0"):
        validate({"smooth": {"n_samples": -1}})
    with pytest.raises(ValueError, match=r"\[smooth\].langevin_walkers must be >= 1"):
        validate({"smooth": {"langevin_walkers": 0}})
    with pytest.raises(ValueError, match=r"\[baseline\].method must be one of mle, nll\+fm, regflow, smooth"):
        validate({"baseline": {"method": "smoothed"}})
    # the smooth flow as the baseline: the [smooth] section's settings, whether or not its dynamics stage runs
    assert baseline_settings(validate({"baseline": {"method": "smooth"}})) == smooth_settings(validate({}))
    assert baseline_settings(validate({"baseline": {"enabled": False}})) is None
    with pytest.raises(ValueError, match="support must be one of"):
        InternalCoordinates.from_topology(__import__("regflow_mm.systems", fromlist=["get_system"])
                                          .get_system("aldp").topology, support="walls")


def test_smooth_stage_trains_runs_md_and_reports(tmp_path, aldp):
    """The [smooth] stage on 100 frames, 2 CPU-s of training and a few hundred MD steps: every number
    of the report is there and comes from the stage."""
    from regflow_mm.data import simulate
    from regflow_mm.pipeline import run as pipeline_run
    from regflow_mm.pipeline.report import _smooth_lines

    path = simulate(aldp, tmp_path / "md.h5", ns=0.01, save_interval_ps=0.1, equilibration_ps=0.5, progress=False)
    config = validate({"smooth": {"enabled": True, "time_budget_s": 2.0, "layers": 2, "components": 4, "hidden": 16,
                                  "nve_equilibrate_ps": 0.05, "nve_ps": 0.1, "langevin_ps": 0.2, "bias_ps": 0.02, "n_test_frames": 10,
                                  "n_samples": 300, "langevin_walkers": 2}})
    inputs = {"md": {"dataset": str(path)}}
    result = pipeline_run._smooth(tmp_path / "smooth", inputs, settings=smooth_settings(config),
                                  smooth=config["smooth"], flows={}, seed=0, threads=1, progress=False)
    dyn = result["dynamics"]
    assert dyn["nve_flow"]["finite"] and dyn["nve_forcefield"]["finite"]
    assert dyn["nve_flow"]["steps_done"] == 100 and dyn["nve_flow"]["equilibrate_steps"] == 50
    assert dyn["nve_ratio"] == pytest.approx(dyn["nve_flow"]["energy_fluctuation_per_dof"]
                                             / dyn["nve_forcefield"]["energy_fluctuation_per_dof"])
    lang = dyn["langevin"]  # 2 walkers from equilibrium starts, each in its own process
    assert lang["finite"] and lang["n_walkers"] == 2 and lang["n_frames"] == 6 and 0 <= lang["t_w2"] < math.pi
    # one Context per usable core: walker k's Context has seed 0 + its first walker ([0, 1] on 2 cores, [0, 0] on 1)
    assert [w["seed"] for w in lang["walkers"]] in ([0, 1], [0, 0]) and all(w["n_frames"] == 3 for w in lang["walkers"])
    assert all(0 <= w["t_w2"] < math.pi and 0 < w["mean_temperature_K"] < 3000 for w in lang["walkers"])
    ff = dyn["langevin_forcefield"]  # the same walkers on the force field: the T-W2 floor of trajectories this long
    assert ff["mode"] == "forcefield" and ff["steps"] == lang["steps"] and ff["seed"] == lang["seed"]
    assert ff["n_frames"] == 6 and 0 <= ff["t_w2"] < math.pi and "flow_energy_mean" not in ff["walkers"][0]
    assert (tmp_path / "smooth" / "ramachandran.png").is_file()
    with np.load(tmp_path / "smooth" / "langevin_angles.npz") as kept:  # every walker's (phi, psi) frames
        assert kept["flow"].shape == (6, 2) and kept["flow_walker"].tolist() == [0, 0, 0, 1, 1, 1]
        assert kept["forcefield"].shape == (6, 2) and np.all(np.abs(kept["flow"]) <= math.pi)
    assert result["force_rmse"]["smooth"]["n_frames"] == 10 and result["force_rmse"]["smooth"]["rmse"] > 0
    text = "\n".join(_smooth_lines(result, config["smooth"], lambda stage, name: f"figures/{stage}_{name}"))
    assert f"{result['force_rmse']['smooth']['rmse']:.3g}" in text and "figures/smooth_ramachandran.png" in text
    assert f"T-W2 against the MD frames **{lang['t_w2']:.3g} rad**" in text
    assert f"and masses: {ff['t_w2']:.3g} rad" in text and "1: finite, T-W2" in text
    # the flow potential's own ensemble q (what Langevin on it samples) against the test split
    ens = result["ensemble"]
    assert ens["n_samples"] == 300 and 0 < ens["ess"] <= 1 and ens["ess_p05"] <= ens["ess"] <= ens["ess_p95"]
    assert 0 <= ens["above_max_fraction"] <= 1 and ens["reference"].startswith("test split")
    assert f"Kish ESS (fraction) {ens['ess']:.3g}" in text


def test_langevin_runs_are_reproducible_with_seed_zero(aldp, frames):
    """OpenMM reads a random seed of 0 as "pick one": run_md derives its streams from the seed, so seed 0 repeats
    itself, with and without equilibration, and another seed differs."""
    runs = [run_md(aldp, frames[0], None, mode="forcefield", integrator="langevin", steps=200, equilibrate_steps=eq,
                   save_every=50, seed=seed) for seed, eq in ((0, 0), (0, 0), (1, 0), (0, 20), (0, 20))]
    np.testing.assert_array_equal(runs[0].positions, runs[1].positions)
    np.testing.assert_array_equal(runs[3].positions, runs[4].positions)
    assert np.abs(runs[0].positions - runs[2].positions).max() > 1e-3


def test_a_runaway_kinetic_temperature_is_a_reported_failure(aldp, frames):
    """A trajectory that heats far above its thermostat stays finite for long: run_md reports it with its step.
    Here the threshold is set below the system's own temperature, so the first report (step 0) is a runaway."""
    run = run_md(aldp, frames[0], None, mode="forcefield", integrator="langevin", steps=50, report_every=10, seed=0,
                 max_temperature_factor=0.5)
    assert not run.finite and run.steps_done == 0 and run.failure["step"] == 0
    assert run.failure["reason"].startswith("ran away: kinetic temperature") and "0.5 x 300 K" in run.failure["reason"]
    fine = run_md(aldp, frames[0], None, mode="forcefield", integrator="langevin", steps=50, report_every=10, seed=0)
    assert fine.finite and fine.failure is None  # the default (10x) leaves a sane run alone
    with pytest.raises(ValueError, match="max_temperature_factor must be > 0"):
        run_md(aldp, frames[0], None, mode="forcefield", max_temperature_factor=0.0)


def test_equilibrium_starts_follow_the_frame_weights():
    """Walkers start from frames drawn by their weights: frames of weight zero are never drawn, the draw is without
    replacement and reproducible, and asking for more walkers than frames is a clear error."""
    from regflow_mm.export.check import equilibrium_starts

    positions = np.arange(10 * 2 * 3, dtype=np.float64).reshape(10, 2, 3)
    log_w = np.full(10, -np.inf)
    log_w[[2, 5, 7]] = [0.0, np.log(2.0), 1.0]
    starts = equilibrium_starts(positions, log_w, 3, seed=4)
    np.testing.assert_array_equal(starts, positions[[2, 5, 7]])  # the only frames with weight, in frame order
    np.testing.assert_array_equal(equilibrium_starts(positions, None, 4, 1), equilibrium_starts(positions, None, 4, 1))
    assert len({tuple(x.ravel()) for x in equilibrium_starts(positions, None, 10, 0)}) == 10
    with pytest.raises(ValueError, match="need 1 <= walkers <= 10 frames, got 11"):
        equilibrium_starts(positions, None, 11, 0)


def test_pooled_langevin_walkers_report_the_first_failure_with_its_walker(aldp, frames):
    """A walker that runs away makes the pooled run not finite, with that walker's step; the others' frames count."""
    from regflow_mm.export.check import _pooled, langevin_walkers

    settings = {"steps": 40, "timestep_fs": 1.0, "hydrogen_mass_amu": None, "backend": "torch", "save_every": 10,
                "pair": [aldp.torsions["phi1"], aldp.torsions["psi1"]]}
    [(good, angles)] = langevin_walkers(None, aldp, frames[:1], "forcefield", 0, settings)
    assert good["finite"] and good["n_frames"] == 5 and angles.shape == (5, 2) and np.all(np.abs(angles) <= math.pi)
    bad = {**good, "finite": False, "ps": 0.01, "n_frames": 1, "failure": {"step": 10, "time_ps": 0.01, "reason": "x"}}
    pooled = _pooled([good, bad, good])
    assert not pooled["finite"] and pooled["failure"] == {"step": 10, "time_ps": 0.01, "reason": "x", "walker": 1}
    assert pooled["n_frames"] == 11 and pooled["ps"] == pytest.approx(0.04 + 0.01 + 0.04) and pooled["n_walkers"] == 3
    assert pooled["steps_done"] == 2 * good["steps_done"] + bad["steps_done"] == 80 + bad["steps_done"]


def test_stratified_equilibrium_starts_hold_each_basins_weight_to_within_one_walker():
    """Systematic resampling over frames ordered by ``ramachandran_strata``: 16 starts from frames whose weights put
    0.42 in alpha_R, 0.56 in beta and 0.02 in alpha_L get 6.72 -> 6 or 7 alpha_R walkers for every seed (independent
    draws spread 2-11); bad keys are a clear error."""
    from regflow_mm.export.check import equilibrium_starts, ramachandran_strata

    rng = np.random.default_rng(0)
    n = 3000
    basin = rng.choice(3, size=n, p=[0.3, 0.5, 0.2])  # frame counts differ from the weights (a biased run)
    angles = np.where(basin[:, None] == 0, [-1.5, -0.5], np.where(basin[:, None] == 1, [-2.5, 2.8], [1.0, 0.5]))
    angles = angles + 0.1 * rng.standard_normal((n, 2))
    target = np.array([0.42, 0.56, 0.02])
    log_w = np.log(target[basin] / np.bincount(basin, minlength=3)[basin])
    positions = np.concatenate([angles, basin[:, None].astype(float)], axis=1)[:, None, :]  # carry the basin along
    strata = ramachandran_strata(angles)
    for seed in range(20):
        starts = equilibrium_starts(positions, log_w, 16, seed, strata=strata)
        counts = np.bincount(starts[:, 0, 2].astype(int), minlength=3)
        assert np.all(np.abs(counts - 16 * target) < 1.0), counts
    with pytest.raises(ValueError, match="strata must be 3000 finite keys"):
        equilibrium_starts(positions, log_w, 16, 0, strata=strata[:10])
