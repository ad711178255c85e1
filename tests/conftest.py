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


class HarmonicOscillator:
    """One particle in U = K/2 |x|^2 (openmmtools testsystem): exact answers for flow MC tests.

    K kJ/mol/nm^2, mass 39.948 amu, start at the origin; ``sigma(T)`` = sqrt(kT/K) nm is the exact
    std of each coordinate at T K; ``gaussian_flow(mean, std)`` is the exact-family proposal
    N(mean, std^2 I_3) on absolute coordinates (float64).
    """

    K = 250.0
    T = 300.0

    def __init__(self):
        from openmm import unit
        from openmmtools import testsystems

        self.testsystem = testsystems.HarmonicOscillator(K=self.K * unit.kilojoule_per_mole / unit.nanometer**2,
                                                         mass=39.948 * unit.amu)
        self.system = self.testsystem.system
        self.positions = self.testsystem.positions

    @staticmethod
    def kT(T: float = T) -> float:
        return 0.00831446261815324 * T

    def sigma(self, T: float = T) -> float:
        return float(np.sqrt(self.kT(T) / self.K))

    def thermodynamic_state(self, T: float = T):
        from openmm import unit
        from openmmtools.states import ThermodynamicState

        return ThermodynamicState(self.system, T * unit.kelvin)

    def gaussian_flow(self, mean, std, T: float = T):
        from regflow_mm.flows import build_flow

        flow = build_flow(1, "identity", "gaussian", kT=self.kT(T), dtype=torch.float64)
        flow.transform.set_gaussian(mean=mean, std=std)
        return flow


@pytest.fixture
def harmonic_oscillator():
    """A :class:`HarmonicOscillator` (exact answers for flow MC tests)."""
    return HarmonicOscillator()


def _statistical_error(x: np.ndarray) -> float:
    """Standard error of the mean of a correlated series (pymbar statistical inefficiency)."""
    from pymbar import timeseries

    g = timeseries.statistical_inefficiency(x)
    return float(np.std(x, ddof=1) * np.sqrt(g / x.size))


@pytest.fixture
def statistical_error():
    """Standard error of the mean of a correlated 1-D series (pymbar statistical inefficiency)."""
    return _statistical_error
