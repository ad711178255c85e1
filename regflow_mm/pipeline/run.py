"""The end-to-end job: MD -> RegFlow (teacher CNF, reflow pairs, student) and an MLE baseline ->
evaluation -> hybrid MD/flow Monte Carlo -> reweighted free energy -> exported OpenMM force -> (optional)
smooth flow potential for dynamics -> report.

Orchestration only: each stage calls the layer that does the work (``data.simulate``,
``training.run_training``, ``training.evaluation``, ``sampling``, ``export.check``) and its figures
come from ``training.plots``; the config reaches the trainer through ``config.train_settings``.

Every stage is cached (see ``stages.py``): re-running with the same config does no work, an
interrupted run continues where it stopped (MD and training resume from their own checkpoints).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from ..files import output_dir
from .config import baseline_settings, finetune_settings, load_config, smooth_settings, train_settings
from .stages import Stage, StagedRun

log = logging.getLogger(__name__)

# Part of the training stages' cache key: bump it when a code change alters what training
# produces, so existing runs retrain instead of reusing flows made by the old code.
# 2: internal coordinates centre each torsion mid-box (fitted circular-mean offsets).
# 3: improper-first Z-matrix, narrow torsions as intervals.
# 4: a final validation at the end of a run, so keep_best can choose the last steps' weights.
# 5: compiled losses without graph breaks (1.24x the steps per CPU-s); the compiling step outside the budget.
TRAIN_CODE_VERSION = 5
# Settings of the RegFlow student's optimisation alone: the teacher stage's key leaves them out.
_STUDENT_ONLY = ("time_budget_s", "epochs", "max_steps", "batch_size", "lr", "weight_decay", "ema_decay", "ema_warmup",
                 "grad_clip", "lr_schedule", "log_every", "checkpoint_every", "compile", "val_every_epochs",
                 "val_samples", "val_torsion_samples", "keep_best", "early_stop_patience", "regression_units",
                 "regularizer", "lambda_r", "lambda_n", "lambda_kl", "kl_batch_size", "kl_energy_cap_kT")


def run_pipeline(config: dict | str | Path | None, out: str | Path, progress: bool = True) -> Path:
    """Run every stage for ``config`` (a validated dict, a TOML path, or None for the aldp demo)
    into the folder ``out``; returns the path of ``report.md``."""
    if not isinstance(config, dict):
        config = load_config(config)
    out = output_dir(out)
    import torch

    torch.set_num_threads(config["run"]["threads"])
    seed = config["run"]["seed"]
    system_name = config["system"]["name"]
    _check_system(system_name)
    if config["baseline"]["enabled"] and config["baseline"]["method"] == config["train"]["method"]:
        raise ValueError(f"[baseline].method {config['baseline']['method']!r} is [train].method too: set "
                         f"[baseline] enabled = false or another baseline method")
    # every training setting is checked here, before any stage runs
    regflow = train_settings(config)
    finetune = finetune_settings(config)  # the MLE part of the RegFlow route, or None
    # The baseline shares architecture, optimiser and budget (not the RegFlow-only settings), or is the smooth flow.
    baseline = baseline_settings(config)
    smooth_baseline = baseline is not None and config["baseline"]["method"] == "smooth"
    smooth = smooth_settings(config) if config["smooth"]["enabled"] else None
    run = StagedRun(out)  # the folder is made only once the config passed every check
    (out / "config.json").write_text(json.dumps(config, indent=2))

    md = config["md"]
    reference = None
    if md["reference_ns"] > 0:
        # The held-out reference run (seed + 1) has no inputs: it runs on the second core while the
        # training run and the training stages use the first, and evaluation waits for it.
        reference = run.start(Stage("reference", functools.partial(_reference_md, system_name=system_name, md=md,
                                                                   seed=seed + 1),
                                    {"system": system_name, "seed": seed + 1, **_md_key_settings(md)}))
    run.run(Stage("md", lambda f, i: _md(f, system_name, md, seed, progress),
                  {"system": system_name, "seed": seed,
                   **{k: v for k, v in _md_key_settings(md).items() if not k.startswith("reference_")}}))
    # The two trainings are independent: the baseline trains in a process of its own beside the main
    # run (their budgets are CPU seconds, so sharing the cores with the reference run costs wall time,
    # not training).
    threads = config["run"]["threads"]
    background = None
    if baseline is not None:
        background = run.start(Stage("train_baseline", functools.partial(_train, settings=baseline, progress=False,
                                                                          threads=threads),
                                     {**baseline, "code_version": TRAIN_CODE_VERSION}, needs=("md",)))
    held_out = ("reference",) if reference is not None else ()
    # teacher_version: 2 = the standardised, torus-aware teacher CNF (training.cnf.TeacherCoordinates); a RegFlow
    # stage cached with the older teacher trains again (the MLE baseline's key does not change)
    teacher = {"teacher_version": 2} if regflow.get("method", "regflow") == "regflow" else {}
    train_needs = ("md",)
    teacher_eval = None
    if regflow["method"] == "regflow" and regflow.get("target", "reflow") == "reflow":
        # The teacher and its pairs first (a stage of their own), then the student; the teacher's evaluation as a
        # generator (CNF likelihoods are costly) runs below, on the core the baseline frees.
        run.run(Stage("teacher", functools.partial(_teacher, settings=regflow, progress=progress, threads=threads),
                      {**{k: v for k, v in regflow.items() if k not in _STUDENT_ONLY}, **teacher}, needs=("md",)))
        train_needs = ("md", "teacher")
        if config["evaluate"]["teacher_samples"] > 0:
            ev = {k: config["evaluate"][k] for k in ("teacher_samples", "teacher_nll_frames", "teacher_ode_steps",
                                                     "n_bootstrap", "n_torsion")}
            teacher_eval = Stage("evaluate_teacher", functools.partial(_evaluate_teacher, settings=ev, seed=seed,
                                                                       threads=threads),
                                 {**ev, "seed": seed}, needs=("md", "teacher", *held_out))
    student = Stage("train_regflow", functools.partial(_train, settings=regflow, finetune=finetune,
                                                       progress=progress and teacher_eval is not None,
                                                       threads=threads),
                    {**regflow, "code_version": TRAIN_CODE_VERSION, **teacher,
                     **({"mle_finetune": finetune} if finetune else {})}, needs=train_needs)
    if teacher_eval is None:
        run.run(student)
    else:
        # the student trains in the background; the teacher's evaluation takes the core the baseline frees when it
        # ends (its budget is the student's, without the teacher): one process per core, no oversubscription
        student = run.start(student)
        if background is not None:
            run.wait(background)
        if reference is not None:
            run.wait(reference)
        run.run(teacher_eval)
        run.wait(student)
    # the stage keeps its name for any method; with the route it holds the RegFlow student and the fine-tuned flow
    flows = {config["train"]["method"]: ("train_regflow", "student_flow" if finetune else "flow")}
    if finetune:
        flows["regflow+mle"] = ("train_regflow", "flow")
    if background is not None:
        run.wait(background)
        flows[config["baseline"]["method"]] = ("train_baseline", "flow")
    if reference is not None:
        run.wait(reference)
    # plain MD, the baseline of the hybrid chain's crossings, on the second core beside the evaluation
    plain_md = None
    if config["mc"]["plain_md_iterations"] > 0:
        plain_keys = ("plain_md_iterations", "md_steps_per_iteration", "n_walkers")
        plain_md = run.start(Stage("plain_md", functools.partial(_plain_md, system_name=system_name, mc=config["mc"],
                                                                 seed=seed),
                                   {**{k: config["mc"][k] for k in plain_keys}, "seed": seed}))
    run.run(Stage("evaluate", lambda f, i: _evaluate(f, i, flows, config["evaluate"], seed),
                  {**config["evaluate"], "seed": seed, "best_rule": BEST_RULE},
                  needs=("md", *held_out, *{s for s, _ in flows.values()})))
    if plain_md is not None:
        run.wait(plain_md)
    # the adaptive chain (its fine-tuning is the longest part of the Monte Carlo) on the second core while the
    # hybrid chain, the free energy, the tempering chain and the export run here
    mc = config["mc"]
    chain_keys = ("md_steps_per_iteration", "n_walkers", "flow_moves_per_iteration")
    adaptive = None
    if mc["adapt_segments"] > 1:
        adaptive_keys = chain_keys + ("n_iterations", "adapt_iterations", "adapt_segments", "finetune_steps",
                                      "finetune_lr", "finetune_proposals", "acceptance_samples")
        adaptive = run.start(Stage("mc_adaptive", functools.partial(_adaptive_mc, system_name=system_name, mc=mc,
                                                                    seed=seed, threads=threads),
                                   {**{k: mc[k] for k in adaptive_keys}, "seed": seed}, needs=("md", "evaluate")))
    try:
        run.run(Stage("mc", functools.partial(_mc, system_name=system_name, mc=mc, seed=seed, progress=progress),
                      {**{k: mc[k] for k in chain_keys + ("n_iterations",)}, "seed": seed}, needs=("md", "evaluate")))
        run.run(Stage("free_energy", functools.partial(_free_energy, settings=config["free_energy"], seed=seed,
                                                       progress=progress),
                      {**config["free_energy"], "seed": seed}, needs=("md", *held_out, "evaluate")))
        if mc["tempering_replicas"] >= 2:
            tempering_keys = ("md_steps_per_iteration", "flow_moves_per_iteration", "tempering_replicas",
                              "tempering_iterations", "tempering_max_K")
            run.run(Stage("mc_tempering", functools.partial(_flow_tempering, system_name=system_name, mc=mc,
                                                            seed=seed, progress=progress),
                          {**{k: mc[k] for k in tempering_keys}, "seed": seed}, needs=("md", "evaluate")))
        run.run(Stage("export", lambda f, i: _export(f, i, config["export"], seed),
                      {**config["export"], "seed": seed}, needs=("md", "evaluate")))
    except BaseException:
        if adaptive is not None and adaptive.process is not None:  # nothing left running: a rerun resumes the chain
            adaptive.process.terminate()
            adaptive.process.join()
        raise
    if adaptive is not None:
        run.wait(adaptive)
    if smooth is not None:
        # with the smooth flow as the baseline, the dynamics stage runs that flow instead of training its own
        trained = "train_baseline" if smooth_baseline else None
        others = {k: v for k, v in flows.items() if v[0] != trained}
        run.run(Stage("smooth", functools.partial(_smooth, settings=smooth, smooth=config["smooth"], flows=others,
                                                  seed=seed, threads=threads, progress=progress, trained_stage=trained),
                      {**config["smooth"], "train": smooth, "code_version": TRAIN_CODE_VERSION,
                       "langevin_starts": "systematic, by (phi, psi) strata",
                       **({"trained_stage": trained} if trained else {})},
                      needs=("md", *held_out, *{s for s, _ in flows.values()})))
    from .report import write_report

    return write_report(out, config, run.records)


def _check_system(name: str) -> None:
    from ..systems import get_system

    get_system(name)  # fails early, with the clear message, on an unknown system


# ----------------------------------------------------------------------------------------------- stages

# [md] keys added after runs were cached: left out of the stage keys while at their default (the behaviour
# of the code before them), so that existing run folders keep their simulations.
_MD_KEYS_ADDED_LATER = {"metad_grid_points": 72}


def _md_key_settings(md: dict) -> dict:
    return {k: v for k, v in md.items() if _MD_KEYS_ADDED_LATER.get(k, object()) != v}


def _simulate_one(system_name: str, path: str, ns: float, save_interval_ps: float, md: dict, seed: int,
                  progress: bool) -> str:
    """One MD or metadynamics run of the [md] settings."""
    from ..data import simulate
    from ..data.metadynamics import MetadynamicsSettings
    from ..data.tempering import TemperingSettings
    from ..systems import get_system

    enhanced = None
    if md["enhanced"] == "metadynamics":
        enhanced = MetadynamicsSettings(torsions=md["metad_torsions"],
                                        bias_factor=md["metad_bias_factor"], height_kJ=md["metad_height_kJ"],
                                        width_rad=md["metad_width_rad"], deposition_ps=md["metad_deposition_ps"],
                                        grid_points=md["metad_grid_points"])
    elif md["enhanced"] == "tempering":
        enhanced = TemperingSettings(n_replicas=md["pt_replicas"], t_max_K=md["pt_max_temperature_K"])
    elif md["enhanced"] != "none":
        raise ValueError(f"[md].enhanced must be 'none', 'metadynamics' or 'tempering', got {md['enhanced']!r}")
    simulate(get_system(system_name), path, ns=ns, save_interval_ps=save_interval_ps,
             timestep_fs=md["timestep_fs"], seed=seed, platform=md["platform"],
             equilibration_ps=md["equilibration_ps"], val_blocks=md["val_blocks"], progress=progress,
             enhanced=enhanced, hydrogen_mass_amu=md["hydrogen_mass_amu"] or None)
    return path


def _md(folder: Path, system_name: str, md: dict, seed: int, progress: bool) -> dict:
    """The training data: one MD or metadynamics run."""
    from ..data import dihedrals, load_dataset
    from ..systems import get_system
    from ..training.plots import ramachandran_panels

    path = str(folder / "md.h5")
    _simulate_one(system_name, path, md["ns"], md["save_interval_ps"], md, seed, progress)
    data = load_dataset(path, get_system(system_name))
    summary = _run_summary(data, md)
    phi_name = summary["phi_name"]
    names = (phi_name, "psi" + phi_name[3:] if "psi" + phi_name[3:] in data.system.torsions
             else next(n for n in data.system.torsions if n.startswith("psi")))
    angles = dihedrals(np.asarray(data.positions, dtype=np.float64), [data.system.torsions[n] for n in names])
    panels = [("training frames", angles, None)]
    if data.weighted:
        panels.append(("training frames, reweighted", angles, data.log_weights))
    ramachandran_panels(folder / "ramachandran.png", panels, labels=names)
    return {"dataset": path, "dataset_summary": summary, "figure": "ramachandran.png",
            "n_frames": summary["n_frames"], "ns": summary["ns"], "phi_name": summary["phi_name"], "phi_positive_fraction": summary["phi_positive_fraction"],
            "phi_sign_changes": summary["phi_sign_changes"], "splits": summary["splits"]}


def _reference_md(folder: Path, inputs: dict, *, system_name: str, md: dict, seed: int) -> dict:
    """The independent, held-out reference run (reference_ns, saved every reference_save_interval_ps)."""
    from ..data import load_dataset
    from ..systems import get_system

    path = str(folder / "reference.h5")
    _simulate_one(system_name, path, md["reference_ns"], md["reference_save_interval_ps"], md, seed, False)
    return {"reference": path, "reference_summary": _run_summary(load_dataset(path, get_system(system_name)), md)}


def _run_summary(data, md: dict) -> dict:
    """Frames, length, state-torsion populations (as sampled and reweighted) and splits of a Dataset."""
    name, phi = _phi(data.system, data.positions, _phi_name(data.system, md))
    return {"n_frames": len(data), "ns": float(data.time[-1] / 1000.0), "enhanced": md["enhanced"], "phi_name": name,
            "seed": data.metadata["seed"], "openmm_seed": data.metadata.get("openmm_seed"),
            "phi_positive_fraction": float(np.mean(phi > 0)),
            "phi_positive_reweighted": data.reweighted_fraction(phi > 0), "weight_ess": data.weight_ess(),
            "phi_sign_changes": int(np.abs(np.diff((phi > 0).astype(int))).sum()),
            "splits": {k: len(v) for k, v in data.splits.items()}}


def _reference(inputs: dict):
    """The held-out reference frames: the independent reference run if there is one, else the test split.

    Returns (dataset, frame indices, description)."""
    from ..data import load_dataset

    if "reference" in inputs:
        ref = load_dataset(inputs["reference"]["reference"])
        return ref, np.arange(len(ref)), f"independent {inputs['reference']['reference_summary']['enhanced']} run"
    data = load_dataset(inputs["md"]["dataset"])
    return data, data.split_indices("test"), "test split (last block of the training run)"


def _train(folder: Path, inputs: dict, *, settings: dict, progress: bool, threads: int,
           finetune: dict | None = None) -> dict:
    """A training run into ``folder``; with the "teacher" stage's results, on its teacher and pairs (linked
    in), and with ``finetune`` settings, the RegFlow route (student, then MLE fine-tuning from it)."""
    import os
    import shutil

    import torch

    from ..training.runner import run_regflow_then_mle, run_training
    from ..training.trainer import TrainConfig

    torch.set_num_threads(threads)  # a spawned stage process starts with torch's default (all cores)
    config = TrainConfig.from_dict({**settings, "data": inputs["md"]["dataset"]})
    if "teacher" in inputs:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("teacher", "pairs"):
            src, dst = Path(inputs["teacher"][name]), folder / Path(inputs["teacher"][name]).name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
    started = time.process_time()
    if finetune is None:
        info, student = run_training(config, folder, progress=progress), None
    else:
        mle = TrainConfig.from_dict({**finetune, "data": inputs["md"]["dataset"]})
        info = run_regflow_then_mle(config, mle, folder, progress=progress)
        student = info.pop("regflow")
    final = folder / "mle_finetune" if student is not None else folder
    results = {"flow": str(final / "flow.pt"), "method": "regflow+mle" if student is not None else config.method,
               "target": config.target, "n_pairs": (student or info).get("n_pairs"), "train": info.get("train", {}),
               "val_metrics": info.get("final_metrics", {}), "cpu_s_this_run": time.process_time() - started,
               "curves": str(final / "plots" / "training_curves.png")}
    if student is not None:
        results.update(student_flow=str(folder / "flow.pt"), student_train=student.get("train", {}),
                       student_curves=str(folder / "plots" / "training_curves.png"))
    return results


def _teacher(folder: Path, inputs: dict, *, settings: dict, progress: bool, threads: int) -> dict:
    import torch

    from ..training.runner import prepare_teacher
    from ..training.trainer import TrainConfig

    torch.set_num_threads(threads)
    return prepare_teacher(TrainConfig.from_dict({**settings, "data": inputs["md"]["dataset"]}), folder,
                           progress=progress)


def _evaluate_teacher(folder: Path, inputs: dict, *, settings: dict, seed: int, threads: int) -> dict:
    """The reflow teacher as a Boltzmann generator: its exact likelihood by a fixed-step rk4 ODE solve with the
    exact divergence, evaluated like every flow (``evaluate_flow``)."""
    import torch

    from ..energy import EnergyEvaluator
    from ..flows import load_flow
    from ..training.cnf import SolverOptions, TeacherCNF, teacher_flow
    from ..training.evaluation import evaluate_flow, scalar_metrics

    torch.set_num_threads(threads)
    data, test, reference = _reference(inputs)
    student = load_flow(inputs["teacher"]["flow_space"], system=data.system)
    cnf = TeacherCNF.load(inputs["teacher"]["teacher"])
    cnf.solver = SolverOptions("rk4", n_steps=settings["teacher_ode_steps"])
    flow = teacher_flow(cnf, student, inputs["teacher"]["teacher"])
    log_w = data.log_weights[test] if data.weighted else None
    started = time.process_time()
    with EnergyEvaluator(data.system, n_workers=0) as evaluator, torch.no_grad():
        res = evaluate_flow(flow, data.system, data.positions[test], data.reduced_energies()[test], evaluator=evaluator,
                            n_samples=settings["teacher_samples"], seed=seed, n_torsion=settings["n_torsion"],
                            n_bootstrap=settings["n_bootstrap"], md_log_weights=log_w,
                            n_nll=settings["teacher_nll_frames"] or None, chunk_size=1000,
                            plots_dir=folder, plot_prefix="teacher_")
    return {"metrics": {**scalar_metrics(res), "basins": res["details"]["basins"],
                        "n_nll_frames": res["details"]["nll"]["n_frames"]},
            "ode_solver": f"rk4 {settings['teacher_ode_steps']} steps", "cpu_s": time.process_time() - started,
            "figures": {"ramachandran": "teacher_ramachandran.png", "energy": "teacher_energy_histogram.png"}}


def _evaluate(folder: Path, inputs: dict, flows: dict, settings: dict, seed: int) -> dict:
    from ..energy import EnergyEvaluator
    from ..flows import load_flow
    from ..training.evaluation import evaluate_flow, scalar_metrics

    data, test, reference = _reference(inputs)
    log_w = data.log_weights[test] if data.weighted else None
    results = {}
    with EnergyEvaluator(data.system, n_workers=0) as evaluator:
        for name, (stage, key) in flows.items():
            flow = load_flow(inputs[stage][key], system=data.system)
            res = evaluate_flow(flow, data.system, data.positions[test], data.reduced_energies()[test],
                                evaluator=evaluator, n_samples=settings["n_samples"], seed=seed,
                                n_torsion=settings["n_torsion"], n_bootstrap=settings["n_bootstrap"],
                                md_log_weights=log_w, plots_dir=folder, plot_prefix=f"{name}_")
            results[name] = {**scalar_metrics(res), "basins": res["details"]["basins"]}
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    data_t_w2 = _training_data_t_w2(inputs, data, test, log_w, settings, seed) if "reference" in inputs else None
    choice = settings["downstream_flow"]
    if choice == "best":
        choice = best_flow(results)
    elif choice == "baseline":
        choice = next(name for name, (stage, _) in flows.items() if stage == "train_baseline")
    if choice not in flows:
        raise ValueError(f"[evaluate].downstream_flow {settings['downstream_flow']!r}: no such flow in this run "
                         f"({', '.join(flows)}); use best, baseline or one of these")
    return {"metrics": results, "n_test_frames": int(len(test)), "reference": reference,
            "reference_weighted": log_w is not None, "training_data_t_w2": data_t_w2,
            "downstream": {"method": choice, "flow": inputs[flows[choice][0]][flows[choice][1]],
                           "rule": settings["downstream_flow"]},
            "figures": {name: {"ramachandran": f"{name}_ramachandran.png", "energy": f"{name}_energy_histogram.png"}
                        for name in flows}}


def _training_data_t_w2(inputs: dict, reference, frames, ref_log_w, settings: dict, seed: int) -> float:
    """T-W2 (rad) between the training run's frames (with their weights) and the reference: how far two
    MD estimates of the same ensemble disagree at these run lengths, the floor for a flow's T-W2."""
    from ..data import load_dataset
    from ..training.evaluation import backbone_torsions
    from ..training.metrics import torsion_w2

    data = load_dataset(inputs["md"]["dataset"])
    ang_data, _ = backbone_torsions(data.system, data.positions)
    ang_ref, _ = backbone_torsions(reference.system, reference.positions[frames])
    n = int(min(settings["n_torsion"], len(data), len(frames)))
    return torsion_w2(ang_ref, ang_data, data.log_weights, n_resample=n, max_md=n, seed=seed,
                      md_log_w=ref_log_w)["t_w2"]


