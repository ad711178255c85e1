"""Energy+force evaluations per second for AL4 configurations: EnergyEvaluator vs a plain Context loop.

    .venv/bin/python benchmarks/bench_energy.py [--n 10000] [--workers 2] [--platforms Reference CPU]

Per platform, in one run on the same configurations: a plain loop over one OpenMM Context with
the platform's default properties (what a user writes by hand), the evaluator in-process
(n_workers=0, the wrapper's own overhead), and the evaluator with a worker pool, cold (first call,
worker start included) and warm. Warm figures are the median of --repeats runs. Prints a markdown
table and writes it with the run's details to benchmarks/results/bench_energy.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform as platform_module
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openmm

from regflow_mm.energy import EnergyEvaluator
from regflow_mm.systems import get_system

RESULTS = Path(__file__).resolve().parent / "results" / "bench_energy.md"


def configurations(system, n: int, seed: int = 0, noise: float = 0.005) -> np.ndarray:
    """(n, n_atoms, 3) nm: the minimised structure plus Gaussian noise (noise nm per coordinate)."""
    rng = np.random.default_rng(seed)
    return system.positions[None] + noise * rng.standard_normal((n,) + system.positions.shape)


def cpu_seconds(pids=()) -> float:
    """User+system CPU seconds of this process and of the processes `pids` (Linux /proc; 0 elsewhere)."""
    times = os.times()
    total = times.user + times.system
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def plain_loop(system, x: np.ndarray, platform: str) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s, energies kJ/mol) of x with one Context and OpenMM's default properties."""
    context = openmm.Context(system.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform))
    energies = np.empty(len(x))
    cpu, start = cpu_seconds(), time.perf_counter()
    for i, xi in enumerate(x):
        context.setPositions(xi)
        state = context.getState(getEnergy=True, getForces=True)
        energies[i] = state.getPotentialEnergy().value_in_unit(openmm.unit.kilojoule_per_mole)
        state.getForces(asNumpy=True)
    return time.perf_counter() - start, cpu_seconds() - cpu, energies


