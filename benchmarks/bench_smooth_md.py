"""Flow potentials you can run dynamics on (issue 12): a smooth flow trained with forces, exported to
OpenMM, run in NVE and Langevin MD, against a spline flow trained on the same data for the same CPU time.

On alanine dipeptide, internal coordinates, both flows trained by ``regflow_mm.training.run_training``
for the same CPU-second budget:

- smooth: architecture 'smooth' (C-infinity couplings: mixtures on the torsion circles; on bonds, angles and
  narrow torsions probit-affine maps on the normal open map with ``--interval probit``, the default,
  logit-affine maps on the logistic open map with ``--interval logistic``, or mixtures with ``--interval
  mixture``, the first version), support 'open' (bonds, angles and narrow torsions mapped from their physical
  domains by smooth bijections; no hard wall), float64, trained by 'nll+fm' (w_nll NLL + w_fm force matching
  on the dataset's forces; with enhanced-sampling data ``--reweight-fraction`` as the pipeline's);
- spline: architecture 'nsf' (rational-quadratic splines, C1), support 'box' (the demo's flows), float32,
  trained by NLL ('mle', as in the paper and the demo; ``--spline-method nll+fm`` for the smooth flow's
  objective, which diverged here).

Then, with the exported force (openmm-torch TorchForce; ``--backend python`` for openmm.PythonForce):
force RMSE against held-out MD forces (test split), NVE (1 ps Langevin, then Verlet) on each flow
potential alone and on the force field from the same frame with the same steps and timestep
(total-energy fluctuation per DOF), cost per step, a long Langevin run on the smooth flow potential
alone (hydrogen mass repartitioning, same ensemble) with the (phi, psi) T-W2 against the MD data and a
Ramachandran figure, and a short Langevin run with the smooth flow as a bias on the force field. Before the
dynamics, the smooth flow's own samples against the test frames (``--ensemble-samples``: Kish ESS with a bootstrap
interval, energies, T-W2): Langevin on the flow potential samples q itself, so q's ESS bounds how close it can come.
Prints markdown.

    python benchmarks/bench_smooth_md.py --dataset md.h5 [--budget-s 300] [--nve-ps 5] [--langevin-ps 100]
        [--interval probit] [--reweight-fraction 0.3] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from regflow_mm.data import load_dataset
from regflow_mm.data.dataset import dihedrals
from regflow_mm.export.check import check_flow_dynamics
from regflow_mm.export.dynamics import run_md
from regflow_mm.flows import load_flow
from regflow_mm.flows.smooth_coupling import open_map_for
from regflow_mm.training.evaluation import evaluate_on_frames
from regflow_mm.training.metrics import force_rmse
from regflow_mm.training.runner import run_training
from regflow_mm.training.trainer import TrainConfig


def train(name: str, args, workdir: Path) -> tuple[object, float]:
    """Train one flow (see the module docstring); returns (flow, CPU seconds of training)."""
    common = dict(system="aldp", data=str(args.dataset), representation="internal", method="nll+fm",
                  w_nll=1.0, w_fm=args.w_fm, time_budget_s=args.budget_s, epochs=100000, batch_size=args.batch,
                  lr=args.lr, lr_schedule="cosine", data_weight_power=args.data_weight_power,
                  reweight_fraction=args.reweight_fraction, val_samples=0, val_every_epochs=1000, seed=args.seed,
                  device="cpu", log_every=100, checkpoint_every=100000)
    if name == "smooth":
        config = TrainConfig(**common, architecture="smooth", dtype="float64", lambda_kl=args.lambda_kl,
                             kl_batch_size=args.kl_batch, kl_energy_cap_kT=args.kl_energy_cap,
                             representation_options={"support": "open", "open_map": open_map_for(args.interval),
                                                     "narrow_span_rad": args.narrow_span_rad},
                             hyper={"n_layers": args.layers, "n_components": args.components,
                                    "hidden": [args.hidden, args.hidden], "interval": args.interval,
                                    "max_log_scale": args.max_log_scale,
                                    "circle_conditioning": args.circle_conditioning})
    else:
        # NLL only, as in the smooth-flows paper and the demo: the same NSF trained by NLL + 1e-3 FM (lr 1e-3,
        # float32) diverged here (non-finite loss at step 481; BENCHMARKS.md)
        config = TrainConfig(**{**common, "method": args.spline_method}, architecture="nsf", dtype="float32",
                             hyper={"layers": args.spline_layers, "hidden": args.spline_hidden})
    folder = workdir / (name if name == "smooth" else f"spline_{config.method}")
    run_training(config, folder, progress=False)  # a finished run in workdir is reused
    info = json.loads((folder / "run_info.json").read_text())
    return load_flow(folder / "flow.pt"), info["train"]["cpu_time_s"], info


def cached(workdir: Path, name: str, compute):
    """The JSON result of one phase: computed once, then read from ``workdir/phase_<name>.json``
    (so an interrupted benchmark resumes at the phase it stopped in)."""
    path = workdir / f"phase_{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    path.write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="aldp HDF5 dataset with forces (simulate)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_smooth_md_work"))
    parser.add_argument("--budget-s", type=float, default=300.0, help="training CPU seconds per flow")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--w-fm", type=float, default=1e-4,
                        help="force-matching weight (the paper's ratio 1e-3 costs 2.5 nats of NLL here, ESS 3.4%% vs 44%%)")
    parser.add_argument("--data-weight-power", type=float, default=0.0,
                        help="enhanced-sampling data: batches drawn ~ frame weight**power (both flows)")
    parser.add_argument("--reweight-fraction", type=float, default=0.0,
                        help="enhanced-sampling data: last fraction of the budget on batches ~ frame weight")
    parser.add_argument("--lambda-kl", type=float, default=0.0,
                        help="smooth flow only: weight of reverse KL on its own samples (force-field energies)")
    parser.add_argument("--kl-batch", type=int, default=32, help="flow samples per reverse-KL step")
    parser.add_argument("--kl-energy-cap", type=float, default=200.0, help="reverse KL: energy cap in kT")
    parser.add_argument("--layers", type=int, default=6, help="smooth coupling layers")
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--interval", choices=("probit", "logistic", "mixture"), default="probit",
                        help="map of the smooth flow's bonds, angles and narrow torsions (mixture: stiff flanks; "
                             "probit: with the normal open map, quadratic in log r along each bond)")
    parser.add_argument("--max-log-scale", type=float, default=math.log(2.0),
                        help="bound of the affine interval map's log-scale per layer")
    parser.add_argument("--circle-conditioning", choices=("all", "circles", "torsions"), default="all",
                        help="what conditions the torsions: 'circles' (circles see the other circles only; 'all' lets "
                             "them follow bond lengths: stiff hydrogen modes, BENCHMARKS.md issue 12) or 'torsions' "
                             "(every torsion, narrow ones too, sees the other torsions only)")
    parser.add_argument("--narrow-span-rad", type=float, default=math.pi / 2,
                        help="torsions whose data span less than this (rad) are intervals with the confining open map, "
                             "the others circles (the representation's default pi/2). 2.5 also makes the amide omega "
                             "and amide-H torsions (span ~1.6 rad) intervals: measured worse, Langevin ran away within "
                             "1 ps (BENCHMARKS.md, issue 12)")
    parser.add_argument("--spline-layers", type=int, default=6)
    parser.add_argument("--spline-hidden", type=int, default=128)
    parser.add_argument("--spline-method", choices=("mle", "nll+fm"), default="mle")
    parser.add_argument("--no-spline", action="store_true",
                        help="skip the spline flow (its force RMSE and NVE): the smooth flow's dynamics only")
    parser.add_argument("--test-frames", type=int, default=2000)
    parser.add_argument("--ensemble-samples", type=int, default=20000,
                        help="samples of the smooth flow against the weighted test frames (ESS, energies): the flow "
                             "potential's own ensemble, which Langevin on it samples (0: skip)")
    parser.add_argument("--nve-ps", type=float, default=5.0)
    parser.add_argument("--langevin-ps", type=float, default=100.0)
    parser.add_argument("--langevin-timestep-fs", type=float, default=1.0,
                        help="2 fs with 3 amu hydrogens heats walkers on the flow potential to 337-377 K (BENCHMARKS.md)")
    parser.add_argument("--hydrogen-mass", type=float, default=0.0, help="amu (0: the force field's masses)")
    parser.add_argument("--backend", choices=("torch", "python"), default="torch")
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/results/smooth_md_ramachandran.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_dataset(args.dataset)
    aldp = data.system
    test = data.split_indices("test")[:: max(len(data.split_indices("test")) // args.test_frames, 1)]
    start = np.asarray(data.positions[data.split_indices("test")[0]], dtype=np.float64)
    print(f"aldp, {len(data.split_indices('train'))} training frames of {args.dataset} "
          f"({'weighted' if data.weighted else 'plain MD'}), {len(test)} test frames; training: NLL + {args.w_fm} x FM, "
          f"{args.budget_s:.0f} CPU-s per flow, batch {args.batch}, smooth interval maps {args.interval}, reweight fraction "
          f"{args.reweight_fraction}, seed {args.seed}; OpenMM Reference platform, backend "
          f"{args.backend}; 2-core x86_64 VM, shared, 1 thread\n", flush=True)

    flows, rows = {}, []

    def trained(name):
        flow, cpu, info = train(name, args, args.workdir)  # cpu: the trainer's CPU seconds
        flows[name] = flow
        f = force_rmse(flow, data.positions[test], data.forces[test])
        steps = info.get("train", {}).get("step")
        with torch.no_grad():
            nll = float(-flow.log_prob(torch.as_tensor(np.asarray(data.positions[test][:500]),
                                                       dtype=next(flow.parameters()).dtype)).mean())
        rows.append((name, cpu, steps, f, nll))
        print(f"trained {name}: {cpu:.0f} CPU-s, {steps} steps, force RMSE {f['rmse']:.1f} kJ/mol/nm", flush=True)

    md_angles = dihedrals(np.asarray(data.positions, dtype=np.float64), [aldp.torsions["phi1"], aldp.torsions["psi1"]])
    say = lambda text: print(f"  {text}", flush=True)  # noqa: E731
    common = dict(md_angles=md_angles, md_log_w=data.log_weights if data.weighted else None,
                  langevin_timestep_fs=args.langevin_timestep_fs, hydrogen_mass_amu=args.hydrogen_mass,
                  backend=args.backend, seed=args.seed, figure=args.figure, progress=say)
    # phases in order of need (each cached in the workdir): the smooth flow and its NVE first
    trained("smooth")
    result = cached(args.workdir, "nve", lambda: check_flow_dynamics(flows["smooth"], aldp, start, nve_ps=args.nve_ps,
                                                                     langevin_ps=0.0, bias_ps=0.0, **common))
    ensemble = None
    if args.ensemble_samples:
        ensemble = cached(args.workdir, "ensemble", lambda: evaluate_on_frames(
            flows["smooth"], data, data.split_indices("test"), n_samples=args.ensemble_samples, seed=args.seed))
        say(f"smooth flow's own ensemble: ESS {ensemble['ess']:.4f} [{ensemble['ess_p05']:.4f}, "
            f"{ensemble['ess_p95']:.4f}], above the test frames' highest energy {ensemble['above_max_fraction']:.3f}")
    say(f"NVE std E_tot/DOF: smooth {result['nve_flow'].get('energy_fluctuation_per_dof')}, force field "
        f"{result['nve_forcefield'].get('energy_fluctuation_per_dof')} kJ/mol (ratio {result.get('nve_ratio')})")
    if not args.no_spline:
        trained("spline")

    print("\n### Force RMSE against held-out MD forces (test split)\n")
    print("| flow | support | training CPU-s | steps | test NLL (nats) | force RMSE (kJ/mol/nm) | RMS of MD forces | frames outside support |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cpu, steps, f, nll in rows:
        support = "open (smooth bijections)" if name == "smooth" else "box (fitted, hard walls)"
        print(f"| {name} | {support} | {cpu:.0f} | {steps} | {nll:.2f} | {f['rmse']:.1f} | {f['reference_rms']:.1f} "
              f"| {f['n_outside']} / {f['n_frames'] + f['n_outside']} |")

    if ensemble:
        print(f"\n### The smooth flow potential's own ensemble q (Langevin on -kT log q samples q)\n\n"
              f"{ensemble['n_samples']} samples against the {'weighted ' if data.weighted else ''}test frames: Kish ESS "
              f"{100 * ensemble['ess']:.2f}% [{100 * ensemble['ess_p05']:.2f}, {100 * ensemble['ess_p95']:.2f}] "
              f"(bootstrap 5-95%), raw samples above the frames' highest energy "
              f"{100 * ensemble['above_max_fraction']:.1f}%, reweighted E-W1 {ensemble['e_w1']:.3f} kT (raw "
              f"{ensemble['e_w1_raw']:.3g}), (phi, psi) T-W2 reweighted {ensemble['t_w2']:.3f} / raw "
              f"{ensemble['t_w2_raw']:.3f} rad, held-out NLL {ensemble['nll']:.2f}")

    eq = int(round(1.0 / 1e-3))
    spline_nve = None if args.no_spline else cached(args.workdir, "spline_nve", lambda: run_md(
        aldp, start, flows["spline"], mode="flow", integrator="verlet", steps=int(round(args.nve_ps / 1e-3)),
        equilibrate_steps=eq, backend=args.backend, seed=args.seed).summary())

    def backends():
        # both backends on the same 200 Verlet steps: the same trajectory to round-off
        other = "python" if args.backend == "torch" else "torch"
        runs = {b: run_md(aldp, start, flows["smooth"], mode="flow", integrator="verlet", steps=200, backend=b,
                          seed=args.seed) for b in (args.backend, other)}
        return {"backends": [args.backend, other], "ms_per_step": [runs[b].summary()["ms_per_step"] for b in runs],
                "max_total_energy_difference": float(np.max(np.abs(runs[args.backend].total - runs[other].total)))}

    short = cached(args.workdir, "backends", backends)
    result.update(cached(args.workdir, "langevin", lambda: check_flow_dynamics(
        flows["smooth"], aldp, start, nve_ps=0.0, langevin_ps=args.langevin_ps, bias_ps=1.0, **common)))

    print(f"\n### NVE from the same test frame: 1 ps Langevin (300 K, 1/ps), then {args.nve_ps} ps Verlet at 1 fs\n")
    print("| potential | finite | steps done | std E_tot / DOF (kJ/mol) | E_tot drift (kJ/mol) | ms per step | failure |")
    print("|---|---|---|---|---|---|---|")
    for label, s in (("smooth flow alone", result["nve_flow"]), ("force field", result["nve_forcefield"]),
                     ("spline flow alone", spline_nve)):
        if s is None:
            continue
        fl = s.get("energy_fluctuation_per_dof")
        print(f"| {label} | {s['finite']} | {s['steps_done']} | {'-' if fl is None else f'{fl:.2e}'} | "
              f"{s.get('total_energy_drift', float('nan')):.3g} | {s['ms_per_step']:.2f} | "
              f"{'-' if not s['failure'] else 'step %d: %s' % (s['failure']['step'], s['failure']['reason'])} |")
    ratio = result["nve_ratio"]
    print(f"\nsmooth / force field fluctuation: {'-' if ratio is None else f'{ratio:.2f}'} (issue: <= 2). "
          f"Paper (GPU, 10 epochs on 1 us): 8e-4 smooth, 6e-4 force field, spline flows blew up.")
    (b1, b2), (ms1, ms2) = short["backends"], short["ms_per_step"]
    print(f"\nBackends: 200 Verlet steps on the smooth flow potential, {b1} {ms1:.2f} ms/step vs {b2} {ms2:.2f} "
          f"ms/step; max |E_tot difference| over the reports {short['max_total_energy_difference']:.2e} kJ/mol")

    lang = result.get("langevin")
    if lang:
        print(f"\n### Langevin on the smooth flow potential alone: {args.langevin_ps} ps at {args.langevin_timestep_fs} fs, "
              f"300 K, 1/ps, hydrogen masses {f'{args.hydrogen_mass} amu' if args.hydrogen_mass else 'of the force field'}\n")
        print(f"finite: {lang['finite']}, steps done {lang['steps_done']} of {lang['steps']} ({lang['ps']:.1f} ps), "
              f"{lang['ms_per_step']:.2f} ms per step ({lang['seconds']:.0f} s), {lang['n_frames']} frames; "
              f"(phi, psi) T-W2 against the MD data: {lang.get('t_w2', float('nan')):.3f} rad (issue: <= 0.5); "
              f"failure: {lang['failure']}; figure {lang.get('figure')}")
        ff = result.get("langevin_forcefield")
        if ff:
            print(f"\nThe force field alone, same start, length, masses and seed: T-W2 {ff.get('t_w2', float('nan')):.3f} "
                  f"rad, {ff['ms_per_step']:.3f} ms per step")
    bias = result.get("bias")
    if bias:
        print(f"\nBias: force field + smooth flow in force group 1, Langevin {bias['ps']:.1f} ps at "
              f"{bias['timestep_fs']} fs: finite {bias['finite']}, flow energy mean {bias['flow_energy_mean']} kJ/mol, "
              f"{bias['ms_per_step']:.2f} ms per step")
    (args.workdir / "result.json").write_text(json.dumps(
        {"train": [(n, c, s, f, nll) for n, c, s, f, nll in rows], "dynamics": result, "ensemble": ensemble,
         "spline_nve": spline_nve, "backends": short}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
