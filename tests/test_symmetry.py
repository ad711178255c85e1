"""Equivalent atoms (methyl hydrogens): detection by energy invariance, cyclic relabelling, training data."""
import copy

import numpy as np
import openmm
import pytest
from openmm import unit

from regflow_mm.systems.symmetry import (candidate_groups, equivalent_atom_groups, relabel,
                                         relabel_equivalent_atoms)


def _names(system, groups):
    atoms = list(system.topology.atoms())
    return [[f"{atoms[i].residue.name}:{atoms[i].name}" for i in g] for g in groups]


def _energy(system, x):
    context = system.make_context()
    context.setPositions(x)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def test_aldp_has_three_methyl_groups_and_relabelling_keeps_energy_forces_and_torsions(aldp):
    groups = equivalent_atom_groups(aldp)
    assert _names(aldp, groups) == [["ACE:H1", "ACE:H2", "ACE:H3"], ["ALA:HB1", "ALA:HB2", "ALA:HB3"],
                                    ["NME:H1", "NME:H2", "NME:H3"]]
    rng = np.random.default_rng(1)
    frames = aldp.positions[None] + rng.normal(0, 0.01, (4, aldp.n_atoms, 3))
    forces = rng.normal(size=frames.shape)
    x, f = relabel_equivalent_atoms(frames, groups, seed=3, forces=forces)
    for k in range(4):
        assert _energy(aldp, x[k]) == pytest.approx(_energy(aldp, frames[k]), abs=1e-7)
    # forces move with their atoms; the atoms outside the groups keep their coordinates
    moved = np.array(sorted(i for g in groups for i in g))
    for k in range(4):
        for i in range(aldp.n_atoms):
            j = int(np.argmin(np.abs(frames[k] - x[k, i]).sum(-1)))
            np.testing.assert_array_equal(f[k, i], forces[k, j])
    rest = np.setdiff1d(np.arange(aldp.n_atoms), moved)
    np.testing.assert_array_equal(x[:, rest], frames[:, rest])


def test_cyclic_shift_inverse_and_uniform_wells():
    group = (2, 5, 7)
    x = np.arange(10 * 8 * 3, dtype=float).reshape(10, 8, 3)
    shifts = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 1])
    back = relabel(relabel(x, group, shifts), group, (3 - shifts) % 3)
    np.testing.assert_array_equal(back, x)
    one = relabel(x[:1], group, np.array([1]))
    np.testing.assert_array_equal(one[0, [2, 5, 7]], x[0, [5, 7, 2]])  # cyclic: 2 <- 5 <- 7 <- 2
    # a data set stuck in one labelling: after relabelling each labelling holds 1/3 (multinomial error)
    n = 30000
    frames = np.broadcast_to(x[:1], (n, 8, 3))
    out, none = relabel_equivalent_atoms(frames, [group], seed=0)
    assert none is None
    which = np.argmax(out[:, 2, 0][:, None] == x[0, [2, 5, 7], 0][None], axis=1)
    counts = np.bincount(which, minlength=3) / n
    np.testing.assert_allclose(counts, 1 / 3, atol=4 * np.sqrt(2 / 9 / n))
    again, _ = relabel_equivalent_atoms(frames, [group], seed=0)
    np.testing.assert_array_equal(again, out)  # one seed, one relabelling


def test_a_group_whose_atoms_differ_in_the_force_field_is_not_equivalent(aldp):
    changed = copy.copy(aldp)
    changed.system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp.system))
    nonbonded = next(f for f in changed.system.getForces() if isinstance(f, openmm.NonbondedForce))
    hb1 = next(a.index for a in aldp.topology.atoms() if a.name == "HB1")
    q, sigma, eps = nonbonded.getParticleParameters(hb1)
    nonbonded.setParticleParameters(hb1, q * 1.5, sigma, eps)
    names = _names(aldp, equivalent_atom_groups(changed))
    assert ["ALA:HB1", "ALA:HB2", "ALA:HB3"] not in names and len(names) == 2


def test_atoms_of_named_torsions_and_non_terminal_atoms_are_never_candidates(aldp):
    excluded = {i for quad in aldp.torsions.values() for i in quad}
    for group in candidate_groups(aldp.topology, excluded):
        assert not set(group) & excluded
    atoms = list(aldp.topology.atoms())
    all_groups = candidate_groups(aldp.topology)
    assert {atoms[i].element.symbol for g in all_groups for i in g} == {"H"}


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="frames, atoms, 3"):
        relabel_equivalent_atoms(np.zeros((4, 3)), [(0, 1)], seed=0)
    with pytest.raises(ValueError, match="forces"):
        relabel_equivalent_atoms(np.zeros((4, 3, 3)), [(0, 1)], seed=0, forces=np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match="does not fit 3 atoms"):
        relabel_equivalent_atoms(np.zeros((4, 3, 3)), [(1, 5)], seed=0)


def test_training_data_relabelled_by_the_config_keep_their_energies_and_forces(tmp_path, frames_match_force_field):
    from regflow_mm.data import simulate
    from regflow_mm.systems import get_system
    from regflow_mm.training.runner import load_training_data
    from regflow_mm.training.trainer import TrainConfig

    path = tmp_path / "aldp.h5"
    simulate(get_system("aldp"), path, ns=0.01, save_interval_ps=0.05, equilibration_ps=0.5, seed=0,
             platform="Reference", progress=False)
    settings = dict(system="aldp", data=str(path), method="mle", representation="internal", batch_size=16, seed=4)
    _, plain = load_training_data(TrainConfig.from_dict({**settings, "relabel_equivalent_atoms": False}))
    _, data = load_training_data(TrainConfig.from_dict(settings))  # relabelled by default
    np.testing.assert_array_equal(data.energies, plain.energies)
    np.testing.assert_array_equal(data.log_weights, plain.log_weights)
    moved = np.any(data.positions != plain.positions, axis=(1, 2))
    assert 0.8 < moved.mean() < 1.0  # 1 - (1/3)^3 of the frames relabel at least one of 3 methyls
    frames_match_force_field(data)
