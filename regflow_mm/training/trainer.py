"""Flow trainer: RegFlow regression, maximum likelihood, NLL + force matching (+ optional reverse KL).

One ``Trainer`` runs the optimisation loop on in-memory tensors with

- AdamW (lr 5e-4, weight decay 0.01 by default), EMA of the weights (``torch.optim.swa_utils``
  AveragedModel, decay 0.999 with warm-up, see ``ema_update_fn``), gradient-norm clipping;
- a deterministic data order: epoch e uses the permutation seeded by (seed, e) and step s draws
  its target noise / reverse-KL latents from generators seeded by (seed, s), so the batch of a
  step depends only on (seed, step). Together with the saved weights, EMA, optimizer,
  scheduler and RNG states this makes a resumed run take exactly the steps an uninterrupted run
  takes (checked bitwise in tests/test_trainer.py);
- atomic checkpoints every ``checkpoint_every`` steps, at epoch ends and on SIGINT/SIGTERM;
- a JSON-lines + CSV log (train rows every ``log_every`` steps, validation rows per epoch);
- a non-finite loss or gradient: no update is applied, the last good checkpoint (if any) is kept,
  ``nan_report.json`` names the step, and ``TrainingDiverged`` is raised;
- a resumed run that already ended (steps, CPU-time budget, early stopping) takes no step and
  rewrites no checkpoint;
- data parallelism over torch.distributed: every rank takes its equal slice of the same global
  batch and gradients are averaged, so the loss trajectory equals one process's.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import random
import signal
import time
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from ..files import atomic_write, check_resume_settings, load_torch
from ..progress import progress_bar
from ..validation import check_types
from .couplings import derived_seed
from .distributed import DistInfo, all_reduce_max, all_reduce_mean, average_gradients
from .objectives import (REGRESSION_UNITS, REGULARIZERS, as_parts, force_matching_loss, nll_terms, regflow_terms,
                         regression_scale, reverse_kl_loss)

METHODS = ("regflow", "mle", "nll+fm")
TARGETS = ("reflow", "ot")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped training; ``step`` is the step that failed."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


@dataclass
class TeacherSettings:
    """The reflow teacher: a flow-matching CNF (``cnf.py``). RegFlow-only."""

    teacher_steps: int = 3000
    teacher_hidden: int = 256
    teacher_layers: int = 3
    teacher_batch_size: int = 256
    teacher_lr: float = 1e-3
    teacher_coupling: str = "minibatch_ot"
    # "standardised": the CNF runs on per-dimension standardised coordinates against N(0, 1), circular
    # (torsion) dims on the circle (cnf.TeacherCoordinates); "raw": on the student's flow space against its
    # prior (the teacher of regflow-mm before 2026-12, whose map was nearly affine on internal coordinates)
    teacher_coordinates: str = "standardised"
    # flow-matching batches draw training frames with probability w^power (enhanced-sampling frame weights)
    teacher_weight_power: float = 0.0

    def __post_init__(self):
        if self.teacher_coordinates not in ("standardised", "raw"):
            raise ValueError(f"teacher_coordinates must be 'standardised' or 'raw', got {self.teacher_coordinates!r}")
        if not 0.0 <= self.teacher_weight_power <= 1.0:
            raise ValueError(f"teacher_weight_power must be in [0, 1], got {self.teacher_weight_power}")


@dataclass
class CouplingSettings:
    """The (latent, data) pairs RegFlow regresses on (``couplings.py``): reflow ODE or OT. RegFlow-only."""

    target: str = "reflow"
    n_pairs: int | None = None
    ode_method: str = "dopri5"
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    ode_steps: int = 50
    ot_method: str = "exact"
    ot_block_size: int = 4096
    pair_chunk_size: int = 10_000
    pair_workers: int = 0


@dataclass
class OptimSettings:
    """The optimisation loop: budget, batches, AdamW, EMA, schedule, seed, precision, checkpoints."""

    epochs: int = 20
    max_steps: int | None = None
    time_budget_s: float | None = None
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    ema_warmup: bool = True
    grad_clip: float = 10.0
    lr_schedule: str = "constant"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    log_every: int = 50
    checkpoint_every: int = 500
    # torch.compile (inductor) the MLE / RegFlow loss: about 1.8x the steps per CPU-second for the aldp
    # NSF on a CPU (BENCHMARKS.md). The first step of each fit() compiles (~30 CPU s cold, ~3 s from
    # inductor's on-disk cache): it is left out of time_budget_s and reported as compile_cpu_s, so that
    # a budget buys the same steps on a cold or a warm cache. Needs a C++ compiler; without one training
    # goes on eagerly, with a warning.
    compile: bool = False


@dataclass
class ValidationSettings:
    """Per-epoch validation against held-out MD (``evaluation.py``) and its energy evaluator."""

    val_every_epochs: int = 1
    val_samples: int = 2000
    val_torsion_samples: int = 2000
    energy_workers: int = 0
    energy_platform: str = "Reference"
    # Keep the EMA weights of the lowest validation NLL as the result, and stop after this many
    # validations without improvement (None: never stop early).
    keep_best: bool = False
    early_stop_patience: int | None = None


_GROUPS = {"teacher": TeacherSettings, "couplings": CouplingSettings, "optim": OptimSettings,
           "validation": ValidationSettings}
# Objective settings that only RegFlow's regression loss reads (with the teacher and coupling groups).
_REGFLOW_OBJECTIVE = ("regression_units", "regularizer", "lambda_r", "lambda_n")


@dataclass(init=False)
class TrainConfig:
    """Everything that defines a training run (saved verbatim, flat, as ``config.json`` with the run).

    The settings live in groups: what to train and the objective here, ``teacher``
    (TeacherSettings), ``couplings`` (CouplingSettings), ``optim`` (OptimSettings) and ``validation``
    (ValidationSettings). Construction, ``from_dict``/``to_dict``, CLI flags and config files use the
    flat names (``TrainConfig(batch_size=64, teacher_steps=100)``); reading a flat name
    (``config.batch_size``) reads it from its group (``config.optim.batch_size``).

    Units: lambda_* are dimensionless weights on losses in units of each dimension's spread^2 (regression;
    flow-space units^2 with regression_units 'raw'),
    nats (NLL), (kT/nm)^2 (force matching) and kT (reverse KL); time budgets in CPU seconds.

    Method 'nll+fm' minimises w_n NLL + w_f FM + w_k KL with (w_n, w_f, w_k) = (w_nll, w_fm, lambda_kl):
    NLL = -E log q(x) on the batch positions, FM = ``force_matching_loss`` on the batch forces and
    KL = ``reverse_kl_loss`` on ``kl_batch_size`` flow samples (left out while lambda_kl = 0). The
    lambda_kl * KL term is added in the same way to 'regflow' and 'mle'.
    """

    # what to train
    system: str = "aldp"
    data: str = ""
    representation: str = "cartesian"
    representation_options: dict = field(default_factory=dict)  # e.g. {"narrow_span_rad": 1.0} (internal)
    architecture: str = "nsf"
    hyper: dict = field(default_factory=dict)
    method: str = "regflow"
    # Warm start: a flow file (same system, representation and architecture) whose weights, normalisation
    # included, are the starting point, e.g. a RegFlow student fine-tuned by MLE, or an MLE flow fine-tuned
    # with lambda_kl > 0. Empty: random initialisation (seeded).
    init_flow: str = ""
    # objective
    # RegFlow's regression errors in "standardised" units (each flow-space dimension divided by the targets'
    # spread, ``objectives.regression_scale``) or "raw" flow-space units (the narrow bond and angle dimensions
    # then carry almost no weight).
    regression_units: str = "standardised"
    # The log-det penalty lambda_r * mean(log|det|^2) (or "fwd_bwd"): off by default, by measurement. With
    # standardised regression, 1e-6 is 0.2% of the loss and 1e-4 20%; neither changed the student's ESS, E-W1
    # or T-W2 beyond seed noise, and 1e-4 cost 0.25 nats of held-out NLL (BENCHMARKS.md, 2026-12-08).
    regularizer: str = "none"
    lambda_r: float = 0.0
    lambda_n: float = 0.0
    lambda_kl: float = 0.0
    kl_batch_size: int = 64
    kl_energy_cap_kT: float | None = None
    w_nll: float = 1.0
    w_fm: float = 1.0
    # Enhanced-sampling data (metadynamics) carry importance weights w to the target ensemble: MLE and
    # NLL+FM batches draw frames with probability ~ w**data_weight_power (0: frames as sampled, the
    # widest coverage; 1: fully reweighted, fewest effective frames). Plain MD has w = 1 either way.
    data_weight_power: float = 0.0
    # The last reweight_fraction of the run (of the CPU-time budget, else of the steps) draws MLE / NLL+FM
    # batches with the full frame weights (power 1), and validation NLL is then weighted over the whole run,
    # so that keep_best selects on the estimate of the cross-entropy to the target ensemble. A flow first fit
    # to the frames as sampled (widest coverage), then pulled onto the reweighted ensemble at the annealed
    # learning rate, is a far better importance sampler (BENCHMARKS.md, "weighted phase").
    reweight_fraction: float = 0.0
    # Relabel each frame's groups of equivalent atoms (methyl and ammonium hydrogens) by a random cyclic
    # shift before training (``systems.symmetry``): the data then give each rotor well its exact 1/3,
    # which a short MD run does not (al3: 7-75% in the wells of one methyl between the halves of 2 ns;
    # relabelled, the same data gave a smooth flow with ESS 26% instead of 0.26%, BENCHMARKS.md).
    relabel_equivalent_atoms: bool = True
    # groups
    teacher: TeacherSettings = field(default_factory=TeacherSettings)
    couplings: CouplingSettings = field(default_factory=CouplingSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __init__(self, **settings):
        for name, cls in _GROUPS.items():
            group = settings.pop(name, None)
            group = cls(**group) if isinstance(group, dict) else (group or cls())
            own = {f.name for f in fields(cls)}
            flat = {k: settings.pop(k) for k in list(settings) if k in own}
            object.__setattr__(self, name, replace(group, **flat))
        for f in fields(self):
            if f.name in _GROUPS:
                continue
            if f.name in settings:
                value = settings.pop(f.name)
            else:
                value = f.default_factory() if f.default_factory is not MISSING else f.default
            object.__setattr__(self, f.name, value)
        if settings:
            raise TypeError(f"TrainConfig got unexpected settings {sorted(settings)}")
        self.__post_init__()

    def __getattr__(self, name):
        # Only called when normal lookup fails: flat names of the grouped settings.
        if name.startswith("__") or name in _GROUPS:
            raise AttributeError(name)
        for group in _GROUPS:
            values = self.__dict__.get(group)
            if values is not None and name in values.__dataclass_fields__:
                return getattr(values, name)
        raise AttributeError(f"TrainConfig has no setting {name!r}")

    def __post_init__(self):
        from ..flows.factory import check_hyper

        check_types(self, "training settings")
        for name in _GROUPS:
            check_types(getattr(self, name), "training settings")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.regression_units not in REGRESSION_UNITS:
            raise ValueError(f"regression_units must be one of {REGRESSION_UNITS}, got {self.regression_units!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not 0.0 <= self.data_weight_power <= 1.0:
            raise ValueError(f"data_weight_power must be in [0, 1] (0: frames as sampled, 1: fully reweighted), "
                             f"got {self.data_weight_power}")
        if self.data_weight_power and self.method == "regflow":
            raise ValueError("data_weight_power applies to the data frames of 'mle' and 'nll+fm'; RegFlow trains on "
                             "teacher pairs: set it to 0")
        if not 0.0 <= self.reweight_fraction < 1.0:
            raise ValueError(f"reweight_fraction must be in [0, 1) (the weighted last part of the run), "
                             f"got {self.reweight_fraction}")
        if self.reweight_fraction and self.method == "regflow":
            raise ValueError("reweight_fraction applies to the data frames of 'mle' and 'nll+fm'; RegFlow trains on "
                             "teacher pairs: set it to 0")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.early_stop_patience is not None and (self.early_stop_patience < 1 or not self.keep_best):
            raise ValueError(f"early_stop_patience must be >= 1 and needs keep_best = true, got "
                             f"{self.early_stop_patience} (keep_best {self.keep_best})")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        for name in ("batch_size", "epochs", "log_every", "checkpoint_every", "val_every_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("max_steps", "n_pairs", "time_budget_s", "early_stop_patience"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or unset), got {value}")
        for name in ("pair_chunk_size", "teacher_steps", "teacher_batch_size", "teacher_hidden", "teacher_layers",
                     "ode_steps", "ot_block_size", "kl_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "teacher_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("val_samples", "val_torsion_samples", "energy_workers", "pair_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_hyper(self.architecture, self.hyper)

    @classmethod
    def setting_names(cls) -> list[str]:
        """Every flat setting name (the keys of ``to_dict``, CLI ``--set`` and config files)."""
        names = [f.name for f in fields(cls) if f.name not in _GROUPS]
        return names + [f.name for group in _GROUPS.values() for f in fields(group)]

    @classmethod
    def regflow_only(cls) -> tuple[str, ...]:
        """Settings only RegFlow reads (teacher, couplings, regression objective): an MLE or NLL+FM
        baseline ignores them."""
        return (*(f.name for f in fields(TeacherSettings)), *(f.name for f in fields(CouplingSettings)),
                *_REGFLOW_OBJECTIVE)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = set(cls.setting_names()) | set(_GROUPS)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known - set(_GROUPS))}")
        return cls(**values)

    @classmethod
    def with_defaults(cls, stored: dict) -> dict:
        """A saved flat config with the settings added since it was written at their defaults (which
        reproduce the older code's behaviour), so that such a run can still resume."""
        return {**cls().to_dict(), **stored}

    def to_dict(self) -> dict:
        """Flat dict of every setting."""
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _GROUPS}
        for group in _GROUPS:
            flat.update(asdict(getattr(self, group)))
        return flat

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


