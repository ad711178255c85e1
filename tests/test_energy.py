"""Batched energies: pool / in-process / passed-in executors agree with a plain OpenMM Context loop,
forces are minus the finite-difference gradient, the torch path differentiates correctly, clashing
configurations come back as counted +inf, bad shapes fail clearly, and pools shut down."""
import concurrent.futures
import dataclasses
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import openmm
import pytest
import torch

from regflow_mm.energy import EnergyEvaluator, EnergyWorkerError

K_SPRING = 250.0  # kJ/mol/nm^2
TEMPERATURE = 300.0  # K
KT_300 = 0.00831446261815324 * TEMPERATURE  # kJ/mol


@dataclasses.dataclass
class Molecule:
    system: openmm.System
    kT: float
    n_atoms: int
    name: str


def _spring_system(n_atoms=3):
    """U = K/2 sum |r_i|^2 (kJ/mol, r in nm): exact energies and forces -K r."""
    system = openmm.System()
    force = openmm.CustomExternalForce("0.5*k*(x^2+y^2+z^2)")
    force.addGlobalParameter("k", K_SPRING)
    for i in range(n_atoms):
        system.addParticle(1.0)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def _raise_when_far(state):
    """PythonForce computation: U = sum |r|^2 / 2, raising an OpenMMException if any |coordinate| > 5 nm."""
    x = state.getPositions(asNumpy=True)._value
    if np.abs(x).max() > 5.0:
        raise ValueError("coordinate beyond 5 nm")
    return 0.5 * float((x ** 2).sum()), -x


def _perturbed(positions, n, scale=0.004, seed=0):
    rng = np.random.default_rng(seed)
    return positions[None] + scale * rng.standard_normal((n,) + positions.shape)


