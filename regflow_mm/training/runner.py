"""A training run from a TrainConfig: dataset -> flow -> (teacher CNF -> pairs) -> Trainer -> saved flow.

Run directory layout::

    config.json        the exact TrainConfig (with the seed); a rerun must match it to resume
    run_info.json      versions, device, world size, dataset hash, timings of each stage
    teacher.pt         reflow teacher CNF (target=reflow)      pairs_reflow.h5 / pairs_ot.h5
    checkpoint.pt      trainer state (resume after kill)        log.jsonl, log.csv
    flow.pt            EMA weights (the result)                 flow_raw.pt: raw weights
    metrics.json       final evaluation on the validation split, plots/*.png

Every stage is cached on disk and resumes: rerunning the same command after a kill continues
where it stopped; rerunning a finished run changes no file. Bad input (data, settings, a file as
``out_dir``) fails before the folder is made, and a folder holding no work yet takes new settings. Under torchrun, rank 0 prepares teacher and pairs while the others wait.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..energy.worker import watch_parent
from ..files import check_resume_settings, output_dir, require_file
from .cnf import (FlowMatchingConfig, SolverOptions, TeacherCNF, TeacherCoordinates, VelocityMLP,
                  check_teacher_matches, representation_hash, train_flow_matching)
from .couplings import generate_ot_pairs, generate_reflow_pairs, load_pairs, tensor_hash
from .distributed import DistInfo, barrier, init_distributed, shutdown
from .evaluation import evaluate_flow, scalar_metrics
from .plots import training_curves
from .trainer import RESUMABLE_CHANGES, TrainConfig, Trainer


def load_config_file(path: str | Path) -> dict:
    """Settings from a .json or .toml file (keys are TrainConfig fields)."""
    path = require_file(path, "config file")
    if path.suffix == ".toml":
        import tomllib
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    raise ValueError(f"config file {path} must be .json or .toml")


# Files holding work of a run; a folder with none of them (a failed start) takes any settings.
_WORK_FILES = ("checkpoint.pt", "teacher.pt", "pairs_reflow.h5", "pairs_ot.h5", "flow.pt")


def _check_run_config(config: TrainConfig, out_dir: Path) -> None:
    path = out_dir / "config.json"
    if path.exists() and any((out_dir / name).exists() for name in _WORK_FILES):
        check_resume_settings(out_dir, TrainConfig.with_defaults(json.loads(path.read_text())), config.to_dict(),
                              ignore=RESUMABLE_CHANGES, verb="trained")
    text = json.dumps(config.to_dict(), indent=2)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load_training_data(config: TrainConfig, min_train: int | None = None):
    """(system, dataset) with the dataset checked against the system and for NaNs and split sizes."""
    from ..data import load_dataset
    from ..systems import get_system

    system = get_system(config.system)
    dataset = load_dataset(config.data, system)
    for name in ("train", "val"):
        if name not in dataset.splits or len(dataset.splits[name]) == 0:
            raise ValueError(f"dataset {config.data} has no {name!r} frames; re-simulate with a {name} fraction")
    n_train = len(dataset.splits["train"])
    need = min_train or config.batch_size
    if n_train < need:
        raise ValueError(f"dataset {config.data} has {n_train} training frames, fewer than {need} "
                         f"(batch size); simulate longer or lower --batch-size")
    if not np.isfinite(dataset.energies).all():
        raise ValueError(f"dataset {config.data} has non-finite energies; re-simulate it")
    if config.method == "nll+fm" and not np.isfinite(dataset.forces).all():
        raise ValueError(f"dataset {config.data} has non-finite forces; re-simulate it")
    if config.relabel_equivalent_atoms:
        from dataclasses import replace

        from ..systems.symmetry import relabel_equivalent_atoms
        positions, forces = relabel_equivalent_atoms(dataset.positions, system.equivalent_atom_groups,
                                                     seed=config.seed, forces=dataset.forces)
        dataset = replace(dataset, positions=positions, forces=forces)
    return system, dataset


def build_student(config: TrainConfig, system, train_positions: np.ndarray):
    """The flow to train: built and fitted to the training positions, or the ``init_flow`` file's weights."""
    from ..flows import build_flow, load_flow

    flow = build_flow(system, config.representation, config.architecture, fit_to=train_positions,
                      representation_options=config.representation_options, seed=config.seed,
                      dtype=config.torch_dtype, **config.hyper)
    if not config.init_flow:
        return flow
    start = load_flow(config.init_flow, system=system)
    if start.config != flow.config:
        differ = sorted(k for k in set(start.config) | set(flow.config) if start.config.get(k) != flow.config.get(k))
        raise ValueError(f"init_flow {config.init_flow} is not a flow of this run's kind (differs in {differ}); "
                         f"train with the representation and architecture it was built with, or start from scratch")
    try:
        flow.load_state_dict(start.state_dict(), strict=True)
    except RuntimeError as err:
        raise ValueError(f"init_flow {config.init_flow}: its weights do not fit this run's flow "
                         f"({str(err).splitlines()[0]})") from None
    return flow


