"""Hybrid MD / flow Monte Carlo walkers with an incremental, resumable trajectory file.

One iteration of a walker = ``md_steps`` of Langevin dynamics (openmmtools ``LangevinDynamicsMove``
with a seeded integrator) followed by ``flow_moves`` :class:`FlowIndependenceMove` proposals,
i.e. the ``SequenceMove([LangevinDynamicsMove, FlowIndependenceMove])`` of
``examples/hybrid_mc_recipe.py``; one frame per walker per iteration is stored. ``flow_moves = 0``
without a flow is the plain-MD chain of the same settings (the baseline of the crossing comparison).

Output: one HDF5 file (h5py)::

    positions   (T, W, n_atoms, 3) float32 nm     one frame per iteration and walker
    accepted    (T, W) int16                      flow moves accepted in that iteration
    sign_changes (T, W, P) int16                  sign changes of each phi torsion of the system (attrs
                                                  "torsions") between consecutive chain states in that
                                                  iteration: after the MD segment and after every flow move
    positive_states (T, W, P) int16               chain states of that iteration with the torsion > 0
    checkpoint/ positions, velocities (W, n, 3) float64; move_state (JSON per walker)
    attrs       metadata (JSON: system, flow hash, settings, seed), n_iterations (committed)

Frames are written in blocks of ``checkpoint_every`` iterations together with the checkpoint;
``n_iterations`` is written last and marks the block as committed. After a kill, rerunning the
same command truncates any uncommitted rows and continues from the checkpoint: no frame is lost
or duplicated; a file that committed no block yet starts over. Arrays carry fletcher32 checksums. The resumed chain is exact in distribution; its Langevin noise is reseeded from
(seed, walker, iteration), so a resumed run is not bitwise equal to an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
import openmm
from openmm import unit
from openmmtools import cache as mm_cache
from openmmtools.mcmc import IntegratorMoveError, LangevinDynamicsMove
from openmmtools.states import SamplerState, ThermodynamicState

from regflow_mm.data.checkpointed_hdf5 import commit_rows, committed_checkpoint, truncate_uncommitted
from regflow_mm.data.simulate import check_langevin, check_trajectory_path
from regflow_mm.files import CHECKSUM, check_resume_settings, hdf5_file
from regflow_mm.progress import progress_bar
from regflow_mm.sampling.moves import FlowIndependenceMove, maxwell_boltzmann_velocities
from regflow_mm.systems import check_spec_hash, system_from_spec_dict
from regflow_mm.systems.platforms import resolve_platform

log = logging.getLogger(__name__)

FORMAT = "regflow-mm hybrid-mc 2"  # 2: sign_changes and positive_states at every chain state
_RESUME_KEYS = ("md_steps", "timestep_fs", "friction_per_ps", "flow_moves", "reject_d_chirality", "batch_size",
                "n_walkers")


class SeededLangevinDynamicsMove(LangevinDynamicsMove):
    """``LangevinDynamicsMove`` whose integrator gets a fixed random seed (openmmtools leaves it unset)."""

    def __init__(self, random_seed: int, **kwargs):
        super().__init__(**kwargs)
        if not 0 < random_seed < 2**31:
            raise ValueError(f"random_seed must be in 1..2^31-1 (0 means 'random' to OpenMM), got {random_seed}")
        self.random_seed = int(random_seed)

    def _get_integrator(self, thermodynamic_state):
        integrator = super()._get_integrator(thermodynamic_state)
        integrator.setRandomNumberSeed(self.random_seed)
        return integrator

    def __getstate__(self):
        return {**super().__getstate__(), "random_seed": self.random_seed}

    def __setstate__(self, serialization):
        super().__setstate__(serialization)
        self.random_seed = int(serialization["random_seed"])


class HybridWalker:
    """One chain: ``md_steps`` Langevin steps then ``flow_moves`` flow proposals per iteration.

    flow_move: a ``FlowIndependenceMove``; positions (n, 3) nm, velocities (n, 3) nm/ps: the start.
    timestep_fs (fs), friction_per_ps (1/ps), random_seed (1..2^31-1) of the Langevin integrator;
    platform: OpenMM platform of the walker's context cache. ``md_cpu_s`` / ``flow_cpu_s``: CPU
    seconds spent so far in MD and in flow moves. watch: torsions (P lists of 4 atom indices) whose
    sign changes between consecutive chain states and states > 0 :meth:`step` counts (``last_sign_changes``,
    ``last_positive_states``, (P,)); the chain states of an iteration are the state after its MD segment and
    after each flow move, accepted or not.
    ``flow_move`` may be None with ``flow_moves = 0`` (plain MD), or until it is set before the first step.
    """

    def __init__(self, flow_move: FlowIndependenceMove | None, positions, velocities, *, md_steps: int,
                 flow_moves: int, timestep_fs: float, friction_per_ps: float, random_seed: int,
                 platform: str = "Reference", watch=()):
        self.flow_move = flow_move
        self.md_steps, self.flow_moves = int(md_steps), int(flow_moves)
        self.md_move = SeededLangevinDynamicsMove(
            random_seed=random_seed, timestep=timestep_fs * unit.femtosecond,
            collision_rate=friction_per_ps / unit.picosecond, n_steps=max(self.md_steps, 1))
        self.sampler_state = SamplerState(positions=np.asarray(positions) * unit.nanometer,
                                          velocities=np.asarray(velocities) * unit.nanometer / unit.picosecond)
        self.context_cache = mm_cache.ContextCache(platform=openmm.Platform.getPlatformByName(platform), capacity=2)
        self.md_cpu_s = self.flow_cpu_s = 0.0
        self.watch = [list(t) for t in watch]
        self._positive = self._signs()
        self.last_sign_changes = np.zeros(len(self.watch), np.int64)
        self.last_positive_states = np.zeros(len(self.watch), np.int64)

    def _signs(self) -> np.ndarray:
        """(P,) bool: the watched torsions of the current state are > 0."""
        if not self.watch:
            return np.zeros(0, bool)
        from regflow_mm.data.dataset import dihedrals

        return dihedrals(self.positions[None].astype(np.float64), self.watch)[0] > 0

    def _count_state(self, moved: bool = True) -> None:
        """Count the current chain state; ``moved`` False: the state is the previous one (a rejected move)."""
        if moved:
            positive = self._signs()
            self.last_sign_changes += positive != self._positive
            self._positive = positive
        self.last_positive_states += self._positive

    def step(self, thermo: ThermodynamicState, where: str = "this walker") -> int:
        """One iteration at ``thermo``; returns the number of flow moves accepted and sets
        ``last_sign_changes``. An MD blow-up is a one-line RuntimeError naming ``where``."""
        if self.flow_moves and self.flow_move is None:
            raise ValueError(f"flow_moves = {self.flow_moves} needs a flow move (None only for plain MD, "
                             f"flow_moves = 0)")
        self.last_sign_changes = np.zeros(len(self.watch), np.int64)
        self.last_positive_states = np.zeros(len(self.watch), np.int64)
        t0 = time.process_time()
        if self.md_steps:
            _md_step(self.md_move, thermo, self.sampler_state, self.context_cache, where)
            self._count_state()
        t1 = time.process_time()
        accepted = 0
        for _ in range(self.flow_moves):
            before = self.flow_move.n_accepted
            self.flow_move.apply(thermo, self.sampler_state, context_cache=self.context_cache)
            moved = self.flow_move.n_accepted != before  # a rejected move leaves the state as it was
            accepted += moved
            self._count_state(moved)
        self.flow_cpu_s += time.process_time() - t1
        self.md_cpu_s += t1 - t0
        return accepted

    @property
    def positions(self) -> np.ndarray:
        """Current positions (n, 3) nm."""
        return np.asarray(self.sampler_state.positions.value_in_unit(unit.nanometer))

    @property
    def velocities(self) -> np.ndarray:
        """Current velocities (n, 3) nm/ps."""
        return np.asarray(self.sampler_state.velocities.value_in_unit(unit.nanometer / unit.picosecond))


def run_block(walkers: list[HybridWalker], thermo: ThermodynamicState, n_block: int, bar=None, *,
              where: str = "", first_iteration: int = 1) -> dict[str, np.ndarray]:
    """``n_block`` iterations of every walker -> rows for :func:`commit_block`: positions (n_block, W, n, 3)
    float32 nm, accepted (n_block, W), sign_changes and positive_states (n_block, W, P) of the walkers' watched
    torsions.

    ``where`` / ``first_iteration`` name the place of an MD blow-up in its error message."""
    frames = np.empty((n_block, len(walkers)) + walkers[0].positions.shape, np.float32)
    accepted = np.zeros((n_block, len(walkers)), np.int16)
    changes = np.zeros((n_block, len(walkers), len(walkers[0].watch)), np.int16)
    positive = np.zeros_like(changes)
    for k in range(n_block):
        for w, walker in enumerate(walkers):
            accepted[k, w] = walker.step(thermo, f"walker {w}, iteration {first_iteration + k} {where}".strip())
            frames[k, w] = walker.positions
            changes[k, w] = walker.last_sign_changes
            positive[k, w] = walker.last_positive_states
        if bar is not None:
            bar.update(1)
            if walkers[0].flow_moves:
                rate = (sum(wk.flow_move.n_accepted for wk in walkers)
                        / max(sum(wk.flow_move.n_proposed for wk in walkers), 1))
                bar.set_postfix(acceptance=f"{rate:.3f}", refresh=False)
    return {"positions": frames, "accepted": accepted, "sign_changes": changes, "positive_states": positive}


def commit_block(out, rows: dict[str, np.ndarray], walkers: list[HybridWalker], n_done: int) -> int:
    """Append ``rows`` (dataset name -> array, first axis = iterations) at row ``n_done`` and commit them
    with a checkpoint of the walkers (positions, velocities, move states); returns the new row count."""
    n_new = n_done + next(iter(rows.values())).shape[0]
    positions = np.stack([wk.positions for wk in walkers])
    velocities = np.stack([wk.velocities for wk in walkers])
    move_states = [json.dumps(wk.flow_move.__getstate__() if wk.flow_move is not None else None) for wk in walkers]
    with h5py.File(out, "r+") as fh:
        for name, arr in rows.items():
            fh[name].resize(n_new, axis=0)
            fh[name][n_done:n_new] = arr

        def write_checkpoint(name):
            ck = fh.create_group(name)
            ck.create_dataset("positions", data=positions)
            ck.create_dataset("velocities", data=velocities)
            ck.attrs["move_state"] = move_states
            return ck

        commit_rows(fh, "n_iterations", n_new, write_checkpoint)
    return n_new


def _openmm_seed(seed: int, walker: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, walker, iteration]).generate_state(1)[0] % (2**31 - 2)) + 1


def run_hybrid_mc(system, flow_path: str | Path, out: str | Path, n_iterations: int, *, n_walkers: int = 2,
                  md_steps: int = 500, timestep_fs: float = 1.0, friction_per_ps: float | None = None,
                  flow_moves: int = 1, reject_d_chirality: bool = True, batch_size: int = 256, seed: int = 0,
                  platform: str = "Reference", checkpoint_every: int = 20, progress: bool = True) -> dict:
    """Run ``n_walkers`` hybrid chains until ``out`` holds ``n_iterations`` frames per walker.

    system: ``MolecularSystem`` or a name for ``get_system``; flow_path: a saved flow of that
    system (None with ``flow_moves = 0``: plain MD, the chain's baseline at the same settings).
    md_steps: Langevin steps of ``timestep_fs`` fs per iteration (0 = flow moves only);
    friction_per_ps defaults to the system's. platform: OpenMM platform of the walkers' contexts.
    Reruns with the same ``out`` resume. Returns the summary of :func:`hybrid_summary` plus timings
    of this run (CPU seconds in MD and in flow moves).
    """
    from regflow_mm.flows import flow_file_hash, load_flow, require_flow_file
    from regflow_mm.systems import get_system

    if isinstance(system, str):
        system = get_system(system)
    if (n_iterations < 1 or n_walkers < 1 or md_steps < 0 or flow_moves < 0 or checkpoint_every < 1
            or batch_size < 1):
        raise ValueError("n_iterations, n_walkers, checkpoint_every, batch_size must be >= 1 and md_steps, flow_moves "
                         f">= 0; got {n_iterations}, {n_walkers}, {checkpoint_every}, {batch_size}, {md_steps}, "
                         f"{flow_moves}")
    if flow_path is None and flow_moves:
        raise ValueError(f"flow_moves = {flow_moves} needs a flow file (flow_path None is plain MD: flow_moves = 0)")
    if md_steps == 0 and not flow_moves:
        raise ValueError("md_steps and flow_moves are both 0: the chain would never move")
    check_langevin(timestep_fs, friction_per_ps)
    platform = resolve_platform(platform, system.n_atoms, system.system)
    flow_path = None if flow_path is None else require_flow_file(flow_path)
    out = Path(out)
    settings = {"md_steps": int(md_steps), "timestep_fs": float(timestep_fs),
                "friction_per_ps": float(system.spec.friction if friction_per_ps is None else friction_per_ps),
                "flow_moves": int(flow_moves), "reject_d_chirality": bool(reject_d_chirality),
                "batch_size": int(batch_size), "n_walkers": int(n_walkers), "platform": platform}
    flow_hash = None if flow_path is None else flow_file_hash(flow_path)
    # a flow of another system fails here, before any file is made
    flow = None if flow_path is None else load_flow(flow_path, system=system)
    thermo = ThermodynamicState(system.system, system.temperature * unit.kelvin)

    resume = _prepare_resume(out, system, flow_hash, settings, seed) if out.exists() else None
    if resume is not None:
        n_done, positions, velocities, move_states = resume
    else:
        n_done, move_states = 0, [None] * n_walkers
        positions = np.repeat(system.positions[None], n_walkers, axis=0)
        velocities = np.stack([maxwell_boltzmann_velocities(system.system, system.temperature,
                                                            np.random.default_rng([seed, w, 0]))
                               for w in range(n_walkers)])

    walkers = []
    watch = [idx for name, idx in system.torsions.items() if name.startswith("phi")]
    for w in range(n_walkers):
        if flow is None:
            flow_move = None
        elif move_states[w] is None:
            flow_move = FlowIndependenceMove(flow, flow_path=flow_path, molecular_system=system,
                                             reject_d_chirality=reject_d_chirality, batch_size=batch_size,
                                             seed=int(np.random.SeedSequence([seed, w]).generate_state(1)[0]))
        else:
            flow_move = FlowIndependenceMove.__new__(FlowIndependenceMove)
            flow_move.__setstate__(move_states[w])
        walkers.append(HybridWalker(flow_move, positions[w], velocities[w], md_steps=md_steps,
                                    flow_moves=flow_moves, timestep_fs=timestep_fs,
                                    friction_per_ps=settings["friction_per_ps"],
                                    random_seed=_openmm_seed(seed, w, n_done), platform=platform, watch=watch))

    if resume is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _create(out, system, flow_path, flow_hash, settings, seed)
    proposed_before = sum(wk.flow_move.n_proposed for wk in walkers if wk.flow_move is not None)
    bar = progress_bar(total=n_iterations, initial=min(n_done, n_iterations), unit="it",
                       desc=f"{'hybrid MC' if flow is not None else 'plain MD chain'} {system.name}",
                       disable=not progress, dynamic_ncols=True, mininterval=1.0)
    try:
        while n_done < n_iterations:
            n_block = min(checkpoint_every, n_iterations - n_done)
            rows = run_block(walkers, thermo, n_block, bar, where=f"of {out} ({n_done} committed)",
                             first_iteration=n_done + 1)
            n_done = commit_block(out, rows, walkers, n_done)
    except BaseException:
        if n_done == 0:
            out.unlink(missing_ok=True)  # a failed start leaves no file behind
        raise
    finally:
        bar.close()
    md_cpu = sum(wk.md_cpu_s for wk in walkers)
    flow_cpu = sum(wk.flow_cpu_s for wk in walkers)
    summary = hybrid_summary(out)
    n_flow = sum(wk.flow_move.n_proposed for wk in walkers if wk.flow_move is not None) - proposed_before
    summary.update(md_cpu_s=md_cpu, flow_cpu_s=flow_cpu,
                   cpu_s_per_flow_move=flow_cpu / n_flow if n_flow else float("nan"))
    return summary


# A walker whose atoms spread over more than this (nm) has blown up (positions may still be finite).
_MAX_EXTENT_NM = 1e4


def _md_step(md_move, thermo, sampler_state, context_cache, where: str) -> None:
    """One MD move; a blow-up (openmmtools' IntegratorMoveError, non-finite positions, or atoms spread
    over more than ``_MAX_EXTENT_NM``) is a one-line RuntimeError that names ``where``."""
    try:
        md_move.apply(thermo, sampler_state, context_cache=context_cache)
        x = sampler_state.positions.value_in_unit(unit.nanometer)
        sane = bool(np.isfinite(x).all() and np.ptp(x, axis=0).max() < _MAX_EXTENT_NM)
    except IntegratorMoveError:
        sane = False
    if not sane:
        raise RuntimeError(f"MD blew up (non-finite energy or positions) at {where}: rerun with a smaller "
                           f"--timestep-fs into another --out")


def _create(out, system, flow_path, flow_hash, settings, seed):
    n, w = system.n_atoms, settings["n_walkers"]
    metadata = {"format": FORMAT, "system": system.spec.to_dict(), "system_hash": system.spec_hash,
                "flow_path": None if flow_path is None else str(Path(flow_path).resolve()), "flow_hash": flow_hash,
                "settings": settings,
                "seed": int(seed), "temperature": system.temperature,
                "units": {"positions": "nm", "time": "ps", "temperature": "K"}}
    with h5py.File(out, "w") as fh:
        fh.attrs["metadata"] = json.dumps(metadata)
        fh.attrs["n_iterations"] = 0
        fh.create_dataset("positions", shape=(0, w, n, 3), maxshape=(None, w, n, 3), dtype=np.float32,
                          chunks=(64, w, n, 3), **CHECKSUM)
        fh.create_dataset("accepted", shape=(0, w), maxshape=(None, w), dtype=np.int16, chunks=(256, w), **CHECKSUM)
        create_chain_counts(fh, w, system.torsions)


CHAIN_COUNTS = ("sign_changes", "positive_states")


def create_chain_counts(fh, n_walkers: int, torsions: dict) -> None:
    """The empty ``sign_changes`` and ``positive_states`` (T, W, P) datasets of a chain file for the phi
    torsions of ``torsions``."""
    names = [name for name in torsions if name.startswith("phi")]
    for name in CHAIN_COUNTS:
        # (an unlimited last axis: h5py refuses a chunk of 1 on a fixed axis of length 0, no phi torsion)
        ds = fh.create_dataset(name, shape=(0, n_walkers, len(names)), maxshape=(None, n_walkers, None),
                               dtype=np.int16, chunks=(256, n_walkers, max(len(names), 1)), **CHECKSUM)
        ds.attrs["torsions"] = json.dumps(names)


def _prepare_resume(out, system, flow_hash, settings, seed):
    """(n_done, positions, velocities, move_states) of the last committed block of ``out``; None, with
    ``out`` removed, when it committed none (killed early, or a failed start: the run starts over by
    itself, whatever settings made it)."""
    # read-only until every check passed: a refused file is left exactly as it was
    with hdf5_file(out, "r", "hybrid-MC file", hint=": choose another --out") as fh:
        md = json.loads(fh.attrs["metadata"])
        if md.get("format") != FORMAT:
            older = str(md.get("format", "")).startswith("regflow-mm hybrid-mc")
            raise ValueError(f"{out} is {'a hybrid-MC file of an older version' if older else 'not a hybrid-MC file'} "
                             f"({md.get('format')!r}): choose another --out")
        ck = committed_checkpoint(fh, "n_iterations")
        n_done = int(fh.attrs["n_iterations"])
        if n_done > 0 and ck is not None:
            check_spec_hash(md["system_hash"], system, str(out), verb="holds a run of", allow_unknown=False)
            if md["flow_hash"] != flow_hash:
                raise ValueError(f"{out} was run with another flow (hash {md['flow_hash'][:12]}, this one "
                                 f"{flow_hash[:12]}): resume with the original flow file or choose another --out")
            check_resume_settings(out, md["settings"], settings, _RESUME_KEYS, md["seed"], seed)
            positions, velocities = ck["positions"][()], ck["velocities"][()]
            move_states = [json.loads(s) for s in ck.attrs["move_state"]]
    if n_done > 0 and ck is not None:
        with hdf5_file(out, "r+", "hybrid-MC file") as fh:
            truncate_uncommitted(fh, "n_iterations", ("positions", "accepted") + CHAIN_COUNTS)
        log.info("resuming %s at iteration %d", out, n_done)
        return n_done, positions, velocities, move_states
    log.info("%s committed no block before it stopped: starting it over", out)
    out.unlink()
    return None


def hybrid_summary(path: str | Path) -> dict:
    """Acceptance and basin statistics of a hybrid-MC file.

    Returns n_iterations, n_walkers, per-walker and overall acceptance (accepted / proposed flow
    moves; NaN for plain MD), proposal counters, and :func:`phi_statistics` of the frames and of the
    chain's sign changes at every state.
    """
    with hdf5_file(path, "r", "hybrid-MC file") as fh:
        md = json.loads(fh.attrs["metadata"])
        n = int(fh.attrs["n_iterations"])
        positions = fh["positions"][:n]
        accepted = fh["accepted"][:n]
        counts = {k: fh[k][:n] for k in CHAIN_COUNTS if k in fh}
        states = [json.loads(s) for s in fh["checkpoint"].attrs["move_state"]] if "checkpoint" in fh else []
    settings = md["settings"]
    states = [s for s in states if s is not None]  # None: the walkers of a plain-MD chain have no flow move
    proposed = np.array([s["n_proposed"] for s in states]) if states else np.zeros(settings["n_walkers"])
    acc = np.array([s["n_accepted"] for s in states]) if states else np.zeros(settings["n_walkers"])
    summary = {"n_iterations": n, "n_walkers": settings["n_walkers"], "settings": settings,
               "acceptance": float(acc.sum() / proposed.sum()) if proposed.sum() else float("nan"),
               "acceptance_per_walker": [float(a / p) if p else float("nan") for a, p in zip(acc, proposed)],
               "n_accepted_frames": int((accepted > 0).sum()),
               "counters": [{k: s[k] for k in ("n_proposed", "n_accepted", "n_rejected_nonfinite",
                                               "n_rejected_chirality")} for s in states]}
    if n:
        per_iteration = (settings["md_steps"] > 0) + settings["flow_moves"]
        summary.update(phi_statistics(positions, system_from_spec_dict(md["system"]).torsions, counts, per_iteration))
        summary["n_chain_states"] = n * per_iteration * settings["n_walkers"]
    return summary


def phi_statistics(positions: np.ndarray, torsions: dict, counts: dict | None = None, states_per_iteration: int = 1,
                   n_blocks: int = 10) -> dict:
    """Basin statistics of walker frames ``positions`` (T, W, n, 3) nm for every phi torsion.

    Returns ``<phi>_positive_fraction`` (mean over walkers of the fraction of frames with phi > 0),
    ``<phi>_positive_fraction_err`` (block error: ``n_blocks`` contiguous blocks per walker, combined
    over walkers), ``<phi>_sign_changes`` (list, per walker, between stored frames). Given the chain
    file's ``counts`` ({"sign_changes", "positive_states"}: (T, W, P) in the order of the phi torsions)
    and the chain states per iteration: ``<phi>_chain_sign_changes`` (list, per walker, between
    consecutive chain states: every flow move counts) and ``<phi>_chain_positive_fraction`` (+ ``_err``,
    block error as above) over every chain state (each state of an exact chain is a draw from the target,
    so this average uses all of them, not only the stored frames).
    """
    from regflow_mm.data.dataset import dihedrals

    from .crossings import walkers_mean_error

    out = {}
    phis = [name for name in torsions if name.startswith("phi")]
    for p, name in enumerate(phis):
        angles = np.stack([dihedrals(positions[:, w].astype(np.float64), [torsions[name]])[:, 0]
                           for w in range(positions.shape[1])], axis=1)  # (T, W)
        positive = angles > 0
        out[f"{name}_positive_fraction"], out[f"{name}_positive_fraction_err"] = walkers_mean_error(positive, n_blocks)
        out[f"{name}_sign_changes"] = [int(c) for c in np.abs(np.diff(positive.astype(np.int8), axis=0)).sum(axis=0)]
        if counts and "sign_changes" in counts:
            out[f"{name}_chain_sign_changes"] = [int(c) for c in counts["sign_changes"][:, :, p].sum(axis=0)]
        if counts and "positive_states" in counts:
            fraction = counts["positive_states"][:, :, p] / states_per_iteration  # (T, W)
            out[f"{name}_chain_positive_fraction"], out[f"{name}_chain_positive_fraction_err"] = (
                walkers_mean_error(fraction, n_blocks))
    return out


def export_walker_trajectory(path: str | Path, walker: int, out: str | Path) -> Path:
    """Write one walker's frames as DCD/XTC/PDB (by extension, via mdtraj)."""
    import mdtraj

    out = check_trajectory_path(out)
    with hdf5_file(path, "r", "hybrid-MC file") as fh:
        md = json.loads(fh.attrs["metadata"])
        n = int(fh.attrs["n_iterations"])
        if not 0 <= walker < fh["positions"].shape[1]:
            raise ValueError(f"walker must be in 0..{fh['positions'].shape[1] - 1}, got {walker}")
        xyz = fh["positions"][:n, walker]
    topology = mdtraj.Topology.from_openmm(system_from_spec_dict(md["system"]).topology)
    mdtraj.Trajectory(xyz, topology).save(str(out))
    return out
