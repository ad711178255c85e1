"""Parallel tempering with flow moves: openmmtools ``ParallelTemperingSampler`` whose replicas run
``SequenceMove([Langevin, FlowIndependenceMove, ...])``.

Each thermodynamic state (temperature T_i) gets its own move: ``md_steps`` Langevin steps
(``LangevinMiddleIntegrator``, seeded) then ``flow_moves`` independence proposals from one flow,
each with its own random stream. The flow's density q(x) does not depend on T; the acceptance
min(1, exp(-[u_i(y) - u_i(x)]) q(x) / q(y)) uses the reduced potential u_i = U / kT_i of the state
the replica is in (``FlowIndependenceMove`` reads it from the thermodynamic state), so every
state's move leaves its own Boltzmann distribution invariant and the exchanges stay exact. The
flow is typically best at the temperature it was trained for and broadens nothing at the hot end;
hot replicas still cross barriers by dynamics and hand states down the ladder.

All replicas must be one system at different temperatures (a flow models one Hamiltonian);
states of different systems, pressures or alchemical states are refused.

Storage (``run_flow_tempering``): openmmtools' ``MultiStateReporter`` files ``<out>`` (.nc) and
``<out stem>_checkpoint.nc``; positions, velocities and move states (flow path, SHA-256, random
streams, counters) every ``checkpoint_interval`` iterations. Rerunning the same command resumes at
the newest checkpoint (later iterations are rewritten, none is duplicated); a flow file that changed
since is a one-line error.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from openmm import unit
from openmmtools import cache, mcmc, states

from regflow_mm.data.parallel_tempering import LangevinMiddleMove, TemperingSampler, numpy_global_rng
from regflow_mm.data.tempering import temperature_ladder
from regflow_mm.flows import flow_file_hash, load_flow, require_flow_file
from regflow_mm.progress import progress_bar
from regflow_mm.sampling.moves import FlowIndependenceMove, maxwell_boltzmann_velocities
from regflow_mm.systems.platforms import openmm_seed

log = logging.getLogger(__name__)


def check_one_system(thermodynamic_states) -> None:
    """ValueError unless all states are one system (same forces and parameters) at different temperatures."""
    if len(thermodynamic_states) < 2:
        raise ValueError(f"tempering needs at least two thermodynamic states, got {len(thermodynamic_states)}")
    first = thermodynamic_states[0]
    for i, state in enumerate(thermodynamic_states):
        if isinstance(state, states.CompoundThermodynamicState):
            raise ValueError(f"replica state {i} is a CompoundThermodynamicState (alchemical/restrained): flow moves "
                             "need states that differ only in temperature")
        if not first.is_state_compatible(state) or state.pressure != first.pressure:
            raise ValueError(f"replica state {i} is another system than state 0 (forces, parameters or pressure "
                             "differ): a flow models one system; give states that differ only in temperature")


def flow_tempering_moves(flow_path, n_states: int, *, md_steps: int, timestep_fs: float, friction_per_ps: float,
                         flow_moves: int = 1, molecular_system=None, reject_d_chirality: bool = False,
                         batch_size: int = 256, seed: int = 0) -> list:
    """One ``SequenceMove([LangevinMiddleMove, FlowIndependenceMove x flow_moves])`` per state.

    timestep_fs (fs), friction_per_ps (1/ps); every flow move has its own seed from (seed, state, k).
    """
    if md_steps < 0 or flow_moves < 1:
        raise ValueError(f"need md_steps >= 0 and flow_moves >= 1, got {md_steps}, {flow_moves}")
    flow = load_flow(flow_path)
    moves = []
    for i in range(n_states):
        parts = [] if md_steps == 0 else [LangevinMiddleMove(
            random_seed=openmm_seed(seed, i, 0), n_steps=int(md_steps), timestep=timestep_fs * unit.femtosecond,
            collision_rate=friction_per_ps / unit.picosecond)]
        parts += [FlowIndependenceMove(flow, flow_path=flow_path, molecular_system=molecular_system,
                                       reject_d_chirality=reject_d_chirality, batch_size=batch_size,
                                       seed=int(np.random.SeedSequence([seed, i, k + 1]).generate_state(1)[0]))
                  for k in range(flow_moves)]
        moves.append(mcmc.SequenceMove(parts))
    return moves


def _parts(move, cls) -> list:
    """The moves of class ``cls`` inside a (sequence) move. openmmtools' MCMCMove metaclass answers
    ``isinstance`` by duck typing (any move has ``apply``), so the class is looked up in the MRO."""
    return [m for m in getattr(move, "move_list", [move]) if cls in type(m).__mro__]


def flow_moves_of(move) -> list[FlowIndependenceMove]:
    """The ``FlowIndependenceMove`` s inside a state's move."""
    return _parts(move, FlowIndependenceMove)


