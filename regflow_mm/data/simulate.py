"""MD with OpenMM (plain, well-tempered metadynamics or parallel tempering), written incrementally to an
HDF5 dataset, resumable.

Every ``chunk_frames`` frames the new frames, an OpenMM checkpoint and the frame count
are appended to the file and the file is closed again, so a killed run loses at most
the chunk in progress; running the same command again resumes from the checkpoint and
appends (the RNG state travels in the checkpoint, so the continued trajectory is the
one an uninterrupted run produces on a deterministic platform). With ``enhanced`` metadynamics
settings the bias grid travels in the checkpoint too, and every frame stores its log-weight to
the unbiased ensemble (``regflow_mm.data.metadynamics``); plain MD frames have log-weight 0. With
``enhanced`` parallel-tempering settings (``regflow_mm.data.tempering``) the frames are those of the
replica at the system temperature, one per exchange iteration, log-weight 0; the replicas' state lives in
openmmtools storage next to the dataset (``<out>.tempering.nc``), and a resumed run keeps exactly the
frames up to the iteration that storage restores, so each iteration's frame is stored once.
"""
from __future__ import annotations

import json
import logging
import time as wallclock
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import openmm
from openmm import app, unit

from .. import __version__
from ..files import CHECKSUM
from ..progress import progress_bar
from ..systems import MolecularSystem, check_spec_hash
from ..systems.masses import repartition_hydrogen_mass
from ..systems.platforms import openmm_seed, platform_properties, resolve_platform
from .checkpointed_hdf5 import (check_resume_settings, commit_rows, committed_checkpoint,
                                truncate_uncommitted)
from .dataset import _open, check_split_fractions, time_block_splits
from .metadynamics import MetadynamicsSettings, TorsionMetadynamics, weights_from_bias
from .tempering import TemperingSettings

if TYPE_CHECKING:
    from .parallel_tempering import ParallelTempering

log = logging.getLogger(__name__)

# Settings that must agree between a dataset on disk and a run that appends to it.
_RESUME_KEYS = ("timestep_fs", "friction_per_ps", "save_interval_ps", "name", "enhanced", "hydrogen_mass_amu")
_FRAME_ARRAYS = ("positions", "forces", "energies", "time")
_WEIGHT_ARRAYS = ("log_weights", "bias_energy", "bias_offset")
_TEMPERING_ARRAYS = {"log_weights": np.float64, "tempering_iteration": np.int64, "tempering_replica": np.int32}


def _versions() -> dict:
    import h5py as _h5
    import torch

    return {"regflow_mm": __version__, "openmm": openmm.__version__, "numpy": np.__version__,
            "h5py": _h5.__version__, "torch": torch.__version__}


def _integrator(system: MolecularSystem, settings: dict, seed: int) -> openmm.Integrator:
    integrator = openmm.LangevinMiddleIntegrator(system.temperature * unit.kelvin,
                                                 settings["friction_per_ps"] / unit.picosecond,
                                                 settings["timestep_fs"] * unit.femtosecond)
    integrator.setRandomNumberSeed(openmm_seed(seed))
    return integrator


def check_langevin(timestep_fs: float, friction_per_ps: float | None) -> None:
    """ValueError unless the Langevin settings can run: timestep > 0 fs, friction >= 0 1/ps (None: the system's)."""
    if not timestep_fs > 0:
        raise ValueError(f"the timestep must be > 0 fs, got {timestep_fs}")
    if friction_per_ps is not None and not friction_per_ps >= 0:
        raise ValueError(f"the Langevin friction must be >= 0 1/ps, got {friction_per_ps}")


