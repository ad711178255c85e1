"""Cost of Langevin walkers on a flow potential: W walkers in one OpenMM Context (one batched flow evaluation per
step, ``export.dynamics.run_flow_walkers``) against one walker per Context (``run_md``), side by side in one run.

At batch size 1 a flow's energy and forces are call overhead (hundreds of small tensor operations), so a batch of W
configurations costs about as much as one: the pipeline's ``[smooth]`` stage runs its walkers that way. Reported per
W: wall ms per Context step, ms per walker-step, and the speed-up over one walker per Context. Positions after the
run are checked finite.

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_walkers.py [--flow smooth/flow.pt --dataset md.h5] \
        [--walkers 1 4 8 16] [--steps 300] [--backend torch] [--out-md results/bench_flow_walkers.md]

Without ``--flow``: an untrained smooth flow of the pipeline's default size (6 x 128, 8 components, probit maps,
float64; the cost does not depend on the weights) on 64 perturbed copies of aldp's minimised structure.
"""
from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

from regflow_mm.export.dynamics import run_flow_walkers, run_md


def _flow_and_starts(args):
    if args.flow:
        from regflow_mm.data import load_dataset
        from regflow_mm.export.check import equilibrium_starts
        from regflow_mm.flows import load_flow

        data = load_dataset(args.dataset)
        log_w = data.log_weights if data.weighted else None
        starts = equilibrium_starts(data.positions, log_w, max(args.walkers), 0)
        return data.system, load_flow(args.flow, system=data.system).eval(), starts, args.flow
    from regflow_mm.flows import build_flow
    from regflow_mm.systems import get_system

    aldp = get_system("aldp")
    frames = aldp.positions[None] + 0.004 * np.random.default_rng(1).standard_normal((64, aldp.n_atoms, 3))
    flow = build_flow(aldp, "internal", "smooth", fit_to=frames, dtype=torch.float64, seed=0,
                      representation_options={"support": "open", "open_map": "normal"}, n_layers=6, n_components=8,
                      hidden=[128, 128], interval="probit").eval()
    return aldp, flow, frames[:max(args.walkers)], "untrained smooth flow, 6 x 128, 8 components, probit, float64"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--walkers", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", default="torch", choices=["torch", "python"])
    parser.add_argument("--out-md", default=None)
    args = parser.parse_args(argv)
    if args.flow and not args.dataset:
        parser.error("--flow needs --dataset (the frames the walkers start from)")
    if min(args.walkers) < 1 or args.steps < 1:
        parser.error("--walkers must be >= 1 and --steps >= 1")
    torch.set_num_threads(1)
    system, flow, starts, label = _flow_and_starts(args)
    kwargs = {"steps": args.steps, "timestep_fs": 1.0, "report_every": 100, "save_every": 100, "backend": args.backend}
    one = run_md(system, starts[0], flow, mode="flow", integrator="langevin", **kwargs)
    base = 1000 * one.seconds_per_step
    rows = [("1 per Context (run_md)", 1, base, base, 1.0, one.finite)]
    for w in args.walkers:
        runs = run_flow_walkers(system, starts[:w], flow, **kwargs)
        per_walker = 1000 * runs[0].seconds_per_step  # each walker's share of the Context's time
        rows.append((f"{w} in one Context", w, per_walker * w, per_walker, base / per_walker,
                     all(r.finite for r in runs)))
        print(f"{w} walkers: {per_walker * w:.2f} ms per step, {per_walker:.2f} per walker-step", file=sys.stderr)
    lines = ["# bench_flow_walkers: Langevin walkers on a flow potential, batched in one OpenMM Context", "",
             f"Command: `{' '.join(['benchmarks/bench_flow_walkers.py'] + (sys.argv[1:] if argv is None else argv))}`  ",
             f"Flow: {label}; {args.steps} Langevin steps at 1 fs per run, backend {args.backend}, one thread, "
             f"Reference platform; {platform.node()} ({platform.machine()}), {date.today().isoformat()}.", "",
             "| walkers | W | ms per Context step | ms per walker-step | walker-steps per second vs one per Context "
             "| finite |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {w} | {ctx:.2f} | {per:.3f} | **{ratio:.1f}x** | {finite} |"
              for name, w, ctx, per, ratio, finite in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    return text


if __name__ == "__main__":
    main()
