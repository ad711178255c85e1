"""Flow independence Metropolis-Hastings as an openmmtools ``MCMCMove``.

The move proposes y ~ q (a Boltzmann generator) independently of the current state x and
accepts with

    min(1, exp(-[u(y) - u(x)] + log q(x) - log q(y)))

where u is the reduced potential (kT) of the thermodynamic state passed to ``apply`` (any
temperature: log q does not depend on it). openmmtools' ``MetropolizedMove`` has no Hastings
term, so the move implements its own ``apply``.

Proposals are drawn in batches ahead of time: they do not depend on the chain's state, so the
chain stays exact. Each batch is drawn under its own torch seed (taken from the move's numpy
generator), which lets a deserialised move regenerate the pending batch and continue the same
random stream.

log q of the current state is the costly part of a move (an inverse pass of the flow). The move
remembers log q of the state it left (the accepted proposal's log q, or the kept state's) with a
digest of its positions; the next move reuses it when the positions are unchanged (several flow
moves in a row, or no dynamics in between) and evaluates the flow otherwise. The memory is part of
the serialised state, so a restored move continues the same chain.

Velocities: by default they are kept on acceptance. With no constraints the Boltzmann
distribution factorises, p(x, v) = p(x) p(v), so replacing x alone leaves p(x, v) invariant;
``velocities="redraw"`` draws fresh Maxwell-Boltzmann velocities at the state's temperature
instead (both are exact; with Langevin dynamics around the move the choice hardly matters).
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import openmm
from openmm import unit
from openmmtools.mcmc import MCMCMove

from regflow_mm.flows import flow_file_hash, flow_log_prob, load_flow, require_flow_file, sample_flow
from regflow_mm.systems import check_spec_hash, system_from_spec_dict

log = logging.getLogger(__name__)

_VELOCITY_MODES = ("keep", "redraw")
_STAT_KEYS = ("n_proposed", "n_accepted", "n_rejected_nonfinite", "n_rejected_chirality")


def maxwell_boltzmann_velocities(system: openmm.System, temperature_k: float, rng: np.random.Generator) -> np.ndarray:
    """Velocities (n, 3) nm/ps from the Maxwell-Boltzmann distribution; massless particles get 0."""
    kT = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin) * temperature_k
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    sigma = np.sqrt(np.divide(kT, masses, out=np.zeros_like(masses), where=masses > 0))
    return rng.standard_normal((masses.size, 3)) * sigma[:, None]


def _digest(x: np.ndarray) -> str:
    """Digest of positions (float64 bytes): identifies the state whose log q is remembered."""
    return hashlib.blake2b(np.ascontiguousarray(x, dtype=np.float64).tobytes(), digest_size=16).hexdigest()


class FlowIndependenceMove(MCMCMove):
    """Independence Metropolis-Hastings move with a Boltzmann-generator proposal.

    flow: a ``BoltzmannFlow``, or the path of a saved flow (loaded with ``load_flow``).
    flow_path: where ``flow`` is saved; needed to serialise the move (path + SHA-256 are stored,
        never the module). Implied when ``flow`` is a path.
    molecular_system: optional ``MolecularSystem``; checks that the flow was trained for it
        (``spec_hash``) and enables the chirality filter.
    reject_d_chirality: reject proposals with a D residue (needs ``molecular_system``); counted
        in ``n_rejected_chirality``. The filter restricts the target to L configurations.
    batch_size: proposals drawn per flow call.
    velocities: "keep" or "redraw" (Maxwell-Boltzmann at the state's temperature) on acceptance.
    seed: seeds the move's own numpy generator (acceptance, velocities, per-batch torch seeds).

    Statistics (like openmmtools moves): ``n_proposed``, ``n_accepted``, ``n_rejected_nonfinite``
    (non-finite proposal, log q or u), ``n_rejected_chirality``; ``statistics`` dict, ``reset_statistics()``.
    """

    def __init__(self, flow, flow_path: str | Path | None = None, molecular_system=None,
                 reject_d_chirality: bool = False, batch_size: int = 256, velocities: str = "keep",
                 seed: int = 0):
        super().__init__()
        if isinstance(flow, (str, Path)):
            flow_path = flow
            flow = load_flow(flow)
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if velocities not in _VELOCITY_MODES:
            raise ValueError(f"velocities must be one of {_VELOCITY_MODES}, got {velocities!r}")
        if reject_d_chirality and molecular_system is None:
            raise ValueError("reject_d_chirality=True needs molecular_system= (it provides the chirality check)")
        self.flow = flow
        self.flow_path = None if flow_path is None else str(Path(flow_path).resolve())
        self.flow_hash = None if flow_path is None else flow_file_hash(self.flow_path)
        self.molecular_system = molecular_system
        self.reject_d_chirality = bool(reject_d_chirality)
        self.batch_size = int(batch_size)
        self.velocities = velocities
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._batch_seed: int | None = None
        self._batch: tuple[np.ndarray, np.ndarray] | None = None
        self._batch_pos = 0
        self._current: tuple[str, float] | None = None  # (digest of positions, log q) of the state left
        self._check_system()
        self.reset_statistics()

    # ----------------------------------------------------------------- statistics
    def reset_statistics(self) -> None:
        """Zero all counters."""
        for key in _STAT_KEYS:
            setattr(self, key, 0)

    @property
    def statistics(self) -> dict[str, int]:
        """Counters as a dict (same keys as the attributes)."""
        return {key: int(getattr(self, key)) for key in _STAT_KEYS}

    @statistics.setter
    def statistics(self, value: dict) -> None:
        for key in _STAT_KEYS:
            setattr(self, key, int(value.get(key, 0)))

    @property
    def acceptance_rate(self) -> float:
        """n_accepted / n_proposed (NaN before the first proposal)."""
        return self.n_accepted / self.n_proposed if self.n_proposed else math.nan

    @property
    def n_atoms(self) -> int:
        n = getattr(self.flow, "n_atoms", None)
        if n is None:
            n = self._next_batch_shape()
        return int(n)

    # ----------------------------------------------------------------- move
    def apply(self, thermodynamic_state, sampler_state, context_cache=None):
        """One proposal from the flow, accepted or rejected; updates ``sampler_state`` in place."""
        n_particles = sampler_state.n_particles
        if n_particles != self.n_atoms:
            raise ValueError(f"the sampler state has {n_particles} particles but the flow models {self.n_atoms} "
                             "atoms: use a flow trained for this system")
        context, _ = self._get_context_cache(context_cache).get_context(thermodynamic_state)
        system = context.getSystem()  # thermodynamic_state.system would copy the System every move
        if system.getNumConstraints():
            raise ValueError(f"the system has {system.getNumConstraints()} constraints: flow proposals do not satisfy "
                             "them; build the system with constraints=None (as regflow_mm systems are)")
        y, log_q_y = self._next_proposal()
        log_uniform = math.log(self._rng.random())  # drawn for every proposal: keeps the stream aligned
        self.n_proposed += 1
        if not (np.isfinite(y).all() and np.isfinite(log_q_y)):
            self.n_rejected_nonfinite += 1
            return
        if self.reject_d_chirality and not bool(self.molecular_system.is_l(y[None])[0]):
            self.n_rejected_chirality += 1
            return

        sampler_state.apply_to_context(context, ignore_velocities=True)
        u_x = thermodynamic_state.reduced_potential(context)
        x = np.asarray(sampler_state.positions.value_in_unit(unit.nanometer), dtype=np.float64)
        key = _digest(x)
        if self._current is not None and self._current[0] == key:
            log_q_x = self._current[1]
        else:
            log_q_x = float(flow_log_prob(self.flow, x[None])[0])
            self._current = (key, log_q_x)
        context.setPositions(y * unit.nanometer)
        try:
            u_y = thermodynamic_state.reduced_potential(context)
        except openmm.OpenMMException:  # e.g. "Particle coordinate is NaN" on some platforms
            u_y = math.inf
        if not (math.isfinite(u_y) and not math.isnan(u_x) and not math.isnan(log_q_x)):
            self.n_rejected_nonfinite += 1
            return
        log_acceptance = -(u_y - u_x) + log_q_x - log_q_y
        if log_uniform < log_acceptance:
            sampler_state.positions = y * unit.nanometer
            self._current = (_digest(np.asarray(sampler_state.positions.value_in_unit(unit.nanometer),
                                                dtype=np.float64)), log_q_y)
            if self.velocities == "redraw":
                v = maxwell_boltzmann_velocities(system, thermodynamic_state.temperature.value_in_unit(unit.kelvin),
                                                 self._rng)
                sampler_state.velocities = v * unit.nanometer / unit.picosecond
            self.n_accepted += 1

    # ----------------------------------------------------------------- proposals
    def _draw_batch(self) -> None:
        if self._batch_seed is None:
            self._batch_seed = int(self._rng.integers(2**62))
            self._batch_pos = 0
        self._batch = sample_flow(self.flow, self.batch_size, self._batch_seed)

    def _next_batch_shape(self) -> int:
        if self._batch is None:
            self._draw_batch()
        return self._batch[0].shape[1]

    def _next_proposal(self) -> tuple[np.ndarray, float]:
        if self._batch is None or self._batch_pos >= self.batch_size:
            if self._batch is not None:
                self._batch_seed = None  # batch used up: the next one gets a fresh seed
            self._draw_batch()
        y, log_q = self._batch[0][self._batch_pos], float(self._batch[1][self._batch_pos])
        self._batch_pos += 1
        return y, log_q

    def _check_system(self) -> None:
        ms = self.molecular_system
        if ms is None:
            return
        check_spec_hash(getattr(self.flow, "spec_hash", None), ms, "the flow")
        n = getattr(self.flow, "n_atoms", None)
        if n is not None and int(n) != ms.n_atoms:
            raise ValueError(f"the flow models {n} atoms but {ms.name!r} has {ms.n_atoms}")

    # ----------------------------------------------------------------- serialisation
    def __getstate__(self):
        if self.flow_path is None:
            raise ValueError("cannot serialise a FlowIndependenceMove of an in-memory flow: save it with "
                             "flow.save(path) and pass flow_path=path")
        rng_state = self._rng.bit_generator.state
        return dict(flow_path=self.flow_path, flow_hash=self.flow_hash,
                    system_spec=None if self.molecular_system is None else self.molecular_system.spec.to_dict(),
                    reject_d_chirality=self.reject_d_chirality, batch_size=self.batch_size,
                    velocities=self.velocities, seed=self.seed,
                    rng_state={"bit_generator": rng_state["bit_generator"],
                               "state": {k: int(v) for k, v in rng_state["state"].items()},
                               "has_uint32": int(rng_state["has_uint32"]), "uinteger": int(rng_state["uinteger"])},
                    batch_seed=self._batch_seed, batch_pos=self._batch_pos,
                    current=None if self._current is None else list(self._current), **self.statistics)

    def __setstate__(self, state):
        path = require_flow_file(state["flow_path"], hint=f" (FlowIndependenceMove): restore it (hash "
                                 f"{state['flow_hash'][:12]}) or rebuild the move with the new path")
        actual = flow_file_hash(path)
        if actual != state["flow_hash"]:
            raise ValueError(f"FlowIndependenceMove: flow file {path} changed since the move was saved (hash "
                             f"{actual[:12]}, expected {state['flow_hash'][:12]}): restore the original flow file")
        self.flow = load_flow(path)
        self.flow_path, self.flow_hash = str(path), actual
        self.molecular_system = None
        if state.get("system_spec"):
            self.molecular_system = system_from_spec_dict(state["system_spec"])
        self.reject_d_chirality = bool(state["reject_d_chirality"])
        self.batch_size = int(state["batch_size"])
        self.velocities = state["velocities"]
        self.seed = int(state["seed"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng_state"]
        self._batch_seed = state["batch_seed"]
        self._batch_pos = int(state["batch_pos"])
        self._batch = None
        current = state.get("current")
        self._current = None if current is None else (str(current[0]), float(current[1]))
        if self._batch_seed is not None:
            self._draw_batch()  # the same seed regenerates the pending batch
        self._check_system()
        self.statistics = state

