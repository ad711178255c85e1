"""Shared test settings: quiet, single-threaded, deterministic."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def aldp():
    """The built-in alanine dipeptide system (cached by ``get_system``; treat it as read-only)."""
    from regflow_mm.systems import get_system

    return get_system("aldp")


def _frames_match_force_field(data, frames=(0, 99, 199)):
    """Stored energies (kJ/mol) and forces (kJ/mol/nm) of ``data`` are those of the plain force field."""
    from openmm import unit

    context = data.system.make_context()
    for k in frames:
        context.setPositions(data.positions[k].astype(np.float64))
        state = context.getState(getEnergy=True, getForces=True)
        assert state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) == pytest.approx(
            data.energies[k], abs=0.05)
        np.testing.assert_allclose(state.getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer), data.forces[k], atol=2.0, rtol=1e-3)


@pytest.fixture
def frames_match_force_field():
    """Checker: a dataset's stored energies and forces equal the force field's at the stored positions."""
    return _frames_match_force_field
