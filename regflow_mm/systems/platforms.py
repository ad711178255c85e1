"""Choosing the OpenMM platform.

Measured on a 2-core VM (see BENCHMARKS.md): for 22-42 atom implicit-solvent peptides the
single-threaded Reference platform beats the CPU platform (aldp ~3900 vs ~140 ns/day,
al4 ~1200 vs ~150 ns/day: the CPU platform's thread synchronisation dominates such tiny
systems), so "auto" prefers Reference for small systems when no GPU is present.
"""
from __future__ import annotations

import logging

import numpy as np
import openmm

log = logging.getLogger(__name__)

SMALL_SYSTEM_ATOMS = 200


def available_platforms() -> list[str]:
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


def resolve_platform(name: str | None, n_atoms: int, system: openmm.System | None = None) -> str:
    """Platform name for ``name`` ('auto'/None: CUDA if present, else Reference for small systems, else CPU).

    Custom forces (e.g. OBC1 as a ``CustomGBForce``, al3) are slow on Reference: with ``system``
    given, such systems get CPU (al3: ~200 vs ~40 ns/day under load, see BENCHMARKS.md).
    """
    available = available_platforms()
    if name in (None, "auto"):
        has_custom = system is not None and any(
            type(f).__name__.startswith("Custom") for f in system.getForces())
        if "CUDA" in available:
            chosen = "CUDA"
        else:
            chosen = "Reference" if n_atoms < SMALL_SYSTEM_ATOMS and not has_custom else "CPU"
        log.info("OpenMM platform: %s (auto; available: %s)", chosen, ", ".join(available))
        return chosen
    if name not in available:
        raise ValueError(f"OpenMM platform {name!r} is not available here; available: {', '.join(available)}")
    return name


def openmm_seed(*keys: int) -> int:
    """A seed in 1 .. 2^31 - 1 for OpenMM's random streams, derived from integer ``keys`` (e.g. the
    run's seed, an iteration, a stream number). OpenMM reads 0 as "pick one at random", which would
    make a seed-0 run irreproducible."""
    entropy = [abs(int(k)) for k in keys] + [sum(1 << i for i, k in enumerate(keys) if int(k) < 0), 20261202]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % (2**31 - 2)) + 1


def platform_properties(name: str, threads: int | None) -> dict:
    return {"Threads": str(threads)} if (name == "CPU" and threads) else {}
