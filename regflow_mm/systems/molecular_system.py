"""A molecular system: OpenMM System + topology + thermodynamic state + peptide bookkeeping.

Built from a ``SystemSpec`` (a TOML file or keyword arguments): a PDB, force-field XML
files (implicit solvent comes as a force-field file, e.g. ``amber99_obc.xml``),
nonbonded settings and a temperature. No constraints: Boltzmann generators model
every atom, so bond lengths to hydrogens must stay free.
"""
from __future__ import annotations

import functools
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from ..files import require_file
from ..validation import check_types

MOLAR_GAS_CONSTANT = 0.00831446261815324  # kJ/(mol K)

_NONBONDED = {
    "NoCutoff": app.NoCutoff,
    "CutoffNonPeriodic": app.CutoffNonPeriodic,
}
_SPEC_KEYS = {"name", "pdb", "forcefield", "temperature", "nonbonded_method", "nonbonded_cutoff",
              "solute_dielectric", "solvent_dielectric", "friction", "build"}


@dataclass(frozen=True)
class SystemSpec:
    """Everything that defines a system. Units: temperature K, cutoff nm, friction 1/ps."""

    name: str
    pdb: str  # path; relative paths are resolved against the spec file's folder
    forcefield: tuple[str, ...]
    temperature: float
    nonbonded_method: str = "NoCutoff"
    nonbonded_cutoff: float | None = None
    solute_dielectric: float | None = None
    solvent_dielectric: float | None = None
    friction: float = 1.0  # default Langevin friction for MD of this system, 1/ps
    build: dict = field(default_factory=dict, compare=False)  # how systems/build_structures.py made the PDB

    def __post_init__(self):
        check_types(self, f"system {self.name!r}")
        if self.friction < 0:
            raise ValueError(f"system {self.name!r}: friction must be >= 0 (1/ps), got {self.friction}")
        if self.nonbonded_cutoff is not None and not self.nonbonded_cutoff > 0:
            raise ValueError(f"system {self.name!r}: nonbonded_cutoff must be > 0 nm, got {self.nonbonded_cutoff}")
        if self.nonbonded_method not in _NONBONDED:
            raise ValueError(f"system {self.name!r}: nonbonded_method must be one of {sorted(_NONBONDED)}, "
                             f"got {self.nonbonded_method!r} (periodic/explicit solvent is not supported)")
        if not self.temperature > 0:
            raise ValueError(f"system {self.name!r}: temperature must be > 0 K, got {self.temperature}")
        if self.nonbonded_method != "NoCutoff" and not self.nonbonded_cutoff:
            raise ValueError(f"system {self.name!r}: {self.nonbonded_method} needs nonbonded_cutoff (nm)")

    @classmethod
    def from_toml(cls, path: str | Path) -> "SystemSpec":
        path = require_file(path, "system spec", ": give a TOML file or a built-in name (see `regflow-mm systems`)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"system spec {path} is not valid TOML: {err}") from None
        unknown = set(raw) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"system spec {path}: unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
        missing = {"name", "pdb", "forcefield", "temperature"} - set(raw)
        if missing:
            raise ValueError(f"system spec {path}: missing keys {sorted(missing)}")
        for key, ok, kind in (("pdb", isinstance(raw["pdb"], str), "a path string"),
                              ("forcefield", isinstance(raw["forcefield"], list)
                               and all(isinstance(f, str) for f in raw["forcefield"]), "a list of file names")):
            if not ok:
                raise ValueError(f"system spec {path}: {key} must be {kind}, got {raw[key]!r}")
        pdb = Path(raw.pop("pdb"))
        if not pdb.is_absolute():
            pdb = path.parent / pdb
        return cls(pdb=str(pdb), forcefield=tuple(raw.pop("forcefield")), **raw)

    def to_dict(self) -> dict:
        """JSON-able dict of the spec (stored in result files); ``from_dict`` rebuilds the same spec."""
        spec = asdict(self)
        spec["forcefield"] = list(spec["forcefield"])
        return spec

    @classmethod
    def from_dict(cls, spec: dict) -> "SystemSpec":
        """Inverse of ``to_dict``."""
        return cls(**{**spec, "forcefield": tuple(spec["forcefield"])})

    def create_system_kwargs(self) -> dict:
        """Keyword arguments of ``ForceField.createSystem`` for this spec."""
        kwargs = {"nonbondedMethod": _NONBONDED[self.nonbonded_method], "constraints": None,
                  "rigidWater": False, "removeCMMotion": False}
        if self.nonbonded_cutoff:
            kwargs["nonbondedCutoff"] = self.nonbonded_cutoff * unit.nanometer
        if self.solute_dielectric is not None:
            kwargs["soluteDielectric"] = self.solute_dielectric
        if self.solvent_dielectric is not None:
            kwargs["solventDielectric"] = self.solvent_dielectric
        return kwargs


class MolecularSystem:
    """A ready-to-simulate system (see ARCHITECTURE.md for the contract).

    Attributes: ``name``, ``spec``, ``topology`` (openmm.app.Topology), ``system`` (openmm.System),
    ``temperature`` (K), ``kT`` (kJ/mol), ``positions`` ((n_atoms, 3) nm, minimised structure),
    ``n_atoms``, ``torsions`` (name -> 4 atom indices), ``spec_hash``.
    """

    def __init__(self, spec: SystemSpec):
        self.spec = spec
        self.name = spec.name
        pdb_path = require_file(spec.pdb, f"system {spec.name!r}: structure file")
        try:
            pdb = app.PDBFile(str(pdb_path))
        except Exception as err:  # OpenMM raises bare Exceptions/ValueErrors on bad PDBs
            raise ValueError(f"system {spec.name!r}: cannot read PDB {pdb_path}: {err}") from None
        if pdb.topology.getNumAtoms() == 0:
            raise ValueError(f"system {spec.name!r}: PDB {pdb_path} has no atoms")
        try:
            forcefield = app.ForceField(*spec.forcefield)
        except (ValueError, OSError) as err:
            raise FileNotFoundError(f"system {spec.name!r}: cannot load force field {list(spec.forcefield)}: "
                                    f"{err}") from None
        try:
            self.system = forcefield.createSystem(pdb.topology, **spec.create_system_kwargs())
        except ValueError as err:
            msg = str(err).splitlines()[0]
            raise ValueError(f"system {spec.name!r}: the force field {list(spec.forcefield)} cannot match the "
                             f"structure ({msg}); fix residue names / add hydrogens (e.g. pdbfixer) or add the "
                             "missing templates") from None
        self.topology = pdb.topology
        self.positions = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)
        self.n_atoms = self.topology.getNumAtoms()
        self.temperature = float(spec.temperature)
        self.kT = MOLAR_GAS_CONSTANT * self.temperature
        self.torsions = backbone_torsions(self.topology)
        self._chiral_centres = chiral_centres(self.topology)
        self.spec_hash = _spec_hash(spec, self.topology)

    def __repr__(self):
        return (f"MolecularSystem({self.name!r}, n_atoms={self.n_atoms}, T={self.temperature} K, "
                f"forcefield={list(self.spec.forcefield)}, hash={self.spec_hash[:12]})")

    @functools.cached_property
    def equivalent_atom_groups(self) -> list[tuple[int, ...]]:
        """Groups of atoms whose cyclic relabelling leaves the energy unchanged (methyl and ammonium
        hydrogens), found and checked by ``systems.symmetry.equivalent_atom_groups``."""
        from .symmetry import equivalent_atom_groups
        return equivalent_atom_groups(self)

    @property
    def chiral_residues(self) -> list[str]:
        """Names of the residues whose C-alpha chirality is checked, e.g. ``['ALA2', ...]``."""
        return [name for name, _ in self._chiral_centres]

    def d_residues(self, x) -> np.ndarray:
        """Which chiral residues are D in each configuration: x (B, n_atoms, 3) nm -> (B, n_chiral) bool."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"{self.name}: expected positions (B, {self.n_atoms}, 3) in nm, got {x.shape}")
        if not self._chiral_centres:
            return np.zeros((x.shape[0], 0), dtype=bool)
        idx = np.array([atoms for _, atoms in self._chiral_centres])  # (n_chiral, 4): N, CA, C, CB
        n, ca, c, cb = (x[:, idx[:, k]] for k in range(4))
        return signed_chiral_volume(n, ca, c, cb) * L_VOLUME_SIGN < 0

    def is_l(self, x) -> np.ndarray:
        """(B,) bool: True where every chiral residue of the configuration is L."""
        return ~self.d_residues(x).any(axis=1)

    def make_context(self, platform: str = "Reference", integrator: openmm.Integrator | None = None,
                     properties: dict | None = None) -> openmm.Context:
        """A fresh OpenMM Context of this system (default: Verlet 1 fs, Reference platform)."""
        integrator = integrator or openmm.VerletIntegrator(1.0 * unit.femtosecond)
        plat = openmm.Platform.getPlatformByName(platform)
        context = openmm.Context(self.system, integrator, plat, properties or {})
        context.setPositions(self.positions)
        return context


# Sign of dot(CB - CA, cross(N - CA, C - CA)) for L-amino acids (checked in the tests against the
# ideal L construction and the "CORN" rule).
L_VOLUME_SIGN = 1.0


def signed_chiral_volume(n, ca, c, cb) -> np.ndarray:
    """dot(CB-CA, (N-CA) x (C-CA)) for arrays (..., 3); positive for L-amino acids."""
    return np.einsum("...i,...i->...", cb - ca, np.cross(n - ca, c - ca))


def chiral_centres(topology: app.Topology) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(residue label, (N, CA, C, CB) atom indices) for every residue with a C-beta."""
    out = []
    for res in topology.residues():
        names = {a.name: a.index for a in res.atoms()}
        if {"N", "CA", "C", "CB"} <= names.keys():
            out.append((f"{res.name}{res.index + 1}", (names["N"], names["CA"], names["C"], names["CB"])))
    return out


