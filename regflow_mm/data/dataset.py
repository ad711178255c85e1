"""MD datasets on disk (HDF5) and in memory.

File layout (one HDF5 file, readable with h5py or any HDF5 tool)::

    /positions   (T, n_atoms, 3) float32   nm
    /energies    (T,)            float64   kJ/mol (potential energy)
    /forces      (T, n_atoms, 3) float32   kJ/mol/nm
    /time        (T,)            float64   ps since the start of production
    /splits/{train,val,test}     int64     frame indices: test the last time block, val the end of
                                           each of ``val_blocks`` segments before it (``time_block_splits``)
    /checkpoint                  uint8     OpenMM checkpoint after the last stored frame (resume); with
                                           metadynamics a group: openmm (uint8), bias (grid, kJ/mol)
    /log_weights, /bias_energy, /bias_offset   (T,) float64   metadynamics only: log-weight to the
                                           unbiased ensemble, bias V(s_t, t) and c(t) in kJ/mol
    /log_weights (zeros), /tempering_iteration (T,) int64, /tempering_replica (T,) int32
                                           parallel tempering only: frame k is the system-temperature
                                           replica after exchange iteration k + 1 (``data.tempering``);
                                           /checkpoint is then a group with that iteration (the
                                           replicas are in <file>.tempering.nc)
    attrs: metadata (JSON: system spec and hash, temperature, seed, integrator, enhanced sampling
           settings or null, versions),
           topology_pdb (the system's PDB text), n_frames (frames committed)

Per-frame arrays carry fletcher32 checksums (files written since they were added), verified by HDF5
on every read: a changed or damaged value fails to load with a one-line error.
``n_frames`` is written last in every append, so a process killed during a write
leaves at most a partial chunk that the next open truncates away.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import hdf5_file, require_file
from ..importance import kish_ess, normalized_weights
from ..systems import MolecularSystem, check_spec_hash, get_system, list_systems, load_system

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Dataset:
    """An MD dataset in memory. Arrays: positions (T, n, 3) nm float32, energies (T,) kJ/mol,
    forces (T, n, 3) kJ/mol/nm, time (T,) ps, log_weights (T,) (log of the importance weight of each
    frame to the unbiased Boltzmann ensemble, up to a constant; zeros for plain MD);
    ``splits`` maps train/val/test to frame indices."""

    path: Path
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    time: np.ndarray
    splits: dict[str, np.ndarray]
    metadata: dict
    system: MolecularSystem
    log_weights: np.ndarray | None = None

    def __post_init__(self):
        if self.log_weights is None:
            self.log_weights = np.zeros(len(self.energies))
        self.log_weights = np.asarray(self.log_weights, dtype=np.float64)
        if self.log_weights.shape != self.energies.shape:
            raise ValueError(f"dataset {self.path}: {self.log_weights.shape[0]} log-weights for "
                             f"{len(self.energies)} frames")
        if np.isnan(self.log_weights).any() or np.isposinf(self.log_weights).any():
            raise ValueError(f"dataset {self.path}: its frame log-weights contain NaN or +inf; the "
                             "enhanced-sampling run is corrupt: re-simulate it")
        if len(self.energies) and not np.isfinite(self.log_weights).any():
            raise ValueError(f"dataset {self.path}: every frame has weight 0 (log-weight -inf); nothing to "
                             "estimate from: re-simulate it")

    @property
    def weighted(self) -> bool:
        """True when frames carry non-uniform weights (metadynamics; parallel tempering's frames are unweighted)."""
        method = (self.metadata.get("enhanced") or {}).get("method")
        return method not in (None, "tempering") or bool(np.ptp(self.log_weights) > 0)

    def weight_ess(self) -> float:
        """Kish effective number of frames of the frame weights (= number of frames for plain MD)."""
        return kish_ess(self.log_weights)["ess"] * len(self)

    def reweighted_fraction(self, mask: np.ndarray) -> float:
        """Population of the frames in ``mask`` (T,) bool in the unbiased ensemble (weights applied)."""
        return float(normalized_weights(self.log_weights)[np.asarray(mask, dtype=bool)].sum())

    def __len__(self):
        return len(self.energies)

    def split(self, name: str) -> np.ndarray:
        """Positions (n_frames, n_atoms, 3) nm of one split."""
        return self.positions[self.split_indices(name)]

    def split_indices(self, name: str) -> np.ndarray:
        if name not in self.splits:
            raise ValueError(f"dataset {self.path} has splits {sorted(self.splits)}, not {name!r}")
        return self.splits[name]

    def reduced_energies(self) -> np.ndarray:
        """(T,) stored energies in kT."""
        return self.energies / self.system.kT

    def summary(self) -> str:
        md = self.metadata
        lines = [f"dataset {self.path}",
                 f"  system       {md['system']['name']} ({self.system.n_atoms} atoms, {md['temperature']} K, "
                 f"hash {md['system_hash'][:12]})",
                 f"  frames       {len(self)} every {md['integrator']['save_interval_ps']} ps "
                 f"({self.time[-1] / 1000 if len(self) else 0:.3f} ns)",
                 f"  integrator   {md['integrator']['name']}, dt {md['integrator']['timestep_fs']} fs, "
                 f"friction {md['integrator']['friction_per_ps']}/ps, seed {md['seed']}"
                 + (f" (OpenMM random seed {md['openmm_seed']})" if md.get("openmm_seed") else ""),
                 f"  energy       mean {self.energies.mean():.2f} kJ/mol, std {self.energies.std():.2f} kJ/mol",
                 "  splits       " + ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())]
        if (md.get("enhanced") or {}).get("method") == "tempering":
            lines.append(f"  enhanced     tempering, {md['enhanced']['n_replicas']} replicas {md['temperature']}-"
                         f"{md['enhanced']['t_max_K']} K; frames at {md['temperature']} K (unweighted)")
        if self.weighted:
            lines.append(f"  enhanced     {md['enhanced']['method'] if md.get('enhanced') else 'weighted'}; "
                         f"weight ESS {self.weight_ess():.0f} of {len(self)} frames")
        for name, idx in self.system.torsions.items():
            if name.startswith("phi"):
                phi = dihedrals(self.positions, [idx])[:, 0]
                line = f"  {name} > 0     {np.mean(phi > 0):.3%} of frames"
                if self.weighted:
                    line += f", {self.reweighted_fraction(phi > 0):.3%} reweighted"
                lines.append(line)
        return "\n".join(lines)


