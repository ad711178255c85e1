"""Delta f between thermodynamic states of aldp, against MBAR over intermediate MD states.

    OMP_NUM_THREADS=1 python benchmarks/bench_thermo_fe.py --flow demo-output/train_baseline/flow.pt \
        --out /tmp/thermo [--ns 1.0] [--n-flow 50000] [--states 4]

Two changes of state A = aldp (amber99sbildn + amber99_obc (OBC2), 300 K):
- temperature: B = the same system at 350 K; intermediates on a linear ladder of temperatures;
- force field: B = amber96 + amber96_obc (OBC2 with amber96 radii) at 300 K; intermediates
  U_lambda = (1 - lambda) U_A + lambda U_B (``sampling.thermodynamic.mixture_system``).
Each ladder state gets its own Langevin MD (2 fs with 3 amu hydrogens: the same configurational
ensemble, ``systems.masses``), frames every --interval-ps, subsampled to uncorrelated frames
(pymbar timeseries). Reference: MBAR over all ladder states. Estimates of f_B - f_A (reduced, kT)
with ``sampling.thermodynamic``: from the flow's samples alone (MBAR with the flow as the sampled
state), BAR on the two end states' MD frames, and both together.
"""
from __future__ import annotations

import argparse
import math
import platform as _platform
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit


def md_frames(state, topology, positions, ns: float, interval_ps: float, seed: int, cache: Path) -> np.ndarray:
    """Langevin MD of a ThermodynamicState (2 fs, hydrogens 3 amu, friction 1/ps, Reference platform) -> frames
    (N, n_atoms, 3) nm, cached in ``cache`` (npz)."""
    from regflow_mm.systems.masses import repartition_hydrogen_mass
    from regflow_mm.systems.platforms import openmm_seed

    if cache.is_file():
        return np.load(cache)["positions"]
    system = repartition_hydrogen_mass(state.system, topology, 3.0)
    integrator = openmm.LangevinMiddleIntegrator(state.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 2.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    context.setVelocitiesToTemperature(state.temperature * unit.kelvin, openmm_seed(seed, 1))
    integrator.step(10_000)  # 20 ps equilibration
    steps = int(round(interval_ps * 500))
    frames = []
    for _ in range(int(round(ns * 1000 / interval_ps))):
        integrator.step(steps)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    out = np.asarray(frames, dtype=np.float64)
    np.savez(cache, positions=out)
    return out


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", required=True, help="a flow trained for aldp at 300 K")
    parser.add_argument("--out", required=True, help="folder for the MD frames (cached)")
    parser.add_argument("--ns", type=float, default=1.0, help="MD per ladder state, ns")
    parser.add_argument("--interval-ps", type=float, default=0.5)
    parser.add_argument("--states", type=int, default=4, help="ladder states, end states included")
    parser.add_argument("--n-flow", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--changes", nargs="+", default=["temperature", "forcefield"])
    args = parser.parse_args()

    from regflow_mm.flows import load_flow
    from regflow_mm.sampling.thermodynamic import ThermodynamicState, delta_f_states, mixture_system
    from regflow_mm.systems import get_system, load_system

    aldp = get_system("aldp")
    flow = load_flow(args.flow, system=aldp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# Delta f between thermodynamic states of aldp\n\nmachine: {_platform.machine()}, {_platform.node()}, "
          f"torch threads 1; MD {args.ns} ns per ladder state (2 fs, H 3 amu, Reference), frames every "
          f"{args.interval_ps} ps; flow {args.flow}, {args.n_flow} samples\n")
    a = ThermodynamicState(aldp.system, 300.0, "aldp 300 K")
    ladders = {}
    if "temperature" in args.changes:
        temps = np.linspace(300.0, 350.0, args.states)
        ladders["temperature 300 K -> 350 K"] = [ThermodynamicState(aldp.system, float(t), f"aldp {t:.1f} K")
                                                 for t in temps]
    if "forcefield" in args.changes:
        b = load_system(aldp.spec.pdb, ["amber96.xml", "amber96_obc.xml"], 300.0, name="aldp-amber96")
        lams = np.linspace(0.0, 1.0, args.states)
        ladders["force field amber99sbildn/OBC2 -> amber96/OBC2 (300 K)"] = (
            [a] + [ThermodynamicState(mixture_system(aldp.system, b.system, float(lam)), 300.0, f"lambda {lam:.2f}")
                   for lam in lams[1:-1]] + [ThermodynamicState(b.system, 300.0, "amber96 300 K")])
    rows = []
    for label, ladder in ladders.items():
        samples = []
        t0 = time.perf_counter()
        for k, state in enumerate(ladder):
            name = f"{label.split()[0]}_{k}.npz"
            samples.append(md_frames(state, aldp.topology, aldp.positions, args.ns, args.interval_ps,
                                     args.seed + k, out / name))
        md_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = delta_f_states(ladder, samples)
        ref_s = time.perf_counter() - t0
        ends = [ladder[0], ladder[-1]]
        common = dict(is_l=aldp.is_l, seed=args.seed, n_flow_samples=args.n_flow)
        estimates = {}
        for name, kwargs in (("flow samples only (MBAR, flow as the sampled state)", dict(samples=None, flow=flow)),
                             ("end-state MD frames only (BAR)", dict(samples=[samples[0], samples[-1]])),
                             ("flow + end-state MD frames (MBAR)", dict(samples=[samples[0], samples[-1]], flow=flow))):
            t0 = time.perf_counter()
            estimates[name] = (delta_f_states(ends, kwargs["samples"], flow=kwargs.get("flow"), **common),
                               time.perf_counter() - t0)
        print(f"## {label}\n\nMD {md_s:.0f} s wall for {len(ladder)} states (cached runs: 0); uncorrelated frames "
              f"per state {list(ref['n_samples'].values())}; MBAR overlap {ref['overlap']:.3f}\n")
        print("| estimate | Delta f (kT) | +- | difference to reference (kT) | within 0.2 kT incl. errors | "
              "effective samples in A, B | note |\n|---|---|---|---|---|---|---|")
        print(f"| reference: MBAR over {len(ladder)} MD states | {ref['delta_f']:.3f} | {ref['ddelta_f']:.3f} | - | - | "
              f"{ref['ess'][0]:.0f}, {ref['ess'][-1]:.0f} | {ref_s:.0f} s |")
        for name, (r, secs) in estimates.items():
            diff = r["delta_f"] - ref["delta_f"]
            err = math.hypot(r["ddelta_f"], ref["ddelta_f"])
            note = f"{secs:.0f} s"
            if r["flow"]:
                note += "; flow Kish ESS " + ", ".join(f"{v:.3f}" for v in r["flow"]["ess"].values()) + \
                        f" ({r['flow']['n_dropped']} D/non-finite dropped)"
            if not r["reliable"]:
                note += "; UNRELIABLE"
            within = "yes" if abs(diff) <= 0.2 else ("yes, within 0.2 + 2 sigma" if abs(diff) <= 0.2 + 2 * err else "no")
            print(f"| {name} | {r['delta_f']:.3f} | {r['ddelta_f']:.3f} | {diff:+.3f} (+- {err:.3f}) | {within} | "
                  f"{r['ess'][0]:.0f}, {r['ess'][1]:.0f} | {note} |")
            rows.append((label, name, diff, err))
        print()


if __name__ == "__main__":
    main()