class FlowTempering:
    """An openmmtools ``ParallelTemperingSampler`` with flow moves, created or reopened on ``storage``.

    Use ``create(thermodynamic_states, positions, moves, n_iterations)`` or ``restore()``, then ``step()``
    per iteration; ``close()`` at the end. ``platform``: OpenMM platform of the context caches.
    """

    def __init__(self, storage: str | Path, *, platform: str = "Reference", seed: int = 0,
                 checkpoint_interval: int = 1):
        if checkpoint_interval < 1:
            raise ValueError(f"checkpoint_interval must be >= 1, got {checkpoint_interval}")
        self.storage = Path(storage)
        self.platform, self.seed, self.checkpoint_interval = platform, int(seed), int(checkpoint_interval)
        self.sampler: TemperingSampler | None = None
        self.n_swaps_accepted = self.n_swaps_proposed = 0

    def create(self, thermodynamic_states, positions, moves, n_iterations: int) -> None:
        """New storage: replicas start at ``positions`` (n, 3) nm with Maxwell-Boltzmann velocities at their
        temperatures; ``moves``: one per state (``flow_tempering_moves``)."""
        check_one_system(thermodynamic_states)
        if len(moves) != len(thermodynamic_states):
            raise ValueError(f"{len(moves)} moves for {len(thermodynamic_states)} states: give one move per state")
        temperatures = [s.temperature for s in thermodynamic_states]
        if any(b <= a for a, b in zip(temperatures, temperatures[1:])):
            raise ValueError("replica temperatures must increase: "
                             f"{[round(t.value_in_unit(unit.kelvin), 2) for t in temperatures]} K")
        system = thermodynamic_states[0].system
        replicas = []
        for i, state in enumerate(thermodynamic_states):
            v = maxwell_boltzmann_velocities(system, state.temperature.value_in_unit(unit.kelvin),
                                             np.random.default_rng([self.seed, i]))
            replicas.append(states.SamplerState(np.asarray(positions) * unit.nanometer,
                                                velocities=v * unit.nanometer / unit.picosecond))
        for path in self._files():
            if path.exists():
                path.unlink()
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        self.sampler = TemperingSampler(mcmc_moves=moves, number_of_iterations=int(n_iterations),
                                        online_analysis_interval=None, replica_mixing_scheme="swap-neighbors")
        reporter = states_reporter(self.storage, self.checkpoint_interval)
        self.sampler.create(thermodynamic_states[0], replicas, reporter, temperatures=temperatures,
                            n_temperatures=len(temperatures))
        self._use_caches()

    def restore(self) -> int:
        """Reopen the storage at its newest checkpoint; returns that iteration."""
        from openmmtools.multistate import MultiStateReporter

        reporter = MultiStateReporter(str(self.storage), open_mode="r+")
        try:
            self.sampler = TemperingSampler.from_storage(reporter)
        except ValueError:
            reporter.close()
            raise
        except Exception as err:  # netCDF/openmmtools raise OSError, RuntimeError, KeyError on a damaged file
            reporter.close()
            raise ValueError(f"cannot resume from {self.storage}: {type(err).__name__}: {err}".replace("\n", " ")
                             ) from None
        self._use_caches()
        return self.iteration

    def _files(self) -> tuple[Path, Path]:
        return self.storage, self.storage.with_name(self.storage.stem + "_checkpoint.nc")

    def _use_caches(self) -> None:
        self.sampler.energy_context_cache = cache.ContextCache(platform=_platform(self.platform))
        self.sampler.sampler_context_cache = cache.ContextCache(platform=_platform(self.platform))
        for i, move in enumerate(self.sampler._mcmc_moves):
            for part in _parts(move, LangevinMiddleMove):
                part.random_seed = openmm_seed(self.seed, i, self.iteration)
        self._mixing_rng = np.random.RandomState(openmm_seed(self.seed, self.iteration, 1))

    @property
    def iteration(self) -> int:
        return int(self.sampler.iteration)

    @property
    def temperatures(self) -> np.ndarray:
        """(n_states,) K."""
        return np.array([s.temperature.value_in_unit(unit.kelvin) for s in self.sampler._thermodynamic_states])

    def step(self) -> np.ndarray:
        """One iteration (neighbour swaps, then every replica's move); returns the positions
        (n_states, n, 3) nm of the replica in each state after it."""
        if self.sampler.iteration >= self.sampler.number_of_iterations:
            self.sampler.number_of_iterations = self.sampler.iteration + 1
        with numpy_global_rng(self._mixing_rng):
            self.sampler.run(1)
        self.n_swaps_accepted += int(self.sampler._n_accepted_matrix.sum())
        self.n_swaps_proposed += int(self.sampler._n_proposed_matrix.sum())
        return self.state_positions()

    def state_positions(self) -> np.ndarray:
        """Positions (n_states, n, 3) nm of the replica now in each state."""
        order = np.argsort(self.sampler._replica_thermodynamic_states)
        return np.stack([self.sampler._sampler_states[r].positions.value_in_unit(unit.nanometer) for r in order])

    def flow_statistics(self) -> list[dict]:
        """Per state: flow proposals and acceptances summed over its flow moves, acceptance rate."""
        out = []
        for move in self.sampler._mcmc_moves:
            parts = flow_moves_of(move)
            n_prop = sum(m.n_proposed for m in parts)
            n_acc = sum(m.n_accepted for m in parts)
            out.append({"n_proposed": n_prop, "n_accepted": n_acc,
                        "acceptance": n_acc / n_prop if n_prop else math.nan})
        return out

    @property
    def swap_acceptance(self) -> float:
        """Fraction of swap attempts accepted in this process (nan before any)."""
        return self.n_swaps_accepted / self.n_swaps_proposed if self.n_swaps_proposed else math.nan

    def close(self) -> None:
        if self.sampler is not None and self.sampler._reporter is not None:
            self.sampler._reporter.close()


