"""Flow energies as OpenMM forces: TorchForce and PythonForce equal BoltzmannFlow.energy / autograd forces."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from regflow_mm.export import flow_force
from regflow_mm.export.cli import register
from regflow_mm.flows import build_flow

RTOL = 1e-5


@pytest.fixture(scope="module")
def flow(aldp):
    """Untrained aldp flow with random weights, float64."""
    f = build_flow(aldp, "cartesian", "resnvp", seed=3, dtype=torch.float64, fit_to=aldp.positions[None])
    with torch.no_grad():  # move the weights off their (often identity-like) initialisation
        g = torch.Generator().manual_seed(0)
        for p in f.transform.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return f.eval()


@pytest.fixture(scope="module")
def configurations(aldp):
    rng = np.random.default_rng(0)
    return aldp.positions[None] + 0.01 * rng.standard_normal((3, aldp.n_atoms, 3))


def flow_only_system(n_atoms: int, force: openmm.Force) -> openmm.System:
    system = openmm.System()
    for _ in range(n_atoms):
        system.addParticle(12.0)
    system.addForce(force)
    return system


def evaluate(system: openmm.System, x: np.ndarray, groups=-1) -> tuple[float, np.ndarray]:
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def reference(flow, x):
    energy, forces = flow.energy_and_forces(torch.as_tensor(x, dtype=torch.float64))
    return energy.numpy(), forces.numpy()


def assert_close(energy, forces, e_ref, f_ref):
    assert abs(energy - e_ref) <= RTOL * abs(e_ref)
    np.testing.assert_allclose(forces, f_ref, rtol=RTOL, atol=RTOL * np.abs(f_ref).max())


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_force_equals_flow_energy_and_autograd_forces(flow, aldp, configurations, backend, tmp_path):
    e_ref, f_ref = reference(flow, configurations)
    system = flow_only_system(aldp.n_atoms, flow_force(flow, backend=backend, path=tmp_path / "m.pt"))
    for k, x in enumerate(configurations):
        energy, forces = evaluate(system, x)
        assert_close(energy, forces, e_ref[k], f_ref[k])
    if backend == "python":  # serialisable System (module-level function + partial)
        copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
        energy, forces = evaluate(copy, configurations[0])
        assert_close(energy, forces, e_ref[0], f_ref[0])


def test_flow_force_in_its_own_group_of_the_force_field_system(flow, aldp, configurations):
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp.system))
    n_forces = system.getNumForces()
    system.addForce(flow_force(flow, backend="python", force_group=7))
    e_ref, f_ref = reference(flow, configurations[:1])
    energy, forces = evaluate(system, configurations[0], groups={7})
    assert_close(energy, forces, e_ref[0], f_ref[0])
    e_ff, _ = evaluate(aldp.system, configurations[0])
    e_rest, _ = evaluate(system, configurations[0], groups=set(range(32)) - {7})
    assert system.getNumForces() == n_forces + 1
    assert abs(e_rest - e_ff) <= 1e-9 * abs(e_ff)


def test_exported_model_loads_without_regflow_mm(flow, aldp, configurations, tmp_path):
    out = tmp_path / "model.pt"
    flow_path = tmp_path / "flow.pt"
    flow.save(flow_path)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["export", str(flow_path), "--out", str(out)])
    assert args.func(args) == 0
    np.save(tmp_path / "x.npy", configurations)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["regflow_mm"] = None  # any import of regflow_mm now fails
        import json, numpy as np, torch, openmm, openmmtorch
        from openmm import unit
        x = np.load({str(tmp_path / "x.npy")!r})
        system = openmm.System()
        for _ in range(x.shape[1]):
            system.addParticle(12.0)
        system.addForce(openmmtorch.TorchForce({str(out)!r}))
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        result = []
        for xi in x:
            context.setPositions(xi * unit.nanometer)
            s = context.getState(getEnergy=True, getForces=True)
            result.append([s.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
                           s.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer).tolist()])
        print(json.dumps(result))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    e_ref, f_ref = reference(flow, configurations)
    for k, (energy, forces) in enumerate(result):
        assert_close(energy, np.array(forces), e_ref[k], f_ref[k])


def test_bad_backend_and_missing_file(flow, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        flow_force(flow, backend="jax")
    with pytest.raises(ValueError, match="force_group"):
        flow_force(flow, backend="python", force_group=40)
    with pytest.raises(FileNotFoundError, match="not found"):
        flow_force(tmp_path / "missing.pt")


def test_openmmtorch_import_prints_no_simtk_deprecation():
    code = "from regflow_mm.export.forces import import_openmmtorch; import_openmmtorch()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and result.stderr == "", result.stderr
