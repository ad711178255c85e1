"""Seed spread of a finished pipeline run's downstream flow: retrain it with other seeds on the same data.

Reads ``RUN/config.json`` and the MD / reference runs of a finished ``regflow-mm pipeline`` run,
trains the baseline (MLE) flow with each seed under the run's own settings and CPU budget
(``config.train_settings``, the real Trainer), evaluates every flow against the run's held-out
reference with its frame weights, exactly as the pipeline's evaluate stage does, and prints a
Markdown table (the run's own seed: its flow, read from its metrics).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_flow_seeds.py --run demo-output --seeds 1 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_flow_seeds.py --run demo-output --seeds 0 \
        --set reweight_fraction=0.3 --out rw   # a setting changed, side by side with the run's seeds
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from regflow_mm.data import load_dataset
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.pipeline.config import train_settings, validate
from regflow_mm.training.evaluation import evaluate_flow, scalar_metrics
from regflow_mm.training.runner import run_training
from regflow_mm.training.trainer import TrainConfig

COLUMNS = ("ess", "ess_p05", "ess_p95", "e_w1", "t_w2", "above_max_fraction", "d_fraction", "nll")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="finished pipeline output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default=None, help="folder of the retrained flows (default RUN/seeds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a training setting of the run, e.g. --set reweight_fraction=0.3 (the run's own "
                        "flow is then not in the table)")
    args = p.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    config = validate(json.loads((run / "config.json").read_text()))
    stages = json.loads((run / "metrics.json").read_text())["stages"]
    method = config["baseline"]["method"]
    reference = load_dataset(stages["reference"]["reference"])
    evaluate = config["evaluate"]
    own_seed = config["run"]["seed"]
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows = {} if overrides else {own_seed: stages["evaluate"]["metrics"][method]}
    out = Path(args.out) if args.out else run / "seeds"
    with EnergyEvaluator(reference.system, n_workers=0) as evaluator:
        for seed in args.seeds:
            settings = {**train_settings(config, method=method), "seed": seed, "data": stages["md"]["dataset"],
                        **overrides}
            started = time.process_time()
            run_training(TrainConfig.from_dict(settings), out / f"seed{seed}", progress=False)
            flow = load_flow(out / f"seed{seed}" / "flow.pt", system=reference.system)
            res = evaluate_flow(flow, reference.system, reference.positions, reference.reduced_energies(),
                                evaluator=evaluator, n_samples=evaluate["n_samples"], seed=seed,
                                n_torsion=evaluate["n_torsion"], n_bootstrap=evaluate["n_bootstrap"],
                                md_log_weights=reference.log_weights if reference.weighted else None)
            rows[seed] = {**scalar_metrics(res), "cpu_s": time.process_time() - started}
            print(f"seed {seed}: " + ", ".join(f"{k} {rows[seed].get(k, float('nan')):.4g}" for k in COLUMNS),
                  flush=True)
    print(f"\n{method} flows of {run} ({evaluate['n_samples']} samples each, reference "
          f"{len(reference)} frames{' with weights' if reference.weighted else ''})\n")
    print("| seed | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for seed, row in rows.items():
        print(f"| {seed}{' (pipeline)' if seed == own_seed and not overrides else ''} | " +
              " | ".join(f"{row.get(k, float('nan')):.4g}" for k in COLUMNS) + " |")
    if overrides:
        print(f"\nsettings changed from the run's: {overrides}")
    values = {k: np.array([row[k] for row in rows.values() if k in row]) for k in COLUMNS}
    print("| mean +- sd | " + " | ".join(f"{v.mean():.4g} +- {v.std(ddof=1) if v.size > 1 else 0:.2g}"
                                        for v in values.values()) + " |")


if __name__ == "__main__":
    main()
