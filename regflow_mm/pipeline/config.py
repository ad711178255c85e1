"""Pipeline configuration: a TOML file checked against a schema of typed defaults.

Every section and key has a default here, so a config file only states what differs.
Unknown sections/keys and wrong types are one-line errors naming the key.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from ..files import require_file

# section -> key -> default (the default's type is the required type; None means "str or unset").
SCHEMA: dict[str, dict] = {
    # threads: torch CPU threads; 1 is fastest for these small networks on a shared CPU.
    "run": {"seed": 0, "device": "cpu", "threads": 1},
    "system": {"name": "aldp"},  # built-in name or a system spec .toml path
    # enhanced: "none" (plain MD), "metadynamics" (well-tempered, on the system's phi1/psi1 by
    # default; frames carry log-weights to the unbiased ensemble) or "tempering" (parallel tempering,
    # pt_replicas on a geometric ladder up to pt_max_temperature_K; the system-temperature replica is kept). reference_ns > 0 runs a second,
    # independent simulation (seed + 1) of that length, held out as the evaluation reference: it runs in
    # the background on the second core from the start until evaluation, so it can be longer than the
    # training run (saved every reference_save_interval_ps). val_blocks: the validation frames are the ends
    # of that many segments of the training run (``data.time_block_splits``), so that keeping the flow of
    # the best validation NLL judges it on the whole run, not on its last block. hydrogen_mass_amu > 0:
    # integrate with hydrogens of that mass (``systems.masses``, same ensemble; 3 amu runs stably at
    # timestep_fs = 2); 0: the force field's masses. metad_grid_points: bias grid points per torsion; with 3
    # torsions, 36 (spacing 0.17 rad, half the default width) keeps OpenMM's per-deposition update of the
    # tabulated bias cheap (al4, 3 torsions: 72 -> ~550 CPU-s per ns, 36 -> ~90).
    "md": {"ns": 5.0, "save_interval_ps": 0.5, "timestep_fs": 1.0, "hydrogen_mass_amu": 0.0, "equilibration_ps": 10.0, "platform": "auto",
           "enhanced": "none", "metad_torsions": "phi1,psi1", "metad_bias_factor": 6.0, "metad_height_kJ": 1.2,
           "metad_width_rad": 0.35, "metad_deposition_ps": 1.0, "metad_grid_points": 72, "pt_replicas": 4,
           "pt_max_temperature_K": 600.0, "val_blocks": 10, "reference_ns": 0.0,
           "reference_save_interval_ps": 0.5},
    # Internal coordinates by default: on a CPU budget they train far better than Cartesian flows
    # (see BENCHMARKS.md); the RegFlow paper's Cartesian setup is `representation = "cartesian"`.
    "flow": {"representation": "internal", "architecture": "nsf", "layers": 6, "hidden": 128},
    # Passed to regflow_mm.training.TrainConfig; the baseline trains with the same settings and budget.
    # data_weight_power: MLE / NLL+FM batches draw enhanced-sampling frames ~ w**power (RegFlow trains on
    # teacher pairs and does not read it). compile: torch.compile the training loss (about 1.8x the steps per
    # CPU-second; its compiling first step is outside time_budget_s; needs a C++ compiler, else training runs
    # eagerly with a warning). val_every_epochs: epochs
    # between validations (a RegFlow epoch over 20k pairs is only ~80 steps; validation is not in the budget).
    # reweight_fraction: the last part of an MLE / NLL+FM run draws batches with the full frame weights.
    # relabel_equivalent_atoms: each training frame's methyl / ammonium hydrogens relabelled by a random cyclic
    # shift (``systems.symmetry``), so that every rotor well holds its exact share of the data.
    # mle_finetune_fraction > 0 (method "regflow"): the RegFlow route, i.e. the student trains by RegFlow for the first
    # (1 - fraction) of time_budget_s and is then fine-tuned by MLE (the baseline's settings, its weighted last part
    # included) for the rest (``runner.run_regflow_then_mle``); both the student and the fine-tuned flow are evaluated.
    # With target "reflow" the teacher CNF and its pairs are a stage of their own ("teacher"), evaluated as a
    # generator (exact likelihood, rk4) in "evaluate_teacher" beside the student's training.
    "train": {"data_weight_power": 0.0, "reweight_fraction": 0.0, "relabel_equivalent_atoms": True,
              "mle_finetune_fraction": 0.0, "method": "regflow", "target": "reflow", "time_budget_s": 150.0, "epochs": 1000,
              "batch_size": 256, "lr": 5e-4, "regression_units": "standardised", "regularizer": "none", "lambda_r": 0.0,
              "lambda_n": 0.0,
              "n_pairs": 20000, "teacher_steps": 6000, "val_samples": 0, "ode_method": "dopri5",
              "lr_schedule": "constant", "keep_best": False, "compile": False, "val_every_epochs": 1},
    # method "smooth": the baseline is the [smooth] section's C-infinity flow (NLL + force matching, its own
    # architecture and time_budget_s; [smooth].enabled only switches its dynamics stage), evaluated beside the main
    # flow and eligible as the downstream flow (on al4 it reached ESS 1.3% where the MLE spline gave 0.4%).
    "baseline": {"enabled": True, "method": "mle"},
    # downstream_flow: the flow used by mc / free_energy / export: "best" (fewest basins missed, then the highest
    # bootstrap 5th percentile of the Kish ESS on held-out data, then the lowest E-W1: run.best_flow), "regflow" or
    # "baseline".
    # n_bootstrap: resamples for the ESS interval; n_torsion: samples per side of the exact T-W2.
    # teacher_samples: samples of the reflow teacher CNF (0: not evaluated), its held-out NLL on teacher_nll_frames
    # reference frames (each costs an ODE solve with the exact divergence: ~16 CPU-ms on aldp with rk4 8 steps, one thread).
    "evaluate": {"n_samples": 5000, "downstream_flow": "best", "n_bootstrap": 200, "n_torsion": 5000,
                 "teacher_samples": 5000, "teacher_nll_frames": 2000, "teacher_ode_steps": 8},
    # plain_md_iterations > 0: the plain-MD chain of the same walkers, start and MD segment without flow moves, that
    # many iterations (choose it so that its CPU time is about the hybrid chain's): the baseline of the hybrid
    # chain's phi sign changes per CPU second, both counted between consecutive chain states.
    # adapt_segments > 1: beside the hybrid chain, an adaptive one (``sampling.adaptive``) of adapt_iterations
    # iterations (0: n_iterations) and the same settings, its proposal flow fine-tuned between adapt_segments equal
    # segments (finetune_steps Adam steps at finetune_lr, weighted NLL on the chain's frames + the training data's
    # train split with its frame weights, and, with finetune_proposals > 0, on that many flow samples weighted by
    # their importance weights, at half the mass of the batches). acceptance_samples > 0: the first and the last
    # flow version's stationary acceptance as independence proposals, each from that many samples on the same latent
    # draws (``adaptive.version_acceptance``): the chain's quarters differ by ~2 points of noise, the paired estimate
    # resolves a change of a few tenths.
    # tempering_replicas >= 2: also openmmtools parallel tempering (``sampling.tempering``) with the same MD
    # segment and flow moves in every replica, on a geometric ladder up to tempering_max_K, for
    # tempering_iterations exchange iterations.
    "mc": {"n_iterations": 200, "md_steps_per_iteration": 500, "n_walkers": 2, "flow_moves_per_iteration": 1,
           "plain_md_iterations": 0, "adapt_iterations": 0, "adapt_segments": 0, "finetune_steps": 300,
           "finetune_lr": 2e-4, "finetune_proposals": 0,
           "acceptance_samples": 20000, "tempering_replicas": 0, "tempering_iterations": 50, "tempering_max_K": 600.0},
    # tfep: also TFEP between phi < 0 and phi > 0 (``sampling.tfep``): a map trained energy-free by RegFlow on
    # OT pairs of tfep_n_train weight-resampled training frames per state (tfep_steps regression steps, a
    # tfep_layers x tfep_hidden circular-spline coupling map moving the wide torsions, or every coordinate with
    # tfep_moved = "all"), works on tfep_n_eval frames per state of the reference run (else of the training run).
    "free_energy": {"n_samples": 20000, "tfep": True, "tfep_n_train": 2000, "tfep_n_eval": 2000, "tfep_steps": 800,
                    "tfep_layers": 6, "tfep_hidden": 64, "tfep_moved": "circular"},
    "export": {"backend": "torch", "md_steps": 1000},
    # A flow potential for dynamics (``export.check.check_flow_dynamics``): a C-infinity 'smooth' flow on
    # internal coordinates with support 'open' (bonds, angles, narrow torsions mapped from their physical
    # domains by smooth bijections, torsions on the circle: the density is positive and smooth on every
    # configuration, no hard wall), float64, trained for time_budget_s CPU seconds by
    #   w_nll * NLL + w_fm * FM,
    # NLL = -E log q(x) (nats) on the training frames and FM = E ||F/kT - grad_x log q||^2 ((kT/nm)^2, summed
    # over the 3N components) on the forces stored with them. FM is ~1e4-1e5 (kT/nm)^2 where NLL is ~-200
    # nats. w_fm = 1e-3 (the smooth-flows paper's ratio) lets FM pull the density off the data: on aldp it cost
    # 2.5 nats of held-out NLL and left ESS at 1-3%, while 1e-4 gave ESS 44% at the same force error
    # (BENCHMARKS.md, issue 12, "force-matching weight").
    # data_weight_power / reweight_fraction / relabel_equivalent_atoms: as in [train].
    # Then, with the exported force (backend): force RMSE against held-out MD forces (n_test_frames of the
    # test split), nve_equilibrate_ps of Langevin + nve_ps of Verlet NVE at 1 fs on the flow potential and
    # on the force field side by side, langevin_ps of Langevin at langevin_timestep_fs with hydrogens of hydrogen_mass_amu
    # (default 1 fs, the force field's masses: at 2 fs with 3 amu hydrogens the flow potential's stiffer modes heated
    # the walkers to 337-377 K against the force field's 324-329 K; at 1 fs 326-337 K against 320-337 K,
    # BENCHMARKS.md issue 12) on the flow potential alone, langevin_walkers of them from frames drawn by their
    # weights from the data (equilibrium starts; one 100 ps trajectory of aldp's force field itself lands 0.4-1.8
    # rad from the data, 4 walkers pooled 0.34-0.44), split into one group per core, the flow walkers of a group in
    # one OpenMM Context whose flow force evaluates them as one batch (16 walkers cost ~1.3x one), beside the force
    # field's walkers from
    # the same starts (pooled T-W2 of (phi, psi) against the MD frames, Ramachandran plot), and bias_ps
    # of Langevin on the force field with the flow force in its own group; then n_samples of the flow's own samples
    # against the held-out reference (ESS, energies, T-W2; 0: skip): Langevin on -kT log q samples q itself, so a
    # flow with a low ESS cannot give dynamics with the target's populations. Off by default (~5 min of
    # training plus the MD: examples/aldp_cpu_smooth.toml).
    # interval: the map of bonds, angles and narrow torsions in the couplings: "probit" (conditional
    # probit-affine on a normal open map: the flow potential along each bond is quadratic in log r, like the
    # force field's), "logistic" (conditional logit-affine on a logistic open map, curvature bounded for every
    # parameter value) or "mixture" (the torsions' smooth mixtures; their flanks are springs far stiffer than
    # the bonds' and NVE at 1 fs heats up, BENCHMARKS.md issue 12).
    # circle_conditioning: what conditions the torsion circles: "all" (every other coordinate), "circles" (the
    # other circles only: q(circles) q(the rest | circles); no torsion can follow a C-H bond, which removes the
    # stiffest hydrogen modes) or "torsions" (every torsion, narrow ones too, sees the other torsions only).
    # Measured on aldp (BENCHMARKS.md, issue 12): neither alternative made Langevin on the flow potential stable,
    # and both raise the force error, so "all" stays the default.
    "smooth": {"enabled": False, "layers": 6, "components": 8, "hidden": 128, "open_width": 1.0, "interval": "probit",
               "circle_conditioning": "all",
               "time_budget_s": 300.0, "batch_size": 64, "lr": 1e-3, "w_nll": 1.0, "w_fm": 1e-4,
               "data_weight_power": 0.0, "reweight_fraction": 0.0, "relabel_equivalent_atoms": True,
               "backend": "torch", "n_test_frames": 2000,
               "nve_equilibrate_ps": 1.0, "nve_ps": 5.0, "langevin_ps": 100.0, "langevin_timestep_fs": 1.0,
               "langevin_walkers": 8, "hydrogen_mass_amu": 0.0, "bias_ps": 1.0, "n_samples": 20000},
}

_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def default_config() -> dict:
    return copy.deepcopy(SCHEMA)


def validate(raw: dict, source: str = "config") -> dict:
    """Merge ``raw`` over the defaults, rejecting unknown keys and wrong types."""
    config = default_config()
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ValueError(f"{source}: unknown section [{section}]; sections are {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ValueError(f"{source}: unknown key {key!r} in [{section}]; allowed: "
                                 f"{', '.join(SCHEMA[section])}")
            config[section][key] = _checked(value, SCHEMA[section][key], f"{source}: [{section}].{key}")
    hm = config["md"]["hydrogen_mass_amu"]
    if hm != 0 and not hm >= 1:
        raise ValueError(f"{source}: [md].hydrogen_mass_amu must be 0 (the force field's masses) or >= 1 amu, got {hm}")
    mc = config["mc"]
    for key in ("plain_md_iterations", "adapt_iterations"):
        if mc[key] < 0:
            zero = "off" if key == "plain_md_iterations" else "n_iterations"
            raise ValueError(f"{source}: [mc].{key} must be >= 0 (0: {zero}), got {mc[key]}")
    adapt_iterations = mc["adapt_iterations"] or mc["n_iterations"]
    if mc["adapt_segments"] > 1 and adapt_iterations % mc["adapt_segments"]:
        raise ValueError(f"{source}: [mc].adapt_iterations (or n_iterations) = {adapt_iterations} must be a multiple "
                         f"of [mc].adapt_segments = {mc['adapt_segments']} (equal segments with a frozen flow)")
    if mc["acceptance_samples"] < 0:
        raise ValueError(f"{source}: [mc].acceptance_samples must be >= 0 (0: not measured), got {mc['acceptance_samples']}")
    if config["free_energy"]["tfep_moved"] not in ("circular", "all"):
        raise ValueError(f"{source}: [free_energy].tfep_moved must be 'circular' or 'all', got "
                         f"{config['free_energy']['tfep_moved']!r}")
    baseline_methods = ("mle", "nll+fm", "regflow", "smooth")
    if config["baseline"]["method"] not in baseline_methods:
        raise ValueError(f"{source}: [baseline].method must be one of {', '.join(baseline_methods)} ('smooth': the "
                         f"[smooth] section's flow), got {config['baseline']['method']!r}")
    sm = config["smooth"]
    for key in ("time_budget_s", "nve_ps", "langevin_timestep_fs", "lr", "open_width"):
        if not sm[key] > 0:
            raise ValueError(f"{source}: [smooth].{key} must be > 0, got {sm[key]}")
    for key in ("langevin_ps", "bias_ps", "w_nll", "w_fm", "nve_equilibrate_ps"):
        if not sm[key] >= 0:
            raise ValueError(f"{source}: [smooth].{key} must be >= 0, got {sm[key]}")
    if sm["langevin_walkers"] < 1:
        raise ValueError(f"{source}: [smooth].langevin_walkers must be >= 1 (trajectories from equilibrium starts), "
                         f"got {sm['langevin_walkers']}")
    if sm["n_samples"] < 0:
        raise ValueError(f"{source}: [smooth].n_samples must be >= 0 (0: the flow's own ensemble is not evaluated), "
                         f"got {sm['n_samples']}")
    if sm["hydrogen_mass_amu"] != 0 and not sm["hydrogen_mass_amu"] >= 1:
        raise ValueError(f"{source}: [smooth].hydrogen_mass_amu must be 0 (the force field's masses) or >= 1 amu, "
                         f"got {sm['hydrogen_mass_amu']}")
    if sm["backend"] not in ("torch", "python"):
        raise ValueError(f"{source}: [smooth].backend must be 'torch' or 'python', got {sm['backend']!r}")
    if sm["interval"] not in ("probit", "logistic", "mixture"):
        raise ValueError(f"{source}: [smooth].interval must be 'probit', 'logistic' or 'mixture', got {sm['interval']!r}")
    if sm["circle_conditioning"] not in ("circles", "torsions", "all"):
        raise ValueError(f"{source}: [smooth].circle_conditioning must be 'circles', 'torsions' or 'all', got "
                         f"{sm['circle_conditioning']!r}")
    if not 0.0 <= config["train"]["mle_finetune_fraction"] < 1.0:
        raise ValueError(f"{source}: [train].mle_finetune_fraction must be in [0, 1) (0: RegFlow alone), got "
                         f"{config['train']['mle_finetune_fraction']}")
    ev = config["evaluate"]
    for key in ("teacher_samples", "teacher_nll_frames"):
        if ev[key] < 0:
            raise ValueError(f"{source}: [evaluate].{key} must be >= 0, got {ev[key]}")
    if ev["teacher_ode_steps"] < 1:
        raise ValueError(f"{source}: [evaluate].teacher_ode_steps must be >= 1, got {ev['teacher_ode_steps']}")
    if mc["tempering_replicas"] == 1 or mc["tempering_replicas"] < 0:
        raise ValueError(f"{source}: [mc].tempering_replicas must be 0 (off) or >= 2, got {mc['tempering_replicas']}")
    return config


def load_config(path: str | Path | None) -> dict:
    """The validated config of a TOML file (``None``: all defaults, the aldp CPU demo)."""
    if path is None:
        return default_config()
    path = require_file(path, "pipeline config", " (examples are in examples/*.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    return validate(raw, str(path))


def train_settings(config: dict, method: str | None = None) -> dict:
    """The one mapping of a validated pipeline config onto ``TrainConfig`` settings (flat names).

    [train] with [flow] (representation, architecture, hyper), [run] (seed, device) and [system];
    ``method`` (the baseline's): the RegFlow-only settings (``TrainConfig.regflow_only()``) are left
    out, so tuning the teacher or the pairs does not change the baseline's settings (nor its cache key);
    a RegFlow run leaves out ``data_weight_power`` and ``reweight_fraction`` (it reads teacher pairs, not frames). The result is checked by ``TrainConfig.from_dict`` here, before any stage runs.
    """
    from ..training.trainer import TrainConfig

    train = dict(config["train"])
    finetune = train.pop("mle_finetune_fraction")
    if method is None and finetune > 0:  # the RegFlow part of the route: the first (1 - fraction) of the budget
        train["time_budget_s"] = (1.0 - finetune) * train["time_budget_s"]
    if method is not None:
        train = {k: v for k, v in train.items() if k not in TrainConfig.regflow_only()}
        train["method"] = method
    if train.get("method", "regflow") == "regflow":
        train.pop("data_weight_power", None)
        train.pop("reweight_fraction", None)
    flow = config["flow"]
    settings = {**train, "representation": flow["representation"], "architecture": flow["architecture"],
                "hyper": {"layers": flow["layers"], "hidden": flow["hidden"]}, "seed": config["run"]["seed"],
                "device": config["run"]["device"], "system": config["system"]["name"]}
    TrainConfig.from_dict(settings)
    return settings


def baseline_settings(config: dict) -> dict | None:
    """``TrainConfig`` settings of the [baseline] flow (None when it is off): the main flow's architecture, optimiser
    and budget trained by [baseline].method, or for method "smooth" the [smooth] section's flow (``smooth_settings``)."""
    if not config["baseline"]["enabled"]:
        return None
    if config["baseline"]["method"] == "smooth":
        return smooth_settings(config)
    return train_settings(config, method=config["baseline"]["method"])


def finetune_settings(config: dict) -> dict | None:
    """``TrainConfig`` settings of the MLE part of the RegFlow route (``[train].mle_finetune_fraction`` of the
    budget, the baseline's settings; ``init_flow`` is set to the student when it runs), or None without it."""
    fraction = config["train"]["mle_finetune_fraction"]
    if fraction == 0:
        return None
    if config["train"]["method"] != "regflow":
        raise ValueError(f"[train].mle_finetune_fraction = {fraction} fine-tunes a RegFlow student; [train].method is "
                         f"{config['train']['method']!r}: set the fraction to 0")
    settings = train_settings(config, method="mle")
    settings["time_budget_s"] = fraction * config["train"]["time_budget_s"]
    return settings


def smooth_settings(config: dict) -> dict:
    """``TrainConfig`` settings (flat names) of the [smooth] stage's flow (see SCHEMA["smooth"]), checked."""
    from ..flows.smooth_coupling import open_map_for
    from ..training.trainer import TrainConfig

    sm = config["smooth"]
    settings = {"system": config["system"]["name"], "representation": "internal",
                "representation_options": {"support": "open", "open_width": sm["open_width"],
                                           "open_map": open_map_for(sm["interval"])},
                "architecture": "smooth",
                "hyper": {"n_layers": sm["layers"], "n_components": sm["components"],
                          "hidden": [sm["hidden"], sm["hidden"]], "interval": sm["interval"],
                          "circle_conditioning": sm["circle_conditioning"]},
                "method": "nll+fm", "w_nll": sm["w_nll"], "w_fm": sm["w_fm"], "time_budget_s": sm["time_budget_s"],
                "epochs": 100000, "batch_size": sm["batch_size"], "lr": sm["lr"], "lr_schedule": "cosine",
                "data_weight_power": sm["data_weight_power"], "reweight_fraction": sm["reweight_fraction"],
                "relabel_equivalent_atoms": sm["relabel_equivalent_atoms"], "dtype": "float64", "val_samples": 0,
                "val_every_epochs": 1000, "checkpoint_every": 100000,
                "seed": config["run"]["seed"], "device": config["run"]["device"]}
    TrainConfig.from_dict(settings)
    return settings


def _checked(value, default, where):
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"{where} must be {_TYPES[expected]}, got a boolean")
    if not isinstance(value, expected):
        raise ValueError(f"{where} must be {_TYPES[expected]}, got {value!r}")
    return value
