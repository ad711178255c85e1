"""Batched reduced energies and forces of an OpenMM System, with a torch autograd path.

`EnergyEvaluator` evaluates u = U/kT (kT in kJ/mol) and forces for batches of configurations
shaped (B, n_atoms, 3) in nm. Work is split into chunks and sent to an executor with the
`concurrent.futures.Executor.submit` interface: by default an own `ProcessPoolExecutor`
(forkserver/spawn start, one OpenMM Context per worker built once by the pool initializer); any
other executor (a `ThreadPoolExecutor`, dask.distributed's `Client.get_executor()`, ...) can be
passed in, and then each worker thread builds its Context lazily on its first task, cached by a
hash of the serialized System, platform and platform properties. `n_workers=0` evaluates in-process.

Clashing or broken configurations never raise: NaN/inf positions, non-finite energies or forces,
|U| > `max_energy` and OpenMM exceptions ("Particle coordinate is NaN") give u = +inf with zero
forces, and are counted in `EnergyStats`.

Modules: `evaluator` (the pool, chunking, validation, statistics), `worker` (Context per worker,
per-configuration error handling), `autograd` (the torch.autograd.Function, imported on first use
so that worker processes never pay for importing torch).
"""
from .evaluator import DEFAULT_MAX_ENERGY, EnergyEvaluator
from .worker import EnergyStats, EnergyWorkerError

__all__ = ["DEFAULT_MAX_ENERGY", "EnergyEvaluator", "EnergyStats", "EnergyWorkerError"]