def simulate(system: MolecularSystem, out: str | Path, ns: float, save_interval_ps: float = 1.0,
             timestep_fs: float = 1.0, friction_per_ps: float | None = None, seed: int = 0,
             platform: str = "auto", threads: int | None = 1, equilibration_ps: float = 10.0,
             chunk_frames: int = 100, val_fraction: float = 0.1, test_fraction: float = 0.1,
             val_blocks: int = 10, progress: bool = True, enhanced: MetadynamicsSettings | TemperingSettings | None = None,
             hydrogen_mass_amu: float | None = None) -> Path:
    """Run Langevin MD (LangevinMiddle) of ``system`` until ``out`` holds ``ns`` nanoseconds of frames.

    ``enhanced``: well-tempered metadynamics settings (``MetadynamicsSettings``); frames then carry
    the log-weights to the unbiased ensemble and stored energies/forces exclude the bias. Or parallel
    tempering (``TemperingSettings``): one exchange iteration per frame, frames of the replica at the
    system temperature (log-weight 0), replicas in ``<out>.tempering.nc``; its commit chunk is the
    storage's checkpoint interval (``chunk_frames`` of the run that created it).

    Splits (``dataset.time_block_splits``): the last ``test_fraction`` of the frames is the test block,
    and validation takes the end of each of ``val_blocks`` segments before it (``val_fraction`` in all).
    Frames every ``save_interval_ps`` ps; ``friction_per_ps`` defaults to the system spec's friction;
    ``equilibration_ps`` of unsaved MD precede production. Re-running with the same ``out`` resumes.
    ``hydrogen_mass_amu``: integrate with hydrogens of this mass (amu), taken from their heavy atoms
    (``systems.masses``): the same configurational ensemble, stable at 2 fs without constraints
    (None: the force field's masses). Stored energies and forces are those of ``system`` either way.
    ``platform``: OpenMM platform name or "auto" (see ``regflow_mm.systems.platforms``);
    ``threads``: CPU-platform threads (default 1: a 22-42 atom system does not scale past one thread,
    and spinning extra threads costs more than they give on a busy machine).
    Returns the dataset path.
    """
    out = Path(out)
    if not (ns > 0 and save_interval_ps > 0):
        raise ValueError(f"ns and save_interval_ps must be positive; got {ns} and {save_interval_ps}")
    check_langevin(timestep_fs, friction_per_ps)
    if not equilibration_ps >= 0:
        raise ValueError(f"equilibration_ps must be >= 0, got {equilibration_ps}")
    check_split_fractions(val_fraction, test_fraction)
    if int(val_blocks) < 1:
        raise ValueError(f"val_blocks must be >= 1, got {val_blocks}")
    if int(chunk_frames) < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    steps_per_frame = save_interval_ps * 1000.0 / timestep_fs
    if abs(steps_per_frame - round(steps_per_frame)) > 1e-9:
        raise ValueError(f"save interval {save_interval_ps} ps is not a whole number of {timestep_fs} fs steps")
    steps_per_frame = int(round(steps_per_frame))
    target = int(round(ns * 1000.0 / save_interval_ps))
    if enhanced is not None and not isinstance(enhanced, (MetadynamicsSettings, TemperingSettings)):
        raise ValueError(f"enhanced must be MetadynamicsSettings, TemperingSettings or None, "
                         f"got {type(enhanced).__name__}")
    settings = {"name": "LangevinMiddleIntegrator", "timestep_fs": timestep_fs,
                "friction_per_ps": system.spec.friction if friction_per_ps is None else friction_per_ps,
                "save_interval_ps": save_interval_ps, "equilibration_ps": equilibration_ps,
                "enhanced": enhanced.to_dict() if enhanced is not None else None}
    if hydrogen_mass_amu is not None:
        settings["hydrogen_mass_amu"] = float(hydrogen_mass_amu)  # absent: the force field's masses (older files)
    md_system = (system.system if hydrogen_mass_amu is None
                 else repartition_hydrogen_mass(system.system, system.topology, hydrogen_mass_amu))
    meta = (TorsionMetadynamics(system, enhanced, timestep_fs, md_system)
            if isinstance(enhanced, MetadynamicsSettings) else None)
    platform = resolve_platform(platform, system.n_atoms, system.system)
    tempering = None
    if isinstance(enhanced, TemperingSettings):
        from .parallel_tempering import ParallelTempering  # openmmtools' multistate: imported only when used
        tempering = ParallelTempering(system, enhanced, out, timestep_fs, settings["friction_per_ps"], steps_per_frame,
                                      platform, platform_properties(platform, threads), seed, int(chunk_frames),
                                      md_system=md_system)
    n_equil = int(round(equilibration_ps * 1000.0 / timestep_fs))
    resume = _read_resume(out, system, settings, seed) if out.exists() else None
    if resume is not None and meta is not None:
        meta.restore_bias(resume["bias"])

    def create_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _create(out, system, settings, seed, platform, val_fraction, test_fraction, val_blocks)

    if tempering is not None:
        if resume is not None and resume["n_frames"] >= target:
            return out  # nothing to add (reopening the replicas could only drop frames)
        # The frames come from the replicas; this Context evaluates their (unbiased) energies and forces.
        context, groups = system.make_context(platform, properties=platform_properties(platform, threads)), -1
        try:
            n_done = _start_tempering(tempering, out, resume, n_equil, target, create_file)
        except BaseException:
            tempering.close()
            raise
        chunk = tempering.checkpoint_interval
    else:
        simulation, n_done = _start_md(system, md_system, out, settings, seed, platform, threads, meta, resume,
                                       n_equil, steps_per_frame, create_file)
        context, groups, chunk = simulation.context, meta.physical_groups if meta else -1, int(chunk_frames)

    bar = progress_bar(total=target, initial=min(n_done, target), unit="frame", disable=not progress,
                       desc=f"{'metaD' if meta else 'PT' if tempering else 'MD'} {system.name}", dynamic_ncols=True,
                       mininterval=1.0)
    started, frames_this_run = wallclock.perf_counter(), 0
    try:
        while n_done < target:
            # Tempering chunks end on the storage's checkpoint iterations (multiples of its interval).
            n_chunk = min(chunk - n_done % chunk if tempering else chunk, target - n_done)
            arrays = {"positions": np.empty((n_chunk, system.n_atoms, 3), np.float32),
                      "forces": np.empty((n_chunk, system.n_atoms, 3), np.float32),
                      "energies": np.empty(n_chunk),
                      "time": (np.arange(n_done, n_done + n_chunk) + 1) * save_interval_ps}
            if meta:
                arrays.update({name: np.empty(n_chunk) for name in _WEIGHT_ARRAYS})
            if tempering:
                arrays.update({name: np.zeros(n_chunk, dtype) for name, dtype in _TEMPERING_ARRAYS.items()})
            for k in range(n_chunk):
                if meta:
                    meta.step(simulation, steps_per_frame)
                elif tempering:
                    positions, arrays["tempering_replica"][k] = tempering.step()
                    arrays["tempering_iteration"][k] = tempering.iteration
                    context.setPositions(positions)
                else:
                    simulation.step(steps_per_frame)
                state = context.getState(getPositions=True, getEnergy=True, getForces=True, groups=groups)
                energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if not np.isfinite(energy):
                    raise RuntimeError(f"{system.name}: MD blew up at frame {n_done + k} (energy {energy}); "
                                       f"{n_done} frames are kept in {out}; use a smaller --timestep-fs")
                arrays["energies"][k] = energy
                arrays["positions"][k] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                arrays["forces"][k] = state.getForces(asNumpy=True).value_in_unit(
                    unit.kilojoule_per_mole / unit.nanometer)
                if meta:
                    arrays["bias_energy"][k] = meta.bias_energy(context)
                    arrays["bias_offset"][k] = meta.offset()
                bar.update(1)
                frames_this_run += 1
                elapsed = wallclock.perf_counter() - started
                ns_per_day = frames_this_run * save_interval_ps * 1e-3 * 86400 / max(elapsed, 1e-9)
                postfix = {"ns_per_day": f"{ns_per_day:.0f}"}
                if tempering:
                    postfix["swaps"] = f"{tempering.swap_acceptance:.2f}"
                bar.set_postfix(postfix, refresh=False)
            if meta:
                arrays["log_weights"] = weights_from_bias(arrays["bias_energy"], arrays["bias_offset"], system.kT)
            _append(out, arrays, n_done, None if tempering else context.createCheckpoint(), meta)
            n_done += n_chunk
    finally:
        bar.close()
        if tempering:
            tempering.close()
    return out


