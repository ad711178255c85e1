"""Coordinate representations: bijections between positions (B, n_atoms, 3) nm and a flow space.

- ``CartesianRepresentation``: centred, scaled, on the (3N-3)-dim mean-free subspace (R^{3N-3}).
- ``IdentityRepresentation``: absolute Cartesian coordinates on R^{3N}.
- ``InternalCoordinates``: Z-matrix bonds/angles/torsions on [0, 1]^{3N-6} (torsions periodic).
"""
from .base import Representation, as_positions
from .cartesian import CartesianRepresentation, IdentityRepresentation, helmert_basis
from .internal import InternalCoordinates, bond_angles, bond_lengths, place_atom, torsion_angles
from .zmatrix import ZMatrix, build_zmatrix, zmatrix_from_topology

REPRESENTATIONS = {cls.name: cls for cls in (CartesianRepresentation, IdentityRepresentation,
                                             InternalCoordinates)}


def representation_from_config(config: dict) -> Representation:
    """Rebuild a representation from ``get_config()`` (normalisation comes with the state_dict)."""
    kind = config.get("type")
    if kind not in REPRESENTATIONS:
        raise ValueError(f"unknown representation type {kind!r}; known: {sorted(REPRESENTATIONS)}")
    if kind == "internal":
        return InternalCoordinates.from_config(config)
    return REPRESENTATIONS[kind](config["n_atoms"])


__all__ = ["Representation", "CartesianRepresentation", "IdentityRepresentation", "InternalCoordinates",
           "ZMatrix", "build_zmatrix", "zmatrix_from_topology", "representation_from_config", "REPRESENTATIONS",
           "as_positions", "helmert_basis", "bond_lengths", "bond_angles", "torsion_angles", "place_atom"]
