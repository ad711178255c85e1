"""Worker side of the energy evaluator: one OpenMM Context per (System XML, platform, properties).

Runs in worker processes (or threads): it imports numpy and openmm only, never torch, so workers
start in a fraction of a second. Contexts are cached per thread, because executors such as
dask.distributed run several tasks of one worker process at once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import os
import threading
import time

import numpy as np
import openmm

log = logging.getLogger(__name__)

_CONTEXTS_PER_THREAD = 4  # LRU size of the worker-side Context cache


class EnergyWorkerError(RuntimeError):
    """An energy worker process died or a chunk could not be evaluated."""


@dataclasses.dataclass
class EnergyStats:
    """Counters of one call (`EnergyEvaluator.last_stats`) or of all calls (`.stats`)."""

    n_configurations: int = 0
    n_nonfinite: int = 0  # results returned as +inf, for any of the reasons below
    n_nan_positions: int = 0  # configurations with NaN/inf coordinates (never sent to OpenMM)
    n_openmm_errors: int = 0  # OpenMM exceptions caught for single configurations
    n_context_rebuilds: int = 0  # Contexts rebuilt because an exception left them unusable
    n_chunks: int = 0
    wall_time_s: float = 0.0
    first_error: str | None = None  # message of the first OpenMM exception

    def add(self, other: "EnergyStats") -> None:
        for field in dataclasses.fields(self):
            if field.name == "first_error":
                self.first_error = self.first_error or other.first_error
            else:
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


@dataclasses.dataclass
class ChunkTask:
    key: str
    system_xml: str | None  # None: the worker initializer already built the Context for `key`
    platform: str
    properties: dict[str, str]
    positions: np.ndarray  # (m, n_atoms, 3) float64 nm
    want_forces: bool
    max_energy: float


@dataclasses.dataclass
class ChunkResult:
    energies: np.ndarray  # (m,) kJ/mol, +inf where non-finite
    forces: np.ndarray | None  # (m, n_atoms, 3) kJ/mol/nm, zero where the energy is +inf
    stats: EnergyStats


class ContextWorker:
    """One OpenMM Context for one System; evaluates configurations one at a time."""

    def __init__(self, system_xml: str, platform: str, properties: dict[str, str]):
        self.system_xml = system_xml
        self.platform = platform
        self.properties = dict(properties)
        self.context = self._build()
        self.last_good: np.ndarray | None = None

    def _build(self) -> openmm.Context:
        system = openmm.XmlSerializer.deserialize(self.system_xml)
        integrator = openmm.VerletIntegrator(0.001)  # never stepped: only holds the Context
        return openmm.Context(system, integrator, openmm.Platform.getPlatformByName(self.platform), self.properties)

    def _single_point(self, x: np.ndarray, want_forces: bool) -> tuple[float, np.ndarray | None]:
        self.context.setPositions(x)
        state = self.context.getState(getEnergy=True, getForces=want_forces)
        # OpenMM's internal units are kJ/mol and nm; `_value` skips the slow unit conversion.
        energy = state.getPotentialEnergy()._value
        forces = state.getForces(asNumpy=True)._value if want_forces else None
        return energy, forces

    def _recover(self, stats: EnergyStats) -> None:
        """Keep the Context if it still evaluates the last good configuration, else rebuild it."""
        if self.last_good is not None:
            try:
                energy, _ = self._single_point(self.last_good, False)
                if math.isfinite(energy):
                    return
            except openmm.OpenMMException:
                log.debug("context unusable after an OpenMM exception; rebuilding it")
        self.context = self._build()
        stats.n_context_rebuilds += 1

    def evaluate(self, positions: np.ndarray, want_forces: bool, max_energy: float) -> ChunkResult:
        m = positions.shape[0]
        stats = EnergyStats(n_configurations=m, n_chunks=1)
        energies = np.full(m, np.inf)
        forces = np.zeros(positions.shape) if want_forces else None
        finite_positions = np.isfinite(positions).reshape(m, -1).all(axis=1)
        stats.n_nan_positions = int(m - finite_positions.sum())
        for i in np.flatnonzero(finite_positions):
            try:
                energy, f = self._single_point(positions[i], want_forces)
            except openmm.OpenMMException as error:
                stats.n_openmm_errors += 1
                stats.first_error = stats.first_error or str(error).split("\n")[0]
                self._recover(stats)
                continue
            if not (math.isfinite(energy) and abs(energy) <= max_energy):
                continue
            if want_forces:
                if not np.isfinite(f).all():
                    continue
                forces[i] = f
            energies[i] = energy
            self.last_good = positions[i]
        stats.n_nonfinite = int(np.isinf(energies).sum())
        return ChunkResult(energies, forces, stats)


_worker_state = threading.local()  # per thread: executors such as dask run several tasks at once


def _cached_workers() -> collections.OrderedDict:
    if not hasattr(_worker_state, "workers"):
        _worker_state.workers = collections.OrderedDict()
    return _worker_state.workers


def _get_worker(key: str, system_xml: str | None, platform: str, properties: dict[str, str]) -> ContextWorker:
    workers = _cached_workers()
    if key in workers:
        workers.move_to_end(key)
        return workers[key]
    if system_xml is None:
        raise EnergyWorkerError(f"energy worker has no Context for system key {key}: the worker initializer did not run")
    workers[key] = ContextWorker(system_xml, platform, properties)
    while len(workers) > _CONTEXTS_PER_THREAD:
        workers.popitem(last=False)
    return workers[key]


PARENT_POLL_S = 0.5  # how often a worker checks that the process that started it is alive


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: trust os.kill


def watch_parent(parent_pid: int) -> None:
    """Exit this worker process within ``PARENT_POLL_S`` s once ``parent_pid`` is gone (e.g. SIGKILLed,
    when no shutdown reaches its pool); a daemon thread polls it."""
    def watch():
        while _alive(parent_pid):
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="regflow-mm parent watch", daemon=True).start()


def init_worker(key: str, system_xml: str, platform: str, properties: dict[str, str],
                parent_pid: int | None = None) -> None:
    """ProcessPoolExecutor initializer: deserialize the System and build the Context once; with
    ``parent_pid``, exit when that process dies (``watch_parent``)."""
    if parent_pid is not None:
        watch_parent(parent_pid)
    _get_worker(key, system_xml, platform, properties)


def evaluate_task(task: ChunkTask) -> ChunkResult:
    worker = _get_worker(task.key, task.system_xml, task.platform, task.properties)
    return worker.evaluate(task.positions, task.want_forces, task.max_energy)


def shutdown_pool(pool: concurrent.futures.ProcessPoolExecutor, join_timeout: float = 10.0) -> None:
    """Shut a pool down without ever hanging: cancel queued work, terminate workers that stay busy."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, but the only handle
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + join_timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(1.0)

