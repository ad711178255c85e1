"""Benchmark (a) of the smooth-flows issue: numerical inverse of a smooth mixture coupling transform
(multi-bin bisection + Newton, regflow_mm.flows.rootfinding) vs the analytic inverse of a
rational-quadratic spline (zuko.transforms.MonotonicRQSTransform), as in section 6.2 of the paper.

Both transforms are driven by a conditioner with input size ``dim`` and 64 hidden units; the timed call
is conditioner + inverse on a (batch, dim) float32 input. For every dim the number of bins K is scanned
and the fastest K is reported beside the spline. Also the backward pass (gradients to the conditioner)
of the inverse at the best K. Prints a markdown table.

    .venv/bin/python benchmarks/bench_smooth_inverse.py [--dims 2 8 32 128 512 2048] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import zuko
from torch import nn

from regflow_mm.flows.rootfinding import RootFindingConfig, implicit_inverse, passes_needed
from regflow_mm.flows.smooth import SmoothParams, SmoothTransformConfig, constrain_params, initial_raw, mixture_cdf


def conditioner(dim: int, n_out: int, bias: torch.Tensor | None = None) -> nn.Module:
    net = nn.Sequential(nn.Linear(dim, 64), nn.SiLU(), nn.Linear(64, n_out))
    with torch.no_grad():
        net[-1].weight.mul_(0.1)
        if bias is not None:
            net[-1].bias.copy_(bias)
    return net


def timed(fn, repeats: int, sync, budget_s: float = 0.3) -> float:
    """Median wall time of fn() in ms after two warm-ups: at least ``repeats`` runs, more (up to 50)
    while the total stays under ``budget_s``."""
    for _ in range(2):
        fn()
    sync()
    times = []
    while len(times) < repeats or (sum(times) < 1e3 * budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 128, 512, 2048])
    parser.add_argument("--bins", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--components", type=int, default=8, help="mixture components / spline bins")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-elements", type=float, default=6e7,
                        help="skip K where batch*dim*K*components exceeds this (memory of one grid pass)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1 gives stable timings on a shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    k = args.components
    config = SmoothTransformConfig("interval", n_components=k)
    fn = lambda x, ps, derivative=True: mixture_cdf(x, SmoothParams(*ps), config, derivative)

    header = ("| dim | spline inverse (ms) | smooth inverse, best K (ms) | best K | passes | ratio | "
              "spline bwd (ms) | smooth bwd (ms) | bwd ratio | K scanned (ms) |")
    print(f"batch {args.batch}, {k} components / spline bins, float32, tol 1e-6, device {device}, "
          f"{args.threads} threads\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for dim in args.dims:
        x = torch.rand(args.batch, dim, device=device)
        cond_input = torch.rand(args.batch, dim, device=device)
        spline_net = conditioner(dim, dim * (3 * k - 1)).to(device)
        bias = initial_raw(config).repeat(dim)
        smooth_net = conditioner(dim, dim * config.n_raw, bias).to(device)

        def spline_inverse():
            raw = spline_net(cond_input).reshape(args.batch, dim, 3 * k - 1)
            t = zuko.transforms.MonotonicRQSTransform(raw[..., :k], raw[..., k:2 * k], raw[..., 2 * k:], bound=1.0)
            return t.inv(2 * x - 1)

        def smooth_inverse(n_bins):
            raw = smooth_net(cond_input).reshape(args.batch, dim, config.n_raw)
            params = tuple(constrain_params(raw, config))
            return implicit_inverse(fn, x, params, RootFindingConfig(n_bins=n_bins, n_newton=1))

        with torch.no_grad():
            t_spline = timed(spline_inverse, args.repeats, sync)
        scan = {}
        for n_bins in args.bins:
            if args.batch * dim * n_bins * k > args.max_elements:
                continue
            with torch.no_grad():
                scan[n_bins] = timed(lambda: smooth_inverse(n_bins), args.repeats, sync)
        best = min(scan, key=scan.get)

        def spline_backward():
            spline_net.zero_grad()
            spline_inverse().sum().backward()

        def smooth_backward():
            smooth_net.zero_grad()
            smooth_inverse(best).sum().backward()

        b_spline = timed(spline_backward, args.repeats, sync)
        b_smooth = timed(smooth_backward, args.repeats, sync)
        scanned = ", ".join(f"{kb}: {t:.2f}" for kb, t in scan.items())
        print(f"| {dim} | {t_spline:.2f} | {scan[best]:.2f} | {best} | {passes_needed(best, 1e-6)} | "
              f"{scan[best] / t_spline:.1f}x | {b_spline:.2f} | {b_smooth:.2f} | {b_smooth / b_spline:.1f}x | "
              f"{scanned} |", flush=True)
    print("\nratio = smooth / spline wall time; 'bwd' times include the forward pass (gradients w.r.t. the "
          "conditioner weights through the implicit inverse). Paper (GPU): 2-3x at dims 2-32, ~10x at 2048.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
