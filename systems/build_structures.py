"""Rebuild the built-in structures (systems/<name>.pdb) from their specs' sequences.

    python systems/build_structures.py [aldp al3 al4]

Heavy atoms in ideal geometry (all-L), hydrogens from OpenMM's templates at pH 7,
then minimisation with the system's own force field and solvent model.
"""
import sys
from pathlib import Path

from openmm import app

from regflow_mm.systems import SystemSpec
from regflow_mm.systems.builder import build_peptide

HERE = Path(__file__).resolve().parent


def main(names):
    for name in names or [p.stem for p in sorted(HERE.glob("*.toml"))]:
        spec = SystemSpec.from_toml(HERE / f"{name}.toml")
        energy = build_peptide(spec.build["residues"], app.ForceField(*spec.forcefield),
                               spec.create_system_kwargs(), HERE / f"{name}.pdb")
        print(f"{name}: wrote {spec.pdb} (minimised energy {energy:.2f} kJ/mol)")


if __name__ == "__main__":
    main(sys.argv[1:])
