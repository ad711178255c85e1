"""Stiffness of a flow potential against the force field: the highest vibrational frequency at equilibrium frames.

Verlet-type integrators are stable only while omega_max * dt < 2, and heat up well before that; a flow potential
-kT log q(x) whose fastest mode is faster than the force field's needs a smaller timestep than the force field,
however good its density. For ``--frames`` configurations drawn with the dataset's frame weights (an equilibrium
sample), this computes the mass-weighted Hessian of the flow energy (autograd, float64) and of the force field
(central differences of OpenMM forces, step ``--fd-step`` nm), and reports omega_max = sqrt(largest eigenvalue)
in 1/fs with the atoms that carry its mode. Masses: the force field's (``--hydrogen-mass`` repartitions hydrogen
masses as the dynamics would).

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_stiffness.py --flow smooth/flow.pt --dataset md.h5 \
        [--frames 50] [--seed 0] [--hydrogen-mass 0] [--out-md results/bench_flow_stiffness.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import openmm.unit as unit
import torch

from regflow_mm.data import load_dataset
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import flow_file_hash, load_flow
from regflow_mm.importance import normalized_weights
from regflow_mm.systems.masses import repartition_hydrogen_mass


def atom_masses(system, hydrogen_mass_amu: float = 0.0) -> np.ndarray:
    """(n_atoms,) amu of the system's OpenMM System; with ``hydrogen_mass_amu`` repartitioned as the dynamics
    would (``systems.masses.repartition_hydrogen_mass``)."""
    omm = system.system
    if hydrogen_mass_amu:
        omm = repartition_hydrogen_mass(omm, system.topology, hydrogen_mass_amu)
    return np.array([omm.getParticleMass(i).value_in_unit(unit.dalton) for i in range(omm.getNumParticles())])


def omega_max(hessian: np.ndarray, masses: np.ndarray) -> tuple[float, np.ndarray]:
    """Highest frequency (1/fs) of a Cartesian Hessian (3N, 3N) kJ/mol/nm^2 and its mode's weight per atom (N,)."""
    m = np.repeat(1.0 / np.sqrt(masses), 3)
    hm = hessian * m[:, None] * m[None, :]
    values, vectors = np.linalg.eigh(0.5 * (hm + hm.T))
    mode = vectors[:, -1].reshape(-1, 3)
    return float(np.sqrt(max(values[-1], 0.0))) * 1e-3, (mode ** 2).sum(1)  # sqrt(kJ/mol/nm^2/amu) = 1/ps


def flow_hessian(flow, x: np.ndarray) -> np.ndarray:
    """Hessian (3N, 3N) kJ/mol/nm^2 of the flow energy -kT log q at positions x (N, 3) nm, by autograd."""
    xt = torch.as_tensor(x.reshape(1, -1), dtype=torch.float64)
    hess = torch.autograd.functional.hessian(lambda y: flow.energy(y.reshape(1, -1, 3)).sum(), xt)
    return hess.reshape(x.size, x.size).numpy()


def forcefield_hessian(evaluator, x: np.ndarray, step: float) -> np.ndarray:
    """Hessian (3N, 3N) kJ/mol/nm^2 of the force field at x (N, 3) nm by central differences of its forces."""
    n = x.size
    shifted = np.repeat(x.reshape(1, -1), 2 * n, axis=0)
    shifted[np.arange(n), np.arange(n)] += step
    shifted[n + np.arange(n), np.arange(n)] -= step
    _, forces = evaluator.energy_and_forces(shifted.reshape(2 * n, -1, 3))
    forces = forces.reshape(2 * n, n)
    hess = -(forces[:n] - forces[n:]) / (2.0 * step)
    return 0.5 * (hess + hess.T)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", required=True, action="append", help="flow file (repeat to compare several)")
    parser.add_argument("--dataset", required=True, help="dataset of the flow's system: the equilibrium frames")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hydrogen-mass", type=float, default=0.0, help="amu (0: the force field's masses)")
    parser.add_argument("--fd-step", type=float, default=1e-5, help="nm, force-field finite differences")
    parser.add_argument("--out-md", default="", help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be >= 1")
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    system = data.system
    p = normalized_weights(data.log_weights) if data.weighted else np.full(len(data), 1.0 / len(data))
    idx = np.sort(np.random.default_rng(args.seed).choice(len(data), size=args.frames, replace=False, p=p))
    frames = np.asarray(data.positions[idx], dtype=np.float64)
    masses = atom_masses(system, args.hydrogen_mass)
    names = [f"{a.residue.name}{a.residue.index}:{a.name}" for a in system.topology.atoms()]
    results = {}
    with EnergyEvaluator(system, n_workers=1) as evaluator:
        t = time.process_time()
        results["force field"] = [omega_max(forcefield_hessian(evaluator, x, args.fd_step), masses) for x in frames]
        print(f"force field: {time.process_time() - t:.0f} CPU-s", file=sys.stderr, flush=True)
    for path in args.flow:
        flow = load_flow(path, system=system).double().eval()
        t = time.process_time()
        results[path] = [omega_max(flow_hessian(flow, x), masses) for x in frames]
        print(f"{path}: {time.process_time() - t:.0f} CPU-s", file=sys.stderr, flush=True)
    lines = ["# bench_flow_stiffness: highest vibrational frequency of flow potentials and of the force field", "",
             f"Command: `{' '.join(['benchmarks/bench_flow_stiffness.py'] + (sys.argv[1:] if argv is None else argv))}`"
             "  ",
             f"{args.frames} frames of {args.dataset} drawn with the frame weights (seed {args.seed}); masses: "
             f"{'hydrogens ' + format(args.hydrogen_mass, 'g') + ' amu' if args.hydrogen_mass else 'the force field'};"
             f" {platform.node()}, {date.today().isoformat()}. Verlet is stable for omega_max dt < 2 and "
             "heats up before.", "",
             "| potential | sha256 | omega_max median (1/fs) | 90% | max | frames above 1.5x the force field's max | "
             "atoms of the fastest mode (largest omega_max) |", "|---|---|---|---|---|---|---|"]
    ff_max = max(w for w, _ in results["force field"])
    for name, rows in results.items():
        w = np.array([r[0] for r in rows])
        worst = rows[int(np.argmax(w))][1]
        atoms = ", ".join(names[j] for j in np.argsort(worst)[::-1][:3])
        sha = "-" if name == "force field" else flow_file_hash(name)[:12]
        lines.append(f"| {name} | {sha} | {np.median(w):.3f} | {np.quantile(w, 0.9):.3f} | {w.max():.3f} | "
                     f"{int((w > 1.5 * ff_max).sum())} of {w.size} | {atoms} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    return text


if __name__ == "__main__":
    main()
