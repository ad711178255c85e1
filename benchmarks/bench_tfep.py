"""TFEP between aldp's phi < 0 and phi > 0 with an energy-free RegFlow map, against the weighted data.

    OMP_NUM_THREADS=1 python benchmarks/bench_tfep.py --data demo-output/md/md.h5 \
        --eval-data demo-output/reference/reference.h5 [--seeds 0 1] [--cnf-steps 1500]

1. Delta F(phi1 < 0 -> phi1 > 0) from the weighted metadynamics frames of both runs (state_delta_f,
   20-block bootstrap): the reference.
2. TFEP (``sampling.tfep.tfep_between_states``): map trained on the training run's frames, works on
   the independent run's frames; BAR of both directions, work ESS, training CPU time, energy calls.
3. The cost of a flow-matching map of the same pairs (``training.cnf``: VelocityMLP, minibatch-OT
   flow matching, same steps and batch): training CPU time, and the CPU time of the exact log-det
   (divergence integrated along the ODE, dopri5) that its works would need, per 1000 samples.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform as _platform
import time

import numpy as np
import torch


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training dataset (weighted metadynamics)")
    parser.add_argument("--eval-data", default=None, help="independent dataset for the works")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=5000)
    parser.add_argument("--moved", default="circular", choices=("circular", "all"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--cnf-steps", type=int, default=0, help="flow-matching map steps (0: skip the comparison)")
    parser.add_argument("--cnf-logdet-samples", type=int, default=50)
    args = parser.parse_args()

    from regflow_mm.data import load_dataset
    from regflow_mm.data.dataset import dihedrals
    from regflow_mm.sampling.free_energy import state_delta_f
    from regflow_mm.sampling.tfep import TFEPSettings, tfep_between_states

    data = load_dataset(args.data)
    ev = load_dataset(args.eval_data) if args.eval_data else None
    system = data.system
    print(f"# TFEP between phi1 < 0 and phi1 > 0 (aldp)\n\nmachine: {_platform.machine()}, {_platform.node()}, "
          f"torch threads 1; training data {args.data} ({len(data)} frames), evaluation data "
          f"{args.eval_data or 'the same'} ({len(ev) if ev else len(data)} frames)\n")
    print("| estimate | Delta F (kT) | +- | note |\n|---|---|---|---|")
    for label, d in (("weighted frames, training run", data), ("weighted frames, evaluation run", ev)):
        if d is None:
            continue
        phi = dihedrals(np.asarray(d.positions, dtype=np.float64), [system.torsions["phi1"]])[:, 0]
        r = state_delta_f(d.log_weights, phi < 0, phi > 0, block_size=len(d) // 20)
        print(f"| {label} | {r['delta_f']:.3f} | {r['ddelta_f']:.3f} | 20-block bootstrap; Kish ESS in states "
              f"{r['ess_a']:.0f} / {r['ess_b']:.0f} |")
    results = []
    for seed in args.seeds:
        settings = TFEPSettings(n_train=args.n_train, n_eval=args.n_eval, n_steps=args.steps, moved=args.moved,
                                layers=args.layers, hidden=args.hidden, seed=seed)
        t0 = time.perf_counter()
        r = tfep_between_states(system, data.positions, data.log_weights, "phi1 < 0", "phi1 > 0",
                                eval_positions=None if ev is None else ev.positions,
                                eval_log_w=None if ev is None else ev.log_weights, settings=settings)
        wall = time.perf_counter() - t0
        f, b, t = r["forward"], r["reverse"], r["train"]
        results.append(r)
        print(f"| TFEP {r['method']}, seed {seed} | {r['delta_f']:.3f} | {r['ddelta_f']:.3f} | forward EXP "
              f"{f['delta_f']:.3f} +- {f['ddelta_f']:.3f} (work ESS {f['work_ess']:.2%}, {f['n_outside']}/{f['n']} "
              f"outside B, W {f['work_mean']:.1f} +- {f['work_std']:.1f}); reverse EXP {b['delta_f']:.3f} +- "
              f"{b['ddelta_f']:.3f} (work ESS {b['work_ess']:.2%}, {b['n_outside']}/{b['n']} outside A, W "
              f"{b['work_mean']:.1f} +- {b['work_std']:.1f}); map moves {r['n_moved']}/{r['dim']} coordinates ({', '.join(r['moved_torsions'])}; reflected: {', '.join(r['reflected']) or 'none'}); "
              f"training {t['cpu_s']:.1f} CPU-s ({t['n_steps']} steps, OT {t['ot']['method']} on {t['ot']['n']} "
              f"pairs), {t['n_energy_calls']} energy calls; works {r['eval_cpu_s']:.1f} CPU-s, "
              f"{r['n_energy_calls_eval']} energy calls; {wall:.0f} s wall in all |")
    print(f"\nsettings: {dataclasses.asdict(settings)}\n")
    if args.cnf_steps > 0:
        cnf_cost(system, data, results[0], args)


def cnf_cost(system, data, tfep_result, args) -> None:
    """CPU cost of a flow-matching (CNF) map of the same frames: training, and exact log-dets for the works."""
    from regflow_mm.importance import resample
    from regflow_mm.representations.internal import InternalCoordinates
    from regflow_mm.sampling.tfep import state_members
    from regflow_mm.training.cnf import FlowMatchingConfig, TeacherCNF, VelocityMLP, train_flow_matching

    in_a, in_b = state_members(system, data.positions, "phi1 < 0", "phi1 > 0", "the training data")
    rng = np.random.default_rng(0)
    pick = {k: np.flatnonzero(m)[resample(data.log_weights[m], args.n_train, rng)] for k, m in (("a", in_a), ("b", in_b))}
    rep = InternalCoordinates.from_topology(system.topology).to(torch.float64)
    rep.fit(np.concatenate([data.positions[pick["a"]], data.positions[pick["b"]]]).astype(np.float64))
    with torch.no_grad():
        ya = rep.to_flow_space(torch.as_tensor(data.positions[pick["a"]], dtype=torch.float64))[0].float()
        yb = rep.to_flow_space(torch.as_tensor(data.positions[pick["b"]], dtype=torch.float64))[0].float()

    class StateA:  # the CNF's "prior": frames of A
        generator = torch.Generator().manual_seed(0)

        def sample(self, n):
            return ya[torch.randint(0, ya.shape[0], (n,), generator=self.generator)]

        def log_prob(self, z):
            return torch.zeros(z.shape[0], dtype=z.dtype)

    torch.manual_seed(0)
    velocity = VelocityMLP(ya.shape[1], hidden=args.hidden * 2, n_layers=3)
    cpu0 = time.process_time()
    train_flow_matching(velocity, yb, StateA(), FlowMatchingConfig(n_steps=args.cnf_steps, batch_size=256,
                                                                  coupling="minibatch_ot"), progress=False)
    train_cpu = time.process_time() - cpu0
    cnf = TeacherCNF(velocity)
    n = args.cnf_logdet_samples
    cpu0 = time.process_time()
    cnf.log_prob(yb[:n], StateA(), divergence="exact")
    logdet_cpu = time.process_time() - cpu0
    t = tfep_result["train"]
    n_works = tfep_result["forward"]["n"] + tfep_result["reverse"]["n"]
    print("## Cost beside a flow-matching (CNF) map of the same frames\n")
    print("| map | training steps | training CPU s | energy calls in training | CPU s per 1000 exact log-dets |")
    print("|---|---|---|---|---|")
    print(f"| RegFlow circular-spline map (this run, seed {tfep_result['settings']['seed']}) | {t['n_steps']} | "
          f"{t['cpu_s']:.1f} | {t['n_energy_calls']} | {1000 * tfep_result['eval_cpu_s'] / n_works:.2f} "
          f"(map + log-det + energies) |")
    print(f"| flow-matching CNF (VelocityMLP {args.hidden * 2}x3, minibatch OT) | {args.cnf_steps} | {train_cpu:.1f} | 0 | "
          f"{1000 * logdet_cpu / n:.1f} (log-det alone, exact divergence, dopri5; measured on {n} samples) |")
    print()


if __name__ == "__main__":
    main()
