"""`regflow-mm mc`, `regflow-mm reweight` and `regflow-mm free-energy`."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from regflow_mm.sampling.free_energy import MIN_STATE_ESS
from regflow_mm.sampling.tfep import TFEPSettings

TFEP_DEFAULTS = TFEPSettings()

_FREE_ENERGY_DOC = """Free-energy differences (kT), three ways:

  between torsion-defined states of one ensemble, from importance-weighted flow samples:
    regflow-mm free-energy aldp FLOW.pt --state-a "phi1 < 0" --state-b "phi1 > 0"
  the same by TFEP with an energy-free RegFlow map trained on (weighted) MD frames of both states:
    regflow-mm free-energy aldp --tfep-data md.h5 [--tfep-eval-data reference.h5]
  between thermodynamic states (another temperature, force field or solvent; reduced units), by MBAR on
  flow samples and/or MD frames of each state:
    regflow-mm free-energy aldp FLOW.pt --to-temperature 350 [--data-a md300.h5 --data-b md350.h5]
"""


def _add_chain_options(p: argparse.ArgumentParser, per: str) -> None:
    """Options of a chain of Langevin MD + flow moves (``mc`` and ``mc-tempering``); ``per`` names the unit."""
    p.add_argument("--md-steps", type=int, default=500, help=f"Langevin steps per {per} (0: flow moves only)")
    p.add_argument("--timestep-fs", type=float, default=1.0, help="Langevin step, fs")
    p.add_argument("--friction", type=float, default=None, help="Langevin friction, 1/ps (default: the system's)")
    p.add_argument("--flow-moves", type=int, default=1, help=f"flow proposals per {per}")
    p.add_argument("--batch-size", type=int, default=256, help="flow proposals drawn per flow call")
    p.add_argument("--allow-d", action="store_true", help="do not reject D-chirality proposals")
    p.add_argument("--platform", default="Reference", help="OpenMM platform (Reference is fastest for ~20 atoms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the MD noise, velocities and flow proposals: one "
                                                       "seed reproduces the run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mc", help="hybrid MD / flow Monte Carlo walkers (resumable)",
                              description="Walkers alternating Langevin MD and flow independence Metropolis-Hastings "
                                          "moves; writes frames incrementally to an HDF5 file and resumes after a kill.")
    p.add_argument("system", help="built-in system name or spec TOML")
    p.add_argument("flow", help="saved flow file ('none' with --flow-moves 0: plain MD of the same walkers and MD "
                                "segments, the baseline of the chain's crossings per CPU second)")
    p.add_argument("--out", required=True, help="output HDF5 (rerun the same command to resume)")
    p.add_argument("--iterations", type=int, required=True, help="frames per walker (one per MD + flow iteration)")
    p.add_argument("--walkers", type=int, default=2, help="independent chains, each from the system's start "
                                                          "structure with its own seeded noise")
    _add_chain_options(p, "iteration")
    p.add_argument("--checkpoint-every", type=int, default=20, help="iterations per committed block")
    p.add_argument("--dcd-prefix", default=None, help="also write PREFIX_walker<k>.dcd at the end (mdtraj)")
    a = p.add_argument_group("adaptive flow MC (--adapt): the flow is fine-tuned by maximum likelihood on the "
                             "chain's frames between segments; versions are saved next to --out (OUT.flows/)")
    a.add_argument("--adapt", action="store_true", help="fine-tune the flow between segments")
    a.add_argument("--segment-iterations", type=int, default=None,
                   help="iterations per segment (the proposal is frozen inside one)")
    a.add_argument("--adapt-every", type=int, default=None,
                   help="iterations between updates, a multiple of --segment-iterations (default: every segment)")
    a.add_argument("--adapt-at", default=None, help="explicit update iterations, comma-separated (e.g. 200,400,800)")
    a.add_argument("--max-updates", type=int, default=None, help="stop adapting after this many updates")
    a.add_argument("--train-data", default=None, help="MD dataset whose train split joins every fine-tuning")
    a.add_argument("--finetune-steps", type=int, default=None, help="Adam steps per update (default 200)")
    a.add_argument("--finetune-batch-size", type=int, default=None, help="frames per Adam step (default 256)")
    a.add_argument("--finetune-lr", type=float, default=None, help="Adam learning rate (default 1e-3)")
    a.add_argument("--finetune-proposals", type=int, default=None,
                   help="flow samples, importance-weighted by their energies, drawn at each update (default 0)")
    a.add_argument("--finetune-proposal-mass", type=float, default=None,
                   help="share of the fine-tuning batches drawn from those proposals (default 0.5)")
    a.add_argument("--acceptance-samples", type=int, default=0,
                   help="also the first and last flow version's stationary acceptance as proposals, from this many "
                        "paired samples each (default 0: not measured)")
    p.set_defaults(func=_mc)

    t = subparsers.add_parser("mc-tempering", help="parallel tempering with flow moves in every replica (resumable)",
                              description="openmmtools ParallelTemperingSampler; each replica runs Langevin MD then "
                                          "flow independence moves accepted with its own temperature's potential.")
    t.add_argument("system", help="built-in system name or spec TOML")
    t.add_argument("flow", help="saved flow file")
    t.add_argument("--out", required=True, help="openmmtools storage (.nc; rerun the same command to resume)")
    t.add_argument("--iterations", type=int, required=True, help="exchange iterations")
    t.add_argument("--replicas", type=int, default=4, help="temperatures on a geometric ladder")
    t.add_argument("--t-max", type=float, default=600.0, help="top temperature, K")
    _add_chain_options(t, "replica and iteration")
    t.add_argument("--checkpoint-interval", type=int, default=1,
                   help="iterations between stored replica states (the phi trace is read from them)")
    t.set_defaults(func=_mc_tempering)

    for name, helptext in (("reweight", "importance-reweighted observables from flow samples"),
                           ("free-energy", "free-energy difference between two torsion-defined states")):
        q = subparsers.add_parser(name, help=helptext, description=_FREE_ENERGY_DOC if name == "free-energy" else None,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        q.add_argument("system", help="built-in system name or spec TOML")
        if name == "free-energy":
            q.add_argument("flow", nargs="?", default=None, help="saved flow file (optional with --tfep-data or "
                                                                   "--data-a/--data-b)")
        else:
            q.add_argument("flow", help="saved flow file")
        q.add_argument("-n", "--n-samples", type=int, default=100_000,
                       help="flow samples drawn, energies evaluated and importance-weighted")
        q.add_argument("--chunk-size", type=int, default=10_000, help="flow samples per streamed chunk")
        q.add_argument("--workers", type=int, default=None, help="energy worker processes (default: cores)")
        q.add_argument("--platform", default="Reference", help="OpenMM platform of the energy workers")
        q.add_argument("--allow-d", action="store_true", help="keep D-chirality samples (default: weight 0)")
        q.add_argument("--seed", type=int, default=0, help="seed of the flow samples (chunk k draws with seed + k): "
                                                           "one seed reproduces the result")
        q.add_argument("--json", default=None, help="also write the results as JSON here")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "reweight":
            q.add_argument("--bins", type=int, default=60, help="torsion histogram bins over (-180, 180] degrees")
            q.add_argument("--histograms", default=None, help="write reweighted torsion histograms (npz) here")
            q.set_defaults(func=_reweight)
        else:
            for state, default in (("a", "phi1 < 0"), ("b", "phi1 > 0")):
                q.add_argument(f"--state-{state}", default=default,
                               help=f"state {state.upper()}: a condition on the system's torsions in degrees, e.g. "
                                    f"\"(phi1 > -90) & (phi1 < 0)\" (single comparisons joined by &, |, ~; abs(...))")
            t = q.add_argument_group("TFEP between the two states (energy-free RegFlow map, internal coordinates)")
            t.add_argument("--tfep-data", default=None, help="dataset (HDF5, e.g. metadynamics with frame weights) whose "
                                                             "frames of each state train the map")
            t.add_argument("--tfep-eval-data", default=None, help="independent dataset for the works (default: "
                                                                  "--tfep-data resampled with another seed)")
            t.add_argument("--tfep-steps", type=int, default=TFEP_DEFAULTS.n_steps, help="regression steps of the map")
            t.add_argument("--tfep-n-train", type=int, default=TFEP_DEFAULTS.n_train, help="frames per state for the OT pairs")
            t.add_argument("--tfep-n-eval", type=int, default=TFEP_DEFAULTS.n_eval, help="frames per state for the works")
            t.add_argument("--tfep-moved", choices=("circular", "all"), default=TFEP_DEFAULTS.moved,
                           help="coordinates the map moves: the wide torsions (circles) or all")
            h = q.add_argument_group("between thermodynamic states: SYSTEM -> --to / --to-temperature (reduced, kT)")
            h.add_argument("--to", default=None, help="state B: a built-in system name or spec TOML over the same atoms "
                                                      "(another force field or solvent model)")
            h.add_argument("--to-temperature", type=float, default=None, help="temperature of state B, K (default: "
                                                                             "that of its system)")
            h.add_argument("--data-a", default=None, help="dataset of frames of state A (MD; subsampled to uncorrelated frames)")
            h.add_argument("--data-b", default=None, help="dataset of frames of state B")
            q.set_defaults(func=_free_energy)


_ADAPT_OPTIONS = ("segment_iterations", "adapt_every", "adapt_at", "max_updates", "train_data", "finetune_steps",
                  "finetune_batch_size", "finetune_lr", "finetune_proposals", "finetune_proposal_mass")


def _mc(args) -> int:
    from regflow_mm.sampling.hybrid import export_walker_trajectory, run_hybrid_mc
    from regflow_mm.systems import get_system

    if not args.adapt:
        given = [name for name in _ADAPT_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --adapt (it sets up adaptive flow MC)")
    else:
        return _adaptive_mc(args)
    flow = None if args.flow == "none" else args.flow
    summary = run_hybrid_mc(get_system(args.system), flow, args.out, args.iterations, n_walkers=args.walkers,
                            md_steps=args.md_steps, timestep_fs=args.timestep_fs, friction_per_ps=args.friction,
                            flow_moves=args.flow_moves, reject_d_chirality=not args.allow_d,
                            batch_size=args.batch_size, seed=args.seed, platform=args.platform,
                            checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    if args.dcd_prefix:
        for w in range(args.walkers):
            export_walker_trajectory(args.out, w, f"{args.dcd_prefix}_walker{w}.dcd")
    print(f"| quantity | value |\n|---|---|\n| iterations per walker | {summary['n_iterations']} |\n"
          f"| walkers | {summary['n_walkers']} |\n| flow acceptance | {summary['acceptance']:.4f} |")
    for key, value in summary.items():
        if key.endswith("_positive_fraction"):
            print(f"| {key} | {value:.4f} +- {summary[key + '_err']:.4f} |")
        elif key.endswith("_sign_changes"):
            print(f"| {key} (per walker) | {value} |")
    print(f"| CPU s per flow move (this run) | {summary['cpu_s_per_flow_move']:.2e} |\n"
          f"| CPU s in MD / flow moves (this run) | {summary['md_cpu_s']:.1f} / {summary['flow_cpu_s']:.1f} |")
    return 0


def _adaptive_mc(args) -> int:
    from regflow_mm.sampling.adaptive import AdaptSchedule, run_adaptive_mc, version_acceptance
    from regflow_mm.sampling.hybrid import export_walker_trajectory
    from regflow_mm.systems import get_system

    if args.segment_iterations is None:
        raise ValueError("--adapt needs --segment-iterations N (iterations per segment with a frozen flow)")
    adapt_at = None
    if args.adapt_at is not None:
        try:
            adapt_at = tuple(int(a) for a in args.adapt_at.split(","))
        except ValueError:
            raise ValueError(f"--adapt-at must be comma-separated iterations, got {args.adapt_at!r}") from None
    schedule = AdaptSchedule(args.segment_iterations, adapt_every=args.adapt_every, adapt_at=adapt_at,
                             max_updates=args.max_updates)
    tune = {k: v for k, v in (("finetune_steps", args.finetune_steps), ("finetune_batch_size", args.finetune_batch_size),
                              ("finetune_lr", args.finetune_lr), ("finetune_proposals", args.finetune_proposals),
                              ("finetune_proposal_mass", args.finetune_proposal_mass)) if v is not None}
    system = get_system(args.system)
    summary = run_adaptive_mc(system, args.flow, args.out, args.iterations, schedule=schedule,
                              train_data=args.train_data, n_walkers=args.walkers, md_steps=args.md_steps,
                              timestep_fs=args.timestep_fs, friction_per_ps=args.friction,
                              flow_moves=args.flow_moves, reject_d_chirality=not args.allow_d,
                              batch_size=args.batch_size, seed=args.seed, platform=args.platform,
                              checkpoint_every=args.checkpoint_every, progress=not args.quiet, **tune)
    if args.dcd_prefix:
        for w in range(args.walkers):
            export_walker_trajectory(args.out, w, f"{args.dcd_prefix}_walker{w}.dcd")
    print(f"| quantity | value |\n|---|---|\n| iterations per walker | {summary['n_iterations']} |\n"
          f"| walkers | {summary['n_walkers']} |\n| flow versions | {len(summary['flow_versions'])} |\n"
          f"| flow acceptance | {summary['acceptance']:.4f} |\n"
          f"| acceptance, first / last quarter | {summary['acceptance_first_quarter']:.4f} / "
          f"{summary['acceptance_last_quarter']:.4f} |\n"
          f"| acceptance rise, last - first quarter (batch-means SE) | {summary['acceptance_rise']:+.4f} "
          f"+- {summary['acceptance_rise_se']:.4f} |")
    for k, segment in enumerate(summary["segments"]):
        print(f"| segment {k} (flow v{segment['flow_version']}) | iterations {segment['start']}..{segment['stop'] - 1}: "
              f"acceptance {segment['acceptance']:.4f} |")
    for key, value in summary.items():
        if key.endswith("_positive_fraction"):
            print(f"| {key} | {value:.4f} +- {summary[key + '_err']:.4f} |")
        elif key.endswith("_sign_changes"):
            print(f"| {key} (per walker) | {value} |")
    print(f"| CPU s in MD / flow moves / fine-tuning (this run) | {summary['md_cpu_s']:.1f} / "
          f"{summary['flow_cpu_s']:.1f} / {summary['finetune_cpu_s']:.1f} |")
    if args.acceptance_samples:
        va = version_acceptance(args.out, system, args.acceptance_samples, seed=args.seed,
                                reject_d_chirality=not args.allow_d)
        print(f"| stationary acceptance of the proposal, v{va['first_version']} -> v{va['last_version']} "
              f"({va['n_samples']} paired samples each) | {va['acceptance_a']:.4f} +- {va['acceptance_a_se']:.4f} -> "
              f"{va['acceptance_b']:.4f} +- {va['acceptance_b_se']:.4f} (change {va['change']:+.4f} +- "
              f"{va['change_se']:.4f}) |")
    return 0


def _mc_tempering(args) -> int:
    from regflow_mm.sampling.tempering import run_flow_tempering

    summary = run_flow_tempering(args.system, args.flow, args.out, args.iterations, n_replicas=args.replicas,
                                 t_max_K=args.t_max, md_steps=args.md_steps, timestep_fs=args.timestep_fs,
                                 friction_per_ps=args.friction, flow_moves=args.flow_moves,
                                 reject_d_chirality=not args.allow_d, batch_size=args.batch_size, seed=args.seed,
                                 platform=args.platform, checkpoint_interval=args.checkpoint_interval,
                                 progress=not args.quiet)
    print(f"| quantity | value |\n|---|---|\n| iterations | {summary['n_iterations']} |\n"
          f"| swap acceptance (this run) | {summary['swap_acceptance']:.4f} |")
    for t, stats in zip(summary["temperatures_K"], summary["flow"]):
        print(f"| flow acceptance at {t:.1f} K | {stats['acceptance']:.4f} ({stats['n_accepted']}/{stats['n_proposed']}) |")
    for key, value in summary.items():
        if key.endswith("_positive_fraction"):
            print(f"| {key} at {summary['temperatures_K'][0]:.1f} K | {value:.4f} |")
        elif key.endswith("_sign_changes"):
            print(f"| {key} at {summary['temperatures_K'][0]:.1f} K | {value[0]} |")
    return 0


def _weighted_samples(args, system=None):
    from regflow_mm.energy import EnergyEvaluator
    from regflow_mm.flows import load_flow
    from regflow_mm.sampling.reweighting import draw_weighted_samples
    from regflow_mm.systems import get_system

    if args.n_samples < 1 or args.chunk_size < 1:
        raise ValueError(f"--n-samples and --chunk-size must be >= 1, got {args.n_samples} and {args.chunk_size}")
    system = system or get_system(args.system)
    flow = load_flow(args.flow, system=system)
    with EnergyEvaluator(system, n_workers=args.workers, platform=args.platform) as evaluator:
        samples = draw_weighted_samples(flow, evaluator, args.n_samples, chunk_size=args.chunk_size, seed=args.seed,
                                        molecular_system=system, progress=not args.quiet)
    if not args.allow_d and samples.is_l is not None:
        samples.log_w = np.where(samples.is_l, samples.log_w, -np.inf)
    return system, samples


def _common(samples) -> dict:
    ess = samples.ess()
    return {"n": samples.n, "ess_fraction": ess["ess"], "ess": ess["ess"] * samples.n,
            "n_zero_weight": samples.n_nonfinite,
            "d_fraction": None if samples.is_l is None else float(1.0 - samples.is_l.mean())}


def _reweight(args) -> int:
    from regflow_mm.sampling.reweighting import weighted_histogram, weighted_mean

    system, samples = _weighted_samples(args)
    result = _common(samples)
    lines = ["| observable | reweighted | +- |", "|---|---|---|",
             f"| Kish ESS / N | {result['ess_fraction']:.4f} | |",
             f"| zero-weight samples | {result['n_zero_weight']} | |"]
    u_mean, u_err = weighted_mean(samples.reduced_energy, samples.log_w)
    result["mean_reduced_energy"] = [float(u_mean), float(u_err)]
    lines.append(f"| <u> (kT) | {u_mean:.4f} | {u_err:.4f} |")
    histograms = {}
    for name, angles in samples.torsions.items():
        p, err = weighted_mean(angles > 0, samples.log_w)
        result[f"{name}_positive_fraction"] = [float(p), float(err)]
        lines.append(f"| P({name} > 0) | {p:.5f} | {err:.5f} |")
        density, d_err, edges = weighted_histogram(angles, samples.log_w, bins=args.bins)
        histograms[name] = density
        histograms[f"{name}_err"] = d_err
        histograms["edges_rad"] = edges
    print("\n".join(lines))
    if args.histograms:
        np.savez(args.histograms, **histograms)
    _write_json(args.json, result)
    return 0


def _free_energy(args) -> int:
    import sys

    from regflow_mm.sampling.free_energy import MIN_STATE_ESS, parse_torsion_predicate, state_delta_f, torsion_state
    from regflow_mm.systems import get_system

    system = get_system(args.system)
    if args.to is not None or args.to_temperature is not None:
        return _thermodynamic(args, system)
    for option in ("data_a", "data_b"):
        if getattr(args, option) is not None:
            raise ValueError(f"--{option.replace('_', '-')} needs --to or --to-temperature (state B of a "
                             "thermodynamic change)")
    # the states are checked before any sample is drawn
    state_a = parse_torsion_predicate(args.state_a, system.torsions)
    state_b = parse_torsion_predicate(args.state_b, system.torsions)
    if args.tfep_data is not None:
        return _tfep(args, system)
    if args.flow is None:
        raise ValueError("free-energy needs a FLOW file, or --tfep-data (TFEP from data), or --to/--to-temperature")
    system, samples = _weighted_samples(args, system)
    in_a = torsion_state(samples.torsions, state_a)
    in_b = torsion_state(samples.torsions, state_b)
    result = {**_common(samples), **state_delta_f(samples.log_w, in_a, in_b),
              "state_a": args.state_a, "state_b": args.state_b, "kT_kJ_per_mol": system.kT}
    print("| quantity | value |\n|---|---|")
    print(f"| Delta F ({args.state_a} -> {args.state_b}) | {result['delta_f']:.4f} +- {result['ddelta_f']:.4f} kT |")
    print(f"| Delta F in kJ/mol | {result['delta_f'] * system.kT:.4f} +- {result['ddelta_f'] * system.kT:.4f} |")
    print(f"| P(A), P(B) | {result['p_a']:.5f}, {result['p_b']:.5f} |")
    print(f"| samples (in A, in B) | {result['n']} ({result['n_a']}, {result['n_b']}) |")
    print(f"| Kish ESS in A, in B | {result['ess_a']:.1f}, {result['ess_b']:.1f} |")
    print(f"| Kish ESS / N | {result['ess_fraction']:.4f} |")
    low = min(result["ess_a"], result["ess_b"])
    if low < MIN_STATE_ESS:
        print(f"regflow-mm free-energy: warning: UNRELIABLE: the +- rests on {low:.1f} effective samples in a state "
              f"(fewer than {MIN_STATE_ESS:.0f}): draw more samples (-n) or use a better flow", file=sys.stderr)
    _write_json(args.json, result)
    return 0


def _tfep(args, system) -> int:
    import sys

    from regflow_mm.data import load_dataset
    from regflow_mm.sampling.tfep import TFEPSettings, tfep_between_states

    settings = TFEPSettings(n_train=args.tfep_n_train, n_eval=args.tfep_n_eval, n_steps=args.tfep_steps,
                            moved=args.tfep_moved, seed=args.seed)
    data = load_dataset(args.tfep_data, system)
    ev = load_dataset(args.tfep_eval_data, system) if args.tfep_eval_data else None
    result = tfep_between_states(system, data.positions, data.log_weights, args.state_a, args.state_b,
                                 eval_positions=None if ev is None else ev.positions,
                                 eval_log_w=None if ev is None else ev.log_weights, settings=settings,
                                 progress=not args.quiet)
    f, r, t = result["forward"], result["reverse"], result["train"]
    print("| quantity | value |\n|---|---|")
    print(f"| Delta F ({args.state_a} -> {args.state_b}), TFEP {result['method']} | {result['delta_f']:.4f} +- "
          f"{result['ddelta_f']:.4f} kT |")
    for label, d in (("forward A -> B", f), ("reverse B -> A", r)):
        print(f"| {label}: EXP Delta F, work ESS / N (count), mapped outside | {d['delta_f']:.4f} +- {d['ddelta_f']:.4f} kT, "
              f"{d['work_ess']:.4f} ({d['work_ess_count']:.0f}), {d['n_outside']} of {d['n']} |")
    print(f"| map: moved coordinates, training CPU s, energy calls in training | {result['n_moved']} of {result['dim']}, "
          f"{t['cpu_s']:.1f}, {t['n_energy_calls']} |")
    print(f"| energy calls for the works | {result['n_energy_calls_eval']} |")
    if not result["reliable"]:
        print(f"regflow-mm free-energy: warning: UNRELIABLE: the TFEP estimate rests on {result['best_work_ess_count']:.1f} "
              f"effective samples (fewer than {MIN_STATE_ESS:.0f}) {result.get('note', '')}".rstrip(), file=sys.stderr)
    _write_json(args.json, {k: v for k, v in result.items() if k != "settings"})
    return 0


def _thermodynamic(args, system) -> int:
    import sys

    from regflow_mm.data import load_dataset
    from regflow_mm.flows import load_flow
    from regflow_mm.sampling.thermodynamic import ThermodynamicState, check_same_molecule, delta_f_between
    from regflow_mm.systems import get_system

    other = get_system(args.to) if args.to is not None else system
    a = ThermodynamicState.of(system, name=f"A ({system.name}, {system.temperature:g} K)")
    t_b = args.to_temperature if args.to_temperature is not None else other.temperature
    b = ThermodynamicState.of(other, t_b, name=f"B ({other.name}, {t_b:g} K)")
    topologies = [system.topology, other.topology]
    check_same_molecule([a, b], topologies)  # before any file is read
    samples = []
    for option, label in (("data_a", "A"), ("data_b", "B")):
        path = getattr(args, option)
        samples.append(None if path is None else load_dataset(path).positions)
    flow = load_flow(args.flow, system=system) if args.flow is not None else None
    if flow is None and samples == [None, None]:
        raise ValueError("a thermodynamic Delta F needs samples: a FLOW file and/or --data-a / --data-b")
    result = delta_f_between(a, b, samples_a=samples[0], samples_b=samples[1], flow=flow,
                             n_flow_samples=args.n_samples, seed=args.seed, is_l=system.is_l, topologies=topologies,
                             n_workers=args.workers or 0, platform=args.platform)
    print("| quantity | value |\n|---|---|")
    print(f"| Delta f ({a.name} -> {b.name}), {result['method']} | {result['delta_f']:.4f} +- {result['ddelta_f']:.4f} "
          f"(reduced, kT) |")
    for key in ("bar", "flow_only"):
        if key in result:
            print(f"| {key.replace('_', ' ')} | {result[key]['delta_f']:.4f} +- {result[key]['ddelta_f']:.4f} |")
    print(f"| samples per source | {result['n_samples']} |")
    print(f"| MBAR effective samples in A, B | {result['ess'][0]:.1f}, {result['ess'][1]:.1f} |")
    if result["flow"]:
        print("| flow: Kish ESS / N per state | " + ", ".join(f"{k} {v:.4f}" for k, v in result["flow"]["ess"].items())
              + f" ({result['flow']['n_dropped']} of {result['flow']['n_drawn']} dropped) |")
    if not result["reliable"]:
        print(f"regflow-mm free-energy: warning: UNRELIABLE: fewer than {MIN_STATE_ESS:.0f} effective samples in a "
              "state", file=sys.stderr)
    _write_json(args.json, result)
    return 0


def _write_json(path, result: dict) -> None:
    if path:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
        Path(path).write_text(json.dumps(clean, indent=2, default=float))
