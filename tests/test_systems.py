"""Built-in and custom systems: sizes, Hamiltonians, structures, chirality, bad input."""
import numpy as np
import openmm
import pytest
from openmm import unit

from regflow_mm.systems import MOLAR_GAS_CONSTANT, get_system, list_systems, load_system, systems_dir
from regflow_mm.systems.builder import heavy_atom_pdb

EXPECTED = {
    # name: atoms, T, GB force class, nonbonded method, torsion names
    "aldp": (22, 300.0, "GBSAOBCForce", openmm.NonbondedForce.NoCutoff, ["phi1", "psi1"]),
    "al3": (33, 310.0, "CustomGBForce", openmm.NonbondedForce.CutoffNonPeriodic, ["psi1", "phi2", "psi2", "phi3"]),
    "al4": (42, 300.0, "GBSAOBCForce", openmm.NonbondedForce.NoCutoff,
            ["phi1", "psi1", "phi2", "psi2", "phi3", "psi3"]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_system_setup(name):
    n_atoms, temperature, gb, method, torsions = EXPECTED[name]
    s = get_system(name)
    assert s.n_atoms == n_atoms == s.system.getNumParticles() == s.positions.shape[0]
    assert s.temperature == temperature
    assert s.kT == pytest.approx(MOLAR_GAS_CONSTANT * temperature)
    assert s.system.getNumConstraints() == 0
    forces = {type(f).__name__: f for f in s.system.getForces()}
    assert {"HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "NonbondedForce", gb} <= set(forces)
    assert forces["NonbondedForce"].getNonbondedMethod() == method
    if name == "al3":
        assert forces["NonbondedForce"].getCutoffDistance().value_in_unit(unit.nanometer) == pytest.approx(2.0)
    assert list(s.torsions) == torsions
    energy = s.make_context().getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert np.isfinite(energy) and energy < 0  # minimised in implicit solvent


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_structures_are_all_l_and_mirror_images_are_d(name):
    s = get_system(name)
    assert len(s.chiral_residues) == {"aldp": 1, "al3": 3, "al4": 3}[name]
    assert not s.d_residues(s.positions).any()
    mirror = s.positions * np.array([-1.0, 1.0, 1.0])
    assert s.d_residues(mirror).all()
    batch = np.stack([s.positions, mirror, s.positions])
    np.testing.assert_array_equal(s.is_l(batch), [True, False, True])


def test_chirality_follows_the_corn_rule():
    """Looking from H-alpha to C-alpha, CO -> R -> N runs clockwise for L residues."""
    s = get_system("al4")
    x = s.positions
    for res in s.topology.residues():
        idx = {a.name: a.index for a in res.atoms()}
        if "CB" not in idx:
            continue
        view = x[idx["CA"]] - x[idx["HA"]]
        view /= np.linalg.norm(view)
        e1 = x[idx["C"]] - x[idx["CA"]]
        e1 -= e1 @ view * view
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(view, e1)  # (e1, e2, view) right-handed with view pointing away: e1 -> e2 is clockwise
        angles = [np.arctan2((x[idx[a]] - x[idx["CA"]]) @ e2, (x[idx[a]] - x[idx["CA"]]) @ e1) % (2 * np.pi)
                  for a in ("CB", "N")]
        assert 0 < angles[0] < angles[1] < 2 * np.pi


def test_torsion_indices_are_backbone_atoms():
    s = get_system("aldp")
    names = {a.index: (a.residue.name, a.name) for a in s.topology.atoms()}
    assert [names[i] for i in s.torsions["phi1"]] == [("ACE", "C"), ("ALA", "N"), ("ALA", "CA"), ("ALA", "C")]
    assert [names[i] for i in s.torsions["psi1"]] == [("ALA", "N"), ("ALA", "CA"), ("ALA", "C"), ("NME", "N")]


def test_spec_hash_identifies_the_hamiltonian(tmp_path):
    aldp = get_system("aldp")
    same = load_system(systems_dir() / "aldp.pdb", ["amber99sbildn.xml", "amber99_obc.xml"], 300.0, name="mine")
    assert same.spec_hash == aldp.spec_hash
    hotter = load_system(systems_dir() / "aldp.pdb", ["amber99sbildn.xml", "amber99_obc.xml"], 350.0)
    vacuum = load_system(systems_dir() / "aldp.pdb", ["amber99sbildn.xml"], 300.0)
    assert len({aldp.spec_hash, hotter.spec_hash, vacuum.spec_hash, get_system("al4").spec_hash}) == 4


def test_custom_system_from_spec_file(tmp_path):
    spec = tmp_path / "mine.toml"
    spec.write_text(f'name = "mine"\npdb = "{systems_dir() / "al4.pdb"}"\n'
                    'forcefield = ["amber99sbildn.xml", "amber99_obc.xml"]\ntemperature = 320.0\n')
    s = get_system(spec)
    assert (s.name, s.n_atoms, s.temperature) == ("mine", 42, 320.0)
    assert list(list_systems()) == ["al3", "al4", "aldp"]


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown system 'aldp2'.*built-ins are al3, al4, aldp"):
        get_system("aldp2")
    with pytest.raises(FileNotFoundError, match="not found"):
        get_system(tmp_path / "missing.toml")
    with pytest.raises(FileNotFoundError, match="structure file .* not found"):
        load_system(tmp_path / "missing.pdb", ["amber99sbildn.xml"], 300.0)
    with pytest.raises(FileNotFoundError, match="cannot load force field"):
        load_system(systems_dir() / "aldp.pdb", ["no_such_ff.xml"], 300.0)
    heavy_only = tmp_path / "noh.pdb"  # no hydrogens: templates cannot match
    heavy_only.write_text(heavy_atom_pdb(["ACE", "ALA", "NME"]))
    with pytest.raises(ValueError, match="cannot match the structure.*add hydrogens"):
        load_system(heavy_only, ["amber99sbildn.xml"], 300.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\npdb = "a.pdb"\nforcefield = []\ntemperature = 300\ncolour = "red"\n')
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        get_system(bad)
    with pytest.raises(ValueError, match="expected positions \\(B, 22, 3\\)"):
        get_system("aldp").d_residues(np.zeros((2, 21, 3)))
    with pytest.raises(ValueError, match="builder knows"):
        heavy_atom_pdb(["ACE", "TRP", "NME"])


def test_custom_example_system_loads():
    from pathlib import Path

    s = get_system(Path(__file__).parents[1] / "examples" / "custom" / "ace_ala_gly_nme.toml")
    assert (s.n_atoms, s.chiral_residues, list(s.torsions)) == (29, ["ALA2"], ["phi1", "psi1", "phi2", "psi2"])
    assert "CustomGBForce" in {type(f).__name__ for f in s.system.getForces()}  # amber14 OBC2 implicit solvent
    assert not s.d_residues(s.positions).any()
