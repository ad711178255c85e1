"""Parallel tempering (temperature replica exchange, openmmtools) for MD datasets: the settings.

The engine (openmmtools' sampler, imported only when a tempering run starts) is
``regflow_mm.data.parallel_tempering``.

The general route when a metadynamics grid over the slow torsions is too large: ``n_replicas``
copies of the system run Langevin dynamics on a geometric temperature ladder

    T_i = T_0 (T_max / T_0)^(i / (n - 1)),   i = 0 .. n - 1,   T_0 = the system temperature,

and every iteration (``save_interval_ps`` of dynamics, one dataset frame) neighbouring temperatures
try to swap configurations (Metropolis on the reduced potentials; openmmtools
``ParallelTemperingSampler``, ``swap-neighbors``). Hot replicas cross barriers and hand their
configurations down the ladder. Only the replica at T_0 is stored: the exchanges keep the joint
ensemble of all replicas invariant, whose T_0 marginal is the Boltzmann distribution of the system,
so every stored frame has log-weight 0 (like plain MD), and its energy and forces are the plain
potential (kJ/mol, kJ/mol/nm). ``/tempering_iteration`` records the iteration of each frame
(frame k <-> iteration k + 1, time = iteration * save interval, ps) and ``/tempering_replica`` which
replica was at T_0 then.

Propagation: ``LangevinMiddleMove`` (openmmtools ``LangevinDynamicsMove`` with OpenMM's
``LangevinMiddleIntegrator``, the integrator of plain MD, seeded), on the chosen platform through
openmmtools context caches. The replicas' state lives in openmmtools storage next to the dataset,
``<out>.tempering.nc`` and ``<out>.tempering_checkpoint.nc``; positions and velocities of all replicas
are checkpointed every ``checkpoint_interval`` iterations (= the dataset's commit chunk). A resumed
run reopens the storage at its newest checkpoint not past the dataset's last frame and drops the
dataset frames after that iteration, so every iteration's frame is in the dataset exactly once
(at most a chunk is redone). The resumed chain is exact in distribution, not bitwise equal to an
uninterrupted run: the checkpoint stores float32 positions and the noise is reseeded from
(seed, iteration).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

@dataclass(frozen=True)
class TemperingSettings:
    """Parallel tempering on a geometric ladder from the system temperature to ``t_max_K``.

    n_replicas: temperatures on the ladder (>= 2). t_max_K: top temperature, K (above the system's).
    One exchange iteration per saved frame: its length is simulate's ``save_interval_ps`` (ps).
    """

    n_replicas: int = 4
    t_max_K: float = 600.0

    def __post_init__(self):
        if int(self.n_replicas) != self.n_replicas or int(self.n_replicas) < 2:
            raise ValueError(f"a replica ladder needs at least two temperatures, got n_replicas={self.n_replicas}: "
                             "use --pt-replicas 2 or more")
        object.__setattr__(self, "n_replicas", int(self.n_replicas))
        if not (math.isfinite(self.t_max_K) and self.t_max_K > 0):
            raise ValueError(f"tempering t_max_K must be a temperature > 0 K, got {self.t_max_K}")
        object.__setattr__(self, "t_max_K", float(self.t_max_K))

    def to_dict(self) -> dict:
        return {"method": "tempering", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TemperingSettings":
        """Inverse of ``to_dict``."""
        d = dict(d)
        if d.pop("method", "tempering") != "tempering":
            raise ValueError(f"not parallel-tempering settings: {d}")
        return cls(**d)


def temperature_ladder(t_min_K: float, t_max_K: float, n: int) -> np.ndarray:
    """(n,) geometric temperatures, K: t_min_K (t_max_K / t_min_K)^(i / (n - 1))."""
    return t_min_K * (t_max_K / t_min_K) ** (np.arange(n) / (n - 1))


def storage_path(out: str | Path) -> Path:
    """openmmtools storage of a tempering dataset: ``<out>.tempering.nc`` (+ ``<out>.tempering_checkpoint.nc``)."""
    out = Path(out)
    return out.with_name(out.name + ".tempering.nc")
