"""The RegFlow route vs MLE from scratch over seeds, on a finished pipeline run's data (issue 11).

For each seed, with the run's own flow, optimiser and student CPU budget B (``[train].time_budget_s``):

- ``mle``: MLE from scratch for B CPU-s (the run's baseline settings: weighted last part, keep-best);
- ``route``: a RegFlow student (the run's teacher settings, reflow pairs) for (1 - f) B, then MLE fine-tuning
  from it for f B (``runner.run_regflow_then_mle``): equal *student* CPU time;
- ``mle_total`` (``--equal-total-seeds``): MLE from scratch for B + the route's teacher and pair CPU time,
  i.e. equal *total* CPU time.

Every flow is evaluated as the pipeline's evaluate stage does (the held-out reference run with its frame
weights, ``--n-samples`` samples, bootstrap ESS interval). Rows are appended to WORKDIR/rows.jsonl as they
finish, so the run resumes after a kill and two processes (``--seeds 0 2 4`` and ``--seeds 1 3``) can share a
workdir; ``--report`` writes the table from the rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_regflow_route.py --run demo-output --seeds 0 1 2 3 4 \
        --equal-total-seeds 0 1 2 --workdir runs/route
    .venv/bin/python benchmarks/bench_regflow_route.py --run demo-output --workdir runs/route --report
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
from regflow_mm.pipeline.config import train_settings, validate
from regflow_mm.training.evaluation import evaluate_flow, scalar_metrics
from regflow_mm.training.runner import run_regflow_then_mle, run_training
from regflow_mm.training.trainer import TrainConfig, TrainingDiverged

METHODS = ("mle", "route", "mle_total")


def evaluate(folder: Path, reference, seed: int, args) -> dict:
    flow = load_flow(folder / "flow.pt", system=reference.system)
    log_w = reference.log_weights if reference.weighted else None
    with EnergyEvaluator(reference.system, n_workers=0) as evaluator, torch.no_grad():
        res = evaluate_flow(flow, reference.system, reference.positions, reference.reduced_energies(),
                            evaluator=evaluator, n_samples=args.n_samples, seed=seed, n_torsion=args.n_torsion,
                            n_bootstrap=200, md_log_weights=log_w)
    return scalar_metrics(res)


def train_one(method: str, seed: int, config: dict, data: str, work: Path, args, rows: list[dict]) -> dict:
    budget = config["train"]["time_budget_s"]
    mle = {**train_settings(config, method="mle"), "seed": seed, "data": data}
    t = time.process_time()
    if method == "route":
        as_regflow = {**config, "train": {**config["train"], "method": "regflow"}}  # runs whose main flow is MLE (al4)
        regflow = {**train_settings(as_regflow), "seed": seed, "data": data,
                   "time_budget_s": (1.0 - args.mle_fraction) * budget}
        folder = work / f"route_s{seed}"
        info = run_regflow_then_mle(TrainConfig.from_dict(regflow),
                                    TrainConfig.from_dict({**mle, "time_budget_s": args.mle_fraction * budget}),
                                    folder, progress=False)
        student = info["regflow"]
        folder = folder / "mle_finetune"
        extra = {"teacher_s": student.get("teacher_train_s", 0.0), "pairs_s": student.get("pairs_s", 0.0),
                 "student_cpu_s": student["train"]["cpu_time_s"],
                 "student_compile_cpu_s": student["train"].get("compile_cpu_s", 0.0)}
    else:
        if method == "mle_total":
            route = next((r for r in rows if r["method"] == "route" and r["seed"] == seed), None)
            if route is None:
                raise ValueError(f"mle_total of seed {seed} needs that seed's route row first (its teacher cost)")
            budget = budget + route["teacher_s"] + route["pairs_s"]
        folder = work / f"{method}_s{seed}"
        info = run_training(TrainConfig.from_dict({**mle, "time_budget_s": budget}), folder, progress=False)
        extra = {}
    return {"method": method, "seed": seed, "budget_s": budget, "train_cpu_s": info["train"]["cpu_time_s"],
            "best_step": info["train"]["best_step"], "steps": info["train"]["step"],
            "compile_cpu_s": info["train"].get("compile_cpu_s", 0.0),
            "process_cpu_s": time.process_time() - t, **extra}


def report(args, config: dict, rows: list[dict]) -> str:
    cols = ("ess", "ess_p05", "ess_p95", "e_w1", "t_w2", "nll", "above_max_fraction", "d_fraction")
    lines = ["| method | seed | student CPU-s | ESS [5%, 95%] | E-W1 (kT) | T-W2 (rad) | NLL | above max ref. energy "
             "| D | basins missed |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["seed"])):
        if r.get("diverged_step") is not None:
            lines.append(f"| {r['method']} | {r['seed']} | {r['budget_s']:.0f} | diverged at step {r['diverged_step']} "
                         f"({r['error']}) | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['seed']} | {r['budget_s']:.0f} | {r['ess']:.2%} [{r['ess_p05']:.2%}, "
                     f"{r['ess_p95']:.2%}] | {r['e_w1']:.3f} | {r['t_w2']:.3f} | {r['nll']:.2f} "
                     f"| {r['above_max_fraction']:.4f} | {r['d_fraction']:.4f} | {r['basins_missing']} |")
    summary = ["| method | seeds | diverged | median ESS | median E-W1 (kT) | median T-W2 (rad) | median NLL |",
               "|---|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        done = [r for r in mine if r.get("diverged_step") is None]
        if mine:
            med = {c: float(np.median([r[c] for r in done])) if done else float("nan") for c in cols}
            summary.append(f"| {method} | {', '.join(str(r['seed']) for r in sorted(mine, key=lambda r: r['seed']))} "
                           f"| {len(mine) - len(done)} of {len(mine)} | **{med['ess']:.2%}** | **{med['e_w1']:.3f}** "
                           f"| {med['t_w2']:.3f} | {med['nll']:.2f} |")
    route = [r for r in rows if r["method"] == "route" and r.get("diverged_step") is None]
    cost = (f"teacher {np.mean([r['teacher_s'] for r in route]):.0f} s + reflow pairs "
            f"{np.mean([r['pairs_s'] for r in route]):.0f} s per seed (wall, one thread)") if route else "-"
    b = config["train"]["time_budget_s"]
    total_seeds = sorted(r["seed"] for r in rows if r["method"] == "mle_total")
    total = f" --equal-total-seeds {' '.join(map(str, total_seeds))}" if total_seeds else ""
    return f"""# bench_regflow_route: RegFlow then MLE vs MLE from scratch, {len({r['seed'] for r in rows})} seeds

Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_regflow_route.py --run {args.run} --seeds \
{' '.join(str(r['seed']) for r in sorted(rows, key=lambda r: r['seed']) if r['method'] == 'mle')}{total} --mle-fraction {args.mle_fraction} --n-samples {args.n_samples} --workdir {args.workdir}` (two processes side by
side on the two cores, seeds split between them). Machine: 2-core CPU, no GPU ({platform.processor() or
platform.machine()}, 1 torch thread per process), shared. Date: {datetime.date.today().isoformat()}.
Data: the run's training frames; evaluation against its held-out reference run with the frame weights,
{args.n_samples} samples per flow, T-W2 on {args.n_torsion} per side, bootstrap ESS interval (200 resamples).
Student budget B = {b:g} CPU-s. route: RegFlow student for {(1 - args.mle_fraction) * b:.0f} CPU-s on the run's
reflow pairs, then MLE from it for {args.mle_fraction * b:.0f} CPU-s (the baseline's settings); mle: MLE from
scratch for B; mle_total: MLE from scratch for B + the route's teacher and pair time (equal total CPU).
Teacher and pair cost: {cost}.

{chr(10).join(summary)}

{chr(10).join(lines)}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="finished pipeline output folder")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--equal-total-seeds", type=int, nargs="*", default=[])
    p.add_argument("--mle-fraction", type=float, default=0.85, help="fraction of B for the MLE fine-tuning")
    p.add_argument("--n-samples", type=int, default=50_000)
    p.add_argument("--n-torsion", type=int, default=5000)
    p.add_argument("--workdir", required=True)
    p.add_argument("--report", action="store_true", help="only write the report from WORKDIR/rows.jsonl")
    p.add_argument("--out", default="benchmarks/results/bench_regflow_route.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, work = Path(args.run), Path(args.workdir)
    config = validate(json.loads((run / "config.json").read_text()))
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"

    def rows() -> list[dict]:
        return [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []

    if not args.report:
        # a finished run's metrics.json, else the stage records (a run still training its flows)
        stages = (json.loads((run / "metrics.json").read_text())["stages"] if (run / "metrics.json").exists() else
                  {name: json.loads((run / name / "stage.json").read_text())["results"] for name in ("md", "reference")})
        reference = load_dataset(stages["reference"]["reference"])
        jobs = [(m, s) for s in args.seeds for m in ("mle", "route")] + [("mle_total", s) for s in args.equal_total_seeds]
        for method, seed in jobs:
            if any(r["method"] == method and r["seed"] == seed for r in rows()):
                continue
            try:
                row = train_one(method, seed, config, stages["md"]["dataset"], work, args, rows())
            except TrainingDiverged as err:  # a failure to count, not a crash of the benchmark
                row = {"method": method, "seed": seed, "budget_s": config["train"]["time_budget_s"],
                       "diverged_step": err.step, "error": str(err)}
            else:
                folder = work / (f"route_s{seed}/mle_finetune" if method == "route" else f"{method}_s{seed}")
                row.update(evaluate(folder, reference, seed, args), diverged_step=None)
            print(json.dumps(row), flush=True)
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    text = report(args, config, rows())
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