# Settings that may change when a run is resumed (they do not alter the steps already taken).
RESUMABLE_CHANGES = ("epochs", "max_steps", "time_budget_s", "device", "log_every", "checkpoint_every", "compile",
                     "val_every_epochs", "val_samples", "val_torsion_samples", "energy_workers", "pair_workers")


_STREAM_EPOCH, _STREAM_NOISE, _STREAM_KL, _STREAM_ROWS = 1, 2, 3, 4


def _row_probs(log_weights, n: int, name: str) -> torch.Tensor:
    """Sampling probabilities softmax(log_weights) of n rows; ValueError unless (n,) without NaN or +inf."""
    log_weights = torch.as_tensor(log_weights, dtype=torch.float64).cpu()
    if log_weights.shape != (n,) or torch.isnan(log_weights).any() or \
            not (log_weights < math.inf).all() or not (log_weights > -math.inf).any():
        raise ValueError(f"{name} must be ({n},) finite or -inf log-weights with at least one "
                         f"finite entry, got shape {tuple(log_weights.shape)}")
    return torch.softmax(log_weights, 0)


def compiled_or_eager(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile`` (inductor, static shapes); where compiling fails (no C++ compiler,
    an unsupported operation) the call warns once and runs ``fn`` eagerly from then on."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # compile in this process, so its CPU time counts in the budget
    compiled = torch.compile(fn, dynamic=False)
    current = [compiled]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if current[0] is fn:
            return fn(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a genuine error in fn is raised again by the eager call
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); training continues without compiling",
                          RuntimeWarning, stacklevel=2)
            current[0] = fn
            return fn(*args, **kwargs)

    return call


