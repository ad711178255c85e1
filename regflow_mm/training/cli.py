"""`regflow-mm train` and `regflow-mm evaluate`."""
from __future__ import annotations

import argparse
import json
import sys

_TRAIN_FLAGS = {  # flag -> (TrainConfig field, type, help)
    "--data": ("data", str, "MD dataset (.h5) from `regflow-mm simulate`"),
    "--representation": ("representation", str, "cartesian (default), internal or identity"),
    "--architecture": ("architecture", str, "nsf (default), resnvp, ar-nsf, smooth, gaussian"),
    "--method": ("method", str, "regflow (default), mle or nll+fm"),
    "--target": ("target", str, "regflow target: reflow (teacher CNF, default) or ot"),
    "--regression-units": ("regression_units", str, "standardised (default: errors per dimension's spread) or raw"),
    "--regularizer": ("regularizer", str, "none (default), logdet or fwd_bwd"),
    "--lambda-r": ("lambda_r", float, "regulariser weight (default 0)"),
    "--lambda-n": ("lambda_n", float, "target noise scale in flow-space units (default 0)"),
    "--lambda-kl": ("lambda_kl", float, "weight of an added reverse-KL term (default 0: off)"),
    "--epochs": ("epochs", int, "passes over the training rows (default 20)"),
    "--max-steps": ("max_steps", int, "stop after this many optimiser steps"),
    "--time-budget-s": ("time_budget_s", float, "stop after this much training CPU time, s"),
    "--batch-size": ("batch_size", int, "global batch size (default 256)"),
    "--lr": ("lr", float, "AdamW learning rate (default 5e-4)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (default 0.01)"),
    "--ema-decay": ("ema_decay", float, "EMA decay of the weights (default 0.999)"),
    "--grad-clip": ("grad_clip", float, "gradient-norm clip (default 10)"),
    "--data-weight-power": ("data_weight_power", float, "MLE/NLL+FM batches ~ frame weight**power (default 0)"),
    "--reweight-fraction": ("reweight_fraction", float, "MLE/NLL+FM: last fraction of the run on batches ~ frame "
                                                        "weights, validation weighted (default 0: off)"),
    "--seed": ("seed", int, "seed of everything (default 0)"),
    "--dtype": ("dtype", str, "float32 (default) or float64"),
    "--device": ("device", str, "auto (CUDA when present, default), cpu, cuda, cuda:N"),
    "--n-pairs": ("n_pairs", int, "reflow pairs to generate (default: number of training frames)"),
    "--teacher-steps": ("teacher_steps", int, "flow-matching steps of the reflow teacher (default 3000)"),
    "--ode-method": ("ode_method", str, "teacher ODE solver: dopri5 (default), rk4, euler, ..."),
    "--ot-method": ("ot_method", str, "exact (default), minibatch or sinkhorn (approximations)"),
    "--val-samples": ("val_samples", int, "flow samples per validation (default 2000; 0: NLL only)"),
    "--energy-workers": ("energy_workers", int, "energy worker processes (default 0: in-process)"),
    "--pair-workers": ("pair_workers", int, "processes generating reflow pairs (default 0: in-process)"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints (default 500)"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a flow (RegFlow, MLE, NLL+force matching); resumes in --out",
                              description="Train a Boltzmann-generator flow. Settings: defaults < --config file < "
                                          "flags. Rerun the same command to resume after a kill; launch with "
                                          "torchrun for data-parallel training.")
    p.add_argument("system", nargs="?", default=None, help="built-in system (aldp, al3, al4) or a spec .toml")
    p.add_argument("--out", required=True, help="run directory (config, checkpoints, logs, flow.pt)")
    p.add_argument("--config", default=None, help="settings file (.json or .toml) with TrainConfig keys")
    for flag, (_, typ, text) in _TRAIN_FLAGS.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    p.add_argument("--hyper", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture hyper-parameter (JSON value), e.g. --hyper layers=8 --hyper hidden=256")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field (JSON value), e.g. --set teacher_hidden=512")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("evaluate", help="metrics (ESS, E-W1, T-W2, NLL, chirality) and plots of a flow")
    p.add_argument("flow", help="flow file (flow.pt)")
    p.add_argument("--data", required=True, help="reference MD dataset (.h5) of the same system; the frames of an "
                                                 "enhanced-sampling run count with their weights")
    p.add_argument("--split", default="test", help="frames to compare with: train, val, test (default) or all "
                                                   "(an independent reference run)")
    p.add_argument("--n-samples", type=int, default=50_000,
                   help="flow samples (default 50000: ESS from fewer is mostly noise with heavy-tailed weights)")
    p.add_argument("--n-bootstrap", type=int, default=200, help="bootstrap resamples of the ESS interval (default 200)")
    p.add_argument("--n-torsion", type=int, default=None, help="samples per side of T-W2 (default min(n, 10000))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--energy-clip-kt", type=float, default=None, help="clip energies to +-this (kT) in E-W1")
    p.add_argument("--drop-top-fraction", type=float, default=0.0, help="drop this fraction of top log-weights")
    p.add_argument("--energy-workers", type=int, default=None, help="energy worker processes (default: cores)")
    p.add_argument("--platform", default=None, help="OpenMM platform for energies (default auto)")
    p.add_argument("--device", default="auto", help="torch device for the flow (auto, cpu, cuda)")
    p.add_argument("--out", default=None, help="directory for metrics.json and plots (default: evaluate-SPLIT beside "
                                               "the flow; never a training run's folder, whose metrics.json is the "
                                               "training's)")
    p.add_argument("--teacher", default=None, help="evaluate this reflow teacher (teacher.pt) instead of the flow, on "
                                                   "the flow space of FLOW (the student it was trained for)")
    p.add_argument("--ode-method", default="rk4", help="teacher ODE solver with --teacher (default rk4)")
    p.add_argument("--ode-steps", type=int, default=8, help="steps of a fixed-step teacher solver (default 8)")
    p.set_defaults(func=_evaluate)


def _parse_pairs(items: list[str], what: str) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what} entries must look like KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def config_from_args(args) -> "TrainConfig":
    from .runner import load_config_file
    from .trainer import TrainConfig

    values = load_config_file(args.config) if args.config else {}
    if args.system is not None:
        values["system"] = args.system
    for flag, (name, _, _) in _TRAIN_FLAGS.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            values[name] = v
    if args.hyper:
        values["hyper"] = {**values.get("hyper", {}), **_parse_pairs(args.hyper, "--hyper")}
    values.update(_parse_pairs(args.set, "--set"))
    if not values.get("data"):
        raise ValueError("no dataset: pass --data DATA.h5 (or 'data' in the --config file)")
    if "system" not in values:
        values["system"] = _dataset_system(values["data"])
    return TrainConfig.from_dict(values)


