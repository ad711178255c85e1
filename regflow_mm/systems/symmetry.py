"""Equivalent atoms: the hydrogens of a methyl or ammonium group, the oxygens of a carboxylate.

The force field gives such atoms identical parameters, so the potential energy, and with it the Boltzmann
density of labelled configurations, is unchanged when their labels are permuted cyclically: each of a
methyl's three wells holds exactly 1/3 of the ensemble. MD does not know that. On al3 a methyl hops
between its wells only a few times per ns (barrier ~5 kT, 3 amu hydrogens), and the two halves of a 2 ns
training run put 44/30/21% and 14/7/75% of the frames in the three wells of one methyl (BENCHMARKS.md,
issue 10, eighth session). A flow fitted to such data learns the run's accident, not the ensemble.
``relabel_equivalent_atoms`` gives every frame a random cyclic relabelling of each group: the training
data then sample the symmetric ensemble that the flow is meant to fit.

Only cyclic shifts are used: they keep the handedness of a group (the Z-matrix places HB2 at +120 degrees
from HB1; a transposition would put it at -120, a region MD never visits), and for 2 or 3 atoms they are
all the permutations of that handedness.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import openmm
from openmm import unit

# Largest |E(relabelled) - E(original)| (kJ/mol) at which a candidate group counts as equivalent: the
# Reference platform's float64 sums differ by ~1e-10 when only the summation order changes.
ENERGY_TOLERANCE_KJ = 1e-6


def candidate_groups(topology, excluded=()) -> list[tuple[int, ...]]:
    """Terminal atoms (one bond) of the same element on the same parent atom, two or more of them,
    none in ``excluded`` (atom indices, e.g. those of the named backbone torsions): sorted index tuples."""
    degree, partner = defaultdict(int), {}
    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        degree[a] += 1
        degree[b] += 1
        partner[a], partner[b] = b, a
    groups = defaultdict(list)
    for atom in topology.atoms():
        i = atom.index
        if degree[i] == 1 and i not in excluded and atom.element is not None:
            groups[(partner[i], atom.element.symbol)].append(i)
    return sorted(tuple(sorted(g)) for g in groups.values() if len(g) >= 2)


def relabel(positions: np.ndarray, group: tuple[int, ...], shifts: np.ndarray) -> np.ndarray:
    """Copy of ``positions`` (B, n_atoms, 3) with the atoms of ``group`` relabelled cyclically by
    ``shifts`` (B,) ints: atom group[i] takes the coordinates of group[(i + shift) % len(group)]."""
    out = np.array(positions, copy=True)
    _relabel_in_place(out, group, shifts)
    return out


def _relabel_in_place(arr: np.ndarray, group, shifts) -> None:
    idx = np.asarray(group)
    m = len(idx)
    source = idx[(np.arange(m)[None, :] + np.asarray(shifts)[:, None]) % m]  # (B, m)
    rows = np.arange(arr.shape[0])[:, None]
    arr[rows, idx[None, :]] = arr[rows, source]  # the right side is a copy of the group's atoms only


def _energy(context: openmm.Context, x: np.ndarray) -> float:
    context.setPositions(x)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def equivalent_atom_groups(system, seed: int = 0) -> list[tuple[int, ...]]:
    """Groups of equivalent atoms of a MolecularSystem: candidates (``candidate_groups``, atoms of the
    named torsions left out) whose cyclic relabelling leaves the force-field energy unchanged (to
    ``ENERGY_TOLERANCE_KJ``) at the system's structure and at a randomly displaced copy of it."""
    excluded = {i for quad in system.torsions.values() for i in quad}
    candidates = candidate_groups(system.topology, excluded)
    if not candidates:
        return []
    context = openmm.Context(system.system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
    rng = np.random.default_rng(seed)
    probes = [system.positions, system.positions + rng.normal(0.0, 0.005, system.positions.shape)]
    groups = []
    for group in candidates:
        same = all(abs(_energy(context, relabel(x[None], group, np.ones(1, int))[0]) - _energy(context, x))
                   <= ENERGY_TOLERANCE_KJ for x in probes)
        if same:
            groups.append(group)
    del context
    return groups


def relabel_equivalent_atoms(positions: np.ndarray, groups, seed: int, forces: np.ndarray | None = None):
    """Every frame of ``positions`` (T, n_atoms, 3) nm with each group of ``groups`` relabelled by its own
    uniformly drawn cyclic shift (seeded); ``forces`` (T, n_atoms, 3), if given, relabelled alike.

    Returns (positions, forces) (forces None if not given). Energies and frame weights are unchanged:
    the relabelled frame has the same force-field energy (``equivalent_atom_groups``)."""
    positions = np.asarray(positions)
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"positions must be (frames, atoms, 3) nm, got shape {positions.shape}")
    if forces is not None and np.shape(forces) != positions.shape:
        raise ValueError(f"forces {np.shape(forces)} must have the positions' shape {positions.shape}")
    rng = np.random.default_rng(seed)
    positions = positions.copy()
    forces = None if forces is None else np.array(forces, copy=True)
    for group in groups:
        if max(group) >= positions.shape[1]:
            raise ValueError(f"equivalent-atom group {group} does not fit {positions.shape[1]} atoms")
        shifts = rng.integers(0, len(group), size=positions.shape[0])
        _relabel_in_place(positions, group, shifts)
        if forces is not None:
            _relabel_in_place(forces, group, shifts)
    return positions, forces
