"""Importance sampling from an equal-weight mixture of flows: Kish ESS of each flow and of every mixture of them.

Each flow draws ``--samples`` configurations (seed 100 + its index); every sample's log q is evaluated under every
flow, so a mixture of a subset S uses the samples of its members with log q_S = logsumexp_k log q_k - log |S| (the
balance heuristic of multiple importance sampling: unbiased, and a mixture's weight is never above |S| times a
member's). Energies come from the dataset's system. Reported with a bootstrap interval (200 resamples).

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_mixture.py --dataset reference.h5 --samples 20000 \
        name1=flow1.pt name2=flow2.pt [...]
"""
from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np
import torch
from scipy.special import logsumexp

from regflow_mm.data import load_dataset
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.flows.sampling import flow_log_prob, sample_flow
from regflow_mm.importance import kish_ess, log_weights


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="any dataset of the flows' system (for its energy)")
    parser.add_argument("--samples", type=int, default=20000, help="samples per flow")
    parser.add_argument("flows", nargs="+", help="NAME=PATH, two or more")
    args = parser.parse_args(argv)
    if len(args.flows) < 2 or any("=" not in f for f in args.flows):
        parser.error("give two or more flows as NAME=PATH")
    torch.set_num_threads(1)
    names = [f.split("=", 1)[0] for f in args.flows]
    system = load_dataset(args.dataset).system
    flows = [load_flow(f.split("=", 1)[1], system=system) for f in args.flows]
    log_q, u = [], []  # per drawing flow: (n, K) log q under every flow, (n,) reduced energy
    with EnergyEvaluator(system, n_workers=1) as evaluator:
        for k, flow in enumerate(flows):
            x, _ = sample_flow(flow, args.samples, seed=100 + k)
            log_q.append(np.stack([flow_log_prob(g, x) for g in flows], axis=1))
            u.append(evaluator.reduced_energy(x))
            print(f"{names[k]}: sampled", file=sys.stderr, flush=True)
    lines = [f"# bench_flow_mixture: {args.samples} samples per flow, {args.dataset}", "",
             f"Command: `{' '.join(['benchmarks/bench_flow_mixture.py'] + (sys.argv[1:] if argv is None else argv))}`",
             "", "| flows | samples | Kish ESS [5%, 95%] |", "|---|---|---|"]
    for r in range(1, len(flows) + 1):
        for subset in itertools.combinations(range(len(flows)), r):
            lq = np.concatenate([log_q[k][:, list(subset)] for k in subset])
            lq_mix = logsumexp(lq, axis=1) - np.log(len(subset))
            ess = kish_ess(log_weights(lq_mix, np.concatenate([u[k] for k in subset])), n_bootstrap=200)
            lines.append(f"| {' + '.join(names[k] for k in subset)} | {lq.shape[0]} | {100 * ess['ess']:.3f}% "
                         f"[{100 * ess['ess_fraction_p05']:.3f}, {100 * ess['ess_fraction_p95']:.3f}] |")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


if __name__ == "__main__":
    main()
