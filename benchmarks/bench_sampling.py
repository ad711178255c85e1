"""Flow sampling in OpenMM on aldp: hybrid MD + flow vs plain MD, reweighted Delta F, TFEP, exported forces.

    .venv/bin/python benchmarks/bench_sampling.py [--flow FLOW.pt] [--dataset runs/bench/aldp_5ns.h5]

Without --flow, a quick flow (internal coordinates + NSF, maximum likelihood, --train-steps steps)
is trained on the dataset's train split and cached next to the dataset. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import math
import platform as _platform
import time
from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit
from openmmtools import cache
from openmmtools.states import SamplerState, ThermodynamicState

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.energy import EnergyEvaluator
from regflow_mm.export import flow_force
from regflow_mm.flows import build_flow, load_flow
from regflow_mm.sampling import (FlowIndependenceMove, SeededLangevinDynamicsMove, draw_weighted_samples,
                                 state_delta_f, tfep_delta_f, train_tfep_map)
from regflow_mm.training.objectives import nll_loss


def quick_flow(dataset, path: Path, steps: int, seed: int) -> Path:
    if path.is_file():
        return path
    x = dataset.split("train")
    flow = build_flow(dataset.system, "internal", "nsf", seed=seed, fit_to=x)
    y, _ = flow.to_flow_space(torch.as_tensor(x, dtype=flow.dtype))
    optimiser = torch.optim.Adam(flow.transform.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, y.shape[0], (256,), generator=g)
        loss, _ = nll_loss(flow.transform, flow.prior, y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    flow.save(path)
    return path


def block_error(x: np.ndarray, n_blocks: int = 10) -> float:
    blocks = np.array_split(np.asarray(x, dtype=np.float64), n_blocks)
    means = np.array([b.mean() for b in blocks if b.size])
    return float(means.std(ddof=1) / math.sqrt(means.size))


def chain(system, flow, flow_path, cpu_budget: float, md_steps: int, use_flow: bool, seed: int) -> dict:
    """Run one walker (md_steps of 1 fs Langevin + optionally one flow move per iteration) for cpu_budget CPU s."""
    thermo = ThermodynamicState(system.system, system.temperature * unit.kelvin)
    state = SamplerState(system.positions * unit.nanometer)
    md = SeededLangevinDynamicsMove(random_seed=seed + 1, timestep=1.0 * unit.femtosecond,
                                    collision_rate=1.0 / unit.picosecond, n_steps=md_steps)
    move = FlowIndependenceMove(flow, flow_path=flow_path, molecular_system=system, reject_d_chirality=True,
                                seed=seed) if use_flow else None
    ctx = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"), capacity=2)
    phi_idx = [system.torsions["phi1"]]
    phi, flow_cpu, start = [], 0.0, time.process_time()
    while time.process_time() - start < cpu_budget:
        md.apply(thermo, state, context_cache=ctx)
        if move is not None:
            t = time.process_time()
            move.apply(thermo, state, context_cache=ctx)
            flow_cpu += time.process_time() - t
        phi.append(dihedrals(np.asarray(state.positions.value_in_unit(unit.nanometer))[None], phi_idx)[0, 0])
    cpu = time.process_time() - start
    phi = np.array(phi)
    positive = phi > 0
    return {"cpu_s": cpu, "frames": phi.size, "sign_changes": int(np.abs(np.diff(positive.astype(int))).sum()),
            "p_pos": float(positive.mean()), "p_pos_err": block_error(positive),
            "acceptance": move.acceptance_rate if move else float("nan"),
            "cpu_per_flow_move": flow_cpu / move.n_proposed if move and move.n_proposed else float("nan"),
            "counters": move.statistics if move else {}}


def set_torsion(x: np.ndarray, topology, quad, degrees: float) -> np.ndarray:
    """Copy of x (n, 3) nm with the dihedral quad set to ``degrees`` by rotating the side of bond j-k that holds l."""
    import collections

    i, j, k, l = quad
    graph = collections.defaultdict(set)
    for bond in topology.bonds():
        graph[bond.atom1.index].add(bond.atom2.index)
        graph[bond.atom2.index].add(bond.atom1.index)
    side, todo = {k}, [k]
    while todo:
        a = todo.pop()
        for b in graph[a]:
            if b not in side and b != j:
                side.add(b)
                todo.append(b)
    side.discard(k)
    current = dihedrals(x[None], [quad])[0, 0]
    angle = np.radians(degrees) - current
    axis = (x[k] - x[j]) / np.linalg.norm(x[k] - x[j])
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross  # Rodrigues
    y = x.copy()
    idx = np.array(sorted(side))
    y[idx] = (x[idx] - x[k]) @ rot.T + x[k]
    return y


def state_b_md(system, seed: int, ps: float) -> np.ndarray:
    """Frames (every 0.5 ps) of Langevin MD (1 fs, 1/ps) started in the alpha_L basin (phi = 60, psi = 40 deg)."""
    x = set_torsion(system.positions, system.topology, system.torsions["phi1"], 60.0)
    x = set_torsion(x, system.topology, system.torsions["psi1"], 40.0)
    integrator = openmm.LangevinMiddleIntegrator(system.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                 1.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 7)
    context = openmm.Context(system.system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(context)
    context.setVelocitiesToTemperature(system.temperature * unit.kelvin, seed + 7)
    integrator.step(10_000)
    frames = []
    for _ in range(int(ps * 2)):
        integrator.step(500)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    frames = np.array(frames)
    return frames[dihedrals(frames, [system.torsions["phi1"]])[:, 0] > 0]


def force_cost(system, flow, n_eval: int) -> dict:
    out = {}
    x = system.positions
    for label, build in (("force field (aldp, Reference)", lambda: system.system),
                         ("TorchForce (flow)", lambda: _flow_system(system, flow_force(flow, "torch"))),
                         ("PythonForce (flow)", lambda: _flow_system(system, flow_force(flow, "python")))):
        s = build()
        context = openmm.Context(s, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        for _ in range(n_eval):
            context.setPositions((x + 0.002 * rng.standard_normal(x.shape)) * unit.nanometer)
            context.getState(getEnergy=True, getForces=True)
        out[label] = (time.perf_counter() - t) / n_eval
    return out


def _flow_system(system, force):
    s = openmm.System()
    for i in range(system.n_atoms):
        s.addParticle(system.system.getParticleMass(i))
    s.addForce(force)
    return s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="runs/bench/aldp_5ns.h5", help="aldp MD dataset (regflow-mm simulate)")
    parser.add_argument("--flow", default=None, help="trained aldp flow (default: train a quick one)")
    parser.add_argument("--train-steps", type=int, default=250)
    parser.add_argument("--cpu-budget", type=float, default=40.0, help="CPU s per chain (hybrid and plain MD each)")
    parser.add_argument("--md-steps", type=int, default=250, help="1 fs Langevin steps per iteration")
    parser.add_argument("--n-samples", type=int, default=20_000, help="flow samples for reweighting")
    parser.add_argument("--tfep-steps", type=int, default=300)
    parser.add_argument("--b-md-ps", type=float, default=500.0, help="ps of state-B MD when the data has no phi > 0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = load_dataset(args.dataset)
    system = dataset.system
    t = time.perf_counter()
    flow_path = Path(args.flow) if args.flow else quick_flow(dataset, Path(args.dataset).with_name(
        f"aldp_quick_nsf_{args.train_steps}.pt"), args.train_steps, args.seed)
    train_s = time.perf_counter() - t
    flow = load_flow(flow_path, system=system).eval()
    print(f"# bench_sampling: aldp, flow {flow_path} ({'given' if args.flow else f'quick MLE, {args.train_steps} steps, {train_s:.0f} s'}), "
          f"{_platform.node()}, torch threads 1\n")

    phi_md = dihedrals(dataset.positions.astype(np.float64), [system.torsions["phi1"]])[:, 0]

    # 1. Hybrid vs plain MD at equal CPU time.
    rows = {"plain MD": chain(system, flow, flow_path, args.cpu_budget, args.md_steps, False, args.seed),
            "hybrid MD + flow": chain(system, flow, flow_path, args.cpu_budget, args.md_steps, True, args.seed)}
    print(f"## Hybrid vs plain MD ({args.md_steps} fs Langevin per iteration, equal CPU budget {args.cpu_budget:.0f} s)\n")
    print("| chain | CPU s | frames | phi sign changes | changes / CPU s | P(phi > 0) | acceptance | CPU s / flow move |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cpu_s']:.1f} | {r['frames']} | {r['sign_changes']} | {r['sign_changes'] / r['cpu_s']:.3f} | "
              f"{r['p_pos']:.4f} +- {r['p_pos_err']:.4f} | {r['acceptance']:.4f} | {r['cpu_per_flow_move']:.2e} |")
    print(f"\nflow move counters: {rows['hybrid MD + flow']['counters']}")
    print(f"MD dataset ({dataset.positions.shape[0]} frames): P(phi > 0) = {np.mean(phi_md > 0):.4f} "
          f"+- {block_error(phi_md > 0):.4f} (block error)\n")

    # 2. Reweighted Delta F(phi < 0 -> phi > 0).
    t = time.perf_counter()
    with EnergyEvaluator(system, n_workers=0, platform="Reference") as ev:
        samples = draw_weighted_samples(flow, ev, args.n_samples, chunk_size=5000, seed=args.seed,
                                        molecular_system=system, progress=False)
    rw_s = time.perf_counter() - t
    log_w = np.where(samples.is_l, samples.log_w, -np.inf)
    phi = samples.torsions["phi1"]
    print("## Delta F(phi < 0 -> phi > 0) in kT\n")
    print("| estimator | Delta F | +- | samples | note |\n|---|---|---|---|---|")
    try:
        fe = state_delta_f(log_w, phi < 0, phi > 0)
        print(f"| flow reweighting | {fe['delta_f']:.3f} | {fe['ddelta_f']:.3f} | {fe['n']} ({fe['n_b']} with phi>0) | "
              f"ESS/N {kish_fraction(log_w):.4f}, ESS in B {fe['ess_b']:.1f}, D fraction {1 - samples.is_l.mean():.3f}, {rw_s:.0f} s |")
    except ValueError as err:
        print(f"| flow reweighting | n/a | | {samples.n} | {err} |")
    if (phi_md > 0).any():
        md_fe = state_delta_f(np.zeros(phi_md.size), phi_md < 0, phi_md > 0)
        md_err = block_error(phi_md > 0) / md_fe["p_b"]
        print(f"| MD counting (dataset) | {md_fe['delta_f']:.3f} | {md_err:.3f} | {phi_md.size} | block error |")
    else:
        print(f"| MD counting (dataset) | n/a | | {phi_md.size} | no frame with phi > 0 in the MD data |")

    # 3. TFEP A (phi < 0) -> B (phi > 0): map trained energy-free on OT pairs of MD samples (flow space of a
    #    mean-free Cartesian representation: exact densities, the representation's constant log-det cancels).
    #    MD of B: the dataset's frames with phi > 0, or (when it has too few) a short MD started from the
    #    lowest-energy L flow sample with phi > 0 (the basin is metastable for ~ns).
    x_md = dataset.positions.astype(np.float64)
    x_b = x_md[phi_md > 0]
    if x_b.shape[0] < 200:
        x_b = state_b_md(system, args.seed, args.b_md_ps)
    x_a = x_md[phi_md < 0]
    x_all = np.concatenate([x_a, x_b])
    rng = np.random.default_rng(args.seed)
    n_pair = min(x_b.shape[0], 1000)
    if n_pair >= 10:
        mapper = build_flow(system, "cartesian", "resnvp", seed=args.seed, dtype=torch.float64, fit_to=x_all)
        rep = mapper.representation
        to_y = lambda x: rep.to_flow_space(torch.as_tensor(x))[0].detach().numpy()  # noqa: E731
        a_train = rng.choice(x_a.shape[0], n_pair, replace=False)
        b_train = rng.choice(x_b.shape[0], n_pair, replace=False)
        t = time.perf_counter()
        train_tfep_map(mapper.transform, to_y(x_a[a_train]), to_y(x_b[b_train]), n_steps=args.tfep_steps,
                       batch_size=min(256, n_pair), lr=1e-3, seed=args.seed, progress=False)
        a_test = np.setdiff1d(np.arange(x_a.shape[0]), a_train)[:2000]
        phi_quad = [system.torsions["phi1"]]
        with EnergyEvaluator(system, n_workers=0, platform="Reference") as ev:
            def u_a(y):
                return ev.reduced_energy(rep.from_flow_space(torch.as_tensor(y))[0].detach().numpy())

            def u_b(y):
                x = rep.from_flow_space(torch.as_tensor(y))[0].detach().numpy()
                u = ev.reduced_energy(x)
                return np.where(dihedrals(x, phi_quad)[:, 0] > 0, u, np.inf)
            try:
                tf = tfep_delta_f(mapper.transform, to_y(x_a[a_test]), u_a, u_b)
                tf_line = (f"| TFEP (RegFlow map, OT pairs, {n_pair} per state) | {tf['delta_f']:.3f} | {tf['ddelta_f']:.3f} | "
                           f"{tf['forward']['n']} | work ESS/N {tf['forward']['work_ess']:.4f}, {tf['forward']['n_outside']} mapped outside B, "
                           f"{time.perf_counter() - t:.0f} s |")
            except ValueError as err:
                tf_line = f"| TFEP | n/a | | {a_test.size} | {err} |"
        print(tf_line)
    print()

    # 4. Exported force cost.
    print(f"TFEP state-B samples: {x_b.shape[0]} frames ({'MD dataset' if (phi_md > 0).sum() >= 200 else f'{args.b_md_ps:.0f} ps MD started at phi = 60, psi = 40 deg'}); "
          "state-A samples: MD dataset\n")
    costs = force_cost(system, flow, 200)
    ff = costs["force field (aldp, Reference)"]
    print("## Energy + forces of one configuration (Reference platform, 200 evaluations)\n")
    print("| force | ms / evaluation | x force field |\n|---|---|---|")
    for name, c in costs.items():
        print(f"| {name} | {1e3 * c:.3f} | {c / ff:.1f} |")


def kish_fraction(log_w):
    from regflow_mm.importance import kish_ess

    return kish_ess(log_w)["ess"]


if __name__ == "__main__":
    main()
