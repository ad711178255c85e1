"""Build small peptides from their sequence: ideal geometry, hydrogens, minimisation.

No pip package ships al3/al4 structures with the published force fields, so we
build them: heavy atoms are placed from ideal internal coordinates (NeRF), the
C-beta from the standard ideal L-amino-acid construction, hydrogens by OpenMM's
``Modeller.addHydrogens`` (its templates know ACE/NME caps and charged termini),
and the result is minimised with the target force field. Positions in nm.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

# Ideal backbone geometry (Engh & Huber), lengths in Angstrom, angles in degrees.
_BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231, "C-OXT": 1.25, "CH3-C": 1.52}
_ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7, "CA-C-O": 120.5}

# Amino-acid heavy side-chain atoms we know how to place; the project's built-ins are alanines.
_SUPPORTED = {"ALA", "GLY"}


def _place(a, b, c, bond, angle_deg, torsion_deg):
    """NeRF: position of atom d with |cd| = bond, angle(b, c, d), dihedral(a, b, c, d)."""
    angle, torsion = np.radians(angle_deg), np.radians(torsion_deg)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(torsion), bond * np.sin(angle) * np.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def _ideal_l_cbeta(n, ca, c):
    """Ideal C-beta of an L-amino acid from its backbone (Angstrom)."""
    b, cc = ca - n, c - ca
    a = np.cross(b, cc)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def heavy_atom_pdb(residues: list[str], phi: float = -80.0, psi: float = 150.0) -> str:
    """PDB text of the heavy atoms of a linear peptide in ideal geometry.

    ``residues``: e.g. ``["ACE", "ALA", "NME"]`` (capped) or ``["ALA", "ALA", "ALA"]``
    (free termini: an OXT is added to the last residue). Torsions phi/psi in degrees.
    """
    unknown = [r for r in residues if r not in _SUPPORTED | {"ACE", "NME"}]
    if unknown:
        raise ValueError(f"the peptide builder knows ACE, NME, {sorted(_SUPPORTED)}; got {unknown}: "
                         "build other residues with a modelling tool and use a custom PDB system")
    amino = [r for r in residues if r not in ("ACE", "NME")]
    if not amino or "ACE" in residues[1:] or "NME" in residues[:-1]:
        raise ValueError(f"need at least one amino acid, ACE only first and NME only last; got {residues}")
    atoms: list[tuple[str, str, int, np.ndarray]] = []  # (atom, residue, residue index, xyz)

    # Running backbone triple (N, CA, C) of the previous residue.
    res_index = 0
    if residues[0] == "ACE":
        ch3 = np.zeros(3)
        c = np.array([_BOND["CH3-C"], 0.0, 0.0])
        pseudo_n = _place(np.array([0.0, 1.0, 0.0]), c, ch3, 1.46, 111.0, 180.0)  # only orients the cap
        prev = (pseudo_n, ch3, c)
        ace_index = res_index
        res_index += 1
        ace_atoms = [("CH3", ch3), ("C", c)]
    else:
        prev = None
    for k, name in enumerate(amino):
        if prev is None:
            n = np.zeros(3)
            ca = np.array([_BOND["N-CA"], 0.0, 0.0])
            c = _place(np.array([0.0, 1.0, 0.0]), n, ca, _BOND["CA-C"], _ANGLE["N-CA-C"], 0.0)
        else:
            pn, pca, pc = prev
            prev_psi = 150.0 if (k == 0) else psi
            n = _place(pn, pca, pc, _BOND["C-N"], _ANGLE["CA-C-N"], prev_psi)
            ca = _place(pca, pc, n, _BOND["N-CA"], _ANGLE["C-N-CA"], 180.0)
            c = _place(pc, n, ca, _BOND["CA-C"], _ANGLE["N-CA-C"], phi)
            o_prev = _place(n, pca, pc, _BOND["C-O"], _ANGLE["CA-C-O"], 180.0)
            if k == 0 and residues[0] == "ACE":
                atoms += [(a, "ACE", ace_index, x) for a, x in ace_atoms] + [("O", "ACE", ace_index, o_prev)]
            else:
                atoms.append(("O", amino[k - 1], res_index - 1, o_prev))
        atoms += [("N", name, res_index, n), ("CA", name, res_index, ca), ("C", name, res_index, c)]
        if name == "ALA":
            atoms.append(("CB", name, res_index, _ideal_l_cbeta(n, ca, c)))
        prev = (n, ca, c)
        res_index += 1
    pn, pca, pc = prev
    if residues[-1] == "NME":
        n = _place(pn, pca, pc, _BOND["C-N"], _ANGLE["CA-C-N"], psi)
        ch3 = _place(pca, pc, n, _BOND["N-CA"], _ANGLE["C-N-CA"], 180.0)
        atoms.append(("O", amino[-1], res_index - 1, _place(n, pca, pc, _BOND["C-O"], _ANGLE["CA-C-O"], 180.0)))
        atoms += [("N", "NME", res_index, n), ("C", "NME", res_index, ch3)]
    else:
        oxt = _place(pn, pca, pc, _BOND["C-OXT"], _ANGLE["CA-C-O"], psi)
        o = _place(pn, pca, pc, _BOND["C-O"], _ANGLE["CA-C-O"], psi + 180.0)
        atoms += [("O", amino[-1], res_index - 1, o), ("OXT", amino[-1], res_index - 1, oxt)]

    atoms.sort(key=lambda t: t[2])  # keep residues contiguous, atoms in placement order
    lines = []
    for serial, (atom, res, ri, xyz) in enumerate(atoms, start=1):
        element = atom[0]
        lines.append(f"ATOM  {serial:5d} {atom:<4s} {res:3s} A{ri + 1:4d}    "
                     f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00  0.00          {element:>2s}")
    lines += ["TER", "END"]
    return "\n".join(lines) + "\n"


def build_peptide(residues: list[str], forcefield: app.ForceField, create_system_kwargs: dict,
                  out_pdb: str | Path, minimize_tolerance: float = 1.0, seed: int = 0) -> float:
    """Build, protonate (pH 7), minimise and write a peptide; returns the minimised energy (kJ/mol).

    ``create_system_kwargs`` are the ForceField.createSystem options of the target system, so
    the structure is minimised with the very Hamiltonian it will be simulated with.
    """
    pdb = app.PDBFile(io.StringIO(heavy_atom_pdb(residues)))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(forcefield, pH=7.0)
    system = forcefield.createSystem(modeller.topology, **create_system_kwargs)
    integrator = openmm.VerletIntegrator(1.0 * unit.femtosecond)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, minimize_tolerance * unit.kilojoule_per_mole / unit.nanometer)
    state = context.getState(getEnergy=True, getPositions=True)
    with open(out_pdb, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, state.getPositions(), fh, keepIds=False)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
