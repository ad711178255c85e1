"""Hydrogen mass repartitioning: same potential and total mass, hydrogens at the asked mass, bad masses refused."""
import numpy as np
import openmm
import pytest
from openmm import unit

from regflow_mm.data import load_dataset, simulate
from regflow_mm.systems import get_system
from regflow_mm.systems.masses import repartition_hydrogen_mass


def _masses(system):
    return np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])


def test_repartitioning_moves_mass_onto_hydrogens_and_keeps_the_potential():
    aldp = get_system("aldp")
    hmr = repartition_hydrogen_mass(aldp.system, aldp.topology, 3.0)
    before, after = _masses(aldp.system), _masses(hmr)
    hydrogens = np.array([a.element.symbol == "H" for a in aldp.topology.atoms()])
    assert after.sum() == pytest.approx(before.sum(), abs=1e-9)
    np.testing.assert_allclose(after[hydrogens], 3.0)
    # each heavy atom loses exactly what its hydrogens gained (a methyl carbon: 3 x 1.992 amu)
    gained = {a.index: 0.0 for a in aldp.topology.atoms()}
    for a, b in aldp.topology.bonds():
        for h, heavy in ((a, b), (b, a)):
            if h.element.symbol == "H":
                gained[heavy.index] += 3.0 - before[h.index]
    np.testing.assert_allclose(after[~hydrogens], before[~hydrogens] - np.array(list(gained.values()))[~hydrogens])
    assert _masses(aldp.system)[hydrogens].max() < 1.1  # the original System is untouched
    x = aldp.positions + np.random.default_rng(0).normal(scale=0.01, size=aldp.positions.shape)
    energies = []
    for system in (aldp.system, hmr):
        context = openmm.Context(system, openmm.VerletIntegrator(1.0), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(x)
        energies.append(context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    assert energies[0] == energies[1]


@pytest.mark.parametrize("mass, message", [(0.5, ">= 1 amu"), (4.0, "lighter than its hydrogens")])
def test_bad_hydrogen_masses_are_refused(mass, message):
    aldp = get_system("aldp")  # a methyl carbon (12 amu) cannot give three hydrogens 4 amu each
    with pytest.raises(ValueError, match=message):
        repartition_hydrogen_mass(aldp.system, aldp.topology, mass)


def test_simulation_with_heavy_hydrogens_stores_force_field_energies_and_its_setting(tmp_path):
    aldp = get_system("aldp")
    path = simulate(aldp, tmp_path / "hmr.h5", ns=0.004, save_interval_ps=0.1, timestep_fs=2.0, platform="Reference",
                    equilibration_ps=0.2, progress=False, seed=1, hydrogen_mass_amu=3.0)
    data = load_dataset(path)
    assert data.metadata["integrator"]["hydrogen_mass_amu"] == 3.0 and len(data) == 40
    context = aldp.make_context()
    for k in (0, 39):
        context.setPositions(data.positions[k].astype(np.float64))
        energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert energy == pytest.approx(data.energies[k], abs=0.05)
    with pytest.raises(ValueError, match="hydrogen_mass_amu"):  # resuming with other masses is refused
        simulate(aldp, path, ns=0.008, save_interval_ps=0.1, timestep_fs=2.0, platform="Reference", progress=False,
                 seed=1, hydrogen_mass_amu=2.0)
