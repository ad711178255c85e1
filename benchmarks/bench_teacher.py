"""The reflow teacher as a Boltzmann generator: standardised, periodic flow-matching CNF on aldp.

    python benchmarks/bench_teacher.py --student FLOW.pt --data MD.h5 --reference REF.h5 \
        --settings 6000:256:3:0 --n-samples 50000 --out runs/bench_teacher

The student flow (``--student``, e.g. the demo's ``train_regflow/flow.pt``) only gives the flow space:
the representation fitted on the training frames, its prior, system hash and kT. For each teacher
setting ``steps:hidden:layers:weight_power`` (flow-matching steps, width, depth, frame-weight power of
the batches) the script (1) trains the teacher on the training split of ``--data`` (``runner.train_teacher``,
the code path of ``regflow-mm train``; timed), (2) checks the ODE solver: fixed-step solvers against
dopri5 at rtol = atol = 1e-7 on ``--solver-points`` base points (max / RMS error of x1 in flow-space
units and of log|det| in nats), (3) evaluates the teacher like any flow (``cnf.teacher_flow`` +
``evaluation.evaluate_flow``: ESS, E-W1, T-W2, held-out NLL on the reference, with its frame weights)
with the chosen fixed-step solver. ``--old-teacher`` evaluates a teacher file of the raw (pre-2026-12)
kind the same way. ``--reference-stride`` thins the reference frames (selection runs); the final run uses
all of them. Every number is printed as a markdown table and appended to ``--results``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regflow_mm.data import load_dataset  # noqa: E402
from regflow_mm.energy import EnergyEvaluator  # noqa: E402
from regflow_mm.flows import load_flow  # noqa: E402
from regflow_mm.training.cnf import SolverOptions, TeacherCNF, teacher_flow  # noqa: E402
from regflow_mm.training.evaluation import evaluate_flow, scalar_metrics  # noqa: E402
from regflow_mm.training.runner import train_teacher  # noqa: E402
from regflow_mm.training.trainer import TeacherSettings  # noqa: E402

KEYS = ("ess", "e_w1", "e_w1_raw", "t_w2", "t_w2_raw", "nll", "above_max_fraction", "outside_support_fraction",
        "basins_missing", "d_fraction", "invertibility_max_abs", "sample_s", "nll_s")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="flow.pt whose flow space the teacher lives on")
    p.add_argument("--data", required=True, help="training MD (HDF5); its train split trains the teacher")
    p.add_argument("--reference", required=True, help="held-out reference MD (HDF5) for the evaluation")
    p.add_argument("--settings", default="6000:256:3:0", help="comma list of steps:hidden:layers:weight_power")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--solver", default="rk4")
    p.add_argument("--ode-steps", type=int, default=8, help="steps of the fixed-step solver of the evaluation")
    p.add_argument("--solver-points", type=int, default=500)
    p.add_argument("--solver-check", default="rk4:4,rk4:8,rk4:16,midpoint:16",
                   help="method:steps list ('' skips the check)")
    p.add_argument("--reference-stride", type=int, default=1)
    p.add_argument("--skip-new", action="store_true", help="evaluate only --old-teacher")
    p.add_argument("--old-teacher", default=None, help="a raw-coordinate teacher.pt of --student to evaluate too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_teacher"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "bench_teacher.md"))
    return p.parse_args()


def solver_check(cnf: TeacherCNF, n: int, methods: list[tuple[str, int]], seed: int) -> list[dict]:
    """Fixed-step solvers vs dopri5 (rtol = atol = 1e-7) on n base points: errors of x1 (flow space) and log|det|."""
    gen = torch.Generator().manual_seed(seed)
    base = cnf.coords.base() if cnf.coords is not None else None
    z = base.sample(n, generator=gen) if base is not None else torch.rand(n, cnf.velocity.config["dim"], generator=gen)
    z = z.to(next(cnf.velocity.parameters()).dtype)

    def run(solver):
        t = time.process_time()
        x1, logdet = cnf.integrate_with_divergence(z, solver=solver)
        if cnf.coords is not None:
            x1 = cnf.coords.destandardise(x1)
        return x1.double(), logdet.double(), time.process_time() - t

    ref_x, ref_ld, ref_s = run(SolverOptions("dopri5", rtol=1e-7, atol=1e-7))
    circ = cnf.coords.circular if cnf.coords is not None else torch.zeros(ref_x.shape[1], dtype=torch.bool)
    rows = [{"solver": "dopri5 1e-7", "x1_max": 0.0, "x1_rms": 0.0, "logdet_max": 0.0, "logdet_rms": 0.0,
             "cpu_s_per_1k": 1000 * ref_s / n}]
    for method, steps in methods:
        x, ld, s = run(SolverOptions(method, n_steps=steps))
        d = x - ref_x
        d = torch.where(circ, torch.remainder(d + 0.5, 1.0) - 0.5, d)
        e = ld - ref_ld
        rows.append({"solver": f"{method} {steps}", "x1_max": float(d.abs().max()), "x1_rms": float(d.pow(2).mean().sqrt()),
                     "logdet_max": float(e.abs().max()), "logdet_rms": float(e.pow(2).mean().sqrt()),
                     "cpu_s_per_1k": 1000 * s / n})
    return rows


def table(rows: list[dict], keys) -> str:
    keys = list(keys)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    system = data.system
    student = load_flow(args.student, system=system)
    idx = data.split_indices("train")
    with torch.no_grad():
        y_train = student.to_flow_space(torch.as_tensor(data.positions[idx], dtype=student.dtype))[0]
    ref = load_dataset(args.reference, system)
    frames = np.arange(0, len(ref), args.reference_stride)
    ref_x, ref_u = ref.positions[frames], ref.reduced_energies()[frames]
    ref_lw = ref.log_weights[frames] if ref.weighted else None
    eval_solver = SolverOptions(args.solver, n_steps=args.ode_steps)
    checks = [(m.split(":")[0], int(m.split(":")[1])) for m in args.solver_check.split(",") if m]
    header = (f"\n## bench_teacher {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"command: `{' '.join(sys.argv)}`\n\nmachine: {platform.machine()}, torch {torch.__version__}, "
              f"1 thread; train frames {len(idx)} (weight ESS of the data {data.weight_ess() if data.weighted else 1.0}), "
              f"reference frames {len(frames)} of {len(ref)}, flow space D = {y_train.shape[1]} "
              f"({int(student.representation.circular.sum())} circular)\n")
    print(header, flush=True)
    results = [header]
    rows = []
    evaluator = EnergyEvaluator(system, n_workers=0)

    def evaluate(name, cnf, check=True, extra=None):
        cnf.solver = eval_solver
        tf = teacher_flow(cnf, student, name, check=check)
        t = time.process_time()
        with torch.no_grad():
            res = evaluate_flow(tf, system, ref_x, ref_u, evaluator=evaluator, n_samples=args.n_samples,
                                seed=args.seed, md_log_weights=ref_lw, plots_dir=out / "plots",
                                plot_prefix=f"{name}_")
        row = {"teacher": name, **(extra or {}), **{k: scalar_metrics(res).get(k) for k in KEYS},
               "eval_cpu_s": time.process_time() - t}
        (out / f"{name}_metrics.json").write_text(json.dumps(res, indent=2, default=float))
        print(table([row], row.keys()), flush=True)
        rows.append(row)

    if args.old_teacher:
        old = TeacherCNF.load(args.old_teacher)
        evaluate("old_raw", old, check=False, extra={"train_s": None})
        if checks:
            results.append("### old teacher (raw box, uniform prior), solver check\n\n" + table(
                solver_check(old, args.solver_points, checks, args.seed), ["solver", "x1_max", "x1_rms", "logdet_max",
                                                                          "logdet_rms", "cpu_s_per_1k"]) + "\n")
            print(results[-1], flush=True)
    for spec in ([] if args.skip_new else args.settings.split(",")):
        steps, hidden, layers, power = spec.split(":")
        settings = TeacherSettings(teacher_steps=int(steps), teacher_hidden=int(hidden), teacher_layers=int(layers),
                                   teacher_batch_size=args.batch_size, teacher_lr=args.lr,
                                   teacher_weight_power=float(power))
        name = f"s{steps}_h{hidden}_l{layers}_w{power}"
        path = out / f"teacher_{name}.pt"
        t = time.process_time()  # CPU seconds (1 thread): the machine is shared, wall time is not the cost
        if path.exists():
            cnf = TeacherCNF.load(path)
            train_s = cnf.metadata.get("train_s")
        else:
            cnf = train_teacher(settings, student, y_train, eval_solver, seed=args.seed,
                                train_log_weights=data.log_weights[idx], progress=False)
            train_s = time.process_time() - t
            cnf.save(path, extra={**cnf.metadata, "train_s": train_s})
        if checks:
            check_rows = solver_check(cnf, args.solver_points, checks, args.seed)
            results.append(f"### {name}: solver check ({args.solver_points} base points, errors vs dopri5 1e-7; "
                           f"x1 in flow-space units, circular dims around the circle; log|det| in nats)\n\n"
                           + table(check_rows, ["solver", "x1_max", "x1_rms", "logdet_max", "logdet_rms", "cpu_s_per_1k"])
                           + "\n")
            print(results[-1], flush=True)
        final_loss = cnf.metadata.get("log", [{}])[-1].get("fm_loss")
        evaluate(name, cnf, extra={"train_s": train_s, "fm_loss": final_loss})
    results.append(f"### evaluation ({args.n_samples} samples, solver {args.solver} {args.ode_steps} steps, "
                   f"exact divergence; ESS as a fraction; E-W1 kT; T-W2 rad; NLL nats)\n\n"
                   + table(rows, ["teacher", "train_s", "fm_loss", *KEYS, "eval_cpu_s"]) + "\n")
    print(results[-1], flush=True)
    evaluator.close()
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as fh:
        fh.write("\n".join(results))


if __name__ == "__main__":
    main()