def _dataset_system(data: str) -> str:
    """The system a dataset was made for: its built-in name, or the spec file it recorded."""
    from ..data import read_metadata
    from ..systems import list_systems

    spec = read_metadata(data)["system"]
    if spec["name"] in list_systems():
        return spec["name"]
    raise ValueError(f"dataset {data} was made for the custom system {spec['name']!r}: pass its spec .toml "
                     "as the SYSTEM argument of `regflow-mm train`")


def _train(args) -> int:
    from .runner import run_training
    from .trainer import TrainingDiverged

    config = config_from_args(args)
    try:
        info = run_training(config, args.out, progress=not args.quiet)
    except TrainingDiverged as err:
        print(f"regflow-mm train: {err}", file=sys.stderr)
        return 3
    if "final_metrics" in info:
        m = info["final_metrics"]
        print(f"trained {config.method} ({config.architecture}, {config.representation}) for {info['train']['step']} "
              f"steps in {info['train']['cpu_time_s']:.1f} CPU s -> {args.out}/flow.pt")
        print(_table({k: m[k] for k in ("ess", "e_w1", "t_w2", "nll", "d_fraction") if k in m}))
    return 0


def _table(metrics: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    return "\n".join(lines)


def _evaluate(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from ..data import load_dataset
    from ..energy import EnergyEvaluator
    from ..files import output_dir
    from ..flows import load_flow
    from .distributed import resolve_device
    from .evaluation import evaluate_flow, scalar_metrics

    out = output_dir(args.out if args.out else Path(args.flow).parent / f"evaluate-{args.split}")
    if (out / "run_info.json").exists():
        raise ValueError(f"--out {out} is a training run folder: its metrics.json is the training's; choose "
                         "another --out")
    device = resolve_device(args.device)
    dataset = load_dataset(args.data)
    system = dataset.system
    flow = load_flow(args.flow, system=system, map_location=device)
    if args.teacher is not None:
        from ..files import require_file
        from .cnf import SolverOptions, TeacherCNF, teacher_flow

        cnf = TeacherCNF.load(require_file(args.teacher, "teacher file"), map_location=device)
        cnf.solver = SolverOptions(args.ode_method, n_steps=args.ode_steps)
        flow = teacher_flow(cnf, flow, args.teacher)
    if args.split == "all":
        frames = np.arange(len(dataset))
    elif args.split in dataset.splits:
        frames = dataset.split_indices(args.split)
    else:
        raise ValueError(f"--split {args.split!r}: {args.data} has splits {sorted(dataset.splits)}; or use all")
    x, u = dataset.positions[frames], dataset.reduced_energies()[frames]
    md_log_w = dataset.log_weights[frames] if dataset.weighted else None
    with EnergyEvaluator(system, n_workers=args.energy_workers, platform=args.platform) as evaluator:
        with torch.no_grad():
            res = evaluate_flow(flow, system, x, u, evaluator=evaluator, n_samples=args.n_samples,
                                n_torsion=args.n_torsion, seed=args.seed, energy_clip_kT=args.energy_clip_kt,
                                drop_top_fraction=args.drop_top_fraction, plots_dir=out / "plots",
                                md_log_weights=md_log_w, n_bootstrap=args.n_bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    res["flow"], res["data"], res["split"], res["n_reference_frames"] = (str(args.flow), str(args.data), args.split,
                                                                         int(len(frames)))
    if args.teacher is not None:
        res["teacher"], res["ode_solver"] = str(args.teacher), f"{args.ode_method} {args.ode_steps}"
    (out / "metrics.json").write_text(json.dumps(res, indent=2, default=float))
    print(_table(scalar_metrics(res)))
    print(f"wrote {out / 'metrics.json'} and {out / 'plots'}")
    return 0