def _context_loop(system, x, platform="Reference", properties=None):
    """Reference values: one Context, configurations one by one. U (B,) kJ/mol, F (B, n, 3) kJ/mol/nm."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName(platform), properties or {})
    energies, forces = [], []
    for xi in x:
        context.setPositions(xi)
        state = context.getState(getEnergy=True, getForces=True)
        energies.append(state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole))
        forces.append(state.getForces(asNumpy=True).value_in_unit(openmm.unit.kilojoule_per_mole / openmm.unit.nanometer))
    return np.array(energies), np.array(forces)


@pytest.fixture(scope="module")
def aldp_batch(aldp):
    return _perturbed(aldp.positions, 23)


@pytest.fixture(scope="module")
def pool_evaluator(aldp):
    """One 2-worker process pool shared by the tests of this module (worker start-up costs seconds)."""
    with EnergyEvaluator(aldp, n_workers=2, platform="Reference", chunk_size=4) as evaluator:
        yield evaluator


def test_spring_known_answer_and_kT():
    evaluator = EnergyEvaluator.from_system(_spring_system(), TEMPERATURE, name="spring", n_workers=0)
    x = np.random.default_rng(1).standard_normal((5, 3, 3))
    energies, forces = evaluator.energy_and_forces(x)
    assert evaluator.kT == pytest.approx(KT_300, rel=1e-9)
    np.testing.assert_allclose(energies, 0.5 * K_SPRING * (x ** 2).sum(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(forces, -K_SPRING * x, rtol=1e-12)
    np.testing.assert_allclose(evaluator.reduced_energy(x), energies / KT_300, rtol=1e-12)
    u_single = evaluator.reduced_energy(x[0])
    assert np.ndim(u_single) == 0 and u_single == pytest.approx(energies[0] / KT_300, rel=1e-12)


def test_pool_equals_single_context_loop(aldp, aldp_batch, pool_evaluator):
    energies_ref, forces_ref = _context_loop(aldp.system, aldp_batch)
    energies, forces = pool_evaluator.energy_and_forces(aldp_batch)
    assert energies.dtype == np.float64 and forces.shape == (23, aldp.n_atoms, 3)
    np.testing.assert_allclose(energies, energies_ref, rtol=1e-6)
    np.testing.assert_allclose(forces, forces_ref, rtol=1e-6, atol=1e-6 * np.abs(forces_ref).max())
    assert pool_evaluator.last_stats.n_chunks == 6  # 23 configurations in chunks of 4, order kept
    u, reduced_forces = pool_evaluator.reduced_energy_and_forces(torch.as_tensor(aldp_batch, dtype=torch.float64))
    np.testing.assert_allclose(u, energies_ref / aldp.kT, rtol=1e-6)
    np.testing.assert_allclose(reduced_forces, forces / aldp.kT, rtol=1e-12)


def test_in_process_and_chunked_results_identical(aldp, aldp_batch, pool_evaluator):
    with EnergyEvaluator(aldp, n_workers=0, platform="Reference") as serial:
        energies, forces = serial.energy_and_forces(aldp_batch)
        assert serial.last_stats.n_chunks == 1
        energies_cpu, _ = EnergyEvaluator(aldp, n_workers=0, platform="CPU").energy_and_forces(aldp_batch)
    pooled, pooled_forces = pool_evaluator.energy_and_forces(aldp_batch)
    np.testing.assert_array_equal(pooled, energies)
    np.testing.assert_array_equal(pooled_forces, forces)
    energies_ref, _ = _context_loop(aldp.system, aldp_batch, "CPU")
    np.testing.assert_allclose(energies_cpu, energies_ref, rtol=1e-6)
    np.testing.assert_allclose(energies_cpu, energies, atol=1e-3)  # CPU platform: single precision terms


def test_forces_are_minus_finite_difference_gradient(aldp):
    evaluator = EnergyEvaluator(aldp, n_workers=0, platform="Reference")
    x = _perturbed(aldp.positions, 1, seed=3)[0]
    _, forces = evaluator.energy_and_forces(x)
    h = 1e-5  # nm
    coordinates = [(0, 0), (4, 1), (8, 2), (14, 0), (21, 2)]
    displaced = []
    for atom, axis in coordinates:
        for sign in (1.0, -1.0):
            xd = x.copy()
            xd[atom, axis] += sign * h
            displaced.append(xd)
    energies, _ = evaluator.energy_and_forces(np.stack(displaced))
    gradient = (energies[0::2] - energies[1::2]) / (2 * h)
    expected = np.array([forces[a, d] for a, d in coordinates])
    np.testing.assert_allclose(-gradient, expected, rtol=1e-5, atol=1e-3)


def test_torch_autograd_matches_forces(aldp):
    evaluator = EnergyEvaluator(aldp, n_workers=0, platform="Reference")
    x = torch.tensor(_perturbed(aldp.positions, 2, seed=4), requires_grad=True)
    assert torch.autograd.gradcheck(evaluator.reduced_energy_torch, (x,), eps=1e-6, atol=1e-4, rtol=1e-4)
    u = evaluator.reduced_energy_torch(x)
    weights = torch.tensor([0.3, -1.7], dtype=torch.float64)
    (gradient,) = torch.autograd.grad((weights * u).sum(), x)
    _, forces = evaluator.energy_and_forces(x.detach().numpy())
    np.testing.assert_allclose(gradient.numpy(), -weights.numpy()[:, None, None] * forces / aldp.kT, rtol=1e-12)

    x32 = x.detach().float().requires_grad_(True)
    u32 = evaluator.reduced_energy_torch(x32)
    assert u32.dtype == torch.float32
    u32.sum().backward()
    assert x32.grad.dtype == torch.float32
    np.testing.assert_allclose(u32.detach().numpy(), u.detach().numpy(), rtol=1e-5)


def test_infinite_energy_has_zero_gradient(aldp):
    evaluator = EnergyEvaluator(aldp, n_workers=0, platform="Reference")
    x = torch.tensor(_perturbed(aldp.positions, 3, seed=5))
    x[1, 0] = float("nan")
    x.requires_grad_(True)
    u = evaluator.reduced_energy_torch(x)
    assert torch.isinf(u[1]) and torch.isfinite(u[[0, 2]]).all()
    u[torch.isfinite(u)].sum().backward()
    assert (x.grad[1] == 0).all() and (x.grad[0] != 0).any()


def _clashing_batch(aldp, aldp_batch):
    x = aldp_batch[:8].copy()
    x[1, 3] = np.nan  # NaN from a flow
    x[3, 0] = np.inf
    x[4] = aldp.positions * 1e3  # blown up: |U| ~ 1e11 kJ/mol > max_energy
    x[6, 5] = x[6, 4]  # two atoms on top of each other: non-finite energy
    return x, [1, 3, 4, 6]


@pytest.mark.parametrize("in_process", [True, False])
def test_nonfinite_configurations_are_counted_inf(aldp, aldp_batch, pool_evaluator, in_process):
    evaluator = EnergyEvaluator(aldp, n_workers=0, platform="Reference") if in_process else pool_evaluator
    x, bad = _clashing_batch(aldp, aldp_batch)
    before = evaluator.n_nonfinite
    energies, forces = evaluator.energy_and_forces(x)
    good = np.setdiff1d(np.arange(len(x)), bad)
    assert np.isposinf(energies[bad]).all() and (forces[bad] == 0).all()
    energies_ref, forces_ref = _context_loop(aldp.system, x[good])
    np.testing.assert_allclose(energies[good], energies_ref, rtol=1e-6)
    np.testing.assert_allclose(forces[good], forces_ref, rtol=1e-6, atol=1e-6 * np.abs(forces_ref).max())
    stats = evaluator.last_stats
    assert (stats.n_configurations, stats.n_nonfinite, stats.n_nan_positions) == (8, 4, 2)
    assert evaluator.n_nonfinite == before + 4
    assert np.isposinf(evaluator.reduced_energy(x)[bad]).all() and evaluator.n_nonfinite == before + 8


def test_max_energy_is_configurable(aldp, aldp_batch):
    evaluator = EnergyEvaluator(aldp, n_workers=0, platform="Reference", max_energy=1.0)
    energies_ref, _ = _context_loop(aldp.system, aldp_batch[:4])
    expected = np.where(np.abs(energies_ref) > 1.0, np.inf, energies_ref)
    np.testing.assert_array_equal(np.isinf(evaluator.energy_and_forces(aldp_batch[:4])[0]), np.isinf(expected))


def test_openmm_exception_is_caught_per_configuration():
    system = openmm.System()
    for _ in range(2):
        system.addParticle(1.0)
    system.addForce(openmm.PythonForce(_raise_when_far))
    x = np.random.default_rng(6).uniform(-1, 1, (6, 2, 3))
    x[[0, 4], 1, 2] = 7.0  # the first configuration fails before any good one: Context rebuilt
    expected = 0.5 * (x ** 2).sum(axis=(1, 2))
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        for kwargs in ({"n_workers": 0}, {"executor": threads, "chunk_size": 3}):
            evaluator = EnergyEvaluator.from_system(system, TEMPERATURE, name="pyforce", platform="Reference", **kwargs)
            energies, forces = evaluator.energy_and_forces(x)
            assert np.isposinf(energies[[0, 4]]).all()
            np.testing.assert_allclose(energies[[1, 2, 3, 5]], expected[[1, 2, 3, 5]], rtol=1e-12)
            np.testing.assert_allclose(forces[[1, 2, 3, 5]], -x[[1, 2, 3, 5]], rtol=1e-12)
            stats = evaluator.last_stats
            assert (stats.n_openmm_errors, stats.n_nonfinite) == (2, 2)
            assert stats.n_context_rebuilds == 1 and "beyond 5 nm" in stats.first_error


def test_passed_in_executors_work_unchanged(aldp, aldp_batch):
    energies_ref, forces_ref = _context_loop(aldp.system, aldp_batch, "CPU", {"Threads": "1"})
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ThreadPoolExecutor(2) as threads, \
            concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as processes:
        for executor in (threads, processes):
            evaluator = EnergyEvaluator(aldp, executor=executor, platform="CPU", chunk_size=5)
            assert evaluator.n_workers == 2 and evaluator.platform_properties == {"Threads": "1"}
            for _ in range(2):  # second call reuses the worker-side Contexts
                energies, forces = evaluator.energy_and_forces(aldp_batch)
                np.testing.assert_allclose(energies, energies_ref, rtol=1e-6)
                np.testing.assert_allclose(forces, forces_ref, rtol=1e-6, atol=1e-6 * np.abs(forces_ref).max())
            evaluator.close()  # must leave a passed-in executor running
            assert executor.submit(abs, -1).result() == 1


@pytest.mark.parametrize("shape, match", [
    ((4, 21, 3), r"must have shape \(B, 22, 3\) or \(22, 3\).*got \(4, 21, 3\)"),
    ((4, 22, 2), r"got \(4, 22, 2\)"),
    ((22,), r"got \(22,\)"),
    ((2, 4, 22, 3), r"got \(2, 4, 22, 3\)"),
])
def test_wrong_shapes_raise_clear_errors(aldp, shape, match):
    evaluator = EnergyEvaluator(aldp, n_workers=0)
    with pytest.raises(ValueError, match=match):
        evaluator.reduced_energy(np.zeros(shape))


def test_bad_arguments_raise_clear_errors(aldp):
    with pytest.raises(ValueError, match="not available here"):
        EnergyEvaluator(aldp, n_workers=0, platform="NoSuchPlatform")
    with pytest.raises(ValueError, match="n_workers must be >= 0"):
        EnergyEvaluator(aldp, n_workers=-1)
    with pytest.raises(TypeError, match="lacks .kT"):
        EnergyEvaluator(types.SimpleNamespace(system=aldp.system, n_atoms=22, name="x"))
    with pytest.raises(ValueError, match="has 22 particles but n_atoms=21"):
        EnergyEvaluator(Molecule(aldp.system, aldp.kT, 21, "x"))
    with pytest.raises(ValueError, match="real numeric array"):
        EnergyEvaluator(aldp, n_workers=0).reduced_energy([["a"] * 3] * 22)
    evaluator = EnergyEvaluator(aldp, n_workers=0)
    assert evaluator.reduced_energy(np.zeros((0, 22, 3))).shape == (0,)
    evaluator.close()
    with pytest.raises(RuntimeError, match="is closed"):
        evaluator.reduced_energy(aldp.positions)


def test_dead_worker_is_reported_and_pool_rebuilt(aldp, aldp_batch):
    with EnergyEvaluator(aldp, n_workers=1, platform="Reference") as evaluator:
        expected = evaluator.reduced_energy(aldp_batch)
        try:
            evaluator.executor.submit(os._exit, 1).result()
        except concurrent.futures.process.BrokenProcessPool:
            pass
        with pytest.raises(EnergyWorkerError, match=r"worker process died while evaluating system 'aldp' on platform Reference"):
            evaluator.reduced_energy(aldp_batch)
        np.testing.assert_array_equal(evaluator.reduced_energy(aldp_batch), expected)
        processes = list(evaluator.executor._processes.values())
    assert not any(p.is_alive() for p in processes)


def test_interpreter_exit_without_close_does_not_hang(tmp_path):
    script = textwrap.dedent("""
        import numpy as np
        from regflow_mm.energy import EnergyEvaluator
        from regflow_mm.systems import get_system
        if __name__ == "__main__":
            aldp = get_system("aldp")
            evaluator = EnergyEvaluator(aldp, n_workers=2, platform="Reference")
            u = evaluator.reduced_energy(np.stack([aldp.positions] * 8))
            print("u", np.isfinite(u).all())
    """)
    path = tmp_path / "no_close.py"
    path.write_text(script)
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "u True" in result.stdout


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """kill -9 of the process that owns the pool (as of `evaluate` or `free-energy`): its energy workers
    notice within a second or two and exit."""
    script = textwrap.dedent("""
        import sys, time
        import numpy as np
        from regflow_mm.energy import EnergyEvaluator
        from regflow_mm.systems import get_system
        if __name__ == "__main__":
            aldp = get_system("aldp")
            evaluator = EnergyEvaluator(aldp, n_workers=2, platform="Reference")
            evaluator.reduced_energy(np.stack([aldp.positions] * 8))
            print(*[p.pid for p in evaluator.executor._processes.values()], flush=True)
            time.sleep(600)
    """)
    path = tmp_path / "parent.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10.0
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if _running(p)]
    assert alive == [], f"workers {alive} outlived their killed parent by 10 s"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
