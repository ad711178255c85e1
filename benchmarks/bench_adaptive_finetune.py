"""What fine-tuning between adaptive-MC segments can do for a flow that is already good (issue 13).

Starting from one flow, each variant fine-tunes a copy and reports the Kish ESS (with a bootstrap interval)
of fresh samples, all variants side by side in one run:

    nll:STEPS:LR                 weighted NLL on the dataset's train split (what adaptive MC did until now)
    is:N:STEPS:LR:MASS           + N samples of the flow itself weighted by exp(-u - log q), MASS of the batches
                                 (``finetune_proposals``; ``sampling.adaptive.pooled_log_weights``)
    kl:STEPS:LR:LAMBDA:BATCH     weighted NLL + LAMBDA x reverse KL on BATCH flow samples per step

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive_finetune.py --flow demo-output/train_baseline/flow.pt \
        --data demo-output/md/md.h5 nll:200:2e-4 is:20000:300:3e-5:0.5 kl:300:1e-4:1.0:128

Units: ESS as a fraction of the samples; CPU seconds of the fine-tuning (one thread).
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import time

import numpy as np
import torch

from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.importance import kish_ess, log_weights
from regflow_mm.sampling.adaptive import _training_frames, _weighted_proposals, pooled_log_weights
from regflow_mm.systems import get_system
from regflow_mm.training.finetune import fine_tune_nll
from regflow_mm.training.objectives import nll_loss, reverse_kl_loss


def ess(flow, evaluator, n: int, seed: int) -> dict:
    with torch.no_grad():
        x, log_q = flow.sample(n, chunk_size=10_000, generator=torch.Generator().manual_seed(seed))
    u = evaluator.reduced_energy(x.double().numpy())
    return kish_ess(log_weights(log_q.double().numpy(), u), n_bootstrap=200, seed=seed)


def kl_fine_tune(flow, y, probs, evaluator, steps: int, lr: float, lam: float, batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    opt = torch.optim.Adam(flow.transform.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss, _ = nll_loss(flow.transform, flow.prior, y[torch.multinomial(probs, 256, replacement=True, generator=gen)])
        kl, _ = reverse_kl_loss(flow.transform, flow.prior, flow.from_flow_space, evaluator.reduced_energy_torch, batch,
                                energy_cap_kT=100.0)
        opt.zero_grad()
        (loss + lam * kl).backward()
        torch.nn.utils.clip_grad_norm_(flow.transform.parameters(), 10.0)
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", default="aldp")
    p.add_argument("--flow", required=True)
    p.add_argument("--data", required=True, help="dataset whose train split (with its frame weights) is fine-tuned on")
    p.add_argument("--n-eval", type=int, default=50_000, help="samples per ESS (default 50k)")
    p.add_argument("--eval-seeds", default="11,12", help="sampling seeds of the ESS (comma-separated)")
    p.add_argument("variants", nargs="+")
    args = p.parse_args()
    torch.set_num_threads(1)
    system = get_system(args.system)
    flow0 = load_flow(args.flow, system=system)
    x, lw = _training_frames(args.data, system)
    evaluator = EnergyEvaluator(system, n_workers=0)
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} "
          f"{torch.get_num_threads()} thread, flow {args.flow}, {len(x)} train frames, ESS over {args.n_eval} samples")
    print("variant | fine-tuning CPU-s | Kish ESS per seed [5%, 95%]")

    def report(name, flow, cpu):
        cells = []
        for s in seeds:
            r = ess(flow, evaluator, args.n_eval, s)
            cells.append(f"{r['ess']:.2%} [{r['ess_fraction_p05']:.1%}, {r['ess_fraction_p95']:.1%}]")
        print(f"{name} | {cpu:.0f} | " + " / ".join(cells), flush=True)

    report("none (the flow as trained)", flow0, 0.0)
    y = probs = None
    for spec in args.variants:
        kind, *values = spec.split(":")
        flow = copy.deepcopy(flow0)
        t = time.process_time()
        if kind == "nll":
            fine_tune_nll(flow, x, steps=int(values[0]), lr=float(values[1]), log_weights=lw, seed=0)
        elif kind == "is":
            n, steps, lr, mass = int(values[0]), int(values[1]), float(values[2]), float(values[3])
            xp, lwp, _ = _weighted_proposals(flow, (system.system, system.temperature), n, seed=7)
            fine_tune_nll(flow, np.concatenate([x, xp]), steps=steps, lr=lr, log_weights=pooled_log_weights(lw, lwp, mass),
                          seed=0)
        elif kind == "kl":
            if y is None:
                with torch.no_grad():
                    y = flow0.to_flow_space(torch.as_tensor(x, dtype=flow0.dtype))[0]
                w = np.exp(lw - lw.max())
                probs = torch.as_tensor(w / w.sum())
            kl_fine_tune(flow, y, probs, evaluator, int(values[0]), float(values[1]), float(values[2]), int(values[3]))
        else:
            raise SystemExit(f"unknown variant {spec!r}: use nll:..., is:... or kl:...")
        report(spec, flow, time.process_time() - t)


if __name__ == "__main__":
    main()
