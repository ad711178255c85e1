"""Basin crossings per CPU-second on aldp: hybrid MD + flow vs plain MD at equal CPU time.

    .venv/bin/python benchmarks/bench_crossings.py --flow FLOW.pt --dataset runs/aldp.h5 \
        [--cpu-budget 60] [--walkers 2] [--md-steps 250] [--flow-moves 1,4,16]

Every chain (plain MD, and hybrid with k flow moves per MD segment for each k of --flow-moves)
runs --walkers walkers from the same dataset frames for --cpu-budget CPU seconds each (process
time, one torch/OpenMM thread). An iteration is --md-steps Langevin steps (--timestep-fs fs,
the system's friction) then k flow independence moves; phi1 is recorded after the MD segment and
after every flow move, i.e. at every state of the chain, and a sign change of phi1 between
consecutive records is a crossing. Reports per chain: CPU s, records, crossings and crossings per
CPU s, P(phi1 > 0) with a block-averaged error (--blocks contiguous blocks per walker, combined over
walkers), flow acceptance, CPU s per flow move and per MD segment; the reference populations from
the dataset (its frame weights, block error) and from reweighted flow samples (--flow-samples, delta
method). Markdown to stdout and to --out-md.
"""
from __future__ import annotations

import argparse
import math
import platform as _platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit
from openmmtools import cache
from openmmtools.states import SamplerState, ThermodynamicState

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.flows import flow_file_hash, load_flow
from regflow_mm.importance import kish_ess
from regflow_mm.sampling import FlowIndependenceMove, SeededLangevinDynamicsMove
from regflow_mm.sampling.crossings import block_mean_error, sign_changes
from regflow_mm.sampling.moves import maxwell_boltzmann_velocities
from regflow_mm.systems.platforms import openmm_seed


def run_walker(system, flow, flow_path, start, *, cpu_budget, md_steps, timestep_fs, flow_moves, seed, walker):
    """One walker for ``cpu_budget`` CPU s -> phi1 at every chain state (rad), counters and CPU split."""
    thermo = ThermodynamicState(system.system, system.temperature * unit.kelvin)
    velocities = maxwell_boltzmann_velocities(system.system, system.temperature, np.random.default_rng([seed, walker]))
    state = SamplerState(start * unit.nanometer, velocities=velocities * unit.nanometer / unit.picosecond)
    md = SeededLangevinDynamicsMove(random_seed=openmm_seed(seed, walker), timestep=timestep_fs * unit.femtosecond,
                                    collision_rate=system.spec.friction / unit.picosecond, n_steps=md_steps)
    move = None
    if flow_moves:
        move = FlowIndependenceMove(flow, flow_path=flow_path, molecular_system=system, reject_d_chirality=True,
                                    seed=int(np.random.SeedSequence([seed, walker, 1]).generate_state(1)[0]))
    ctx = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"), capacity=2)
    phi_idx = [system.torsions["phi1"]]

    def phi() -> float:
        return float(dihedrals(np.asarray(state.positions.value_in_unit(unit.nanometer))[None], phi_idx)[0, 0])

    angles, md_cpu, flow_cpu, n_md = [phi()], 0.0, 0.0, 0
    start_cpu = time.process_time()
    while time.process_time() - start_cpu < cpu_budget:
        t0 = time.process_time()
        md.apply(thermo, state, context_cache=ctx)
        t1 = time.process_time()
        angles.append(phi())
        md_cpu += t1 - t0
        n_md += 1
        for _ in range(flow_moves):
            t2 = time.process_time()
            move.apply(thermo, state, context_cache=ctx)
            flow_cpu += time.process_time() - t2
            angles.append(phi())
    return {"cpu_s": time.process_time() - start_cpu, "phi": np.array(angles), "md_cpu_s": md_cpu,
            "flow_cpu_s": flow_cpu, "n_md": n_md, "counters": move.statistics if move else None}


def run_chain(system, flow, flow_path, starts, args, flow_moves: int) -> dict:
    """All walkers of one chain type; P(phi1 > 0) = mean over walkers, error sqrt(sum err^2) / W."""
    walkers = [run_walker(system, flow, flow_path, x, cpu_budget=args.cpu_budget, md_steps=args.md_steps,
                          timestep_fs=args.timestep_fs, flow_moves=flow_moves, seed=args.seed, walker=w)
               for w, x in enumerate(starts)]
    stats = [block_mean_error(r["phi"] > 0, args.blocks) for r in walkers]
    cpu = sum(r["cpu_s"] for r in walkers)
    crossings = sum(sign_changes(r["phi"]) for r in walkers)
    n_prop = sum(r["counters"]["n_proposed"] for r in walkers) if flow_moves else 0
    n_acc = sum(r["counters"]["n_accepted"] for r in walkers) if flow_moves else 0
    n_md = sum(r["n_md"] for r in walkers)
    return {"flow_moves": flow_moves, "cpu_s": cpu, "records": sum(r["phi"].size for r in walkers),
            "crossings": crossings, "crossings_per_cpu_s": crossings / cpu,
            "p_pos": float(np.mean([s[0] for s in stats])),
            "p_pos_err": float(math.sqrt(sum(s[1] ** 2 for s in stats)) / len(stats)),
            "acceptance": n_acc / n_prop if n_prop else math.nan,
            "cpu_s_per_flow_move": sum(r["flow_cpu_s"] for r in walkers) / n_prop if n_prop else math.nan,
            "cpu_s_per_md_segment": sum(r["md_cpu_s"] for r in walkers) / n_md if n_md else math.nan,
            "ps_simulated": n_md * args.md_steps * args.timestep_fs / 1000.0}


