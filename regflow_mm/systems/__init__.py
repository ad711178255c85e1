"""Molecular systems: the built-in peptides (aldp, al3, al4) and users' own PDB + force field.

    >>> from regflow_mm.systems import get_system
    >>> aldp = get_system("aldp")          # built-in name, or a path to a spec TOML
    >>> aldp.n_atoms, aldp.kT              # 22, 2.494 kJ/mol
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from .molecular_system import (MOLAR_GAS_CONSTANT, MolecularSystem, SystemSpec, backbone_torsions,
                               chiral_centres, signed_chiral_volume)

__all__ = ["MOLAR_GAS_CONSTANT", "MolecularSystem", "SystemSpec", "check_spec_hash", "get_system", "list_systems",
           "load_system", "system_from_spec_dict", "systems_dir", "backbone_torsions", "chiral_centres", "signed_chiral_volume"]


def systems_dir() -> Path:
    """Folder of the built-in system specs and structures (``$REGFLOW_MM_SYSTEMS`` overrides)."""
    override = os.environ.get("REGFLOW_MM_SYSTEMS")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "systems"


def list_systems() -> dict[str, SystemSpec]:
    """Built-in systems by name."""
    return {p.stem: SystemSpec.from_toml(p) for p in sorted(systems_dir().glob("*.toml"))}


@functools.lru_cache(maxsize=16)
def _cached(spec: SystemSpec) -> MolecularSystem:
    return MolecularSystem(spec)


def get_system(name_or_path: str | os.PathLike) -> MolecularSystem:
    """A built-in system by name (``aldp``, ``al3``, ``al4``) or a custom one from a spec TOML path.

    Systems are cached per spec; treat the returned object as read-only.
    """
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        return _cached(SystemSpec.from_toml(text))
    builtin = systems_dir() / f"{text}.toml"
    if not builtin.is_file():
        names = ", ".join(sorted(list_systems())) or "none found"
        raise ValueError(f"unknown system {text!r}: built-ins are {names}; or pass a spec .toml path "
                         "(see `regflow-mm systems`)")
    return _cached(SystemSpec.from_toml(builtin))


def load_system(pdb: str | os.PathLike, forcefield: list[str], temperature: float, name: str | None = None,
                nonbonded_method: str = "NoCutoff", nonbonded_cutoff: float | None = None,
                **options) -> MolecularSystem:
    """A custom system from a PDB and force-field XML files (implicit solvent as one of them).

    temperature in K, nonbonded_cutoff in nm; ``options``: solute_dielectric, solvent_dielectric,
    friction (1/ps, default for MD).
    """
    spec = SystemSpec(name=name or Path(pdb).stem, pdb=str(pdb), forcefield=tuple(forcefield),
                      temperature=float(temperature), nonbonded_method=nonbonded_method,
                      nonbonded_cutoff=nonbonded_cutoff, **options)
    return _cached(spec)


def system_from_spec_dict(spec: dict) -> MolecularSystem:
    """The system of a spec stored as ``SystemSpec.to_dict()`` (result files carry it)."""
    return MolecularSystem(SystemSpec.from_dict(spec))


def check_spec_hash(found: str | None, system, what: str, verb: str = "was trained for",
                    allow_unknown: bool = True) -> None:
    """Refuse a flow / file made for another system: ValueError unless ``found`` equals ``system.spec_hash``.

    ``found``: the stored hash (None: unknown, accepted when ``allow_unknown``); ``system``: a
    MolecularSystem or a hash string; ``what`` names the flow or file in the message.
    """
    expected = getattr(system, "spec_hash", system)
    if found == expected or (found is None and allow_unknown):
        return
    name = getattr(system, "name", "the given system")
    raise ValueError(f"{what} {verb} system hash {str(found)[:12]}, but {name!r} has hash {str(expected)[:12]}: "
                     "the force field, structure or temperature differ; use a flow or file made for this system")
