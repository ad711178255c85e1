"""Langevin (or NVE) on a flow potential from several equilibrium starts: the pooled (phi, psi) T-W2 against the MD data,
beside the force field's own walkers from the same starts (issue 12's Langevin check, with a spread).

One 100 ps trajectory of aldp samples the alpha/beta populations only roughly (the force field itself lands
0.4-1.8 rad from the data, ``bench_langevin_floor.py``). Here ``--walkers`` trajectories start from frames drawn
from the dataset with probability proportional to their weights (an equilibrium start), run ``--ps`` each
(default 1 fs with the force field's masses, 300 K, 1/ps; a frame every 0.1 ps; at 2 fs with hydrogens of 3 amu
the smooth flow potentials' stiffer modes heat the walkers, BENCHMARKS.md issue 12), and their pooled frames are compared
with the weighted data: a potential whose equilibrium is the data's keeps them there, one that is not drifts
away from them. Each walker's own T-W2 and mean kinetic temperature are listed too. The same starts, lengths,
masses and seeds run on the force field. ``--integrator verlet`` runs NVE instead (after ``--equilibrate-ps`` of
Langevin) and compares the total-energy fluctuation per degree of freedom with the force field's, walker by walker.

    OMP_NUM_THREADS=1 python benchmarks/bench_langevin_walkers.py --flow smooth/flow.pt --dataset md.h5 \
        [--walkers 4] [--ps 100] [--seed 0] [--timestep-fs 1] [--hydrogen-mass 0] \
        [--integrator langevin|verlet] [--equilibrate-ps 0] [--out-md results/bench_langevin_walkers.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.export.check import equilibrium_starts, mean_kinetic_temperature
from regflow_mm.export.dynamics import run_md
from regflow_mm.flows import flow_file_hash, load_flow
from regflow_mm.importance import normalized_weights
from regflow_mm.training.metrics import torsion_w2


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", required=True, help="a smooth aldp flow (support covering what dynamics reaches)")
    parser.add_argument("--dataset", required=True, help="aldp dataset (weighted or plain MD): starts and reference")
    parser.add_argument("--walkers", type=int, default=4)
    parser.add_argument("--ps", type=float, default=100.0, help="length of each trajectory (ps)")
    parser.add_argument("--seed", type=int, default=0, help="starts and Langevin noise (walker k: seed + k)")
    parser.add_argument("--backend", default="torch", choices=("torch", "python"))
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--integrator", choices=("langevin", "verlet"), default="langevin",
                        help="verlet: NVE after --equilibrate-ps of Langevin; reports std E_tot per DOF, flow / force "
                             "field per walker")
    parser.add_argument("--equilibrate-ps", type=float, default=0.0, help="Langevin before the run (ps)")
    parser.add_argument("--hydrogen-mass", type=float, default=0.0, help="amu (0: the force field's masses)")
    parser.add_argument("--n-torsion", type=int, default=5000, help="weighted MD frames in each T-W2")
    parser.add_argument("--out-md", default="", help="also write the markdown here")
    args = parser.parse_args(argv)
    if args.walkers < 1 or not args.ps > 0:
        parser.error("--walkers must be >= 1 and --ps > 0")
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    system = data.system
    flow = load_flow(args.flow, system=system).eval()
    pair = [system.torsions["phi1"], system.torsions["psi1"]]
    md = dihedrals(np.asarray(data.positions, dtype=np.float64), pair)
    log_w = data.log_weights if data.weighted else None
    starts = equilibrium_starts(data.positions, log_w, args.walkers, args.seed)
    steps = int(round(args.ps / (args.timestep_fs * 1e-3)))
    save = max(1, int(round(0.1 / (args.timestep_fs * 1e-3))))  # a frame every 0.1 ps

    def t_w2(angles):
        return torsion_w2(md, angles, None, max_md=args.n_torsion, seed=args.seed, md_log_w=log_w)["t_w2"]

    rows, pooled = [], {"flow": [], "forcefield": []}
    for k, start in enumerate(starts):
        for mode in ("flow", "forcefield"):
            t = time.process_time()
            run = run_md(system, start, flow if mode == "flow" else None, mode=mode, integrator=args.integrator,
                         steps=steps, equilibrate_steps=int(round(args.equilibrate_ps / (args.timestep_fs * 1e-3))),
                         timestep_fs=args.timestep_fs, hydrogen_mass_amu=args.hydrogen_mass or None,
                         backend=args.backend, report_every=save,
                         save_every=save, seed=args.seed + k)
            angles = dihedrals(run.positions, pair) if len(run.positions) else np.zeros((0, 2))
            pooled[mode].append(angles)
            rows.append((k, mode, run.finite, run.steps_done * run.timestep_ps, len(angles),
                         t_w2(angles) if len(angles) else float("nan"), float(np.mean(angles[:, 0] > 0)) if len(angles)
                         else float("nan"), mean_kinetic_temperature(run),
                         run.energy_fluctuation_per_dof() if run.finite and args.integrator == "verlet" else float("nan"),
                         time.process_time() - t,
                         f"step {run.failure['step']}: {run.failure['reason']}" if run.failure else ""))
            print(f"walker {k} {mode}: T-W2 {rows[-1][5]:.3f} rad, {rows[-1][7]:.0f} K, {rows[-1][9]:.0f} CPU-s",
                  file=sys.stderr, flush=True)
    w = np.ones(len(md)) if log_w is None else normalized_weights(log_w)
    lines = ["# bench_langevin_walkers: aldp, Langevin on a flow potential and on the force field from equilibrium "
             "starts", "",
             f"Command: `{' '.join(['benchmarks/bench_langevin_walkers.py'] + (sys.argv[1:] if argv is None else argv))}`"
             "  ",
             f"Flow {args.flow} (sha256 {flow_file_hash(args.flow)[:12]}); dataset {args.dataset} ({len(data)} frames"
             f"{', weighted' if log_w is not None else ''}; phi > 0 in {float(np.sum(w * (md[:, 0] > 0))):.4f} of its "
             f"weight); {args.walkers} walkers x {args.ps:g} ps of {args.integrator} (after {args.equilibrate_ps:g} ps "
             f"of Langevin) at {args.timestep_fs:g} fs (hydrogens "
             f"{args.hydrogen_mass or 'force-field'} amu, 300 K, 1/ps), a frame every "
             f"0.1 ps; backend {args.backend}; {platform.node()}, {date.today().isoformat()}.", "",
             "Kinetic temperature: mean over the reports after the first 10% of the run (a potential too stiff for "
             "the timestep heats up against the thermostat).", "",
             "| walker | potential | finite | ps | frames | T-W2 (rad) | phi > 0 | kinetic T (K) | std E_tot/DOF (kJ/mol) "
             "| CPU s | failure |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {mode} | {finite} | {ps:.1f} | {n} | {tw:.3f} | {pos:.3f} | {temp:.0f} | {fluct:.3g} | {cpu:.0f} "
              f"| {fail} |" for k, mode, finite, ps, n, tw, pos, temp, fluct, cpu, fail in rows]
    lines += ["", "| potential | pooled frames | pooled T-W2 (rad) | per-walker T-W2 median (rad) |", "|---|---|---|---|"]
    for mode in ("flow", "forcefield"):
        angles = np.concatenate(pooled[mode])
        per = [r[5] for r in rows if r[1] == mode]
        lines.append(f"| {mode} | {len(angles)} | {t_w2(angles) if len(angles) else float('nan'):.3f} | "
                     f"{np.median(per):.3f} |")
    if args.integrator == "verlet":
        ratios = [f[8] / g[8] for f, g in zip(rows[0::2], rows[1::2])]
        lines += ["", "NVE energy fluctuation per DOF, flow / force field, per walker: "
                  + ", ".join(f"{r:.2f}x" for r in ratios) + f" (max {max(ratios):.2f}x)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    return text


if __name__ == "__main__":
    main()