BEST_RULE = "basins_missing, -ess_p05, e_w1"  # part of the evaluate stage's key: a new rule re-chooses


def best_flow(metrics: dict[str, dict]) -> str:
    """The name of the 'best' downstream flow among ``evaluate_flow`` metrics: fewest Ramachandran basins of the
    reference missed, then the highest bootstrap 5th percentile of the Kish ESS (``ess_p05``, else ``ess``), then
    the lowest reweighted E-W1. The downstream stages reweight by or accept with the importance weights, whose
    variance (1/ESS) sets their errors; E-W1 alone is noisy where the ESS is below a few percent (al4: the spline's
    E-W1 0.63 vs the smooth flow's 0.96 kT at ESS 0.58% vs 0.95%, BENCHMARKS.md issue 10)."""
    def rank(name):
        m = metrics[name]
        ess = m.get("ess_p05", m.get("ess"))
        return (m.get("basins_missing") or 0, -float(ess) if ess is not None and np.isfinite(ess) else 0.0,
                _finite_or_inf(m.get("e_w1")))

    return min(metrics, key=rank)


def _finite_or_inf(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else float("inf")


def _mc(folder: Path, inputs: dict, *, system_name: str, mc: dict, seed: int, progress: bool) -> dict:
    """The hybrid chain, its trace plot and summary."""
    import h5py

    from ..sampling.hybrid import run_hybrid_mc
    from ..systems import get_system
    from ..systems.platforms import resolve_platform
    from ..training.plots import mc_trace_plot

    system = get_system(system_name)
    started = time.process_time()
    summary = run_hybrid_mc(system, inputs["evaluate"]["downstream"]["flow"], folder / "mc.h5", mc["n_iterations"],
                            n_walkers=mc["n_walkers"], md_steps=mc["md_steps_per_iteration"],
                            flow_moves=mc["flow_moves_per_iteration"], seed=seed,
                            platform=resolve_platform("auto", system.n_atoms, system.system), progress=progress)
    with h5py.File(folder / "mc.h5", "r") as fh:
        positions = fh["positions"][: int(fh.attrs["n_iterations"])]
    name = inputs["md"]["phi_name"]
    angles = np.stack([_phi(system, positions[:, w], name)[1] for w in range(positions.shape[1])], axis=1)
    mc_trace_plot(folder / "mc_trace.png", name, angles, summary["counters"], summary["acceptance"])
    summary.pop("settings", None)
    # the chains' own CPU time (MD + flow moves), the base of crossings per CPU second
    return {**summary, "chain_cpu_s": summary["md_cpu_s"] + summary["flow_cpu_s"],
            "cpu_s": time.process_time() - started, "figure": "mc_trace.png"}


def _plain_md(folder: Path, inputs: dict, *, system_name: str, mc: dict, seed: int) -> dict:
    """The hybrid chain's walkers, start and MD segment without flow moves: phi sign changes per CPU second of
    plain MD, counted like the hybrid chain's (between consecutive chain states, here the MD segments' ends)."""
    from ..sampling.hybrid import run_hybrid_mc
    from ..systems import get_system
    from ..systems.platforms import resolve_platform

    system = get_system(system_name)
    summary = run_hybrid_mc(system, None, folder / "plain_md.h5", mc["plain_md_iterations"],
                            n_walkers=mc["n_walkers"], md_steps=mc["md_steps_per_iteration"], flow_moves=0, seed=seed,
                            platform=resolve_platform("auto", system.n_atoms, system.system), progress=False)
    steps = summary["n_iterations"] * summary["n_walkers"] * mc["md_steps_per_iteration"]
    ps = steps * summary["settings"]["timestep_fs"] * 1e-3
    keep = {k: v for k, v in summary.items() if k.startswith("phi") or k in ("n_iterations", "n_walkers",
                                                                             "n_chain_states")}
    return {**keep, "chain_cpu_s": summary["md_cpu_s"], "ps": ps}


def _flow_tempering(folder: Path, inputs: dict, *, system_name: str, mc: dict, seed: int, progress: bool) -> dict:
    """Parallel tempering with the chain's MD segment and flow moves in every replica."""
    from ..sampling.tempering import run_flow_tempering
    from ..systems import get_system
    from ..systems.platforms import resolve_platform

    system = get_system(system_name)
    started = time.process_time()
    summary = run_flow_tempering(system, inputs["evaluate"]["downstream"]["flow"], folder / "tempering.nc",
                                 mc["tempering_iterations"], n_replicas=mc["tempering_replicas"],
                                 t_max_K=mc["tempering_max_K"], md_steps=mc["md_steps_per_iteration"],
                                 flow_moves=mc["flow_moves_per_iteration"], seed=seed,
                                 platform=resolve_platform("auto", system.n_atoms, system.system), progress=progress)
    return {**summary, "cpu_s": time.process_time() - started}


def _adaptive_mc(folder: Path, inputs: dict, *, system_name: str, mc: dict, seed: int, threads: int) -> dict:
    """The hybrid chain's settings with its flow fine-tuned between ``adapt_segments`` segments; acceptance per
    segment. A stage of its own process (no progress bar)."""
    import torch

    from ..sampling.adaptive import AdaptSchedule, run_adaptive_mc, version_acceptance
    from ..systems import get_system
    from ..systems.platforms import resolve_platform

    torch.set_num_threads(threads)  # a spawned stage process starts with torch's default (all cores)
    system = get_system(system_name)

    n = mc["adapt_iterations"] or mc["n_iterations"]
    summary = run_adaptive_mc(system, inputs["evaluate"]["downstream"]["flow"], folder / "adaptive.h5", n,
                              schedule=AdaptSchedule(n // mc["adapt_segments"]), train_data=inputs["md"]["dataset"],
                              finetune_steps=mc["finetune_steps"], finetune_lr=mc["finetune_lr"],
                              finetune_proposals=mc["finetune_proposals"],
                              n_walkers=mc["n_walkers"], md_steps=mc["md_steps_per_iteration"],
                              flow_moves=mc["flow_moves_per_iteration"], seed=seed,
                              platform=resolve_platform("auto", system.n_atoms, system.system), progress=False)
    keep = ("acceptance", "acceptance_first_quarter", "acceptance_last_quarter", "acceptance_first_quarter_se",
            "acceptance_last_quarter_se", "acceptance_rise", "acceptance_rise_se", "segments", "md_cpu_s", "flow_cpu_s",
            "finetune_cpu_s")
    if mc["finetune_proposals"]:
        summary.update(finetune_proposals=mc["finetune_proposals"],
                       proposal_ess=[v["proposal_ess"] for v in summary["flow_versions"][1:]])
        keep += ("finetune_proposals", "proposal_ess")
    if mc["acceptance_samples"]:
        summary["version_acceptance"] = version_acceptance(folder / "adaptive.h5", system, mc["acceptance_samples"],
                                                           seed=seed)
        keep += ("version_acceptance",)
    return {**{k: summary[k] for k in keep}, "n_versions": len(summary["flow_versions"]),
            **{k: v for k, v in summary.items() if k.startswith("phi")}}


def _free_energy(folder: Path, inputs: dict, settings: dict, seed: int, progress: bool) -> dict:
    from ..data import load_dataset
    from ..energy import EnergyEvaluator
    from ..flows import load_flow
    from ..sampling.free_energy import state_delta_f
    from ..sampling.reweighting import draw_weighted_samples
    from ..training.plots import free_energy_plot

    runs = {"md": load_dataset(inputs["md"]["dataset"])}
    if "reference" in inputs:
        runs["md_reference"] = load_dataset(inputs["reference"]["reference"])
    system = runs["md"].system
    flow = load_flow(inputs["evaluate"]["downstream"]["flow"], system=system)
    with EnergyEvaluator(system, n_workers=0) as evaluator:
        samples = draw_weighted_samples(flow, evaluator, settings["n_samples"], seed=seed,
                                        molecular_system=system, progress=progress)
    name = inputs["md"]["phi_name"]
    phi = samples.torsions[name]
    log_w = np.where(samples.is_l, samples.log_w, -np.inf) if samples.is_l is not None else samples.log_w
    result = {"torsion": name, "n_samples": samples.n, "n_zero_weight": int(np.sum(~np.isfinite(log_w))),
              "ess": samples.ess()["ess"]}
    try:
        result["flow"] = state_delta_f(log_w, phi < 0, phi > 0)
    except ValueError as err:
        result["flow"] = {"error": str(err)}
    # MD estimates: each run's frames with their own weights (zero for plain MD), 20-block bootstrap.
    estimates = [("flow (reweighted)", result["flow"])]
    for label, dataset in runs.items():
        phi_md = _phi(system, dataset.positions, name)[1]
        try:
            result[label] = state_delta_f(dataset.log_weights, phi_md < 0, phi_md > 0,
                                          block_size=max(len(dataset) // 20, 1), seed=seed)
        except ValueError as err:
            result[label] = {"error": str(err)}
        result[label]["weighted"] = dataset.weighted
        estimates.append(("MD reference run" if label == "md_reference" else "MD training run", result[label]))
    if settings["tfep"]:
        result["tfep"] = _tfep(runs, system, name, settings, seed, progress)
        if "error" not in result["tfep"]:
            estimates.append(("TFEP (RegFlow map)", result["tfep"]))
    free_energy_plot(folder / "free_energy.png", estimates, ylabel=f"dF({name}<0 -> {name}>0) (kT)")
    result["figure"] = "free_energy.png"
    return result


def _tfep(runs: dict, system, name: str, settings: dict, seed: int, progress: bool) -> dict:
    """TFEP between {name} < 0 and {name} > 0: the map trained on the training run's weighted frames (no
    energy calls), the works on the reference run's frames when there is one."""
    from ..sampling.tfep import TFEPSettings, tfep_between_states

    tfep = TFEPSettings(n_train=settings["tfep_n_train"], n_eval=settings["tfep_n_eval"], n_steps=settings["tfep_steps"],
                        layers=settings["tfep_layers"], hidden=settings["tfep_hidden"], moved=settings["tfep_moved"],
                        seed=seed)
    train, held_out = runs["md"], runs.get("md_reference")
    try:
        result = tfep_between_states(system, train.positions, train.log_weights, f"{name} < 0", f"{name} > 0",
                                     eval_positions=None if held_out is None else held_out.positions,
                                     eval_log_w=None if held_out is None else held_out.log_weights, settings=tfep,
                                     progress=progress)
    except ValueError as err:
        return {"error": str(err)}
    result.pop("settings")
    return result


def _export(folder: Path, inputs: dict, settings: dict, seed: int) -> dict:
    from ..data import load_dataset
    from ..export.check import check_flow_force
    from ..flows import load_flow

    data = load_dataset(inputs["md"]["dataset"])
    flow = load_flow(inputs["evaluate"]["downstream"]["flow"], system=data.system)
    torch_backend = settings["backend"] == "torch"
    # frames of the flow's training data: inside its support, where the export must match exactly
    result = check_flow_force(flow, data.system, data.split("train")[::997][:8], settings["backend"], settings["md_steps"],
                              seed, model_path=folder / "model.pt")
    return {"backend": settings["backend"], "model": str(folder / "model.pt") if torch_backend else None, **result}


def _smooth(folder: Path, inputs: dict, *, settings: dict, smooth: dict, flows: dict, seed: int, threads: int,
            progress: bool, trained_stage: str | None = None) -> dict:
    """The smooth flow potential: NLL + force matching training, then its dynamics in OpenMM
    (``export.check.check_flow_dynamics``), the force RMSE of it and of the run's other flows, and the flow
    potential's own ensemble q against the held-out reference (``evaluate_flow`` on ``n_samples`` of its samples):
    dynamics on -kT log q samples q, so q's ESS and energies bound what that dynamics can reproduce.
    ``trained_stage``: take the flow that stage trained with these settings (the smooth baseline) instead of
    training one here."""
    import torch

    from ..data import load_dataset
    from ..energy.evaluator import usable_cores
    from ..export.check import check_flow_dynamics, equilibrium_starts, ramachandran_strata
    from ..flows import load_flow
    from ..training.evaluation import backbone_torsions, evaluate_on_frames, ramachandran_pair
    from ..training.metrics import force_rmse

    trained = inputs[trained_stage] if trained_stage else \
        _train(folder / "train", inputs, settings=settings, progress=progress, threads=threads)
    data = load_dataset(inputs["md"]["dataset"])
    flow = load_flow(trained["flow"], system=data.system)
    test = data.split_indices("test")
    test = test[:: max(len(test) // smooth["n_test_frames"], 1)]
    rmse = {"smooth": force_rmse(flow, data.positions[test], data.forces[test])}
    for name, (stage, key) in flows.items():
        rmse[name] = force_rmse(load_flow(inputs[stage][key], system=data.system), data.positions[test],
                                data.forces[test])
        rmse[name]["cpu_s"] = inputs[stage].get("cpu_s_this_run")
    rmse["smooth"]["cpu_s"] = trained["cpu_s_this_run"]
    angles, names = backbone_torsions(data.system, data.positions)
    i, j = ramachandran_pair(names)
    say = (lambda text: log.info("smooth: %s", text)) if progress else None
    log_w = data.log_weights if data.weighted else None
    walkers = smooth["langevin_walkers"]
    starts = equilibrium_starts(data.positions, log_w, walkers, seed, strata=ramachandran_strata(angles[:, [i, j]]))
    workers = min(walkers, usable_cores())
    # the walkers are independent: one group per core (torch single-threaded in each), the flow walkers of a group in
    # one OpenMM Context whose flow force evaluates them as one batch
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=torch.set_num_threads, initargs=(1,)) \
        if workers > 1 else None
    try:
        dynamics = check_flow_dynamics(flow, data.system, np.asarray(data.positions[test[0]], dtype=np.float64),
                                       md_angles=angles[:, [i, j]], md_log_w=log_w, nve_ps=smooth["nve_ps"],
                                       equilibrate_ps=smooth["nve_equilibrate_ps"], langevin_ps=smooth["langevin_ps"],
                                       langevin_timestep_fs=smooth["langevin_timestep_fs"],
                                       hydrogen_mass_amu=smooth["hydrogen_mass_amu"] or None, bias_ps=smooth["bias_ps"],
                                       backend=smooth["backend"], seed=seed, figure=folder / "ramachandran.png",
                                       langevin_starts=starts, contexts=workers, executor=executor,
                                       angles_file=folder / "langevin_angles.npz", progress=say)
    finally:
        if executor is not None:
            executor.shutdown()
    if "figure" in dynamics.get("langevin", {}):
        dynamics["langevin"]["figure"] = "ramachandran.png"
    ensemble = None
    if smooth["n_samples"]:
        ref, frames, description = _reference(inputs)
        ensemble = {**evaluate_on_frames(flow, ref, frames, n_samples=smooth["n_samples"], seed=seed),
                    "reference": description}
    return {"flow": trained["flow"], "train": trained["train"], "cpu_s": trained["cpu_s_this_run"],
            "force_rmse": rmse, "n_test_frames": int(len(test)), "dynamics": dynamics, "ensemble": ensemble}


def _phi_name(system, md: dict | None = None) -> str:
    """The phi torsion whose sign defines the two states: the first biased phi of a metadynamics run
    (al3/al4 bias the middle residue), else the system's first phi."""
    if md is not None and md["enhanced"] == "metadynamics":
        biased = [n.strip() for n in md["metad_torsions"].split(",") if n.strip().startswith("phi")]
        if biased and biased[0] in system.torsions:
            return biased[0]
    return next(n for n in system.torsions if n.startswith("phi"))


def _phi(system, positions, name: str | None = None) -> tuple[str, np.ndarray]:
    """A phi torsion (default: the system's first) and its values (rad) over frames (T, n, 3)."""
    from ..data.dataset import dihedrals

    name = name or _phi_name(system)
    return name, dihedrals(np.asarray(positions, dtype=np.float64), [system.torsions[name]])[:, 0]