def _start_md(system, md_system, out, settings, seed, platform, threads, meta, resume, n_equil, steps_per_frame,
              create_file):
    """(Simulation, frames done) of plain MD / metadynamics of ``md_system``, at the end of ``out``'s frames."""
    simulation = app.Simulation(system.topology, meta.openmm_system if meta else md_system,
                                _integrator(system, settings, seed), openmm.Platform.getPlatformByName(platform),
                                platform_properties(platform, threads))
    context = simulation.context
    log.info("simulating %s on the %s platform%s", system.name, platform, " with metadynamics" if meta else "")

    if resume is not None:
        n_done = resume["n_frames"]
        try:
            context.loadCheckpoint(resume["checkpoint"])
        except Exception as err:  # OpenMM raises OpenMMException for a checkpoint of another platform/system
            raise ValueError(f"cannot resume {out}: its checkpoint does not load on this platform ({err}); "
                             "resume with the same --platform") from None
        log.info("resuming %s at frame %d", out, n_done)
    else:
        create_file()
        context.setPositions(system.positions * unit.nanometer)
        context.setVelocitiesToTemperature(system.temperature * unit.kelvin, openmm_seed(seed))
        if n_equil:
            simulation.step(n_equil)  # unbiased equilibration
        n_done = 0
    # Metadynamics deposits a Gaussian whenever the step counter is a multiple of its interval.
    simulation.currentStep = n_equil + n_done * steps_per_frame
    return simulation, n_done