def ema_update_fn(decay: float, warmup: bool = True):
    """EMA update for AveragedModel: p_ema <- d p_ema + (1 - d) p with d = decay, or with warmup
    d = min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are not dominated by the
    initial weights (a fixed 0.999 still gives the initialisation ~37% weight after 1000 steps)."""

    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        n = float(n_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        for p_ema, p in zip(ema_params, params):
            p_ema.lerp_(p, 1.0 - d)

    return update


class Trainer:
    """Optimisation loop for a BoltzmannFlow on in-memory tensors.

    Args:
        flow: the BoltzmannFlow (trained in place; ``flow.transform`` and ``flow.prior``).
        config: TrainConfig (method, objective weights, optimiser, seed, schedule).
        out_dir: run directory (checkpoint.pt, log.jsonl, log.csv, nan_report.json).
        data: tensors indexed along dim 0, by method: regflow (x0 latent (N, D), x1 flow space (N, D));
            mle (y flow space (N, D),); nll+fm (positions (N, n, 3) nm, forces / kT (N, n, 3) kT/nm).
        late_row_log_weights: (N,) log sampling weights of the rows for the last ``reweight_fraction`` of
            the run (needed when it is > 0); the switch step is recorded and kept on resume.
        row_log_weights: optional (N,) log sampling weights of the rows: each step then draws its batch
            with replacement with probabilities softmax(row_log_weights), seeded by (seed, step);
            None: epoch permutations.
        validate: optional ``validate(ema_flow) -> dict`` run on rank 0 every ``val_every_epochs``.
        reduced_energy_torch: u(x) in kT with autograd, needed when ``lambda_kl > 0``.
        dist: DistInfo of this process (single CPU process by default).
        on_step_end: optional ``callback(step)`` after each completed step (tests inject crashes).
    """

    def __init__(self, flow, config: TrainConfig, out_dir: str | Path, data: tuple[torch.Tensor, ...], *,
                 row_log_weights: torch.Tensor | None = None, late_row_log_weights: torch.Tensor | None = None,
                 validate: Callable | None = None, reduced_energy_torch: Callable | None = None,
                 dist: DistInfo | None = None, on_step_end: Callable[[int], None] | None = None,
                 progress: bool = True):
        self.flow = flow
        self.config = config
        self.out_dir = Path(out_dir)
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.validate = validate
        self.reduced_energy_torch = reduced_energy_torch
        self.on_step_end = on_step_end
        self.progress = progress and self.dist.is_main
        if config.lambda_kl > 0 and reduced_energy_torch is None:
            raise ValueError("lambda_kl > 0 needs reduced_energy_torch (an EnergyEvaluator's method)")
        self.data = tuple(d.to(self.device) for d in data)
        n = self.data[0].shape[0]
        if any(d.shape[0] != n for d in self.data):
            raise ValueError("all training tensors must have the same number of rows")
        if any(not torch.isfinite(d).all() for d in self.data):
            raise ValueError("training data contains NaN/inf; clean the dataset (or the pairs) first")
        if config.batch_size % self.dist.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.dist.world_size} "
                             f"data-parallel processes")
        if n < config.batch_size:
            raise ValueError(f"only {n} training rows for batch_size {config.batch_size}; lower the batch size "
                             f"or use more data")
        self.n = n
        self.row_probs = None if row_log_weights is None else _row_probs(row_log_weights, n, "row_log_weights")
        if config.reweight_fraction and late_row_log_weights is None:
            raise ValueError("reweight_fraction > 0 needs late_row_log_weights (the frame weights of the rows)")
        self.late_row_probs = (None if not config.reweight_fraction
                               else _row_probs(late_row_log_weights, n, "late_row_log_weights"))
        self.reweighted_from_step = None  # the step the weighted last part began (None: not yet)
        self.steps_per_epoch = n // config.batch_size
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.flow.to(self.device)
        self.cpu_time = 0.0  # before the scheduler: the time-based cosine reads it
        self.optimizer = torch.optim.AdamW(self.flow.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        if config.lr_schedule == "cosine":
            # Anneal over the run that will actually happen: whichever of the step horizon and the
            # CPU-time budget ends it first (a time-budgeted run never reaches its step horizon).
            horizon = max(1, self.total_steps)
            budget = config.time_budget_s

            def cosine(step: int) -> float:
                done = step / horizon if budget is None else max(step / horizon, self.cpu_time / budget)
                return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        # parameters are averaged; buffers (normalisation, index tables, flags) are copied in _update_ema
        self.ema = AveragedModel(self.flow, multi_avg_fn=ema_update_fn(config.ema_decay, config.ema_warmup),
                                 use_buffers=False)
        self.step = 0
        self.best: dict | None = None  # keep_best: {"nll", "step", "state" (EMA flow state dict)}
        self._since_best = 0
        self.records: list[dict] = []
        self._running: dict[str, list[float]] = {}  # per-step values since the last log row
        self._stop_requested = False
        self._nll_terms, self._regflow_terms = nll_terms, regflow_terms
        # torsions on circles of period 1: RegFlow regression errors are taken around the circle
        circ = getattr(self.flow.representation, "circular", None)
        self._circular = circ.to(self.device) if circ is not None and bool(circ.any()) else None
        self._regression_scale = (regression_scale(self.data[1], self._circular)
                                  if config.method == "regflow" and config.regression_units == "standardised" else None)
        if config.compile:
            self._nll_terms, self._regflow_terms = compiled_or_eager(nll_terms), compiled_or_eager(regflow_terms)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        self.resumed_from: int | None = None
        if self.checkpoint_path.exists():
            self._load_checkpoint()

    # ----------------------------------------------------------------- state
    def _state(self) -> dict:
        return {"step": self.step, "cpu_time": self.cpu_time, "config": self.config.to_dict(),
                "flow": self.flow.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                "data_order": {"n": self.n, "batch_size": self.config.batch_size, "seed": self.config.seed,
                               "rule": "epoch permutation seeded by (seed, 1, epoch)" if self.row_probs is None
                               else "weighted draw with replacement seeded by (seed, 4, step)"},
                "records": self.records, "running": self._running, "reweighted_from_step": self.reweighted_from_step,
                "best": self.best, "since_best": self._since_best}

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            atomic_write(self.checkpoint_path, functools.partial(torch.save, self._state()))

    def _load_checkpoint(self) -> None:
        # weights_only: a checkpoint holds tensors and plain Python values only, so a planted file
        # cannot run code when a run resumes.
        state = load_torch(self.checkpoint_path, "training checkpoint", ": nothing was run; delete it to start this "
                           "run over", map_location=self.device)
        check_resume_settings(self.checkpoint_path, TrainConfig.with_defaults(state["config"]), self.config.to_dict(),
                              ignore=RESUMABLE_CHANGES,
                              verb="trained")
        if state["data_order"]["n"] != self.n:
            raise ValueError(f"{self.checkpoint_path} was trained on {state['data_order']['n']} rows, now {self.n}: "
                             f"the training data changed")
        self.flow.load_state_dict(state["flow"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(_numpy_rng_from(rng["numpy"]))
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        self.step = int(state["step"])
        self.cpu_time = float(state["cpu_time"])
        self.records = list(state["records"])
        self._running = {k: list(v) for k, v in state["running"].items()}
        self.best, self._since_best = state.get("best"), int(state.get("since_best", 0))
        self.reweighted_from_step = state.get("reweighted_from_step")
        self.resumed_from = self.step
        if self.dist.is_main:
            self._rewrite_logs()

    # ----------------------------------------------------------------- logs
    def _append_record(self, record: dict) -> None:
        self.records.append(record)
        if self.dist.is_main:
            with open(self.out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _rewrite_logs(self) -> None:
        with open(self.out_dir / "log.jsonl", "w") as fh:
            for r in self.records:
                fh.write(json.dumps(r) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
        with open(self.out_dir / "log.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records)

    # ----------------------------------------------------------------- batches
    def batch_indices(self, step: int) -> tuple[torch.Tensor, slice]:
        """Global-batch rows of ``step`` and this rank's slice of the global batch."""
        probs = self.row_probs
        if self.reweighted_from_step is not None and step >= self.reweighted_from_step:
            probs = self.late_row_probs
        if probs is not None:
            gen = torch.Generator().manual_seed(derived_seed(self.config.seed, _STREAM_ROWS, step))
            rows = torch.multinomial(probs, self.config.batch_size, replacement=True, generator=gen)
        else:
            epoch, b = divmod(step, self.steps_per_epoch)
            gen = torch.Generator().manual_seed(derived_seed(self.config.seed, _STREAM_EPOCH, epoch))
            perm = torch.randperm(self.n, generator=gen)
            rows = perm[b * self.config.batch_size:(b + 1) * self.config.batch_size]
        local = self.config.batch_size // self.dist.world_size
        return rows, slice(self.dist.rank * local, (self.dist.rank + 1) * local)

    def _loss(self, step: int) -> tuple[torch.Tensor, dict]:
        cfg = self.config
        rows, mine = self.batch_indices(step)
        batch = [d[rows[mine].to(self.device)] for d in self.data]
        if cfg.method == "regflow":
            noise = None
            if cfg.lambda_n > 0:
                gen = torch.Generator().manual_seed(derived_seed(cfg.seed, _STREAM_NOISE, step))
                noise = torch.randn(cfg.batch_size, batch[1].shape[1], generator=gen, dtype=batch[1].dtype)
                noise = noise[mine].to(self.device)
            terms = self._regflow_terms(self.flow.transform, batch[0], batch[1], regularizer=cfg.regularizer,
                                        lambda_r=cfg.lambda_r, lambda_n=cfg.lambda_n, noise=noise,
                                        circular=self._circular, scale=self._regression_scale)
            loss, parts = terms["loss"], as_parts(terms)
        elif cfg.method == "mle":
            terms = self._nll_terms(self.flow.transform, self.flow.prior, batch[0])
            loss, parts = terms["loss"], as_parts(terms)
        else:
            x, forces = batch
            nll = -self.flow.log_prob(x).mean()
            fm, _ = force_matching_loss(self.flow, x, forces)
            loss = cfg.w_nll * nll + cfg.w_fm * fm
            parts = {"nll": nll.item(), "force_matching": fm.item(), "loss": loss.item()}
        if cfg.lambda_kl > 0:
            prior = _SeededPrior(self.flow.prior, derived_seed(cfg.seed, _STREAM_KL, step, self.dist.rank))
            kl, kl_parts = reverse_kl_loss(self.flow.transform, prior, self.flow.from_flow_space,
                                           self.reduced_energy_torch, cfg.kl_batch_size // self.dist.world_size
                                           or 1, energy_cap_kT=cfg.kl_energy_cap_kT)
            loss = loss + cfg.lambda_kl * kl
            parts.update(reverse_kl=kl_parts["reverse_kl"], kl_nonfinite=kl_parts["n_nonfinite"],
                         loss=loss.item())
        return loss, parts

    # ----------------------------------------------------------------- loop
    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _diverged(self, step: int, what: str, parts: dict) -> TrainingDiverged:
        kept = (f"the last good checkpoint {self.checkpoint_path} (step {self._last_checkpoint_step}) is kept"
                if self._last_checkpoint_step is not None else "no checkpoint was written yet")
        # A rerun of the same settings takes the same steps and fails again; other settings do not resume.
        message = (f"training stopped: {what} at step {step}; no update was applied and {kept}. Train again "
                   f"into another output folder with a lower learning rate (now {self.config.lr}) or a larger "
                   f"regularisation")
        if self.dist.is_main:
            report = {"step": step, "what": what, "parts": parts, "last_checkpoint_step": self._last_checkpoint_step}
            (self.out_dir / "nan_report.json").write_text(json.dumps(report, indent=2, default=str))
        return TrainingDiverged(step, message)

    def _in_late_part(self) -> bool:
        """Whether the run has reached its last ``reweight_fraction`` (of the CPU budget, else of the steps)."""
        start = 1.0 - self.config.reweight_fraction
        if self.config.time_budget_s is not None:
            return self.cpu_time >= start * self.config.time_budget_s
        return self.step >= start * self.total_steps

    def fit(self, handle_signals: bool = True) -> dict:
        """Run until ``total_steps`` (or the CPU-time budget, or a stop signal); returns a summary dict."""
        cfg = self.config
        old_handlers = {}
        if handle_signals and self._in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._request_stop)
        self._last_checkpoint_step = self.step if self.checkpoint_path.exists() else None
        budget = cfg.time_budget_s
        if budget is not None:  # the run ends on CPU time: show that, not a step count it will not reach
            bar = progress_bar(total=float(budget), initial=min(self.cpu_time, budget), desc=f"train {cfg.method}",
                               disable=not self.progress,
                               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} CPU s{postfix}")
        else:
            bar = progress_bar(total=self.total_steps, initial=self.step, desc=f"train {cfg.method}",
                               disable=not self.progress)
        stopped_by = "steps"
        start_step = self.step
        compile_cpu_s = 0.0
        # A resumed run that already ended on its budget or patience takes no further step.
        if budget is not None and self.cpu_time >= budget:
            stopped_by = "time_budget"
        elif cfg.early_stop_patience is not None and self._since_best >= cfg.early_stop_patience:
            stopped_by = "early_stopping"
        try:
            while self.step < self.total_steps and stopped_by == "steps":
                if self.late_row_probs is not None and self.reweighted_from_step is None and self._in_late_part():
                    self.reweighted_from_step = self.step
                t0 = time.process_time()
                self.flow.train()
                loss, parts = self._loss(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                # backward even for a non-finite loss: every rank must join the gradient all-reduce
                loss.backward()
                average_gradients(self.flow, self.dist.world_size)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.flow.parameters(), cfg.grad_clip)
                keys = sorted(k for k, v in parts.items() if k != "loss" and isinstance(v, (int, float)))
                stats = torch.tensor([loss.item(), float(torch.isfinite(grad_norm))] + [float(parts[k]) for k in keys],
                                     dtype=torch.float64)
                stats = all_reduce_mean(stats, self.dist.world_size)  # logged values are global-batch means
                parts.update({k: stats[2 + i].item() for i, k in enumerate(keys)})
                if not math.isfinite(stats[0].item()):
                    raise self._diverged(self.step, f"non-finite loss ({stats[0].item()})", parts)
                if stats[1].item() < 1.0:
                    raise self._diverged(self.step, "non-finite gradient", parts)
                self.optimizer.step()
                self.scheduler.step()
                self._update_ema()
                self.step += 1
                step_cpu = time.process_time() - t0
                if cfg.compile and self.step == start_step + 1:  # this step compiled the loss: see OptimSettings
                    compile_cpu_s, step_cpu = step_cpu, 0.0
                self.cpu_time += step_cpu
                parts["loss"] = stats[0].item()
                parts["grad_norm"] = float(grad_norm)
                for k, v in parts.items():
                    if isinstance(v, (int, float)):
                        self._running.setdefault(k, []).append(float(v))
                bar.update(min(step_cpu, max(budget - bar.n, 0.0)) if budget is not None else 1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    row = {"kind": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                           "lr": self.scheduler.get_last_lr()[0], "cpu_time_s": self.cpu_time,
                           **{k: float(np.mean(v)) for k, v in self._running.items()}}
                    self._running = {}
                    self._append_record(row)
                    bar.set_postfix(step=self.step, loss=f"{row['loss']:.4g}")
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end and (self.step // self.steps_per_epoch) % cfg.val_every_epochs == 0:
                    self._run_validation()
                no_progress = (cfg.early_stop_patience is not None and self._since_best >= cfg.early_stop_patience)
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
                out_of_time = cfg.time_budget_s is not None and self.cpu_time >= cfg.time_budget_s
                flags = all_reduce_max(torch.tensor([float(self._stop_requested), float(out_of_time),
                                                     float(no_progress)]), self.dist.world_size)
                if epoch_end or self.step % cfg.checkpoint_every == 0 or flags.any():
                    self.save_checkpoint()
                    self._last_checkpoint_step = self.step
                if flags[0]:
                    stopped_by = "signal"
                    break
                if flags[1]:
                    stopped_by = "time_budget"
                    break
                if flags[2]:
                    stopped_by = "early_stopping"
                    break
            if stopped_by in ("steps", "time_budget") and self.step != start_step and self._last_val_step() != self.step:
                # the steps since the last validation (up to val_every_epochs epochs: the whole weighted last
                # part of a short run) are judged too, so keep_best can choose the final weights
                self._run_validation()
            if self.step != start_step or not self.checkpoint_path.exists():
                self.save_checkpoint()
                self._last_checkpoint_step = self.step
        finally:
            bar.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if self.dist.is_main:
                self._write_csv()
        if stopped_by == "signal":
            # An interruption is not a finished run: callers (run_training, the pipeline) must not
            # save or report this flow as trained. The checkpoint above makes a rerun resume here.
            raise KeyboardInterrupt(f"training interrupted at step {self.step}; checkpoint saved to "
                                    f"{self.checkpoint_path}, rerun to resume")
        return {"step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "cpu_time_s": self.cpu_time, "compile_cpu_s": compile_cpu_s, "stopped_by": stopped_by,
                "resumed_from": self.resumed_from,
                "reweighted_from_step": self.reweighted_from_step,
                "steps_this_run": self.step - start_step,
                "best_step": None if self.best is None else self.best["step"],
                "best_val_nll": None if self.best is None else self.best["nll"]}

    @torch.no_grad()
    def _update_ema(self) -> None:
        self.ema.update_parameters(self.flow)
        for b_ema, b in zip(self.ema.module.buffers(), self.flow.buffers()):
            b_ema.copy_(b)

    def _last_val_step(self) -> int | None:
        return next((r["step"] for r in reversed(self.records) if r.get("kind") == "val"), None)

    def _run_validation(self) -> None:
        if self.validate is None:
            return
        if self.dist.is_main:
            self.ema.module.eval()
            with torch.no_grad():
                metrics = self.validate(self.ema.module)
            self._append_record({"kind": "val", "step": self.step,
                                 "epoch": self.step // self.steps_per_epoch - 1, **metrics})
            nll = metrics.get("nll")
            if self.config.keep_best and nll is not None and math.isfinite(nll):
                if self.best is None or nll < self.best["nll"]:
                    state = {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}
                    self.best, self._since_best = {"nll": float(nll), "step": self.step, "state": state}, 0
                else:
                    self._since_best += 1

    @staticmethod
    def _in_main_thread() -> bool:
        import threading
        return threading.current_thread() is threading.main_thread()

    @property
    def ema_flow(self):
        """The EMA-averaged BoltzmannFlow (what is saved and evaluated)."""
        return self.ema.module

    def result_flow(self):
        """The flow to save: the EMA weights of the lowest validation NLL with keep_best, else the last."""
        if self.best is not None and self.config.keep_best:
            self.ema.module.load_state_dict(self.best["state"])
        return self.ema.module


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_rng_from(state: dict) -> tuple:
    return (state["kind"], state["keys"].cpu().numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["cached_gaussian"])


class _SeededPrior:
    """A flow prior whose ``sample`` draws from a generator seeded with ``seed`` on the prior's device."""

    def __init__(self, prior, seed: int):
        self.prior = prior
        self.generator = torch.Generator(device=prior.device).manual_seed(seed)

    def sample(self, n):
        return self.prior.sample(n, generator=self.generator)

    def log_prob(self, z):
        return self.prior.log_prob(z)
