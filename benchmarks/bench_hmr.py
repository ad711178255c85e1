"""Does 2 fs with hydrogen mass repartitioning sample the 1 fs ensemble of aldp? And how much faster?

    .venv/bin/python benchmarks/bench_hmr.py [--ns 3] [--seeds 0,1] [--hydrogen-mass 3]

Plain Langevin MD of aldp (LangevinMiddle, 300 K, 1/ps, Reference platform, no constraints) at
1 fs with the force field's masses and at 2 fs with hydrogens of --hydrogen-mass amu
(``systems.masses.repartition_hydrogen_mass``), one process per run, two at a time, after 10 ps of
unsaved equilibration, a frame every 0.1 ps. Reports ns/day, the mean and standard deviation of the
potential energy (kJ/mol; error of the mean from 20 blocks per run, combined over seeds) and the
fraction of frames in the alpha_R basin (-2.1 < psi < 0.87 rad, phi < 0). The configurational
ensemble does not depend on the masses, so any difference beyond the errors is integration error.
Markdown to stdout and to --out-md.
"""
from __future__ import annotations

import argparse
import platform as _platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np


def run(timestep_fs: float, hydrogen_mass: float, ns: float, seed: int) -> dict:
    import openmm
    from openmm import unit

    from regflow_mm.data import dihedrals
    from regflow_mm.systems import get_system
    from regflow_mm.systems.masses import repartition_hydrogen_mass
    from regflow_mm.systems.platforms import openmm_seed

    s = get_system("aldp")
    system = repartition_hydrogen_mass(s.system, s.topology, hydrogen_mass) if hydrogen_mass > 1.0 else s.system
    integrator = openmm.LangevinMiddleIntegrator(s.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 timestep_fs * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(s.positions * unit.nanometer)
    context.setVelocitiesToTemperature(s.temperature * unit.kelvin, openmm_seed(seed))
    integrator.step(int(round(10_000 / timestep_fs)))
    every = int(round(100 / timestep_fs))
    energies, frames = [], []
    start = time.perf_counter()
    for _ in range(int(round(ns * 1e6 / timestep_fs)) // every):
        integrator.step(every)
        state = context.getState(getEnergy=True, getPositions=True)
        energies.append(state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
        frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    seconds = time.perf_counter() - start
    angles = dihedrals(np.asarray(frames, dtype=np.float64), [s.torsions["phi1"], s.torsions["psi1"]])
    alpha = (angles[:, 0] < 0) & (angles[:, 1] > -2.1) & (angles[:, 1] < 0.87)
    return {"timestep_fs": timestep_fs, "hydrogen_mass": hydrogen_mass, "seed": seed, "seconds": seconds,
            "energies": np.asarray(energies), "alpha": alpha.astype(float)}


def block_mean(runs: list[dict], key: str, blocks: int = 20) -> tuple[float, float]:
    """Mean over all runs and its error from ``blocks`` contiguous blocks per run."""
    means = np.concatenate([r[key][: len(r[key]) // blocks * blocks].reshape(blocks, -1).mean(axis=1) for r in runs])
    return float(means.mean()), float(means.std(ddof=1) / np.sqrt(means.size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=float, default=3.0, help="production per run, ns")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (one run per seed and setting)")
    parser.add_argument("--hydrogen-mass", type=float, default=3.0, help="hydrogen mass of the 2 fs runs, amu")
    parser.add_argument("--out-md", default="benchmarks/results/bench_hmr.md")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [(1.0, 1.0), (2.0, args.hydrogen_mass)]
    jobs = [(ts, hm, args.ns, seed) for seed in seeds for ts, hm in settings]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    lines = [f"# HMR check: aldp plain MD, 1 fs vs 2 fs with {args.hydrogen_mass} amu hydrogens",
             "", f"{date.today()}, {_platform.machine()} {_platform.processor() or ''}, two runs at a time; "
             f"`benchmarks/bench_hmr.py --ns {args.ns} --seeds {args.seeds} --hydrogen-mass {args.hydrogen_mass}`", "",
             "| setting | runs x ns | ns/day (mean) | <U> (kJ/mol) | sd U (kJ/mol) | P(alpha_R) |", "|---|---|---|---|---|---|"]
    for ts, hm in settings:
        runs = [r for r in results if r["timestep_fs"] == ts and r["hydrogen_mass"] == hm]
        speed = np.mean([args.ns / r["seconds"] * 86400 for r in runs])
        u, du = block_mean(runs, "energies")
        a, da = block_mean(runs, "alpha")
        sd = np.mean([r["energies"].std() for r in runs])
        lines.append(f"| {ts:g} fs, H {hm:g} amu | {len(runs)} x {args.ns:g} | {speed:.0f} | {u:.2f} +- {du:.2f} | "
                     f"{sd:.2f} | {a:.3f} +- {da:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_md).write_text(text)


if __name__ == "__main__":
    main()
