"""Training steps per CPU-second, eager vs ``torch.compile`` (TrainConfig ``compile = true``), side by side.

The demo's flow (aldp, internal coordinates, NSF 6 x 128, batch 256, MLE loss, AdamW), one thread,
on training frames of a dataset (or, without ``--data``, the system's structure plus 0.003 nm
Gaussian noise: the step cost does not depend on the data). The two variants alternate in rounds so
that load from other jobs hits both alike; the compile cost (first call) is reported apart.

    .venv/bin/python benchmarks/bench_train_compile.py --data demo-output/md/md.h5 --rounds 3
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from regflow_mm.flows import build_flow
from regflow_mm.systems import get_system
from regflow_mm.training.objectives import nll_terms
from regflow_mm.training.trainer import compiled_or_eager


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="MD dataset (.h5) of aldp; default: noisy copies of the structure")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    system = get_system("aldp")
    if args.data:
        from regflow_mm.data import load_dataset

        x = load_dataset(args.data, system).split("train")
    else:
        x = np.asarray(system.positions)[None] + 0.003 * np.random.default_rng(0).normal(size=(4000, system.n_atoms, 3))
    variants = {}
    for name in ("eager", "compiled"):
        flow = build_flow(system, representation="internal", architecture="nsf", layers=6, hidden=128, fit_to=x, seed=0)
        y = flow.to_flow_space(torch.as_tensor(x, dtype=torch.float32))[0].detach()
        loss = compiled_or_eager(nll_terms) if name == "compiled" else nll_terms
        variants[name] = (flow, y, loss, torch.optim.AdamW(flow.parameters(), lr=1e-3))
    gen = torch.Generator().manual_seed(0)

    def step(name):
        flow, y, loss, opt = variants[name]
        value = loss(flow.transform, flow.prior, y[torch.randint(0, y.shape[0], (args.batch,), generator=gen)])["loss"]
        opt.zero_grad()
        value.backward()
        opt.step()

    t = time.process_time()
    step("compiled")
    compile_s = time.process_time() - t
    rates = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            for _ in range(3):
                step(name)
            t = time.process_time()
            for _ in range(args.steps):
                step(name)
            rates[name].append(args.steps / (time.process_time() - t))
    print(f"# bench_train_compile ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, 1 thread, batch {args.batch}, data {args.data or 'noisy structure'})\n")
    print("| variant | steps / CPU-s (median of rounds) | rounds |")
    print("|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {np.median(r):.2f} | {', '.join(f'{v:.2f}' for v in r)} |")
    print(f"\nspeed-up {np.median(rates['compiled']) / np.median(rates['eager']):.2f}x; "
          f"first compiled step (compilation) {compile_s:.1f} CPU s")


if __name__ == "__main__":
    main()