def backbone_torsions(topology: app.Topology) -> dict[str, tuple[int, int, int, int]]:
    """Backbone phi_k / psi_k atom indices, k counting amino-acid residues (caps excluded) from 1.

    phi_k = C(prev)-N-CA-C, psi_k = N-CA-C-N(next); the previous C / next N may belong to ACE / NME caps.
    """
    residues = list(topology.residues())
    backbone = [{a.name: a.index for a in r.atoms()} for r in residues]
    torsions = {}
    k = 0
    for i, res in enumerate(residues):
        atoms = backbone[i]
        if not {"N", "CA", "C"} <= atoms.keys():
            continue  # caps (ACE, NME) and non-amino residues
        k += 1
        if i > 0 and "C" in backbone[i - 1] and _bonded(topology, backbone[i - 1]["C"], atoms["N"]):
            torsions[f"phi{k}"] = (backbone[i - 1]["C"], atoms["N"], atoms["CA"], atoms["C"])
        if i + 1 < len(residues) and "N" in backbone[i + 1] and _bonded(topology, atoms["C"], backbone[i + 1]["N"]):
            torsions[f"psi{k}"] = (atoms["N"], atoms["CA"], atoms["C"], backbone[i + 1]["N"])
    return dict(sorted(torsions.items(), key=lambda kv: (int(kv[0][3:]), kv[0][:3] != "phi")))


def _bonded(topology, i, j) -> bool:
    return any({b.atom1.index, b.atom2.index} == {i, j} for b in topology.bonds())


def _spec_hash(spec: SystemSpec, topology: app.Topology) -> str:
    """SHA-256 of what defines the Hamiltonian and ensemble: atoms, bonds, force field, settings.

    Coordinates and the system's name are not part of it: a flow trained on one structure file
    is valid for any starting structure of the same system.
    """
    physics = {k: v for k, v in asdict(spec).items() if k not in ("name", "pdb", "build", "friction")}
    atoms = [(a.residue.name, a.name, a.element.symbol if a.element else "") for a in topology.atoms()]
    bonds = sorted(tuple(sorted((b.atom1.index, b.atom2.index))) for b in topology.bonds())
    blob = json.dumps({"physics": physics, "atoms": atoms, "bonds": bonds}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