def _start_tempering(tempering: ParallelTempering, out: Path, resume: dict | None, n_equil: int, target: int,
                     create_file) -> int:
    """Create or reopen the replicas of ``out``; returns the frames kept (= the sampler's iteration).

    On resume the storage reopens at its newest checkpoint not past the dataset's last frame, and the
    dataset drops its frames after that iteration (usually none; at most one chunk).
    """
    if resume is None:
        create_file()
        tempering.create(n_equil, target)
        return 0
    n_frames = resume["n_frames"]
    if resume["iteration"] != n_frames:
        raise ValueError(f"cannot resume {out}: its frames end at tempering iteration {resume['iteration']}, "
                         f"not {n_frames}; the file is inconsistent: choose another --out")
    restored = tempering.restore(max_iteration=n_frames)
    if restored < n_frames:
        log.info("%s: the replicas restart from iteration %d; dropping frames %d-%d to redo them",
                 out, restored, restored + 1, n_frames)
        _cut_frames(out, restored)
    tempering.extend_to(target)
    log.info("resuming %s at frame %d", out, restored)
    return restored


def _create(out, system, settings, seed, platform, val_fraction, test_fraction, val_blocks):
    n = system.n_atoms
    pdb = _pdb_text(system)
    is_tempering = (settings["enhanced"] or {}).get("method") == "tempering"
    metadata = {"format": "regflow-mm dataset 1", "system": asdict(system.spec), "system_hash": system.spec_hash,
                "enhanced": settings["enhanced"],
                "temperature": system.temperature, "kT": system.kT, "seed": seed,
                # the Langevin/velocity seed OpenMM gets (tempering reseeds from (seed, iteration) instead)
                "openmm_seed": None if is_tempering else openmm_seed(seed), "integrator": settings,
                "platform": platform, "versions": _versions(),
                "split_fractions": {"val": val_fraction, "test": test_fraction, "val_blocks": int(val_blocks)},
                "units": {"positions": "nm", "energies": "kJ/mol", "forces": "kJ/mol/nm", "time": "ps"}}
    with h5py.File(out, "w") as fh:
        fh.attrs["metadata"] = json.dumps(metadata)
        fh.attrs["topology_pdb"] = pdb
        fh.attrs["n_frames"] = 0
        for name, shape, dtype in (("positions", (n, 3), np.float32), ("forces", (n, 3), np.float32),
                                   ("energies", (), np.float64), ("time", (), np.float64)):
            fh.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                              chunks=(256, *shape), compression="gzip" if shape else None, **CHECKSUM)
        per_frame = {}
        if settings["enhanced"] is not None:
            per_frame = (_TEMPERING_ARRAYS if settings["enhanced"]["method"] == "tempering"
                         else dict.fromkeys(_WEIGHT_ARRAYS, np.float64))
        for name, dtype in per_frame.items():
            fh.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(256,), **CHECKSUM)


