"""Check an exported flow force inside OpenMM: energies against the flow, then a short MD run.

``check_flow_force(flow, system, positions, backend, md_steps, seed, model_path=None)`` builds a
System of the molecule's masses holding only the flow force (``forces.flow_force``), compares its
energies on ``positions`` (B, n_atoms, 3) nm with ``flow.energy`` (kJ/mol), then runs ``md_steps``
Langevin steps (1 fs, 1/ps, the system's temperature, Reference platform) from ``positions[0]``.
Returns max_rel_energy_error, md_steps, md_seconds, md_finite, first_nonfinite_step,
flow_energy_mean / _std (kJ/mol) and ns_per_day.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit

from .forces import flow_force


def _potential_energy(context) -> float:
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def check_flow_force(flow, system, positions: np.ndarray, backend: str, md_steps: int, seed: int,
                     model_path: str | Path | None = None) -> dict:
    """See the module docstring; ``system`` is the MolecularSystem the flow was trained for."""
    force = flow_force(flow, backend=backend, path=model_path)
    flow_system = openmm.System()
    for i in range(system.system.getNumParticles()):
        flow_system.addParticle(system.system.getParticleMass(i))
    flow_system.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, 1.0, 0.001)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(flow_system, integrator, openmm.Platform.getPlatformByName("Reference"))

    test = np.asarray(positions, dtype=np.float64)
    exported, reference = [], flow.double().energy(torch.as_tensor(test)).detach().numpy()
    for x in test:
        context.setPositions(x)
        exported.append(_potential_energy(context))
    exported = np.array(exported)
    inside = np.isfinite(reference)  # frames outside the flow's support have +inf energy in both
    if not inside.any():
        raise ValueError("every check frame lies outside the flow's support: pass frames from its training data")
    rel = float(np.max(np.abs(exported[inside] - reference[inside]) / np.maximum(np.abs(reference[inside]), 1.0)))
    if np.isfinite(exported[~inside]).any():
        rel = float("inf")  # the exported force is finite where the flow's density is zero: a mismatch

    context.setPositions(test[0])
    context.setVelocitiesToTemperature(system.temperature, seed)
    energies, started = [], time.perf_counter()
    for _ in range(max(md_steps // 10, 1)):
        integrator.step(10)
        energies.append(_potential_energy(context))
    seconds = time.perf_counter() - started
    energies = np.array(energies)
    finite = energies[np.isfinite(energies)]
    first_bad = np.flatnonzero(~np.isfinite(energies))
    return {"max_rel_energy_error": rel, "md_steps": int(len(energies) * 10), "md_seconds": seconds,
            "md_finite": bool(finite.size == energies.size),
            "first_nonfinite_step": int((first_bad[0] + 1) * 10) if first_bad.size else None,
            "flow_energy_mean": float(finite.mean()) if finite.size else None,
            "flow_energy_std": float(finite.std()) if finite.size else None,
            "ns_per_day": len(energies) * 10 * 1e-6 * 86400 / seconds}
