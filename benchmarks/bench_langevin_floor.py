"""How far one Langevin trajectory of the force field itself lands from the weighted MD data in (phi, psi) T-W2:
the floor of issue 12's check "100 ps of Langevin on the flow potential within T-W2 0.5 rad of the MD data".

aldp, the same settings as ``export.check.check_flow_dynamics`` (start: the first test frame of the dataset,
2 fs, hydrogens 3 amu, 300 K, 1/ps, a frame every 0.1 ps, T-W2 against at most 5000 weighted MD frames), one
trajectory per seed; also the fraction of frames with psi < 1 rad (the alpha basins) against the data's.

    OMP_NUM_THREADS=1 python benchmarks/bench_langevin_floor.py --dataset md.h5 [--ps 100] [--seeds 0,1,2,3,4,5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.export.dynamics import run_md
from regflow_mm.training.metrics import torsion_w2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="aldp dataset (weighted or plain MD)")
    parser.add_argument("--ps", type=float, default=100.0, help="length of each trajectory")
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset)
    system = data.system
    pair = [system.torsions["phi1"], system.torsions["psi1"]]
    md = dihedrals(np.asarray(data.positions, dtype=np.float64), pair)
    log_w = data.log_weights if data.weighted else None
    w = np.ones(len(md)) if log_w is None else np.exp(log_w - log_w.max())
    alpha_data = float(w[md[:, 1] < 1.0].sum() / w.sum())
    start = np.asarray(data.positions[data.split_indices("test")[0]], dtype=np.float64)
    steps = int(round(args.ps / 2e-3))
    print(f"aldp force field, Langevin {args.ps} ps at 2 fs (hydrogens 3 amu, 300 K, 1/ps) from the first test frame of "
          f"{args.dataset}; T-W2 against {'weighted ' if log_w is not None else ''}MD data (psi < 1 rad: "
          f"{alpha_data:.2f} of the data)\n")
    print("| seed | frames | T-W2 (rad) | frames with psi < 1 rad | wall s |")
    print("|---|---|---|---|---|")
    values = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.time()
        run = run_md(system, start, None, mode="forcefield", integrator="langevin", steps=steps, timestep_fs=2.0,
                     hydrogen_mass_amu=3.0, report_every=50, save_every=50, seed=seed)
        a = dihedrals(run.positions, pair)
        t_w2 = torsion_w2(md, a, None, max_md=5000, seed=seed, md_log_w=log_w)["t_w2"]
        values.append(t_w2)
        print(f"| {seed} | {len(a)} | {t_w2:.3f} | {np.mean(a[:, 1] < 1.0):.2f} | {time.time() - t:.0f} |", flush=True)
    print(f"\nT-W2 over {len(values)} trajectories: min {min(values):.3f}, median {np.median(values):.3f}, "
          f"max {max(values):.3f} rad")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
