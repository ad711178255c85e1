"""MD throughput (ns/day) of the built-in systems on OpenMM's Reference and CPU platforms.

    .venv/bin/python benchmarks/bench_md_platforms.py [--steps 5000] [--threads 1]

LangevinMiddle, 1 fs, the systems' own force fields, no constraints; both platforms timed in
one run, in turn, after 200 warm-up steps. Prints a markdown table with the Reference/CPU ratio:
the reason `platform="auto"` prefers Reference for small systems without a GPU.
"""
import argparse
import datetime
import platform as pyplatform
import time

import openmm

from regflow_mm.systems import get_system


def ns_per_day(system, platform, properties, steps):
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, 1.0, 0.001)
    context = openmm.Context(system.system, integrator, openmm.Platform.getPlatformByName(platform), properties)
    context.setPositions(system.positions)
    integrator.step(200)
    started = time.perf_counter()
    integrator.step(steps)
    return steps * 1e-6 * 86400 / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1, help="CPU-platform threads")
    parser.add_argument("--systems", nargs="+", default=["aldp", "al3", "al4"])
    args = parser.parse_args()
    print(f"# MD throughput, {datetime.date.today()}, {pyplatform.machine()}, OpenMM {openmm.__version__}, "
          f"{args.steps} steps, CPU platform Threads={args.threads}\n")
    print("| system | atoms | Reference ns/day | CPU ns/day | Reference / CPU |")
    print("|---|---|---|---|---|")
    for name in args.systems:
        system = get_system(name)
        steps = args.steps if system.n_atoms < 30 or name != "al3" else max(args.steps // 10, 200)
        ref = ns_per_day(system, "Reference", {}, steps)
        cpu = ns_per_day(system, "CPU", {"Threads": str(args.threads)}, steps)
        print(f"| {name} | {system.n_atoms} | {ref:.0f} | {cpu:.0f} | {ref / cpu:.1f}x |")


if __name__ == "__main__":
    main()