def _circular_mask(flow) -> torch.Tensor | None:
    circ = getattr(flow.representation, "circular", None)
    return circ.cpu() if circ is not None and bool(circ.any()) else None


def train_teacher(teacher, flow, y_train: torch.Tensor, solver: SolverOptions, *, seed: int = 0,
                  train_log_weights: np.ndarray | None = None, progress: bool = True) -> TeacherCNF:
    """Train the reflow teacher of ``flow`` (TeacherSettings ``teacher``) on its flow-space training points
    y_train (N, D); the returned CNF's ``metadata`` names the system and flow space (saved with it)."""
    standardised = teacher.teacher_coordinates == "standardised"
    device = flow.device
    coords = TeacherCoordinates.fit(y_train, _circular_mask(flow)).to(device) if standardised else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        velocity = VelocityMLP(y_train.shape[1], teacher.teacher_hidden, teacher.teacher_layers,
                               circular=None if coords is None else coords.circular)
    velocity = velocity.to(device=device, dtype=y_train.dtype)
    fm = FlowMatchingConfig(n_steps=teacher.teacher_steps, batch_size=teacher.teacher_batch_size,
                            lr=teacher.teacher_lr, coupling=teacher.teacher_coupling, seed=seed)
    row_log_w = None
    if teacher.teacher_weight_power and train_log_weights is not None:
        row_log_w = teacher.teacher_weight_power * torch.as_tensor(train_log_weights, dtype=torch.float64)
    y = y_train.to(device)
    if coords is None:
        log = train_flow_matching(velocity, y, flow.prior, fm, progress=progress, row_log_weights=row_log_w)
    else:
        log = train_flow_matching(velocity, coords.standardise(y), coords.base(), fm, progress=progress,
                                  circular=coords.circular, row_log_weights=row_log_w)
    cnf = TeacherCNF(velocity, solver, coords)
    cnf.metadata = {"flow_matching": vars(fm), "log": log, "spec_hash": flow.spec_hash,
                    "representation_hash": representation_hash(flow.representation),
                    "teacher_coordinates": teacher.teacher_coordinates,
                    "teacher_weight_power": teacher.teacher_weight_power}
    return cnf


def prepare_pairs(config: TrainConfig, flow, y_train: torch.Tensor, out_dir: Path, info: dict,
                  progress: bool = True, train_log_weights: np.ndarray | None = None) -> Path:
    """Teacher + reflow pairs, or OT pairs, cached in ``out_dir``; returns the pair store path.

    ``train_log_weights`` (N,): log-weights of the training frames (enhanced sampling), used by the teacher's
    batches with ``teacher_weight_power``.
    """
    prior = flow.prior
    circular = _circular_mask(flow)
    if config.target == "ot":
        t = time.perf_counter()
        pairs = config.couplings
        path = generate_ot_pairs(y_train, prior, out_dir / "pairs_ot.h5", method=pairs.ot_method, seed=config.seed,
                                 block_size=pairs.ot_block_size, chunk_size=pairs.pair_chunk_size,
                                 progress=progress, circular=circular)
        info.setdefault("pairs_s", time.perf_counter() - t)
        return path
    teacher_path = out_dir / "teacher.pt"
    pairs, teacher = config.couplings, config.teacher
    solver = SolverOptions(pairs.ode_method, pairs.ode_rtol, pairs.ode_atol, pairs.ode_steps)
    device = flow.device
    standardised = teacher.teacher_coordinates == "standardised"
    if teacher_path.exists():
        cnf = TeacherCNF.load(teacher_path, map_location=device).to(y_train.dtype)
        if standardised != (cnf.coords is not None):
            raise ValueError(f"{teacher_path} is a {'raw' if cnf.coords is None else 'standardised'}-coordinate teacher "
                             f"(older regflow-mm, or another teacher_coordinates), the run asks for "
                             f"{teacher.teacher_coordinates!r}: delete it to train the teacher again")
        if cnf.metadata.get("representation_hash") is not None or standardised:
            check_teacher_matches(cnf, flow, teacher_path)
        cnf.solver = solver
    else:
        t = time.perf_counter()
        cnf = train_teacher(teacher, flow, y_train, solver, seed=config.seed, train_log_weights=train_log_weights,
                            progress=progress)
        cnf.save(teacher_path, extra=cnf.metadata)
        info["teacher_train_s"] = time.perf_counter() - t
    n_pairs = pairs.n_pairs if pairs.n_pairs is not None else y_train.shape[0]
    t = time.perf_counter()
    # spawn, not fork: forking a process that already runs torch's thread pools can deadlock
    # workers exit by themselves if this process is killed (watch_parent)
    executor = (ProcessPoolExecutor(pairs.pair_workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=watch_parent, initargs=(os.getpid(),))
                if pairs.pair_workers > 0 else None)
    try:
        path = generate_reflow_pairs(cnf, prior, n_pairs, out_dir / "pairs_reflow.h5",
                                     chunk_size=pairs.pair_chunk_size, seed=config.seed, solver=solver,
                                     dtype=y_train.dtype, executor=executor, progress=progress)
    finally:
        if executor is not None:
            executor.shutdown()
    info.setdefault("pairs_s", time.perf_counter() - t)
    return path