def _read_resume(out, system, settings, seed) -> dict | None:
    """Committed frame count, OpenMM checkpoint and bias grid of ``out`` (tempering: the iteration of
    its last frame instead); None if nothing was committed.

    A file that committed no chunk yet (killed early, or a failed start) is removed, whatever settings
    made it, so the run starts over by itself.
    """
    with _open(out, "r") as fh:  # read-only until every check passed: a refused file stays as it was
        md = json.loads(fh.attrs["metadata"])
        if not str(md.get("format", "")).startswith("regflow-mm dataset"):
            raise ValueError(f"{out} is not a regflow-mm dataset ({md.get('format')!r}): choose another --out")
        committed = int(fh.attrs["n_frames"]) > 0 and committed_checkpoint(fh, "n_frames") is not None
        if committed:
            check_spec_hash(md["system_hash"], system, f"{out} holds system {md['system']['name']!r}",
                            verb=f"(refusing to append {system.name!r}; choose another --out): it has")
            stored = {**md["integrator"], "enhanced": md.get("enhanced")}
            check_resume_settings(out, stored, settings, _RESUME_KEYS, md["seed"], seed, verb="simulated")
    if committed:
        with _open(out, "r+") as fh:
            checkpoint = committed_checkpoint(fh, "n_frames")
            n_done = truncate_uncommitted(fh, "n_frames", _per_frame_arrays(fh))
            _write_splits(fh, n_done)
            if "tempering_iteration" in fh:  # the replicas' state is in the openmmtools storage
                return {"n_frames": n_done, "iteration": int(fh["tempering_iteration"][n_done - 1])}
            if isinstance(checkpoint, h5py.Group):
                return {"n_frames": n_done, "checkpoint": checkpoint["openmm"][()].tobytes(),
                        "bias": checkpoint["bias"][()]}
            return {"n_frames": n_done, "checkpoint": checkpoint[()].tobytes(), "bias": None}
    log.info("%s committed no frames before it stopped: starting it over", out)
    out.unlink()
    return None


def _per_frame_arrays(fh) -> tuple[str, ...]:
    return _FRAME_ARRAYS + tuple(name for name in dict.fromkeys((*_WEIGHT_ARRAYS, *_TEMPERING_ARRAYS)) if name in fh)


def _tempering_checkpoint(fh, name: str, iteration: int):
    """A tempering commit's checkpoint: only the last iteration (the replicas are in the openmmtools storage)."""
    group = fh.create_group(name)
    group.attrs["tempering_iteration"] = iteration
    return group


def _cut_frames(out: Path, n_keep: int) -> None:
    """Keep only the first ``n_keep`` committed frames of ``out`` (crash-safe: the counter goes down first)."""
    with h5py.File(out, "r+") as fh:
        if "splits" in fh:
            del fh["splits"]  # before the commit: stored splits never index uncommitted frames
        commit_rows(fh, "n_frames", n_keep, lambda name: _tempering_checkpoint(fh, name, n_keep))
        truncate_uncommitted(fh, "n_frames", _per_frame_arrays(fh))
        _write_splits(fh, n_keep)