def flow_reference(system, flow, n: int, seed: int) -> tuple[float, float, float]:
    """P(phi1 > 0) from ``n`` reweighted flow samples (D-chirality weight 0): (p, delta-method error, Kish ESS/N)."""
    from regflow_mm.energy import EnergyEvaluator
    from regflow_mm.sampling import draw_weighted_samples, weighted_mean

    with EnergyEvaluator(system, n_workers=0, platform="Reference") as evaluator:
        samples = draw_weighted_samples(flow, evaluator, n, chunk_size=5000, seed=seed, molecular_system=system,
                                        progress=False)
    log_w = np.where(samples.is_l, samples.log_w, -np.inf)
    p, err = weighted_mean(samples.torsions["phi1"] > 0, log_w)
    return float(p), float(err), float(kish_ess(log_w)["ess"])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", required=True, help="trained aldp flow")
    parser.add_argument("--dataset", required=True, help="aldp MD dataset (start frames and the data reference)")
    parser.add_argument("--cpu-budget", type=float, default=60.0, help="CPU s per walker and chain")
    parser.add_argument("--walkers", type=int, default=2, help="walkers per chain (start frames spread over the data)")
    parser.add_argument("--md-steps", type=int, default=250, help="Langevin steps per MD segment")
    parser.add_argument("--timestep-fs", type=float, default=1.0)
    parser.add_argument("--flow-moves", default="1,4,16", help="flow moves per MD segment, comma-separated")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per walker for the error bars")
    parser.add_argument("--flow-samples", type=int, default=20_000, help="reweighted flow samples (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-md", default=str(Path(__file__).resolve().parent / "results" / "bench_crossings.md"),
                        help="also write the markdown here ('' to skip)")
    args = parser.parse_args(argv)
    try:
        ks = [int(k) for k in args.flow_moves.split(",")]
    except ValueError:
        parser.error(f"--flow-moves must be comma-separated integers, got {args.flow_moves!r}")
    if any(k < 1 for k in ks) or args.walkers < 1 or args.blocks < 2 or not args.cpu_budget > 0:
        parser.error("--flow-moves entries and --walkers must be >= 1, --blocks >= 2, --cpu-budget > 0")
    torch.set_num_threads(1)

    dataset = load_dataset(args.dataset)
    system = dataset.system
    flow = load_flow(args.flow, system=system).eval()
    frames = dataset.split_indices("train")
    starts = [dataset.positions[frames[int(i)]].astype(np.float64)
              for i in np.linspace(0, frames.size - 1, args.walkers).round()]

    rows = [run_chain(system, flow, args.flow, starts, args, 0)] + [run_chain(system, flow, args.flow, starts, args, k)
                                                                     for k in ks]
    phi_data = dihedrals(dataset.positions.astype(np.float64), [system.torsions["phi1"]])[:, 0]
    p_data, e_data = block_mean_error(phi_data > 0, args.blocks, dataset.log_weights)
    reference = flow_reference(system, flow, args.flow_samples, args.seed) if args.flow_samples else None

    lines = ["# bench_crossings: aldp, hybrid MD + flow vs plain MD at equal CPU time",
             "",
             f"Command: `{' '.join(['benchmarks/bench_crossings.py'] + (sys.argv[1:] if argv is None else argv))}`  ",
             f"Flow {args.flow} (sha256 {flow_file_hash(args.flow)[:12]}); dataset {args.dataset} "
             f"({len(dataset)} frames{', weighted' if dataset.weighted else ''}).  ",
             f"{args.walkers} walkers x {args.cpu_budget:g} CPU s per chain; MD segment {args.md_steps} x "
             f"{args.timestep_fs:g} fs Langevin ({system.spec.friction:g}/ps); Reference platform, 1 thread; "
             f"{_platform.node()}, {date.today().isoformat()}.",
             "",
             "| chain | CPU s | ps MD | records | phi1 sign changes | changes / CPU s | P(phi1 > 0) | acceptance "
             "| CPU s / flow move | CPU s / MD segment |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "plain MD" if r["flow_moves"] == 0 else f"hybrid, {r['flow_moves']} flow moves / MD segment"
        lines.append(f"| {name} | {r['cpu_s']:.1f} | {r['ps_simulated']:.1f} | {r['records']} | {r['crossings']} | "
                     f"{r['crossings_per_cpu_s']:.4f} | {r['p_pos']:.4f} +- {r['p_pos_err']:.4f} | "
                     f"{r['acceptance']:.4f} | {r['cpu_s_per_flow_move']:.2e} | {r['cpu_s_per_md_segment']:.2e} |")
    plain = rows[0]
    best = max(rows[1:], key=lambda r: r["crossings_per_cpu_s"])
    if plain["crossings"]:
        ratio = f"{best['crossings_per_cpu_s'] / plain['crossings_per_cpu_s']:.1f}x"
    else:  # no plain-MD crossing: the ratio to a rate of one crossing in plain MD's CPU time
        ratio = (f"> {best['crossings_per_cpu_s'] * plain['cpu_s']:.1f}x (plain MD: 0 crossings in "
                 f"{plain['cpu_s']:.0f} CPU s; ratio to one crossing in that time)")
    lines += ["", f"Best hybrid ({best['flow_moves']} flow moves / MD segment) vs plain MD, crossings per CPU s: "
                  f"{ratio}.", "",
              "| reference P(phi1 > 0) | value |", "|---|---|",
              f"| MD dataset ({'frame weights, ' if dataset.weighted else ''}block error) | {p_data:.4f} +- "
              f"{e_data:.4f} |"]
    if reference:
        lines.append(f"| reweighted flow, {args.flow_samples} samples (Kish ESS/N {reference[2]:.4f}) | "
                     f"{reference[0]:.4f} +- {reference[1]:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(text)
    return text


if __name__ == "__main__":
    main()