def prepare_teacher(config: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """The reflow teacher CNF and its pairs alone, in ``out_dir`` (``teacher.pt``, ``pairs_reflow.h5`` and
    ``flow_space.pt``: the untrained student, whose representation and prior they live in), for students trained
    elsewhere: ``run_training`` on a folder holding copies of both files checks and reuses them. Resumes like
    ``run_training``'s own teacher step. Returns timings (wall s) and the paths."""
    if config.method != "regflow" or config.target != "reflow":
        raise ValueError(f"a reflow teacher belongs to method 'regflow' with target 'reflow', got {config.method!r} "
                         f"with {config.target!r}")
    out_dir = output_dir(out_dir)
    system, dataset = load_training_data(config)
    train = dataset.split("train")
    flow = build_student(config, system, train)
    with torch.no_grad():
        y_train = flow.to_flow_space(torch.as_tensor(train, dtype=config.torch_dtype))[0].cpu()
    out_dir.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    started = time.process_time()
    pairs = prepare_pairs(config, flow, y_train, out_dir, info, progress,
                          train_log_weights=dataset.log_weights[dataset.split_indices("train")])
    flow.save(out_dir / "flow_space.pt")
    return {**info, "cpu_s": time.process_time() - started, "teacher": str(out_dir / "teacher.pt"),
            "pairs": str(pairs), "flow_space": str(out_dir / "flow_space.pt")}


def run_training(config: TrainConfig, out_dir: str | Path, *, progress: bool = True,
                 dist: DistInfo | None = None) -> dict:
    """Run (or resume) a full training run in ``out_dir``; returns the summary (also in run_info.json)."""
    from ..energy import EnergyEvaluator

    out_dir = output_dir(out_dir)
    own_dist = dist is None
    dist = dist or init_distributed(config.device)
    new_config = not (out_dir / "config.json").exists()
    work_before = {name for name in _WORK_FILES if (out_dir / name).exists()}
    try:
        # data and flow first: bad input fails before the run folder is made or changed
        system, dataset = load_training_data(config)
        train = dataset.split("train")
        flow = build_student(config, system, train)
        flow.to(dist.device)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_run_config(config, out_dir)
        barrier(dist)
        info_path = out_dir / "run_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        finished = "final_metrics" in info and (out_dir / "flow.pt").exists()
        info.update(regflow_mm=__version__, torch=torch.__version__, device=str(dist.device),
                    world_size=dist.world_size, dataset=str(config.data), dataset_frames=len(dataset),
                    train_frames=int(train.shape[0]), dataset_hash=tensor_hash(train),
                    relabelled_groups=[list(g) for g in system.equivalent_atom_groups]
                    if config.relabel_equivalent_atoms else [])
        if config.init_flow:
            from ..flows.io import flow_file_hash
            digest = flow_file_hash(config.init_flow)
            if info.get("init_flow_sha256", digest) != digest and (out_dir / "checkpoint.pt").exists():
                raise ValueError(f"{out_dir} continues a run started from another {config.init_flow} (its SHA-256 "
                                 f"changed since): train into a new folder to start from the new file")
            info["init_flow_sha256"] = digest
            if dist.is_main:  # recorded now, so that a resumed run can tell whether its start is still the same
                info_path.write_text(json.dumps(info, indent=2, default=str))

        with torch.no_grad():
            y_train = flow.to_flow_space(torch.as_tensor(train, dtype=config.torch_dtype))[0].cpu()
        train_idx = dataset.split_indices("train")
        train_log_w = dataset.log_weights[train_idx]
        if config.method == "regflow":
            if dist.is_main:
                prepare_pairs(config, flow, y_train, out_dir, info, progress, train_log_weights=train_log_w)
            barrier(dist)
            x0, x1, pair_info = load_pairs(out_dir / f"pairs_{config.target}.h5")
            data = (x0.to(config.torch_dtype), x1.to(config.torch_dtype))
            info["n_pairs"] = int(x0.shape[0])
            info["pairs"] = pair_info["settings"]
        elif config.method == "mle":
            data = (y_train,)
        else:
            forces = torch.as_tensor(dataset.forces[train_idx] / system.kT, dtype=config.torch_dtype)
            data = (torch.as_tensor(train, dtype=config.torch_dtype), forces)

        val_idx = dataset.split_indices("val")
        val_x, val_u = dataset.positions[val_idx], dataset.reduced_energies()[val_idx]
        # Weighted batches (enhanced-sampling data): validation NLL under the same frame weights.
        power = config.data_weight_power
        row_log_w = torch.as_tensor(power * train_log_w) if power else None
        late_row_log_w = torch.as_tensor(train_log_w) if config.reweight_fraction else None
        # a weighted last part (reweight_fraction): validate on the reweighted ensemble all along
        val_power = 1.0 if config.reweight_fraction else power
        val_log_w = val_power * dataset.log_weights[val_idx] if val_power else None
        val_md_log_w = dataset.log_weights[val_idx] if dataset.weighted else None  # frames -> target ensemble
        info["data_weight_power"] = power
        evaluator = EnergyEvaluator(system, n_workers=config.energy_workers, platform=config.energy_platform)

        def validate(ema_flow) -> dict:
            if config.val_samples <= 0:
                from .metrics import heldout_nll
                return {"nll": heldout_nll(ema_flow, torch.as_tensor(val_x, dtype=ema_flow.dtype), log_w=val_log_w)["nll"]}
            res = evaluate_flow(ema_flow, system, val_x, val_u, evaluator=evaluator, n_samples=config.val_samples,
                                n_torsion=config.val_torsion_samples, seed=config.seed, md_log_weights=val_md_log_w)
            return scalar_metrics(res)

        trainer = Trainer(flow, config, out_dir, data, row_log_weights=row_log_w, late_row_log_weights=late_row_log_w,
                          validate=validate,
                          reduced_energy_torch=evaluator.reduced_energy_torch if config.lambda_kl > 0 else None,
                          dist=dist, progress=progress)
        summary = trainer.fit()
        info["train"] = summary
        if finished and summary["steps_this_run"] == 0:
            evaluator.close()  # a rerun of a finished run: its flow, metrics and plots stay as they are
            return info
        if dist.is_main:
            ema_flow = trainer.result_flow()
            ema_flow.save(out_dir / "flow.pt")
            flow.save(out_dir / "flow_raw.pt")
            final = evaluate_flow(ema_flow, system, val_x, val_u, evaluator=evaluator,
                                  n_samples=max(config.val_samples, 1000), n_torsion=config.val_torsion_samples,
                                  seed=config.seed, plots_dir=out_dir / "plots", md_log_weights=val_md_log_w)
            (out_dir / "metrics.json").write_text(json.dumps(final, indent=2, default=float))
            info["final_metrics"] = scalar_metrics(final)
            train_rows = [r for r in trainer.records if r.get("kind") == "train"]
            if train_rows:
                training_curves(out_dir / "plots" / "training_curves.png", train_rows,
                                keys=[k for k in ("loss", "regression", "logdet", "fwd_bwd", "nll", "force_matching",
                                                  "reverse_kl", "grad_norm") if k in train_rows[-1]])
            info_path.write_text(json.dumps(info, indent=2, default=str))
        evaluator.close()
        return info
    except Exception:
        # a failed start (e.g. an unreadable teacher or checkpoint already in the folder) leaves the folder as it was
        if dist.is_main and new_config and work_before == {n for n in _WORK_FILES if (out_dir / n).exists()}:
            (out_dir / "config.json").unlink(missing_ok=True)
        raise
    finally:
        if own_dist:
            shutdown(dist)


def run_regflow_then_mle(regflow: TrainConfig, finetune: TrainConfig, out_dir: str | Path, *,
                         progress: bool = True) -> dict:
    """The RegFlow route: a RegFlow student (``regflow``, trained in ``out_dir`` like ``run_training``: teacher,
    pairs, student) is the start of maximum-likelihood fine-tuning (``finetune``, method 'mle', its
    ``init_flow`` set to the student) in ``out_dir/mle_finetune``; its flow.pt is the route's result.

    Budgets are each part's own ``time_budget_s``; each part resumes by itself. Returns the fine-tuning's
    summary with the student's under ``"regflow"``.
    """
    if regflow.method != "regflow" or finetune.method != "mle":
        raise ValueError(f"the RegFlow route is a 'regflow' student then 'mle' fine-tuning, got {regflow.method!r} "
                         f"then {finetune.method!r}")
    out_dir = Path(out_dir)
    student = run_training(regflow, out_dir, progress=progress)
    finetune = TrainConfig.from_dict({**finetune.to_dict(), "init_flow": str(out_dir / "flow.pt")})
    info = run_training(finetune, out_dir / "mle_finetune", progress=progress)
    return {**info, "regflow": student}

