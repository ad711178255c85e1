"""Training stability in Cartesian coordinates, RegFlow vs MLE, over seeds (aldp, the RegFlow paper's setting).

The paper's claim: an NSF trained by MLE on Cartesian aldp is unstable (E-W1 13.8 kT, Res-NVP > 1e3) while
RegFlow on reflow pairs trains stably (0.50 kT). Here, at a CPU scale: for each seed, the same NSF on the same
frames (a finished pipeline run's training data) trained by MLE and by RegFlow (standardised teacher CNF,
reflow pairs) for the same student CPU time, then counted: runs that diverged (non-finite loss or gradient),
D-chirality of raw samples (the Cartesian failure mode), and the usual metrics against the run's held-out
reference with its frame weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cartesian_stability.py --run demo-output \
        --seeds 0 1 2 --budget-s 150 --workdir runs/cart_stab
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
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.training.evaluation import evaluate_flow, scalar_metrics
from regflow_mm.training.runner import run_training
from regflow_mm.training.trainer import TrainConfig, TrainingDiverged

PAPER = {"mle": "NSF 13.797 / 1.243, Res-NVP > 1e3", "regflow": "NSF 0.501 / 0.951, Res-NVP 2.104"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="finished pipeline output folder (its md and reference stages)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget-s", type=float, default=150.0, help="student training CPU seconds per run")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--n-pairs", type=int, default=20_000)
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="benchmarks/results/bench_cartesian_stability.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    data = stages["md"]["dataset"]
    reference = load_dataset(stages["reference"]["reference"])
    system = reference.system
    ref_x, ref_u = reference.positions, reference.reduced_energies()
    ref_log_w = reference.log_weights if reference.weighted else None
    workdir = Path(args.workdir)
    common = dict(system=system.name, data=data, representation="cartesian", architecture="nsf",
                  hyper={"layers": 6, "hidden": 128}, batch_size=256, epochs=10_000, lr=1e-3, lr_schedule="cosine",
                  time_budget_s=args.budget_s, device="cpu", val_samples=0, checkpoint_every=10_000, log_every=100,
                  keep_best=True, val_every_epochs=1)
    rows = []
    results = workdir / "rows.jsonl"
    done = {(r["method"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.exists() else set()
    workdir.mkdir(parents=True, exist_ok=True)
    with EnergyEvaluator(system, n_workers=0) as evaluator:
        for seed in args.seeds:
            for method in ("mle", "regflow"):
                if (method, seed) in done:
                    continue
                extra = dict(target="reflow", n_pairs=args.n_pairs, teacher_steps=args.teacher_steps) \
                    if method == "regflow" else {}
                cfg = TrainConfig(method=method, seed=seed, **common, **extra)
                folder = workdir / f"{method}_s{seed}"
                row = {"method": method, "seed": seed}
                t = time.process_time()
                try:
                    info = run_training(cfg, folder, progress=False)
                    row.update(diverged=False, steps=info["train"]["step"], train_cpu_s=info["train"]["cpu_time_s"],
                               teacher_s=info.get("teacher_train_s", 0.0), pairs_s=info.get("pairs_s", 0.0))
                except TrainingDiverged as err:
                    row.update(diverged=True, steps=err.step, error=str(err).split(";")[0])
                row["cpu_s"] = time.process_time() - t
                if not row["diverged"]:
                    flow = load_flow(folder / "flow.pt", system=system)
                    with torch.no_grad():
                        res = evaluate_flow(flow, system, ref_x, ref_u, evaluator=evaluator,
                                            n_samples=args.n_samples, seed=seed, md_log_weights=ref_log_w,
                                            n_bootstrap=200)
                    row.update(scalar_metrics(res))
                print(json.dumps(row, default=float), flush=True)
                with open(results, "a") as fh:
                    fh.write(json.dumps(row, default=float) + "\n")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    lines = ["| method | seed | diverged | steps | ESS [5%, 95%] | E-W1 (kT) | T-W2 (rad) | D-chirality (raw) "
             "| above max ref. energy | NLL |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        if r["diverged"]:
            lines.append(f"| {r['method']} | {r['seed']} | **yes** (step {r['steps']}) | - | - | - | - | - | - | - |")
            continue
        lines.append(f"| {r['method']} | {r['seed']} | no | {r['steps']} | {r['ess']:.2e} [{r['ess_p05']:.1e}, "
                     f"{r['ess_p95']:.1e}] | {r['e_w1']:.3g} | {r['t_w2']:.3f} | {r['d_fraction']:.4f} "
                     f"| {r['above_max_fraction']:.3f} | {r['nll']:.1f} |")
    summary = []
    for method in ("mle", "regflow"):
        mine = [r for r in rows if r["method"] == method]
        ok = [r for r in mine if not r["diverged"]]
        bad_d = sum(r["d_fraction"] > 0.001 for r in ok)
        med = np.median([r["e_w1"] for r in ok]) if ok else float("nan")
        summary.append(f"| {method} | {len(mine)} | {len(mine) - len(ok)} | {bad_d} | {med:.3g} | {PAPER[method]} |")
    table = "\n".join(lines)
    summary_table = "\n".join(["| method | seeds | diverged | D-chirality > 0.1% | median E-W1 (kT) | published "
                               "E-W1 / T-W2 (GPU, millions of pairs) |", "|---|---|---|---|---|---|", *summary])
    print(summary_table)
    teacher = [r for r in rows if r["method"] == "regflow" and "teacher_s" in r]
    cost = (f"teacher {np.mean([r['teacher_s'] for r in teacher]):.0f} s + pairs "
            f"{np.mean([r['pairs_s'] for r in teacher]):.0f} s per seed (wall)") if teacher else "-"
    report = f"""# bench_cartesian_stability: RegFlow vs MLE in Cartesian coordinates over seeds (aldp)

Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cartesian_stability.py --run {args.run} --seeds \
{' '.join(map(str, args.seeds))} --budget-s {args.budget_s:g} --teacher-steps {args.teacher_steps} --n-pairs \
{args.n_pairs} --n-samples {args.n_samples} --workdir {args.workdir}`
Machine: 2-core CPU, no GPU ({platform.processor() or platform.machine()}, 1 torch thread), shared. Date:
{datetime.date.today().isoformat()}. Data: the training frames of `{data}` ({stages['md'].get('n_frames', '?')}
frames); metrics against the held-out reference run with its frame weights, {args.n_samples} samples per flow.
Both methods: NSF 6 x 128 on mean-free Cartesian coordinates, batch 256, lr 1e-3 cosine over {args.budget_s:g}
CPU-s, EMA, best validation NLL kept. RegFlow: reflow pairs of a standardised teacher CNF ({args.teacher_steps}
steps; {cost}, not counted in the student budget).

{summary_table}

{table}
"""
    Path(args.out).write_text(report)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
