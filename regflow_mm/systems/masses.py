"""Hydrogen mass repartitioning (HMR) for faster MD sampling of the same configurational ensemble.

The Boltzmann distribution of configurations, exp(-U(x)/kT), does not depend on the atomic masses:
masses only set how fast the dynamics explores it. Moving mass from each heavy atom onto its bonded
hydrogens (total mass unchanged) slows the fastest vibrations (X-H stretches), so an unconstrained
peptide integrates stably at 2 fs instead of 1 fs: twice the sampled nanoseconds per CPU-second with
the same potential. OpenMM's ``ForceField.createSystem(hydrogenMass=...)`` does this when it builds a
System; here it is applied to an already built System (the built-in and users' systems), on a copy.
The measured check that 2 fs with HMR samples the 1 fs ensemble is in BENCHMARKS.md ("HMR").
"""
from __future__ import annotations

import openmm
from openmm import app, unit


def repartition_hydrogen_mass(system: openmm.System, topology: app.Topology, hydrogen_mass_amu: float) -> openmm.System:
    """A copy of ``system`` whose hydrogens weigh ``hydrogen_mass_amu`` (amu), the added mass taken from
    the heavy atom each is bonded to. Total mass is unchanged; forces and energies are untouched.

    ValueError for a mass below a hydrogen's own (< 1 amu), or one that would leave a heavy atom
    lighter than its hydrogens, and for a topology without bonds to hydrogens.
    """
    mass = float(hydrogen_mass_amu)
    if not mass >= 1.0:
        raise ValueError(f"hydrogen mass must be >= 1 amu (a hydrogen's own mass), got {hydrogen_mass_amu}; "
                         "3 or 4 amu is the usual choice")
    out = openmm.XmlSerializer.clone(system)
    amu = unit.dalton
    n_moved = 0
    for a, b in topology.bonds():
        for h, heavy in ((a, b), (b, a)):
            if h.element is not None and h.element.symbol == "H" and (heavy.element is None or heavy.element.symbol != "H"):
                delta = mass - out.getParticleMass(h.index).value_in_unit(amu)
                out.setParticleMass(h.index, mass * amu)
                out.setParticleMass(heavy.index, out.getParticleMass(heavy.index) - delta * amu)
                n_moved += 1
    if n_moved == 0:
        raise ValueError("hydrogen mass repartitioning found no bonds to hydrogen atoms in the topology")
    for atom in topology.atoms():
        if atom.element is not None and atom.element.symbol != "H" and out.getParticleMass(atom.index).value_in_unit(amu) < mass:
            raise ValueError(f"hydrogen mass {mass} amu leaves atom {atom.name} of {atom.residue.name} lighter than "
                             "its hydrogens: use a smaller hydrogen mass (3 or 4 amu)")
    return out