def dihedrals(x: np.ndarray, quads) -> np.ndarray:
    """Dihedral angles (rad, in (-pi, pi]) of atom quadruples: x (T, n, 3) -> (T, len(quads))."""
    quads = np.asarray(quads)
    p0, p1, p2, p3 = (x[:, quads[:, k]] for k in range(4))
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - np.sum(b0 * b1n, axis=-1, keepdims=True) * b1n
    w = b2 - np.sum(b2 * b1n, axis=-1, keepdims=True) * b1n
    return np.arctan2(np.sum(np.cross(b1n, v) * w, axis=-1), np.sum(v * w, axis=-1))


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError unless both fractions are in [0, 1) and sum below 1 (some frames must train)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"split fractions must be in [0, 1) and sum below 1; got val {val_fraction}, "
                         f"test {test_fraction}")


def time_block_splits(n_frames: int, val_fraction: float = 0.1, test_fraction: float = 0.1,
                      val_blocks: int = 1) -> dict[str, np.ndarray]:
    """Train / val / test frame indices of an n_frames trajectory, as blocks of consecutive frames.

    test is the last block (held out from everything). The frames before it are cut into
    ``val_blocks`` equal segments, and the last frames of each segment form the validation set, so
    validation spans the whole run: an enhanced-sampling run's sampled distribution drifts along the
    run (the metadynamics bias keeps growing), and a single final block would judge the flow on the
    end of the run only. ``val_blocks = 1`` gives consecutive train, val, test blocks.
    """
    check_split_fractions(val_fraction, test_fraction)
    if int(val_blocks) < 1:
        raise ValueError(f"val_blocks must be >= 1, got {val_blocks}")
    n_val, n_test = int(round(n_frames * val_fraction)), int(round(n_frames * test_fraction))
    n_train = n_frames - n_val - n_test
    if n_train < 1 or (val_fraction > 0 and n_val < 1) or (test_fraction > 0 and n_test < 1):
        raise ValueError(f"{n_frames} frames are too few for train/val/test fractions "
                         f"{1 - val_fraction - test_fraction:.2f}/{val_fraction}/{test_fraction}: "
                         "simulate longer (--ns) or save more often (--save-interval-ps)")
    n_head = n_train + n_val
    blocks = max(1, min(int(val_blocks), n_val))
    seg_edges = np.linspace(0, n_head, blocks + 1).round().astype(int)
    val_edges = np.linspace(0, n_val, blocks + 1).round().astype(int)
    is_val = np.zeros(n_head, dtype=bool)
    for b in range(blocks):
        is_val[seg_edges[b + 1] - (val_edges[b + 1] - val_edges[b]):seg_edges[b + 1]] = True
    head = np.arange(n_head)
    return {"train": head[~is_val], "val": head[is_val], "test": np.arange(n_head, n_frames)}


