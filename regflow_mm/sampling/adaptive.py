"""Adaptive flow Monte Carlo: hybrid MD/flow walkers whose flow is fine-tuned between segments.

The run is cut into segments of ``segment_iterations`` iterations (an iteration is ``md_steps``
Langevin steps then ``flow_moves`` flow proposals per walker, as in ``hybrid.py``). Inside a
segment the proposal is frozen, so each segment is an exact Metropolis-Hastings chain for the
Boltzmann distribution, started from the state the previous segment ended in. At the segment
boundaries the schedule names (``adapt_every`` iterations, or the iterations ``adapt_at``; at most
``max_updates`` updates), the flow is fine-tuned by maximum likelihood
(``training.finetune.fine_tune_nll``) on every frame the chain has stored so far (all walkers,
all iterations) plus, optionally, the train split of an MD dataset, and becomes the next flow
version. With ``finetune_proposals`` = n > 0, each update also draws n fresh configurations from the
current flow and weights them by their importance weights exp(-u(x) - log q(x)) (self-normalised): an
unbiased weighted sample of the target itself, which gets ``finetune_proposal_mass`` of the fine-tuning
batches (the chain and data frames the rest). A few hundred chain states alone cannot improve a flow that
was trained on tens of thousands of frames; the weighted proposals can, a little (aldp demo flow, 20k
proposals at half the mass, 300 steps at 3e-5: Kish ESS 31.0 / 31.7% -> 32.5 / 33.5% on two seeds;
BENCHMARKS.md, "adaptive MC"). After the last update the chain is time-homogeneous and exact; a schedule
that would change the flow inside a segment is refused.

Output: one HDF5 file with the layout of ``hybrid.py`` plus::

    flow_version  (T,) int16    version of the flow that proposed in each iteration
    attrs         flow_versions: JSON list of {version, file, sha256, start_iteration,
                  n_train_frames, nll_before, nll_after} (NLL in nats, flow space)

and the versions themselves in ``<out without suffix>.flows/v000.pt`` (a copy of the initial flow),
``v001.pt``, ... Rerunning the same command resumes after the last committed block: every recorded
version must still have its SHA-256 on disk (else a one-line error), and a fine-tuning step killed
before its version was recorded is redone (it is deterministic under the seed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import openmm
from openmm import unit
from openmmtools.states import ThermodynamicState
from scipy.special import logsumexp

from regflow_mm.data.checkpointed_hdf5 import committed_checkpoint, truncate_uncommitted
from regflow_mm.files import check_resume_settings
from regflow_mm.flows import flow_file_hash, load_flow, require_flow_file
from regflow_mm.progress import progress_bar
from regflow_mm.sampling.hybrid import (CHAIN_COUNTS, HybridWalker, commit_block, create_chain_counts, phi_statistics,
                                        run_block)
from regflow_mm.sampling.moves import FlowIndependenceMove, maxwell_boltzmann_velocities
from regflow_mm.systems import MolecularSystem, check_spec_hash, system_from_spec_dict
from regflow_mm.systems.platforms import openmm_seed

log = logging.getLogger(__name__)

FORMAT = "regflow-mm adaptive-mc 2"  # 2: counts at every chain state (hybrid.run_block)
_DATASETS = ("positions", "accepted", "flow_version") + CHAIN_COUNTS


@dataclass(frozen=True)
class AdaptSchedule:
    """When the flow is fine-tuned: only at segment boundaries (iterations, multiples of ``segment_iterations``).

    adapt_every: an update every this many iterations (default: every segment); adapt_at: explicit
    update iterations instead; max_updates: stop adapting after this many updates (None: never stop).
    """

    segment_iterations: int
    adapt_every: int | None = None
    adapt_at: tuple[int, ...] | None = None
    max_updates: int | None = None

    def __post_init__(self):
        s = self.segment_iterations
        if int(s) != s or s < 1:
            raise ValueError(f"segment_iterations must be a positive integer, got {s}")
        if self.adapt_every is not None and self.adapt_at is not None:
            raise ValueError("give adapt_every or adapt_at, not both")
        if self.max_updates is not None and self.max_updates < 0:
            raise ValueError(f"max_updates must be >= 0 or None, got {self.max_updates}")
        if self.adapt_at is not None:
            at = tuple(int(a) for a in self.adapt_at)
            if any(a < 1 for a in at) or list(at) != sorted(set(at)):
                raise ValueError(f"adapt_at must be increasing iterations >= 1, got {list(at)}")
            object.__setattr__(self, "adapt_at", at)
            updates = at
        else:
            every = s if self.adapt_every is None else self.adapt_every
            if int(every) != every or every < 1:
                raise ValueError(f"adapt_every must be a positive integer, got {every}")
            object.__setattr__(self, "adapt_every", int(every))
            updates = (int(every),)
        for a in updates:
            if a % s:
                k = a // s
                raise ValueError(f"an update at iteration {a} would change the flow inside segment {k} (iterations "
                                 f"{k * s}..{(k + 1) * s - 1}): adapt at multiples of segment_iterations={s}")

    def n_updates(self, iteration: int) -> int:
        """Updates made before iteration ``iteration`` runs (= the flow version it uses)."""
        if self.adapt_at is not None:
            n = sum(1 for a in self.adapt_at if a <= iteration)
        else:
            n = iteration // self.adapt_every
        return n if self.max_updates is None else min(n, self.max_updates)

    def segment_end(self, iteration: int) -> int:
        """First iteration of the segment after the one holding ``iteration``."""
        return (iteration // self.segment_iterations + 1) * self.segment_iterations

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adapt_at"] = None if self.adapt_at is None else list(self.adapt_at)
        return d


def _target(system, temperature: float | None):
    """(openmm.System, temperature K, start positions nm, MolecularSystem or None, hash, friction 1/ps)."""
    from regflow_mm.systems import get_system

    if isinstance(system, (str, Path)):
        system = get_system(system)
    if isinstance(system, MolecularSystem):
        if temperature is not None and float(temperature) != system.temperature:
            raise ValueError(f"temperature={temperature} K differs from {system.name!r}'s {system.temperature} K: "
                             "the flow and the chain target the system's temperature; leave temperature unset")
        return (system.system, system.temperature, system.positions, system, system.spec_hash,
                float(system.spec.friction))
    if not (hasattr(system, "system") and hasattr(system, "positions")):
        raise ValueError(f"system must be a MolecularSystem, a system name or an object with .system and .positions "
                         f"(e.g. an openmmtools TestSystem), got {type(system).__name__}")
    if temperature is None or not float(temperature) > 0:
        raise ValueError(f"a {type(system).__name__} target needs temperature= in K (> 0), got {temperature}")
    positions = system.positions
    if hasattr(positions, "value_in_unit"):
        positions = positions.value_in_unit(unit.nanometer)
    digest = hashlib.sha256(openmm.XmlSerializer.serialize(system.system).encode()).hexdigest()
    return system.system, float(temperature), np.asarray(positions, dtype=np.float64), None, digest, 1.0


def flow_versions_dir(out: str | Path) -> Path:
    """Folder of the flow versions of an adaptive run ``out``: ``<out without suffix>.flows``."""
    out = Path(out)
    return out.with_name(out.stem + ".flows")


def run_adaptive_mc(system, flow_path: str | Path, out: str | Path, n_iterations: int, *,
                    schedule: AdaptSchedule, temperature: float | None = None, train_data: str | Path | None = None,
                    finetune_steps: int = 200, finetune_batch_size: int = 256, finetune_lr: float = 1e-3,
                    finetune_proposals: int = 0, finetune_proposal_mass: float = 0.5,
                    relabel_equivalent_atoms: bool = True, n_walkers: int = 2, md_steps: int = 500,
                    timestep_fs: float = 1.0,
                    friction_per_ps: float | None = None, flow_moves: int = 1, reject_d_chirality: bool | None = None,
                    batch_size: int = 256, seed: int = 0, platform: str = "Reference", checkpoint_every: int = 20,
                    progress: bool = True) -> dict:
    """Run ``n_walkers`` adaptive hybrid chains until ``out`` holds ``n_iterations`` frames per walker.

    system: ``MolecularSystem`` / name, or an object with ``.system`` (openmm.System) and ``.positions``
    (nm) plus ``temperature`` (K). flow_path: the initial flow. schedule: ``AdaptSchedule``.
    train_data: an MD dataset whose train split (with its frame weights) joins the chain's frames in
    every fine-tuning (MolecularSystem only). finetune_*: Adam steps, minibatch, learning rate;
    finetune_proposals: importance-weighted flow samples drawn at each update (0: none), which get
    finetune_proposal_mass (in (0, 1]) of the batches. relabel_equivalent_atoms (MolecularSystem only): every
    fine-tuning frame's methyl / ammonium hydrogens relabelled by a random cyclic shift (``systems.symmetry``):
    short chains, like short MD, leave a rotor's equivalent wells unequally filled.
    reject_d_chirality: default True for a MolecularSystem. The other arguments are those of
    ``run_hybrid_mc``. Reruns with the same ``out`` resume; ``n_iterations`` may grow between reruns.
    Returns :func:`adaptive_summary` plus CPU seconds of this run in MD, flow moves and fine-tuning.
    """
    openmm_system, temperature, start, molsys, system_hash, default_friction = _target(system, temperature)
    if n_iterations < 1 or n_walkers < 1 or md_steps < 0 or flow_moves < 1 or checkpoint_every < 1:
        raise ValueError("n_iterations, n_walkers, flow_moves, checkpoint_every must be >= 1 and md_steps >= 0; got "
                         f"{n_iterations}, {n_walkers}, {flow_moves}, {checkpoint_every}, {md_steps}")
    if not isinstance(schedule, AdaptSchedule):
        raise ValueError(f"schedule must be an AdaptSchedule, got {type(schedule).__name__}")
    if reject_d_chirality is None:
        reject_d_chirality = molsys is not None
    if train_data is not None and molsys is None:
        raise ValueError("train_data needs a MolecularSystem target (the dataset is checked against it)")
    if int(finetune_proposals) < 0 or not 0.0 < float(finetune_proposal_mass) <= 1.0:
        raise ValueError(f"finetune_proposals must be >= 0 and finetune_proposal_mass in (0, 1]; got "
                         f"{finetune_proposals}, {finetune_proposal_mass}")
    flow_path = require_flow_file(flow_path)
    out = Path(out)
    settings = {"md_steps": int(md_steps), "timestep_fs": float(timestep_fs),
                "friction_per_ps": float(default_friction if friction_per_ps is None else friction_per_ps),
                "flow_moves": int(flow_moves), "reject_d_chirality": bool(reject_d_chirality),
                "batch_size": int(batch_size), "n_walkers": int(n_walkers), "temperature": temperature,
                "schedule": schedule.to_dict(), "finetune_steps": int(finetune_steps),
                "finetune_batch_size": int(finetune_batch_size), "finetune_lr": float(finetune_lr),
                "train_data": None if train_data is None else str(Path(train_data).resolve()), "platform": platform}
    if finetune_proposals:  # (absent when off: chains written before these settings existed still resume)
        settings.update(finetune_proposals=int(finetune_proposals), finetune_proposal_mass=float(finetune_proposal_mass))
    groups = molsys.equivalent_atom_groups if relabel_equivalent_atoms and molsys is not None else []
    if groups:  # (absent without groups, as above)
        settings["relabel_equivalent_atoms"] = [list(g) for g in groups]
    flow_hash = flow_file_hash(flow_path)
    thermo = ThermodynamicState(openmm_system, temperature * unit.kelvin)
    flows_dir = flow_versions_dir(out)

    resume = _prepare_resume(out, system_hash, flow_hash, settings, seed) if out.exists() else None
    if resume is not None:
        n_done, positions, velocities, move_states, versions = resume
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        flows_dir.mkdir(exist_ok=True)
        v0 = flows_dir / "v000.pt"
        shutil.copyfile(flow_path, v0)
        versions = [{"version": 0, "file": v0.name, "sha256": flow_file_hash(v0), "start_iteration": 0,
                     "n_train_frames": 0, "nll_before": None, "nll_after": None}]
        _create(out, molsys, system_hash, start.shape[0], flow_path, flow_hash, settings, seed, versions)
        n_done, move_states = 0, [None] * n_walkers
        positions = np.repeat(start[None], n_walkers, axis=0)
        velocities = np.stack([maxwell_boltzmann_velocities(openmm_system, temperature,
                                                            np.random.default_rng([seed, w, 0]))
                               for w in range(n_walkers)])
    data = None if train_data is None else _training_frames(train_data, molsys)

    def make_move(version: int, walker: int, state: dict | None) -> FlowIndependenceMove:
        if state is not None:
            move = FlowIndependenceMove.__new__(FlowIndependenceMove)
            move.__setstate__(state)
            return move
        path = flows_dir / versions[version]["file"]
        return FlowIndependenceMove(load_flow(path), flow_path=path, molecular_system=molsys,
                                    reject_d_chirality=reject_d_chirality, batch_size=batch_size,
                                    seed=int(np.random.SeedSequence([seed, walker, version]).generate_state(1)[0]))

    active = schedule.n_updates(n_done)
    watch = [] if molsys is None else [idx for name, idx in molsys.torsions.items() if name.startswith("phi")]
    walkers = []
    for w in range(n_walkers):
        state = move_states[w]
        if state is not None and (active >= len(versions) or state["flow_hash"] != versions[active]["sha256"]):
            state = None  # the checkpoint predates this segment's flow: the segment starts with fresh moves
        walkers.append(HybridWalker(make_move(active, w, state) if active < len(versions) else None,
                                    positions[w], velocities[w], md_steps=md_steps, flow_moves=flow_moves,
                                    timestep_fs=timestep_fs, friction_per_ps=settings["friction_per_ps"],
                                    random_seed=openmm_seed(seed, w, n_done), platform=platform, watch=watch))

    finetune_cpu = 0.0
    bar = progress_bar(total=n_iterations, initial=min(n_done, n_iterations), unit="it",
                       desc=f"adaptive MC {getattr(molsys, 'name', '')}".rstrip(), disable=not progress,
                       dynamic_ncols=True, mininterval=1.0)
    try:
        while n_done < n_iterations:
            version = schedule.n_updates(n_done)
            if version >= len(versions):
                t0 = time.process_time()
                versions.append(_fine_tune(out, flows_dir, versions, n_done, data, settings, seed,
                                           (openmm_system, temperature)))
                finetune_cpu += time.process_time() - t0
            if walkers[0].flow_move is None or walkers[0].flow_move.flow_hash != versions[version]["sha256"]:
                for w, walker in enumerate(walkers):
                    walker.flow_move = make_move(version, w, None)
            n_block = min(checkpoint_every, schedule.segment_end(n_done) - n_done, n_iterations - n_done)
            rows = run_block(walkers, thermo, n_block, bar)
            n_done = commit_block(out, {**rows, "flow_version": np.full(n_block, version, np.int16)}, walkers, n_done)
    finally:
        bar.close()
    summary = adaptive_summary(out)
    summary.update(md_cpu_s=sum(wk.md_cpu_s for wk in walkers), flow_cpu_s=sum(wk.flow_cpu_s for wk in walkers),
                   finetune_cpu_s=finetune_cpu)
    return summary


def _training_frames(path, molsys) -> tuple[np.ndarray, np.ndarray]:
    """Train-split positions (N, n, 3) nm of an MD dataset and their log-weights, normalised to mean weight 1."""
    from regflow_mm.data import load_dataset

    dataset = load_dataset(path, system=molsys)
    idx = dataset.split_indices("train")
    lw = np.zeros(idx.size) if dataset.log_weights is None else np.asarray(dataset.log_weights[idx], np.float64)
    finite = np.isfinite(lw)
    if not finite.any():
        raise ValueError(f"dataset {path}: every train frame has weight 0; use another --train-data")
    lw = lw - logsumexp(lw[finite]) + np.log(finite.sum())
    return dataset.positions[idx], lw


def pooled_log_weights(frames_log_w: np.ndarray, proposals_log_w: np.ndarray, proposal_mass: float) -> np.ndarray:
    """Log-weights of frames + proposals, concatenated, each pool normalised to its share of the batches
    (proposals: ``proposal_mass`` in (0, 1], frames the rest)."""
    frames = (frames_log_w - logsumexp(frames_log_w) + np.log1p(-proposal_mass) if proposal_mass < 1
              else np.full(len(frames_log_w), -np.inf))
    return np.concatenate([frames, proposals_log_w - logsumexp(proposals_log_w) + np.log(proposal_mass)])


def _weighted_proposals(flow, target, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """n flow samples (n, n_atoms, 3) nm with their log importance weights -u - log q (-inf where u or log q is
    not finite) and their Kish ESS (samples)."""
    import torch

    from regflow_mm.energy import EnergyEvaluator
    from regflow_mm.importance import kish_ess, log_weights

    with torch.no_grad():
        x, log_q = flow.sample(n, chunk_size=4096, generator=torch.Generator().manual_seed(seed))
    x = x.cpu().double().numpy()
    with EnergyEvaluator.from_system(target[0], target[1], n_workers=0) as evaluator:
        u = evaluator.reduced_energy(x)
    lw = log_weights(log_q.cpu().double().numpy(), u)
    lw = np.where(np.isfinite(lw), lw, -np.inf)
    if not np.isfinite(lw).any():
        raise FloatingPointError(f"none of the {n} proposals for fine-tuning has a finite energy and density")
    return x, lw, float(kish_ess(lw)["ess"] * n)


def _fine_tune(out: Path, flows_dir: Path, versions: list[dict], n_done: int, data, settings: dict,
               seed: int, target) -> dict:
    """Fine-tune the newest version on the chain's frames [0, n_done) (+ data, + weighted proposals of the
    newest version; equivalent atoms relabelled where the settings name groups), save and record the next
    one. target: (openmm.System, temperature K)."""
    from regflow_mm.systems.symmetry import relabel_equivalent_atoms
    from regflow_mm.training.finetune import fine_tune_nll

    version = len(versions)
    tune_seed = int(np.random.SeedSequence([seed, version]).generate_state(1)[0])
    with h5py.File(out, "r") as fh:
        chain = fh["positions"][:n_done]
    x = chain.reshape((-1,) + chain.shape[2:])
    lw = np.zeros(len(x))
    if data is not None:
        x, lw = np.concatenate([x, data[0]]), np.concatenate([lw, data[1]])
    flow = load_flow(flows_dir / versions[-1]["file"])
    proposal_ess = None
    if settings.get("finetune_proposals"):
        xp, lwp, proposal_ess = _weighted_proposals(flow, target, settings["finetune_proposals"], tune_seed)
        x, lw = np.concatenate([x, xp]), pooled_log_weights(lw, lwp, settings["finetune_proposal_mass"])
    if settings.get("relabel_equivalent_atoms"):  # p is symmetric: relabelled frames keep their weights
        x, _ = relabel_equivalent_atoms(x, [tuple(g) for g in settings["relabel_equivalent_atoms"]], seed=tune_seed)
    weighted = data is not None or proposal_ess is not None
    result = fine_tune_nll(flow, x, steps=settings["finetune_steps"], batch_size=settings["finetune_batch_size"],
                           lr=settings["finetune_lr"], log_weights=lw if weighted else None, seed=tune_seed)
    path = flows_dir / f"v{version:03d}.pt"
    record = {"version": version, "file": path.name, "sha256": flow.save(path), "start_iteration": int(n_done),
              "n_train_frames": result["n_frames"], "nll_before": result["nll_before"],
              "nll_after": result["nll_after"]}
    if proposal_ess is not None:
        record["proposal_ess"] = proposal_ess
    with h5py.File(out, "r+") as fh:
        fh.attrs["flow_versions"] = json.dumps(versions + [record])
    log.info("flow version %d from %d frames: NLL %.3f -> %.3f", version, result["n_frames"], result["nll_before"],
             result["nll_after"])
    return record


def _create(out, molsys, system_hash, n_atoms, flow_path, flow_hash, settings, seed, versions):
    w = settings["n_walkers"]
    metadata = {"format": FORMAT, "system": None if molsys is None else molsys.spec.to_dict(),
                "system_hash": system_hash, "flow_path": str(Path(flow_path).resolve()), "flow_hash": flow_hash,
                "settings": settings, "seed": int(seed), "temperature": settings["temperature"],
                "units": {"positions": "nm", "time": "ps", "temperature": "K", "nll": "nats"}}
    with h5py.File(out, "w") as fh:
        fh.attrs["metadata"] = json.dumps(metadata)
        fh.attrs["flow_versions"] = json.dumps(versions)
        fh.attrs["n_iterations"] = 0
        fh.create_dataset("positions", shape=(0, w, n_atoms, 3), maxshape=(None, w, n_atoms, 3), dtype=np.float32,
                          chunks=(64, w, n_atoms, 3))
        fh.create_dataset("accepted", shape=(0, w), maxshape=(None, w), dtype=np.int16, chunks=(256, w))
        fh.create_dataset("flow_version", shape=(0,), maxshape=(None,), dtype=np.int16, chunks=(256,))
        create_chain_counts(fh, w, {} if molsys is None else molsys.torsions)


def _prepare_resume(out, system_hash, flow_hash, settings, seed):
    """Checks for resuming ``out``; its committed state, or None when it committed nothing (start again)."""
    with h5py.File(out, "r+") as fh:
        md = json.loads(fh.attrs["metadata"])
        if md.get("format") != FORMAT:
            what = ("an adaptive-MC file of an older version" if str(md.get("format", "")).startswith(
                "regflow-mm adaptive-mc") else "not an adaptive-MC file")
            raise ValueError(f"{out} is {what} ({md.get('format')!r}): choose another --out")
        check_spec_hash(md["system_hash"], system_hash, str(out), verb="holds a run of", allow_unknown=False)
        if md["flow_hash"] != flow_hash:
            raise ValueError(f"{out} was started from another flow (hash {md['flow_hash'][:12]}, this one "
                             f"{flow_hash[:12]}): resume with the original flow file or choose another --out")
        check_resume_settings(out, md["settings"], settings, None, md["seed"], seed, ignore=("platform",))
        versions = json.loads(fh.attrs["flow_versions"])
        flows_dir = flow_versions_dir(out)
        for record in versions:
            path = require_flow_file(flows_dir / record["file"], hint=f": flow version {record['version']} of {out} "
                                     "is missing; restore it or choose another --out")
            actual = flow_file_hash(path)
            if actual != record["sha256"]:
                raise ValueError(f"flow version {record['version']} ({path}) changed on disk since the chain used it "
                                 f"(hash {actual[:12]}, recorded {record['sha256'][:12]}): restore it or choose "
                                 "another --out")
        n_done = truncate_uncommitted(fh, "n_iterations", _DATASETS)
        if n_done == 0:
            log.info("%s committed no block yet: starting it again", out)
            return None
        ck = committed_checkpoint(fh, "n_iterations")
        if ck is None:
            raise ValueError(f"{out} has no checkpoint of its {n_done} committed iterations; delete it (and "
                             f"{flows_dir.name}/) and start again")
        positions, velocities = ck["positions"][()], ck["velocities"][()]
        move_states = [json.loads(s) for s in ck.attrs["move_state"]]
    log.info("resuming %s at iteration %d (%d flow versions)", out, n_done, len(versions))
    return n_done, positions, velocities, move_states, versions


def version_acceptance(out: str | Path, system, n_samples: int = 20000, seed: int = 0,
                       reject_d_chirality: bool = True) -> dict:
    """Stationary acceptance of the first and the last flow version of the adaptive run ``out`` as
    independence proposals (``importance.imh_acceptance``), each from ``n_samples`` samples drawn with the
    same seed (paired latent draws, so the change is resolved far below the chain's own quarter-to-quarter
    noise). D-chirality samples count as never accepted when ``reject_d_chirality`` (as the chain's rule).
    Energies at the system's temperature (``EnergyEvaluator``'s default, the adaptive run's default too).

    Returns first_version, last_version, n_samples and ``importance.imh_acceptance_change``'s
    acceptance_a/_b, change and their standard errors.
    """
    from ..energy import EnergyEvaluator
    from ..importance import imh_acceptance_change
    from .reweighting import draw_weighted_samples

    with h5py.File(out, "r") as fh:
        versions = json.loads(fh.attrs["flow_versions"])
    flows_dir = flow_versions_dir(out)
    log_w = []
    with EnergyEvaluator(system, n_workers=0) as evaluator:
        for record in (versions[0], versions[-1]):
            flow = load_flow(require_flow_file(flows_dir / record["file"]), system=system)
            samples = draw_weighted_samples(flow, evaluator, n_samples, seed=seed, molecular_system=system,
                                            progress=False)
            lw = samples.log_w.copy()
            if reject_d_chirality and samples.is_l is not None:
                lw[~samples.is_l] = -np.inf
            log_w.append(lw)
    return {"first_version": int(versions[0]["version"]), "last_version": int(versions[-1]["version"]),
            "n_samples": int(n_samples), **imh_acceptance_change(log_w[0], log_w[1], seed=seed)}


def _acceptance(accepted: np.ndarray, flow_moves: int) -> float:
    return float(accepted.sum() / (accepted.size * flow_moves)) if accepted.size else float("nan")


def _acceptance_se(accepted: np.ndarray, flow_moves: int, n_batches: int = 10) -> float:
    """Standard error of ``_acceptance`` over iterations (T, W) by batch means: the walkers' iterations are
    cut into ``n_batches`` contiguous blocks each (independence moves accept in runs: a chain sitting on a
    high-weight state rejects many proposals in a row, so the binomial error would be too small)."""
    t = accepted.shape[0]
    n_batches = min(n_batches, t)
    if n_batches < 2:
        return float("nan")
    means = np.array([[_acceptance(block[:, w:w + 1], flow_moves) for w in range(accepted.shape[1])]
                      for block in np.array_split(accepted, n_batches)]).ravel()
    return float(means.std(ddof=1) / math.sqrt(means.size))


def adaptive_summary(path: str | Path) -> dict:
    """Acceptance trace and basin statistics of an adaptive-MC file.

    Returns n_iterations, n_walkers, flow_versions (the records), segments (start, stop, flow_version,
    acceptance), acceptance (overall), acceptance_first_quarter / acceptance_last_quarter (over
    iterations) with their batch-means standard errors (``*_se``), acceptance_rise (last - first quarter) and
    its standard error, and for a MolecularSystem the phi statistics of ``hybrid.phi_statistics``.
    Acceptance = accepted / proposed flow moves (chirality and non-finite rejections count as proposed).
    """
    with h5py.File(path, "r") as fh:
        md = json.loads(fh.attrs["metadata"])
        n = int(fh.attrs["n_iterations"])
        accepted = fh["accepted"][:n]
        version = fh["flow_version"][:n]
        versions = json.loads(fh.attrs["flow_versions"])
        positions = fh["positions"][:n] if md["system"] else None
        counts = {k: fh[k][:n] for k in CHAIN_COUNTS if k in fh}
    settings = md["settings"]
    schedule = AdaptSchedule(**settings["schedule"])
    k = settings["flow_moves"]
    s = schedule.segment_iterations
    segments = [{"start": a, "stop": min(a + s, n), "flow_version": int(version[a]),
                 "acceptance": _acceptance(accepted[a:a + s], k)} for a in range(0, n, s)]
    q = max(n // 4, 1)
    summary = {"n_iterations": n, "n_walkers": settings["n_walkers"], "settings": settings,
               "flow_versions": versions, "segments": segments, "acceptance": _acceptance(accepted, k)}
    first, last = (accepted[:q], accepted[n - q:]) if n >= 4 else (accepted[:0], accepted[:0])  # empty: NaN
    summary.update(acceptance_first_quarter=_acceptance(first, k), acceptance_last_quarter=_acceptance(last, k),
                   acceptance_first_quarter_se=_acceptance_se(first, k),
                   acceptance_last_quarter_se=_acceptance_se(last, k))
    summary.update(acceptance_rise=summary["acceptance_last_quarter"] - summary["acceptance_first_quarter"],
                   acceptance_rise_se=math.hypot(summary["acceptance_first_quarter_se"],
                                                 summary["acceptance_last_quarter_se"]))
    if positions is not None and n:
        summary.update(phi_statistics(positions, system_from_spec_dict(md["system"]).torsions, counts,
                                      (settings["md_steps"] > 0) + settings["flow_moves"]))
    return summary
