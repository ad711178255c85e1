"""Training data with equivalent atoms relabelled vs as simulated, on a finished pipeline run's data (issue 10).

Short MD fills the three equivalent wells of a methyl or ammonium rotor unequally (a hop every ~0.1-1 ns);
``systems.symmetry`` gives every training frame a random cyclic relabelling of each group, so that the data
sample the symmetric ensemble. This script shows the data's well populations (first and second half of the
training run, and the held-out reference) and trains the same flow on the same frames with and without
relabelling, side by side, each evaluated like the pipeline's flows (the reference run with its frame
weights, ``--n-samples`` samples, bootstrap ESS interval). Rows go to WORKDIR/rows.jsonl as they finish (the
run resumes after a kill; two processes can share the workdir, e.g. ``--relabel 1`` and ``--relabel 0``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relabel.py --run runs/al3 --flow smooth --budget-s 900 \
        --relabel 1 --workdir runs/relabel_al3 &
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relabel.py --run runs/al3 --flow smooth --budget-s 900 \
        --relabel 0 --workdir runs/relabel_al3
    .venv/bin/python benchmarks/bench_relabel.py --run runs/al3 --workdir runs/relabel_al3 --report
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.importance import normalized_weights
from regflow_mm.pipeline.config import smooth_settings, train_settings, validate
from regflow_mm.systems.symmetry import equivalent_atom_groups
from regflow_mm.training.evaluation import evaluate_flow, scalar_metrics
from regflow_mm.training.runner import run_training
from regflow_mm.training.trainer import TrainConfig


def well_populations(dataset, group, weighted: bool) -> np.ndarray:
    """Fraction (m,) of frames with each of the m cyclic labellings of ``group``: the well of its first atom
    in the torsion about the bond from the group's parent to the parent's first other neighbour."""
    top = dataset.system.topology
    neighbours = {a.index: set() for a in top.atoms()}
    for bond in top.bonds():
        neighbours[bond[0].index].add(bond[1].index)
        neighbours[bond[1].index].add(bond[0].index)
    parent = next(iter(neighbours[group[0]]))
    q = min(neighbours[parent] - set(group))
    r = min(neighbours[q] - {parent})
    tau = dihedrals(dataset.positions, [(group[0], parent, q, r)])[:, 0]
    m = len(group)
    well = np.round(tau / (2 * np.pi / m)).astype(int) % m
    w = normalized_weights(dataset.log_weights) if weighted else np.full(len(well), 1 / len(well))
    return np.bincount(well, weights=w, minlength=m)


def data_table(md, reference, groups) -> str:
    atoms = list(md.system.topology.atoms())
    half = len(md) // 2
    first, second = (load_part(md, slice(0, half)), load_part(md, slice(half, None)))
    lines = ["| group | training run, first half | second half | reference (weighted) |", "|---|---|---|---|"]
    for g in groups:
        name = f"{atoms[g[0]].residue.name}{atoms[g[0]].residue.index + 1}:" + "/".join(atoms[i].name for i in g)
        cells = [" / ".join(f"{p:.2f}" for p in well_populations(d, g, weighted))
                 for d, weighted in ((first, False), (second, False), (reference, True))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_part(dataset, part: slice):
    from dataclasses import replace
    return replace(dataset, positions=dataset.positions[part], energies=dataset.energies[part],
                   forces=dataset.forces[part], time=dataset.time[part], log_weights=dataset.log_weights[part])


def settings_for(config: dict, flow: str) -> dict:
    return smooth_settings(config) if flow == "smooth" else train_settings(config, method="mle")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="finished pipeline output folder (its md and reference data)")
    p.add_argument("--flow", choices=("smooth", "mle"), default="smooth",
                   help="the run's [smooth] flow or its MLE spline flow ([train] settings)")
    p.add_argument("--budget-s", type=float, default=None, help="training CPU-s (default: the run's)")
    p.add_argument("--relabel", type=int, nargs="*", default=[1, 0], help="1: relabelled, 0: as simulated")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--n-samples", type=int, default=50_000)
    p.add_argument("--n-torsion", type=int, default=5000)
    p.add_argument("--workdir", required=True)
    p.add_argument("--report", action="store_true", help="only write the report from WORKDIR/rows.jsonl")
    p.add_argument("--out", default="benchmarks/results/bench_relabel.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, work = Path(args.run), Path(args.workdir)
    config = validate(json.loads((run / "config.json").read_text()))
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    md, reference = load_dataset(stages["md"]["dataset"]), load_dataset(stages["reference"]["reference"])
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []

    if not args.report:
        for seed in args.seeds:
            for relabel in args.relabel:
                if any(r["relabel"] == relabel and r["seed"] == seed and r["flow"] == args.flow for r in rows()):
                    continue
                settings = {**settings_for(config, args.flow), "data": stages["md"]["dataset"], "seed": seed,
                            "relabel_equivalent_atoms": bool(relabel)}
                if args.budget_s:
                    settings["time_budget_s"] = args.budget_s
                folder = work / f"{args.flow}_relabel{relabel}_s{seed}"
                t = time.process_time()
                info = run_training(TrainConfig.from_dict(settings), folder, progress=False)
                flow = load_flow(folder / "flow.pt", system=reference.system)
                with EnergyEvaluator(reference.system, n_workers=0) as evaluator, torch.no_grad():
                    res = evaluate_flow(flow, reference.system, reference.positions, reference.reduced_energies(),
                                        evaluator=evaluator, n_samples=args.n_samples, seed=seed,
                                        n_torsion=args.n_torsion, n_bootstrap=200,
                                        md_log_weights=reference.log_weights if reference.weighted else None)
                row = {"flow": args.flow, "relabel": relabel, "seed": seed,
                       "budget_s": settings["time_budget_s"], "train_cpu_s": info["train"]["cpu_time_s"],
                       "process_cpu_s": time.process_time() - t, **scalar_metrics(res)}
                print(json.dumps(row), flush=True)
                with open(rows_path, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    groups = equivalent_atom_groups(md.system)
    lines = ["| flow | relabelled | seed | CPU-s | Kish ESS [5%, 95%] | E-W1 (kT) | T-W2 (rad) | NLL | above max ref. "
             "energy | basins missed |", "|" + "---|" * 10]
    for r in sorted(rows(), key=lambda r: (r["flow"], -r["relabel"], r["seed"])):
        lines.append(f"| {r['flow']} | {'yes' if r['relabel'] else 'no'} | {r['seed']} | {r['budget_s']:.0f} | "
                     f"{r['ess']:.2%} [{r['ess_p05']:.2%}, {r['ess_p95']:.2%}] | {r['e_w1']:.3f} | {r['t_w2']:.3f} | "
                     f"{r['nll']:.2f} | {r['above_max_fraction']:.2%} | {r['basins_missing']} |")
    text = f"""# bench_relabel: equivalent atoms relabelled vs as simulated ({md.system.name})

Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_relabel.py --run {args.run} --flow ... --relabel ...
--workdir {args.workdir}` (two processes side by side on the two cores). Machine: 2-core CPU, no GPU
({platform.processor() or platform.machine()}, 1 torch thread per process), shared. Date: {datetime.date.today().isoformat()}.
Data: the run's {len(md)} training frames ({md.time[-1] / 1000:.1f} ns); evaluation against its held-out reference
run with the frame weights, {args.n_samples} samples per flow, T-W2 on {args.n_torsion} per side, bootstrap ESS
interval (200 resamples).

Well populations of each group of equivalent atoms (each cyclic labelling's fraction of frames; the ensemble
has exactly 1/{len(groups[0]) if groups else 3} in each):

{data_table(md, reference, groups)}

{chr(10).join(lines)}
"""
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
