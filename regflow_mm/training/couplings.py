"""Fixed noise-data pairs (x0, x1) for RegFlow, stored on disk in chunks and resumable.

- ``generate_reflow_pairs``: x0 ~ prior, x1 = teacher CNF ODE solution f*(x0) (``TeacherCNF.generate``:
  through the teacher's coordinates and base when it has them). Chunk k draws its
  x0 under a seed derived from (seed, k) and holds ``chunk_size`` pairs (the last one the
  remainder), so the pairs do not depend on how the work was split (resume, executor sharding).
  Rerunning is idempotent: a store for ``n_pairs`` keeps its whole chunks and redraws only a final
  partial chunk whose size is not the one ``n_pairs`` asks for (a store made for another count).
- ``ot_pairing`` / ``generate_ot_pairs``: x0 = prior samples, x1 = data; pairing by exact
  optimal transport (POT ``emd``, squared Euclidean cost, uniform weights: the optimal plan is a
  permutation) or, flagged as approximations, by exact OT within random minibatches
  ("minibatch", a bijection) or by entropic OT ("sinkhorn", pairs drawn from the plan's
  columns: not a bijection). ``circular`` dims (circles of period 1) enter the cost by their torus
  distance min(|d|, 1 - |d|).

Every store's settings name what made its pairs, so a store made otherwise is refused, never reused:
the teacher's weight-and-coordinates hash, the solver, the prior, the circular mask (reflow); the data
hash, method, prior and circular mask (OT).

Memory of exact OT: the dense cost matrix and the dense plan are n^2 float64 each, and POT's
network simplex keeps per-arc state for all n^2 arcs. Measured on this 2-core, 24 GiB machine
(D = 66): peak ~40 bytes * n^2 and time ~n^2.85 (n = 2,000: 1 s; 4,000: 7 s, 1.3 GB). So
n = 10,000 needs ~4 GB and ~1.5 min; the largest n that fits in memory here is ~22,000 (~20 GB,
~15 min). Use method="minibatch" beyond that.

Store layout (HDF5): ``/x0``, ``/x1`` (n, D) float32 in flow-space units, chunked along n, with
fletcher32 checksums (verified on read); attrs ``kind``, ``settings`` (JSON of everything that made
the pairs), ``n_target`` (the pairs asked for last), ``n_done`` (written after each chunk is
flushed: a killed run resumes from it).
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import ot
import torch

from ..files import CHECKSUM, check_resume_settings, hdf5_file
from ..progress import progress_bar
from .cnf import SolverOptions, TeacherCNF, prior_sample


def derived_seed(seed: int, *keys: int) -> int:
    """Independent 63-bit seed for the stream (seed, *keys), e.g. chunk k of a run seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def tensor_hash(*tensors) -> str:
    """sha1 over the bytes of tensors/arrays (identifies teacher weights or a data set)."""
    h = hashlib.sha1()
    for t in tensors:
        a = t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def module_hash(module: torch.nn.Module) -> str:
    return tensor_hash(*module.state_dict().values())


class PairStore:
    """Chunked HDF5 store of pairs; open with ``PairStore.open(path, kind, settings, n_target, dim)``."""

    def __init__(self, path: Path, kind: str, settings: dict, n_target: int, n_done: int):
        self.path, self.kind, self.settings, self.n_target, self.n_done = path, kind, settings, n_target, n_done

    @classmethod
    def open(cls, path: str | Path, kind: str, settings: dict, n_target: int, dim: int,
             chunk_size: int) -> "PairStore":
        """Create the store, or reopen one made with identical ``settings`` (to resume or extend).

        A store made with other settings is never overwritten: a clear error asks for another path.
        ``n_target`` replaces the stored target; rows past it are the caller's to ``truncate``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(settings, sort_keys=True)
        if path.exists():
            with hdf5_file(path, "a", "pair store", hint=": delete it to make the pairs again") as f:
                stored = {"kind": f.attrs.get("kind"), **json.loads(f.attrs.get("settings") or "{}")}
                check_resume_settings(f"pair store {path}", stored, {"kind": kind, **json.loads(text)}, verb="made")
                n_done = int(f.attrs["n_done"])
                for name in ("x0", "x1"):  # drop rows of a chunk interrupted before n_done was updated
                    f[name].resize(n_done, axis=0)
                f.attrs["n_target"] = n_target
            return cls(path, kind, settings, n_target, n_done)
        with h5py.File(path, "w") as f:
            for name in ("x0", "x1"):
                f.create_dataset(name, shape=(0, dim), maxshape=(None, dim), dtype="float32",
                                 chunks=(max(1, min(chunk_size, 65536)), dim), **CHECKSUM)
            f.attrs.update(kind=kind, settings=text, n_target=n_target, n_done=0)
        return cls(path, kind, settings, n_target, 0)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` committed pairs (``n <= n_done``)."""
        with h5py.File(self.path, "a") as f:
            f.attrs["n_done"] = n
            for name in ("x0", "x1"):
                f[name].resize(n, axis=0)
        self.n_done = n

    def append(self, x0: np.ndarray, x1: np.ndarray) -> None:
        """Append a chunk of pairs (m, D) and commit it (``n_done`` is written after the data)."""
        with h5py.File(self.path, "a") as f:
            n = int(f.attrs["n_done"])
            for name, a in (("x0", x0), ("x1", x1)):
                f[name].resize(n + a.shape[0], axis=0)
                f[name][n:] = np.asarray(a, dtype=np.float32)
            f.flush()
            f.attrs["n_done"] = n + x0.shape[0]
        self.n_done = n + x0.shape[0]