def read_metadata(path: str | Path) -> dict:
    """The metadata dict of a dataset file (fast: reads no arrays)."""
    with _open(path, "r") as fh:
        return json.loads(fh.attrs["metadata"])


def load_dataset(path: str | Path, system: MolecularSystem | None = None) -> Dataset:
    """Load a dataset written by ``regflow-mm simulate``; ``system`` (optional) must match its hash."""
    path = Path(path)
    with _open(path, "r") as fh:
        metadata = json.loads(fh.attrs["metadata"])
        n = int(fh.attrs["n_frames"])
        arrays = {k: fh[k][:n] for k in ("positions", "energies", "forces", "time")}
        arrays["log_weights"] = fh["log_weights"][:n] if "log_weights" in fh else None
        splits = {k: fh["splits"][k][:] for k in fh["splits"]} if "splits" in fh else {}
        pdb_text = fh.attrs["topology_pdb"]
    if n == 0:
        raise ValueError(f"dataset {path} has no frames yet: run `regflow-mm simulate` to fill it")
    bad = ~np.isfinite(arrays["positions"]).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"dataset {path} has non-finite positions in {bad.sum()} frames (first: {np.flatnonzero(bad)[0]}); "
                         "the simulation blew up: re-simulate with a smaller --timestep-fs")
    if any(idx.size and idx.max() >= n for idx in splits.values()):
        raise ValueError(f"dataset {path}: stored splits index past the {n} stored frames; the file is inconsistent")
    if system is None:
        system = _system_from_metadata(metadata, pdb_text, path)
    else:
        check_spec_hash(metadata["system_hash"], system, f"dataset {path}",
                        verb=f"was made for system {metadata['system']['name']!r}, not {system.name!r}: it has")
    return Dataset(path=path, splits=splits, metadata=metadata, system=system, **arrays)


@contextlib.contextmanager
def _open(path, mode):
    """The dataset file ``path`` opened with h5py; one-line ValueErrors for anything that is not a readable
    regflow-mm dataset (``files.hdf5_file``: not HDF5, truncated, a failed checksum, no metadata)."""
    path = Path(path)
    if mode == "r":
        require_file(path, "dataset", f": create it with `regflow-mm simulate SYSTEM --out {path}`")
    # Readers take no HDF5 file lock, so inspecting a dataset never blocks a running simulate.
    with hdf5_file(path, mode, "HDF5 dataset", **({"locking": False} if mode == "r" else {})) as fh:
        if "metadata" not in fh.attrs:
            raise ValueError(f"{path} is an HDF5 file but not a regflow-mm dataset (no metadata)")
        yield fh


def _system_from_metadata(metadata: dict, pdb_text: str, path: Path) -> MolecularSystem:
    """Rebuild the dataset's system: the built-in of that name if its hash matches, else from the stored PDB."""
    spec = metadata["system"]
    builtins = list_systems()
    if spec["name"] in builtins:
        system = get_system(spec["name"])
        if system.spec_hash == metadata["system_hash"]:
            return system
    cache = Path(tempfile.gettempdir()) / "regflow_mm_systems"
    cache.mkdir(exist_ok=True)
    pdb = cache / f"{metadata['system_hash'][:16]}.pdb"
    pdb.write_text(pdb_text)
    options = {k: spec[k] for k in ("solute_dielectric", "solvent_dielectric", "friction") if spec.get(k) is not None}
    system = load_system(pdb, spec["forcefield"], spec["temperature"], name=spec["name"],
                         nonbonded_method=spec["nonbonded_method"], nonbonded_cutoff=spec["nonbonded_cutoff"],
                         **options)
    check_spec_hash(metadata["system_hash"], system, f"dataset {path}",
                    verb=f"cannot rebuild its system {spec['name']!r} (force-field files changed?): it has")
    return system
