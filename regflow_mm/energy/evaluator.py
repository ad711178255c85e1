"""`EnergyEvaluator`: batched reduced energies and forces of a molecular system (see the package doc)."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import multiprocessing
import os
import time
import weakref
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import openmm
import openmm.unit as unit

from regflow_mm.systems import MOLAR_GAS_CONSTANT
from regflow_mm.systems.platforms import resolve_platform

from .worker import (ChunkResult, ChunkTask, ContextWorker, EnergyStats, EnergyWorkerError, evaluate_task, init_worker,
                     shutdown_pool)

logger = logging.getLogger("regflow_mm.energy")

DEFAULT_MAX_ENERGY = 1e10  # kJ/mol; |U| above this is treated as an overflow (+inf)
_GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")
_MAX_GPU_WORKERS = 4  # every GPU worker process holds its own device context (~hundreds of MB)
_SMALL_SYSTEM_ATOMS = 1000  # below this one CPU thread per Context is faster for single points


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class _SystemSpec:
    """Minimal molecular system for `EnergyEvaluator.from_system`."""

    system: openmm.System
    kT: float  # kJ/mol
    n_atoms: int
    name: str


class EnergyEvaluator:
    """Reduced energies u = U/kT and forces of a molecular system for batches of configurations.

    molecular_system: object with `.system` (openmm.System), `.kT` (kJ/mol), `.n_atoms`, `.name`.
    n_workers: worker processes of the own pool; 0 = in-process; None = usable cores (in-process
        on one core, at most 4 on GPU platforms). With an `executor` it only sets the chunking
        (default: the executor's max_workers if it has one, else the usable cores; give the
        cluster's total worker threads for dask).
    platform: "CPU", "Reference", "CUDA", "OpenCL" or None/"auto" (CUDA if available, else Reference
        below 200 atoms, else CPU; see regflow_mm.systems.platforms).
    executor: any object with `submit(fn, *args)` returning futures (e.g. `Client.get_executor()`);
        not shut down by `close()` (its owner does that). Worker-side Contexts are then built lazily.
    chunk_size: configurations per task; None = about 4 chunks per worker.
    max_energy: |U| in kJ/mol above which a configuration counts as overflowing (+inf).
    platform_properties: OpenMM platform properties; default Threads=1 per worker for CPU on
        systems below 1000 atoms (faster for single points), Precision=mixed on GPUs.
    timeout: seconds one call may take before it is abandoned (own pool then terminated).

    The own pool starts worker processes with forkserver/spawn, so scripts using it need the usual
    `if __name__ == "__main__":` guard. Use `with EnergyEvaluator(...) as evaluator:` or `close()`;
    a pool left open is shut down when the evaluator is garbage collected or at interpreter exit.

    Outputs are float64 numpy arrays (except `reduced_energy_torch`); a single configuration
    (n_atoms, 3) gives outputs without the batch axis. Configurations returned as +inf have zero forces.
    """

    def __init__(
        self,
        molecular_system: Any,
        n_workers: int | None = None,
        platform: str | None = None,
        executor: Any = None,
        chunk_size: int | None = None,
        max_energy: float = DEFAULT_MAX_ENERGY,
        platform_properties: dict[str, str] | None = None,
        timeout: float | None = None,
    ):
        for attribute in ("system", "kT", "n_atoms", "name"):
            if not hasattr(molecular_system, attribute):
                raise TypeError(
                    f"molecular_system needs .system, .kT, .n_atoms and .name, it lacks .{attribute}: "
                    "pass regflow_mm.systems.get_system(...) or use EnergyEvaluator.from_system(system, temperature)"
                )
        system = molecular_system.system
        if not isinstance(system, openmm.System):
            raise TypeError(f"molecular_system.system must be an openmm.System, got {type(system).__name__}")
        self.molecular_system = molecular_system
        self.name = str(molecular_system.name)
        self.n_atoms = int(molecular_system.n_atoms)
        self.kT = float(molecular_system.kT)
        if system.getNumParticles() != self.n_atoms:
            raise ValueError(
                f"system {self.name!r} has {system.getNumParticles()} particles but n_atoms={self.n_atoms}: "
                "fix the molecular system so both agree"
            )
        if not (math.isfinite(self.kT) and self.kT > 0):
            raise ValueError(f"kT must be a positive number in kJ/mol, got {self.kT} for system {self.name!r}")
        if n_workers is not None and n_workers < 0:
            raise ValueError(f"n_workers must be >= 0 (0 = in-process), got {n_workers}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        if not max_energy > 0:
            raise ValueError(f"max_energy must be positive (kJ/mol), got {max_energy}")

        self.platform = resolve_platform(platform, self.n_atoms, system)
        cores = usable_cores()
        if n_workers is None:
            if executor is not None:
                n_workers = getattr(executor, "_max_workers", None) or cores
            elif self.platform in _GPU_PLATFORMS:
                n_workers = min(cores, _MAX_GPU_WORKERS)
            else:
                n_workers = cores if cores > 1 else 0
        self.n_workers = int(n_workers)
        self.chunk_size = chunk_size
        self.max_energy = float(max_energy)
        self.timeout = timeout
        parallel = executor is not None or self.n_workers > 0
        self.platform_properties = self._default_properties(cores, parallel) | dict(platform_properties or {})

        self._system_xml = openmm.XmlSerializer.serialize(system)
        key_source = self._system_xml + self.platform + repr(sorted(self.platform_properties.items()))
        self.system_key = hashlib.sha256(key_source.encode()).hexdigest()[:20]

        self._external_executor = executor
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pool_finalizer: weakref.finalize | None = None
        self._local_worker: ContextWorker | None = None
        self._closed = False
        self.stats = EnergyStats()
        self.last_stats = EnergyStats()
        if executor is not None:
            mode = f"external executor {type(executor).__name__}"
        elif self.n_workers == 0:
            mode = "in-process"
        else:
            mode = f"{self.n_workers} worker processes"
        logger.info(
            "EnergyEvaluator %r: %d atoms, kT=%.4f kJ/mol, platform %s %s, %s",
            self.name, self.n_atoms, self.kT, self.platform, self.platform_properties, mode,
        )

    @classmethod
    def from_system(cls, system: openmm.System, temperature: float, name: str = "system", **kwargs) -> "EnergyEvaluator":
        """Evaluator for a bare openmm.System at `temperature` (K, float or openmm Quantity)."""
        if isinstance(temperature, unit.Quantity):
            temperature = temperature.value_in_unit(unit.kelvin)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number in K, got {temperature}")
        spec = _SystemSpec(system=system, kT=MOLAR_GAS_CONSTANT * float(temperature), n_atoms=system.getNumParticles(), name=name)
        return cls(spec, **kwargs)

    # -- configuration ------------------------------------------------------------------------

    def _default_properties(self, cores: int, parallel: bool) -> dict[str, str]:
        if self.platform == "CPU":
            if self.n_atoms < _SMALL_SYSTEM_ATOMS:
                return {"Threads": "1"}
            return {"Threads": str(max(1, cores // max(self.n_workers, 1)))} if parallel else {}
        if self.platform in _GPU_PLATFORMS:
            return {"Precision": "mixed"}
        return {}

    @property
    def executor(self) -> Any:
        """The executor in use (the own pool is started here if needed); None when in-process."""
        if self._external_executor is not None:
            return self._external_executor
        if self.n_workers == 0:
            return None
        if self._pool is None:
            self._start_pool()
        return self._pool

    def _start_pool(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        # fork is unsafe once OpenMM or torch have started threads in this process
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.n_workers,
            mp_context=context,
            initializer=init_worker,
            initargs=(self.system_key, self._system_xml, self.platform, self.platform_properties, os.getpid()),
        )
        self._pool_finalizer = weakref.finalize(self, shutdown_pool, self._pool)
        logger.info(
            "EnergyEvaluator %r: started %d %s workers on platform %s %s",
            self.name, self.n_workers, context.get_start_method(), self.platform, self.platform_properties,
        )

    def _discard_pool(self) -> None:
        if self._pool_finalizer is not None:
            self._pool_finalizer()  # runs shutdown_pool once, then detaches
        self._pool = None
        self._pool_finalizer = None

    def close(self) -> None:
        """Shut down the own worker pool (not an executor passed in) and free the Contexts."""
        self._discard_pool()
        self._local_worker = None
        self._closed = True

    def __enter__(self) -> "EnergyEvaluator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- evaluation ---------------------------------------------------------------------------

    def _as_positions(self, x: Any) -> tuple[np.ndarray, bool]:
        """(B, n_atoms, 3) float64 nm array and whether the input was a single configuration."""
        if isinstance(x, unit.Quantity):
            x = x.value_in_unit(unit.nanometer)
        if type(x).__module__.startswith("torch"):
            x = x.detach().cpu().double().numpy()
        try:
            x = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"positions must be a real numeric array in nm, got {type(x).__name__}: {error}") from None
        single = x.ndim == 2
        if single:
            x = x[None]
        if x.ndim != 3 or x.shape[1:] != (self.n_atoms, 3):
            raise ValueError(
                f"positions for system {self.name!r} must have shape (B, {self.n_atoms}, 3) or ({self.n_atoms}, 3) "
                f"in nm, got {tuple(np.shape(x[0] if single else x))}: pass all {self.n_atoms} atoms of each configuration"
            )
        return np.ascontiguousarray(x), single

    def _chunks(self, batch: int) -> list[slice]:
        if self.chunk_size is not None:
            size = self.chunk_size
        elif self.n_workers == 0 and self._external_executor is None:
            size = max(batch, 1)
        else:
            size = max(1, math.ceil(batch / (4 * max(self.n_workers, 1))))
        return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]

    def _evaluate(self, x: Any, want_forces: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
        if self._closed:
            raise RuntimeError(f"EnergyEvaluator for {self.name!r} is closed: create a new one")
        positions, single = self._as_positions(x)
        started = time.perf_counter()
        chunks = self._chunks(positions.shape[0])
        executor = self.executor
        if executor is None:
            results = [self._evaluate_in_process(positions[c], want_forces) for c in chunks]
        else:
            results = self._evaluate_with(executor, positions, chunks, want_forces)
        stats = EnergyStats()
        for result in results:
            stats.add(result.stats)
        stats.wall_time_s = time.perf_counter() - started
        self.last_stats = stats
        self.stats.add(stats)
        if stats.n_nonfinite:
            logger.debug(
                "EnergyEvaluator %r: %d of %d configurations non-finite (%d NaN positions, %d OpenMM errors: %s)",
                self.name, stats.n_nonfinite, stats.n_configurations, stats.n_nan_positions,
                stats.n_openmm_errors, stats.first_error,
            )
        energies = np.concatenate([r.energies for r in results]) if results else np.zeros(0)
        forces = None
        if want_forces:
            forces = np.concatenate([r.forces for r in results]) if results else np.zeros((0, self.n_atoms, 3))
        return energies, forces, single

    def _evaluate_in_process(self, positions: np.ndarray, want_forces: bool) -> ChunkResult:
        if self._local_worker is None:
            self._local_worker = ContextWorker(self._system_xml, self.platform, self.platform_properties)
            logger.info("EnergyEvaluator %r: in-process Context on platform %s", self.name, self.platform)
        return self._local_worker.evaluate(positions, want_forces, self.max_energy)

    def _evaluate_with(self, executor: Any, positions: np.ndarray, chunks: list[slice], want_forces: bool) -> list[ChunkResult]:
        own_pool = executor is self._pool
        # the own pool's initializer built the Contexts; other executors build them lazily from the XML
        xml = None if own_pool else self._system_xml
        futures = []
        try:
            for c in chunks:
                task = ChunkTask(self.system_key, xml, self.platform, self.platform_properties,
                                  positions[c], want_forces, self.max_energy)
                futures.append(executor.submit(evaluate_task, task))
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            return [f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]
        except BrokenProcessPool as error:
            if own_pool:
                self._discard_pool()
            raise EnergyWorkerError(
                f"an energy worker process died while evaluating system {self.name!r} on platform {self.platform} "
                f"({error}); the pool is rebuilt on the next call"
            ) from error
        except (concurrent.futures.TimeoutError, TimeoutError) as error:
            if own_pool:
                self._discard_pool()
            raise TimeoutError(
                f"energy evaluation of {positions.shape[0]} configurations of system {self.name!r} on platform "
                f"{self.platform} took longer than timeout={self.timeout} s; raise the timeout or check the workers"
            ) from error
        except EnergyWorkerError:
            raise
        except Exception as error:
            raise EnergyWorkerError(
                f"energy worker failed evaluating system {self.name!r} on platform {self.platform}: "
                f"{type(error).__name__}: {error}"
            ) from error
        finally:
            for f in futures:
                f.cancel()

    def reduced_energy(self, x: Any) -> np.ndarray:
        """u = U/kT, (B,) float64 in kT, +inf where non-finite, for positions (B, n_atoms, 3) nm."""
        energies, _, single = self._evaluate(x, want_forces=False)
        u = energies / self.kT
        return u[0] if single else u

    def energy_and_forces(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """U (B,) kJ/mol and F (B, n_atoms, 3) kJ/mol/nm, float64; +inf energies have zero forces."""
        energies, forces, single = self._evaluate(x, want_forces=True)
        return (energies[0], forces[0]) if single else (energies, forces)

    def reduced_energy_and_forces(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        """u (B,) in kT and F/kT (B, n_atoms, 3) in kT/nm (= -du/dx), float64."""
        energies, forces = self.energy_and_forces(x)
        return energies / self.kT, forces / self.kT

    def reduced_energy_torch(self, x: Any) -> Any:
        """u (B,) in kT as a torch tensor of x's dtype and device, differentiable w.r.t. x (nm).

        The gradient is -F/kT * grad_output. Configurations with u = +inf get zero gradient, so a
        loss over the finite entries (e.g. after masking with torch.isfinite) trains normally.
        """
        from .autograd import ReducedEnergy  # here, not at the top: worker processes never import torch

        return ReducedEnergy.apply(x, self)

    @property
    def n_nonfinite(self) -> int:
        """Configurations returned as +inf over all calls so far."""
        return self.stats.n_nonfinite

    def __repr__(self) -> str:
        return (f"EnergyEvaluator({self.name!r}, n_atoms={self.n_atoms}, platform={self.platform!r}, "
                f"n_workers={self.n_workers}, executor={type(self._external_executor).__name__ if self._external_executor else None})")