def _append(out, arrays: dict, n_done: int, checkpoint: bytes | None, meta: TorsionMetadynamics | None):
    """Append and commit a chunk of frames; ``checkpoint``: OpenMM's (None for tempering)."""
    n_new = n_done + len(arrays["energies"])

    def write_checkpoint(name):
        if checkpoint is None:
            return _tempering_checkpoint(fh, name, int(arrays["tempering_iteration"][-1]))
        if meta is None:
            return fh.create_dataset(name, data=np.frombuffer(checkpoint, dtype=np.uint8))
        group = fh.create_group(name)
        group.create_dataset("openmm", data=np.frombuffer(checkpoint, dtype=np.uint8))
        group.create_dataset("bias", data=meta.bias_grid)
        return group

    with h5py.File(out, "r+") as fh:
        for name, arr in arrays.items():
            fh[name].resize(n_new, axis=0)
            fh[name][n_done:n_new] = arr
        commit_rows(fh, "n_frames", n_new, write_checkpoint)
        _write_splits(fh, n_new)  # after the commit: stored splits never index uncommitted frames


def _write_splits(fh, n_frames: int) -> None:
    """(Re)write the train/val/test splits of the first ``n_frames`` frames (``time_block_splits``)."""
    fractions = json.loads(fh.attrs["metadata"])["split_fractions"]
    if "splits" in fh:
        del fh["splits"]
    try:
        splits = time_block_splits(n_frames, fractions["val"], fractions["test"],
                                   fractions.get("val_blocks", 1))  # files made before val_blocks: one block
    except ValueError:
        splits = {}  # too few frames yet; written once there are enough
    group = fh.create_group("splits")
    for name, idx in splits.items():
        group.create_dataset(name, data=idx)


def _pdb_text(system: MolecularSystem) -> str:
    import io

    buf = io.StringIO()
    app.PDBFile.writeFile(system.topology, system.positions * unit.nanometer, buf)
    return buf.getvalue()


TRAJECTORY_FORMATS = (".dcd", ".xtc", ".pdb", ".h5")


def check_trajectory_path(out: str | Path) -> Path:
    """``out`` as a Path if mdtraj can write its format here (by extension), else ValueError: .dcd, .xtc, .pdb,
    or .h5 (mdtraj's HDF5 format, which needs the optional PyTables package)."""
    out = Path(out)
    if out.suffix not in TRAJECTORY_FORMATS:
        raise ValueError(f"unsupported trajectory format {out.suffix!r} ({out}): use .dcd, .xtc or .pdb")
    if out.suffix == ".h5":
        import importlib.util

        if importlib.util.find_spec("tables") is None:
            raise ValueError(f"{out}: mdtraj's .h5 trajectories need the PyTables package (pip install tables), "
                             "which is not installed: use .dcd, .xtc or .pdb")
    return out


def export_trajectory(dataset_path: str | Path, out: str | Path, split: str | None = None) -> Path:
    """Write a dataset's frames as DCD/XTC/PDB (by extension, via mdtraj) for VMD/PyMOL users.

    A DCD/XTC also gets a ``.pdb`` topology next to it.
    """
    import mdtraj

    from .dataset import load_dataset

    out = check_trajectory_path(out)
    data = load_dataset(dataset_path)
    if split is not None and split not in data.splits:
        raise ValueError(f"--split {split!r}: {dataset_path} has splits {sorted(data.splits)}")
    xyz = data.split(split) if split else data.positions
    top = mdtraj.Topology.from_openmm(data.system.topology)
    traj = mdtraj.Trajectory(xyz, top, time=data.time[data.split_indices(split)] if split else data.time)
    out.parent.mkdir(parents=True, exist_ok=True)
    traj.save(str(out))
    if out.suffix in (".dcd", ".xtc"):
        traj[0].save_pdb(str(out.with_suffix(".pdb")))
    return out