def timed(evaluator: EnergyEvaluator, x: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s of this process and the pool's workers, energies kJ/mol)."""
    executor = evaluator.executor  # starts the pool, so a cold call still counts the workers' CPU
    pids = list(getattr(executor, "_processes", None) or {})  # private, but the only handle on the workers
    cpu, start = cpu_seconds(pids), time.perf_counter()
    energies, _ = evaluator.energy_and_forces(x)
    pids = list(getattr(evaluator.executor, "_processes", None) or {})
    return time.perf_counter() - start, cpu_seconds(pids) - cpu, energies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", default="al4")
    parser.add_argument("--n", type=int, default=10_000, help="configurations")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the pool")
    parser.add_argument("--platforms", nargs="+", default=["Reference", "CPU"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    system = get_system(args.system)
    x = configurations(system, args.n)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows, pool_per_cpu_s = [], {}
    for platform in args.platforms:
        with EnergyEvaluator(system, n_workers=0, platform=platform) as serial, \
                EnergyEvaluator(system, n_workers=args.workers, platform=platform) as pool:
            cold = timed(pool, x)
            loop_energies = plain_loop(system, x, platform)[2]
            # interleaved repeats: load from other jobs on the shared machine hits all methods alike
            runs = {"loop": [], "serial": [], "pool": []}
            for _ in range(args.repeats):
                runs["loop"].append(plain_loop(system, x, platform)[:2])
                runs["serial"].append(timed(serial, x)[:2])
                runs["pool"].append(timed(pool, x)[:2])
            median = {k: tuple(statistics.median(r[i] for r in v) for i in (0, 1)) for k, v in runs.items()}
            threads = {k: e.platform_properties.get("Threads", "default") for k, e in (("serial", serial), ("pool", pool))}
        pool_energies = cold[2]
        finite = np.isfinite(loop_energies)
        max_rel = float(np.max(np.abs(pool_energies[finite] - loop_energies[finite]) / np.abs(loop_energies[finite])))
        loop_s = median["loop"][0]
        pool_per_cpu_s[platform] = args.n / median["pool"][1]
        for method, t, (wall, cpu), diff in (
            ("plain Context loop (default properties)", "default", median["loop"], None),
            ("EnergyEvaluator in-process", threads["serial"], median["serial"], None),
            (f"EnergyEvaluator {args.workers} workers, cold (incl. start)", threads["pool"], cold[:2], max_rel),
            (f"EnergyEvaluator {args.workers} workers, warm", threads["pool"], median["pool"], max_rel),
        ):
            rows.append(f"| {platform} | {method} | {t} | {wall:.2f} | {args.n / wall:,.0f} | {loop_s / wall:.2f}x "
                        f"| {cpu:.2f} | {args.n / cpu:,.0f} | {'' if diff is None else f'{diff:.1e}'} |")

    table = "\n".join([
        "| platform | method | CPU threads/Context | wall (s) | evals/s | speed-up vs loop | CPU s (all processes) "
        "| evals per CPU-s | max rel. diff vs loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ] + rows)
    print(table)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    projection = "; ".join(f"{p}: about {2 * r:,.0f}/s on 2 free cores, {16 * r:,.0f}/s on 16"
                           for p, r in pool_per_cpu_s.items())
    report = f"""# bench_energy: batched energies+forces, {args.system.upper()} ({system.n_atoms} atoms)

Command: `{' '.join(['.venv/bin/python benchmarks/bench_energy.py'] + list(argv if argv is not None else sys.argv[1:]))}`
Date: {datetime.date.today().isoformat()}
Machine: 2-core CPU, no GPU ({cores} usable cores, {platform_module.processor() or platform_module.machine()},
1-min load average {load_start:.2f} at the start, {load_end:.2f} at the end of the run: values above ~0.5
mean other jobs shared the cores, which caps the pool's speed-up below 2x).
Software: OpenMM {openmm.__version__}, Python {platform_module.python_version()}.
Workload: {args.n} configurations = minimised {args.system} + 0.005 nm Gaussian noise per coordinate,
energy and forces for every one (amber99sbildn + OBC GBSA, NoCutoff). Warm times are the median of
{args.repeats} interleaved runs (loop, in-process, pool, loop, ...); "cold" is the first call of a
fresh pool, worker start-up included. "max rel. diff" compares the pool's energies with the loop's.
"CPU s" adds the CPU time of this process and of the pool's workers: evals per CPU-second is the
throughput one free core gives, independent of what else ran on the machine.

{table}

Notes
- Single points of a 42-atom implicit-solvent peptide are tiny: OpenMM's CPU platform spends much
  of each call on per-call setup and thread synchronisation, so the single-threaded Reference
  platform gives more evaluations per CPU-second here (the evaluator's automatic choice below 200
  atoms). With Threads=1 per Context (the evaluator's default below 1000 atoms) CPU is faster than
  with OpenMM's default thread count.
- The pool's workers each hold a Context and evaluate whole chunks, so per-configuration work is
  the same as in-process (compare evals per CPU-s of the in-process and warm pool rows); pickling
  positions and forces (~2 KB per configuration here) is a small extra. Throughput therefore grows
  with free cores: ideal (linear) projection = n_workers x evals per CPU-s of the warm pool row,
  {projection}.
  This 2-core machine (shared with other jobs during the run) allows at most 2x over in-process; on
  a dask cluster (`EnergyEvaluator(system, executor=client.get_executor(), n_workers=total_threads)`)
  the same holds with all its worker threads. The cold call pays worker start-up (forkserver: a
  fraction of a second) once per evaluator.
- No published figure exists for this measurement. For scale: /work/shared/REFERENCE.md notes
  ~64k/s (Reference) and ~10k/s (CPU) single-point energies for 22-atom ALDP in vacuum on this
  machine, a cheaper system without the GBSA term.
- No GPU here: the CUDA platform was not measured. For systems this small a GPU Context is
  latency-bound (one chain of kernel launches per configuration) and is not expected to beat one
  Reference core per configuration; it pays off for systems with thousands of atoms.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