def states_reporter(storage: Path, checkpoint_interval: int):
    """openmmtools ``MultiStateReporter`` on ``storage`` writing checkpoints every ``checkpoint_interval``."""
    from openmmtools.multistate import MultiStateReporter

    return MultiStateReporter(str(storage), checkpoint_interval=int(checkpoint_interval))


def _platform(name: str):
    import openmm

    return openmm.Platform.getPlatformByName(name)


def run_flow_tempering(system, flow_path: str | Path, out: str | Path, n_iterations: int, *, n_replicas: int = 4,
                       t_max_K: float = 600.0, md_steps: int = 500, timestep_fs: float = 1.0,
                       friction_per_ps: float | None = None, flow_moves: int = 1, reject_d_chirality: bool = True,
                       batch_size: int = 256, seed: int = 0, platform: str = "Reference",
                       checkpoint_interval: int = 1, progress: bool = True) -> dict:
    """Parallel tempering of a ``MolecularSystem`` (or name) with flow moves until ``out`` holds ``n_iterations``.

    Temperatures: geometric ladder from the system's temperature to ``t_max_K`` (K), ``n_replicas``.
    md_steps Langevin steps of timestep_fs fs (friction 1/ps, default the system's) and ``flow_moves``
    proposals of the flow at ``flow_path`` per replica and iteration. Reruns with the same ``out``
    resume. Returns temperatures (K), flow acceptance per state, swap acceptance (this run),
    iterations, and the phi statistics of the lowest temperature over the stored checkpoints
    (every ``checkpoint_interval`` iterations).
    """
    from regflow_mm.sampling.hybrid import phi_statistics
    from regflow_mm.systems import get_system

    if isinstance(system, str):
        system = get_system(system)
    if n_iterations < 1 or n_replicas < 2:
        raise ValueError(f"need n_iterations >= 1 and n_replicas >= 2, got {n_iterations}, {n_replicas}")
    if not t_max_K > system.temperature:
        raise ValueError(f"t_max_K {t_max_K} K must be above the system temperature {system.temperature} K")
    flow_path = require_flow_file(flow_path)
    load_flow(flow_path, system=system)  # the flow must be one of this system: one-line error otherwise
    out = Path(out)
    engine = FlowTempering(out, platform=platform, seed=seed, checkpoint_interval=checkpoint_interval)
    ladder = temperature_ladder(system.temperature, t_max_K, n_replicas)
    if out.exists():
        engine.restore()
        if engine.temperatures.shape != ladder.shape or not np.allclose(engine.temperatures, ladder, rtol=1e-9):
            engine.close()
            raise ValueError(f"{out} holds temperatures {np.round(engine.temperatures, 1).tolist()} K, not "
                             f"{np.round(ladder, 1).tolist()} K: use the same ladder or another --out")
        stored = {m.flow_hash for move in engine.sampler._mcmc_moves for m in flow_moves_of(move)}
        if stored != {flow_file_hash(flow_path)}:
            engine.close()
            raise ValueError(f"{out} was run with another flow file than {flow_path}: resume with the original "
                             "flow or choose another --out")
    else:
        thermo = [states.ThermodynamicState(system.system, t * unit.kelvin) for t in ladder]
        moves = flow_tempering_moves(flow_path, n_replicas, md_steps=md_steps, timestep_fs=timestep_fs,
                                     friction_per_ps=system.spec.friction if friction_per_ps is None
                                     else friction_per_ps, flow_moves=flow_moves, molecular_system=system,
                                     reject_d_chirality=reject_d_chirality, batch_size=batch_size, seed=seed)
        engine.create(thermo, system.positions, moves, n_iterations)
    bar = progress_bar(total=n_iterations, initial=min(engine.iteration, n_iterations), unit="it",
                       desc=f"flow tempering {system.name}", disable=not progress, dynamic_ncols=True, mininterval=1.0)
    try:
        while engine.iteration < n_iterations:
            engine.step()
            bar.update(1)
        frames = _lowest_state_frames(engine)
        summary = {"n_iterations": engine.iteration, "temperatures_K": engine.temperatures.tolist(),
                   "flow": engine.flow_statistics(), "swap_acceptance": engine.swap_acceptance,
                   "n_frames": int(frames.shape[0]), "checkpoint_interval": engine.checkpoint_interval}
    finally:
        bar.close()
        engine.close()
    if frames.shape[0] > 1:
        summary.update(phi_statistics(frames[:, None], system.torsions))
    return summary


def _lowest_state_frames(engine: FlowTempering) -> np.ndarray:
    """(F, n, 3) nm: the replica at the lowest temperature at every stored checkpoint iteration >= 1."""
    reporter = engine.sampler._reporter
    frames = []
    for iteration in reporter.read_checkpoint_iterations():
        if not 1 <= iteration <= engine.iteration:
            continue
        replica_states = reporter.read_replica_thermodynamic_states(iteration)
        sampler_states = reporter.read_sampler_states(iteration)
        replica = int(np.flatnonzero(np.asarray(replica_states) == 0)[0])
        frames.append(sampler_states[replica].positions.value_in_unit(unit.nanometer))
    return np.asarray(frames, dtype=np.float64).reshape((-1,) + engine.state_positions().shape[1:])