def load_pairs(path: str | Path, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Read committed pairs: ``(x0 (n, D), x1 (n, D), info)``; info holds kind, settings, counts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no pair store at {path}; generate pairs first (reflow or OT)")
    with hdf5_file(path, "r", "pair store", hint=": delete it to make the pairs again") as f:
        n_done, n_target = int(f.attrs["n_done"]), int(f.attrs["n_target"])
        if n_done < n_target:
            raise ValueError(f"pair store {path} is incomplete ({n_done} of {n_target}); "
                             f"rerun the generation to resume it")
        n = n_target if n is None else min(n, n_target)
        x0, x1 = torch.from_numpy(f["x0"][:n]), torch.from_numpy(f["x1"][:n])
        info = {"kind": f.attrs["kind"], "settings": json.loads(f.attrs["settings"]), "n_pairs": n}
    return x0, x1, info


def reusable_pairs(n_done: int, n_pairs: int, chunk_size: int) -> int:
    """How many of ``n_done`` stored pairs are the first pairs of a store for ``n_pairs``: all of them when
    the counts are equal, else the whole chunks both have (a final partial chunk differs by its size)."""
    if n_done == n_pairs:
        return n_done
    return min(n_done // chunk_size, n_pairs // chunk_size) * chunk_size


def _chunk_prior(prior, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    # drawn in the calling thread: the global torch RNG is shared between executor threads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return prior_sample(prior, n).to(dtype)


def _reflow_chunk(cnf: TeacherCNF, x0: torch.Tensor, solver: SolverOptions, prior) -> tuple[np.ndarray, np.ndarray]:
    x1 = cnf.generate(x0, prior, solver=solver)
    bad = int((~torch.isfinite(x1).all(1)).sum())
    if bad:  # never written as pairs: the chunk fails, the store keeps only committed chunks
        raise FloatingPointError(f"{bad} of {x1.shape[0]} teacher ODE solutions are non-finite; use an adaptive "
                                 f"solver (ode_method = 'dopri5') or more ode_steps, or retrain the teacher")
    return x0.cpu().numpy(), x1.cpu().numpy()


def _mask_text(circular, dim: int) -> str:
    if circular is None:
        return "0" * dim
    return "".join("1" if bool(c) else "0" for c in (circular.tolist() if torch.is_tensor(circular) else circular))


def generate_reflow_pairs(cnf: TeacherCNF, prior, n_pairs: int, path: str | Path, *, chunk_size: int = 10_000,
                          seed: int = 0, solver: SolverOptions | None = None, dtype: torch.dtype = torch.float32,
                          executor: Executor | None = None, extra_settings: dict | None = None,
                          progress: bool = True) -> Path:
    """Write ``n_pairs`` reflow pairs (x0 ~ prior, x1 = cnf.transport(x0)) to the HDF5 store at ``path``.

    Resumes an interrupted store and reuses one made with the same teacher and settings for another
    ``n_pairs`` (whole chunks kept, see ``reusable_pairs``). ``executor`` (e.g. ``ProcessPoolExecutor``) computes chunks concurrently; chunks are
    still written in order, so the file is identical to a serial run.
    """
    if n_pairs < 1 or chunk_size < 1:
        raise ValueError(f"n_pairs and chunk_size must be positive, got {n_pairs} and {chunk_size}")
    solver = solver or cnf.solver
    with torch.random.fork_rng(devices=[]):
        dim = prior_sample(prior, 1).shape[1]
    # module_hash(cnf) covers the velocity weights and the teacher coordinates (shift, scale, circular)
    settings = {"kind": "reflow", "seed": int(seed), "chunk_size": int(chunk_size), "solver": vars(solver).copy(),
                "teacher_hash": module_hash(cnf), "dtype": str(dtype), "prior": repr(prior)[:200],
                **(extra_settings or {})}
    if cnf.coords is not None:
        settings["teacher_coords"] = cnf.coords.describe()
    store = PairStore.open(path, "reflow", settings, n_pairs, dim, chunk_size)
    keep = reusable_pairs(store.n_done, n_pairs, chunk_size)
    if keep < store.n_done:
        store.truncate(keep)
    chunks = [(k, min(chunk_size, n_pairs - k * chunk_size))
              for k in range(store.n_done // chunk_size, -(-n_pairs // chunk_size))] if store.n_done < n_pairs else []
    bar = progress_bar(total=n_pairs, initial=store.n_done, desc="reflow pairs", disable=not progress)
    if executor is None:
        for k, m in chunks:
            store.append(*_reflow_chunk(cnf, _chunk_prior(prior, m, derived_seed(seed, k), dtype), solver, prior))
            bar.update(m)
    else:
        window = max(2, 2 * getattr(executor, "_max_workers", 2))
        pending = []
        for k, m in chunks:
            x0 = _chunk_prior(prior, m, derived_seed(seed, k), dtype)
            pending.append((m, executor.submit(_reflow_chunk, cnf, x0, solver, prior)))
            while len(pending) >= window or (pending and k == chunks[-1][0]):
                m0, fut = pending.pop(0)
                store.append(*fut.result())
                bar.update(m0)
    bar.close()
    return store.path


def ot_pairing(x0: np.ndarray | torch.Tensor, x1: np.ndarray | torch.Tensor, *, method: str = "exact",
               block_size: int = 4096, reg: float = 0.05, seed: int = 0,
               circular=None) -> tuple[np.ndarray, dict[str, Any]]:
    """Pair prior points x0 (n, D) with data x1 (n, D) under squared-Euclidean cost.

    ``circular`` (D,) bool: dimensions that are circles of period 1 (flow-space torsions); their
    term of the cost is the squared torus distance min(|d|, 1 - |d|)^2 (``pairing_cost``).

    Returns ``(src, info)`` with pairs (x0[src[j]], x1[j]). ``method``: "exact" (POT emd on the
    full n x n problem: src is the optimal permutation), "minibatch" (random blocks of
    ``block_size``, exact within each: approximate, still a permutation) or "sinkhorn"
    (entropic plan with ``reg`` times the median cost, src[j] drawn from column j: approximate,
    not a permutation). ``info["approximate"]`` flags the two approximations.
    """
    x0 = np.asarray(x0.detach().cpu() if torch.is_tensor(x0) else x0, dtype=np.float64)
    x1 = np.asarray(x1.detach().cpu() if torch.is_tensor(x1) else x1, dtype=np.float64)
    if x0.shape != x1.shape or x0.ndim != 2:
        raise ValueError(f"x0 and x1 must both be (n, D) with equal shapes, got {x0.shape} and {x1.shape}")
    n = x0.shape[0]
    circ = np.zeros(x0.shape[1], dtype=bool) if circular is None else np.asarray(
        circular.cpu() if torch.is_tensor(circular) else circular, dtype=bool)
    if circ.shape != (x0.shape[1],):
        raise ValueError(f"circular must have one entry per dimension ({x0.shape[1]}), got shape {circ.shape}")
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"method": method, "n": n, "approximate": method != "exact", "n_circular": int(circ.sum())}
    if method == "exact":
        src = _exact_permutation(x0, x1, circ)
    elif method == "minibatch":
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        src = np.empty(n, dtype=np.int64)
        order0, order1 = rng.permutation(n), rng.permutation(n)
        for i in range(0, n, block_size):
            b0, b1 = order0[i:i + block_size], order1[i:i + block_size]
            src[b1] = b0[_exact_permutation(x0[b0], x1[b1], circ)]
        info["block_size"] = int(block_size)
    elif method == "sinkhorn":
        cost = pairing_cost(x0, x1, circ)
        scale = float(np.median(cost))
        plan, log = ot.sinkhorn(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost / scale, reg,
                                method="sinkhorn_log", numItermax=10_000, stopThr=1e-9, log=True, warn=False)
        info["sinkhorn_marginal_error"] = float(log["err"][-1]) if len(log["err"]) else None
        cols = plan / plan.sum(axis=0, keepdims=True)
        src = np.array([rng.choice(n, p=cols[:, j]) for j in range(n)], dtype=np.int64)
        info.update(reg=float(reg), cost_scale=scale, bijection=False,
                    n_distinct_sources=int(np.unique(src).size))
    else:
        raise ValueError(f"unknown OT method {method!r}; use 'exact', 'minibatch' or 'sinkhorn'")
    d = np.abs(x0[src] - x1)
    d = np.where(circ, np.minimum(d % 1.0, 1.0 - d % 1.0), d)
    info["mean_cost"] = float((d ** 2).sum(1).mean())
    return src, info


def pairing_cost(x0: np.ndarray, x1: np.ndarray, circular: np.ndarray | None = None) -> np.ndarray:
    """(n, m) squared cost: Euclidean on ordinary dimensions, torus distance min(|d|, 1 - |d|) on the
    ``circular`` ones (period 1, flow-space units)."""
    if circular is None or not np.any(circular):
        return ot.dist(x0, x1)  # squared Euclidean, float64
    from .metrics import torus_cost_matrix

    circular = np.asarray(circular, dtype=bool)
    cost = torus_cost_matrix(x0[:, circular], x1[:, circular], period=1.0)
    if (~circular).any():
        cost += ot.dist(x0[:, ~circular], x1[:, ~circular])
    return cost


def _exact_permutation(x0: np.ndarray, x1: np.ndarray, circular: np.ndarray | None = None) -> np.ndarray:
    n = x0.shape[0]
    cost = pairing_cost(x0, x1, circular)
    plan, log = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost, numItermax=max(100_000, 100 * n * n),
                       log=True)
    if log.get("result_code", 1) != 1:
        raise RuntimeError(f"POT emd did not reach the optimum ({log.get('warning')}); use method='minibatch'")
    src = plan.argmax(axis=0)
    if np.unique(src).size != n:
        raise RuntimeError("the exact OT plan is not a permutation (degenerate ties); perturb the inputs")
    return src.astype(np.int64)


def generate_ot_pairs(data: torch.Tensor, prior, path: str | Path, *, method: str = "exact", seed: int = 0,
                      block_size: int = 4096, reg: float = 0.05, chunk_size: int = 10_000,
                      extra_settings: dict | None = None, progress: bool = True, circular=None) -> Path:
    """Draw len(data) prior points (seeded), pair them with the flow-space ``data`` (n, D) by
    ``ot_pairing`` (torus cost on ``circular`` dims) and write the pairs to the store at ``path``
    (pairing info in the settings).

    The pairing is a deterministic function of (data, seed, method): an interrupted write is
    completed by rerunning, which recomputes the pairing and appends the missing chunks.
    """
    if data.dim() != 2 or not torch.isfinite(data).all():
        raise ValueError("OT data must be a finite (n, D) tensor of flow-space points")
    n = data.shape[0]
    settings = {"kind": "ot", "method": method, "seed": int(seed), "n": n, "data_hash": tensor_hash(data),
                "block_size": int(block_size) if method == "minibatch" else None,
                "reg": float(reg) if method == "sinkhorn" else None, "approximate": method != "exact",
                "prior": repr(prior)[:200], **(extra_settings or {})}
    if circular is not None and bool(torch.as_tensor(circular).any()):  # stores without circles keep their settings
        settings["circular"] = _mask_text(circular, data.shape[1])
    store = PairStore.open(path, "ot", settings, n, data.shape[1], chunk_size)
    if store.n_done >= n:
        return store.path
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, 0))
        x0 = prior_sample(prior, n).to(data.dtype)
    src, info = ot_pairing(x0, data, method=method, block_size=block_size, reg=reg, seed=seed,
                           circular=circular)
    with h5py.File(store.path, "a") as f:
        f.attrs["pairing_info"] = json.dumps(info)
    x0p, x1 = x0.cpu().numpy()[src], data.cpu().numpy()
    for i in progress_bar(range(store.n_done, n, chunk_size), desc="OT pairs", disable=not progress):
        store.append(x0p[i:i + chunk_size], x1[i:i + chunk_size])
    return store.path
