"""The RegFlow student's log-det regulariser by measurement: students on the same teacher and reflow pairs, each
for the run's RegFlow student budget, with ``regularizer = "none"`` and with the log-det penalty at several
weights, evaluated like every pipeline flow (issue 11: "the log-det regulariser re-centred or dropped by
measurement").

Each seed's teacher and pairs come from ``--pairs-from DIR/route_s{seed}`` (a ``bench_regflow_route.py``
workdir: ``teacher.pt`` and ``pairs_reflow.h5``, reused through the pair store's hash check) so that the
variants differ in the regulariser alone. Rows are appended to WORKDIR/rows.jsonl as they finish (resumable).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_regflow_regularizer.py --run demo-output \
        --pairs-from runs/route --seeds 0 --lambdas 0 1e-6 1e-4 --workdir runs/regularizer
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from bench_regflow_route import evaluate  # same folder: the route benchmark's evaluation, unchanged
from regflow_mm.data import load_dataset
from regflow_mm.pipeline.config import train_settings, validate
from regflow_mm.training.runner import run_training
from regflow_mm.training.trainer import TrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="finished pipeline output folder (config, data, reference)")
    p.add_argument("--pairs-from", required=True, help="bench_regflow_route workdir with route_s{seed}/ teachers")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--lambdas", type=float, nargs="*", default=[0.0, 1e-6, 1e-4],
                   help="log-det penalty weights; 0 means regularizer = none")
    p.add_argument("--n-samples", type=int, default=50_000)
    p.add_argument("--n-torsion", type=int, default=5000)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="benchmarks/results/bench_regflow_regularizer.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, work = Path(args.run), Path(args.workdir)
    config = validate(json.loads((run / "config.json").read_text()))
    stages = {name: json.loads((run / name / "stage.json").read_text())["results"] for name in ("md", "reference")}
    reference = load_dataset(stages["reference"]["reference"])
    budget = (1.0 - config["train"]["mle_finetune_fraction"]) * config["train"]["time_budget_s"]
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    as_regflow = {**config, "train": {**config["train"], "method": "regflow"}}
    for seed in args.seeds:
        for lam in args.lambdas:
            if any(r["seed"] == seed and r["lambda_r"] == lam for r in rows):
                continue
            folder = work / f"s{seed}_lambda{lam:g}"
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("teacher.pt", "pairs_reflow.h5"):
                if not (folder / name).exists():
                    shutil.copy(Path(args.pairs_from) / f"route_s{seed}" / name, folder / name)
            settings = {**train_settings(as_regflow), "seed": seed, "data": stages["md"]["dataset"],
                        "time_budget_s": budget, "regularizer": "logdet" if lam > 0 else "none", "lambda_r": lam}
            info = run_training(TrainConfig.from_dict(settings), folder, progress=False)
            records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
            last = [r for r in records if r["kind"] == "train"][-1]
            row = {"seed": seed, "lambda_r": lam, "steps": info["train"]["step"],
                   "train_cpu_s": info["train"]["cpu_time_s"], "regression": last.get("regression"),
                   "logdet_sq": last.get("logdet"), **evaluate(folder, reference, seed, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    lines = ["| lambda_r | seed | steps | last regression | lambda_r x logdet^2 | ESS [5%, 95%] | E-W1 (kT) | T-W2 (rad) "
             "| NLL | above max ref. energy |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r["lambda_r"], r["seed"])):
        pen = "-" if r["logdet_sq"] is None else f"{r['lambda_r'] * r['logdet_sq']:.3g}"
        lines.append(f"| {r['lambda_r']:g} | {r['seed']} | {r['steps']} | {r['regression']:.3f} | {pen} "
                     f"| {r['ess']:.3%} [{r['ess_p05']:.3%}, {r['ess_p95']:.3%}] | {r['e_w1']:.3f} | {r['t_w2']:.3f} "
                     f"| {r['nll']:.2f} | {r['above_max_fraction']:.3f} |")
    summary = ["| lambda_r | seeds | median ESS | median E-W1 (kT) | median T-W2 (rad) |", "|---|---|---|---|---|"]
    for lam in sorted({r["lambda_r"] for r in rows}):
        mine = [r for r in rows if r["lambda_r"] == lam]
        summary.append(f"| {lam:g} | {', '.join(str(r['seed']) for r in mine)} | {np.median([r['ess'] for r in mine]):.3%} "
                       f"| {np.median([r['e_w1'] for r in mine]):.3f} | {np.median([r['t_w2'] for r in mine]):.3f} |")
    text = f"""# bench_regflow_regularizer: the RegFlow student's log-det penalty, same teacher and pairs

Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_regflow_regularizer.py --run {args.run} --pairs-from \
{args.pairs_from} --seeds {' '.join(map(str, sorted({r['seed'] for r in rows})))} --lambdas \
{' '.join(f'{v:g}' for v in sorted({r['lambda_r'] for r in rows}))} --workdir {args.workdir}`. Machine: 2-core CPU
({platform.processor() or platform.machine()}, 1 torch thread per process). Date: {datetime.date.today().isoformat()}.
Each student: the run's RegFlow settings (standardised regression), {budget:g} CPU-s (the route's RegFlow share),
loss = regression + lambda_r * mean(log|det|^2) (lambda_r 0: no penalty). Evaluation: {args.n_samples} samples
against the run's weighted reference, bootstrap ESS interval.

{chr(10).join(summary)}

{chr(10).join(lines)}
"""
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
