"""The parallel-tempering engine: openmmtools ``ParallelTemperingSampler`` driven frame by frame.

See ``regflow_mm.data.tempering`` for the method, the settings and the storage layout. Kept apart
from the settings because importing openmmtools' multistate package takes ~1 s.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import openmm
from openmm import unit

from ..systems.molecular_system import MOLAR_GAS_CONSTANT
from ..systems.platforms import openmm_seed
from .tempering import TemperingSettings, storage_path, temperature_ladder

# openmmtools' multistate import pulls in pymbar, which logs a timeseries notice and a "JAX NOT FOUND"
# banner (harmless); import it quietly, as regflow_mm.sampling does.
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from openmmtools import cache, mcmc, states
    from openmmtools.multistate import MultiStateReporter, ParallelTemperingSampler
    from openmmtools.multistate.utils import SimulationNaNError

log = logging.getLogger(__name__)


class _QuietMultistate(logging.Filter):
    """Drops openmmtools.multistate's "API is experimental" warning and its per-iteration INFO chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "API is experimental" not in record.getMessage()


for _name in ("openmmtools.multistate.multistatesampler", "openmmtools.multistate.multistatereporter"):
    if not any(isinstance(f, _QuietMultistate) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_QuietMultistate())


def _storage_files(out: str | Path) -> tuple[Path, Path]:
    nc = storage_path(out)
    return nc, nc.with_name(nc.stem + "_checkpoint.nc")


class LangevinMiddleMove(mcmc.LangevinDynamicsMove):
    """``LangevinDynamicsMove`` integrating with OpenMM's ``LangevinMiddleIntegrator`` and a fixed seed.

    Same parameters as ``LangevinDynamicsMove`` (timestep, collision_rate, n_steps) plus ``random_seed``
    (1..2^31-1; the seed takes effect when the context cache creates the Context).
    """

    def __init__(self, random_seed: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.random_seed = int(random_seed)

    def _get_integrator(self, thermodynamic_state):
        integrator = openmm.LangevinMiddleIntegrator(thermodynamic_state.temperature, self.collision_rate,
                                                     self.timestep)
        integrator.setRandomNumberSeed(self.random_seed)
        return integrator

    def __getstate__(self):
        return {**super().__getstate__(), "random_seed": self.random_seed}

    def __setstate__(self, serialization):
        super().__setstate__(serialization)
        self.random_seed = int(serialization["random_seed"])


class TemperingSampler(ParallelTemperingSampler):
    """openmmtools ``ParallelTemperingSampler``, quiet (no citations) and writing MCMC moves only on checkpoints."""

    _global_citation_silence = True  # openmmtools prints its citation list on create/from_storage otherwise

    def _flatten_moves_iterator(self):
        """openmmtools' flattening of the MCMC moves (read for its timing estimate every iteration), without the
        deep copy its ``mcmc_moves`` property makes (a flow move would reload its flow file every time)."""
        def flatten(iterator):
            try:
                yield from [inner for move in iterator for inner in flatten(move)]
            except TypeError:  # not iterable: a single move
                yield iterator
        return flatten(self._mcmc_moves)

    def _report_iteration_items(self):
        """openmmtools' per-iteration record, but the MCMC moves (YAML, ~8 ms; flow moves carry counters and
        random streams) are rewritten only on checkpoint iterations, together with the replica states."""
        reporter, iteration = self._reporter, self._iteration
        reporter.write_sampler_states(self._sampler_states, iteration)
        reporter.write_replica_thermodynamic_states(self._replica_thermodynamic_states, iteration)
        if iteration % reporter.checkpoint_interval == 0:
            reporter.write_mcmc_moves(self._mcmc_moves)
        reporter.write_energies(self._energy_thermodynamic_states, self._neighborhoods,
                                self._energy_unsampled_states, iteration)
        reporter.write_mixing_statistics(self._n_accepted_matrix, self._n_proposed_matrix, iteration)


class _CappedReporter(MultiStateReporter):
    """``MultiStateReporter`` that offers no checkpoint after ``max_iteration`` to ``from_storage``."""

    max_iteration: int | None = None

    def read_checkpoint_iterations(self):
        iterations = super().read_checkpoint_iterations()
        return iterations if self.max_iteration is None else iterations[iterations <= self.max_iteration]


@contextlib.contextmanager
def numpy_global_rng(rng: np.random.RandomState):
    """Let openmmtools' replica mixing (which draws from ``np.random``) draw from ``rng`` instead."""
    saved = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(saved)


class ParallelTempering:
    """openmmtools ``ParallelTemperingSampler`` of a ``MolecularSystem`` for one dataset ``out``.

    ``timestep_fs`` (fs), ``friction_per_ps`` (1/ps), ``steps_per_iteration`` (MD steps between exchange
    attempts: the dataset's save interval); ``platform``/``properties``: OpenMM platform of the context
    caches; ``checkpoint_interval``: iterations between replica checkpoints (the dataset's commit chunk);
    ``md_system``: the openmm.System the replicas integrate (default ``system.system``; same potential, e.g.
    repartitioned hydrogen masses).
    Call ``create`` or ``restore``, then ``step`` once per frame; ``close`` at the end.
    """

    def __init__(self, system, settings: TemperingSettings, out: str | Path, timestep_fs: float,
                 friction_per_ps: float, steps_per_iteration: int, platform: str = "Reference",
                 properties: dict | None = None, seed: int = 0, checkpoint_interval: int = 100,
                 md_system: openmm.System | None = None):
        if not settings.t_max_K > system.temperature:
            raise ValueError(f"tempering t_max_K {settings.t_max_K} K must be above the system temperature "
                             f"{system.temperature} K (the bottom of the ladder): raise --pt-max-temperature")
        self.system, self.settings, self.seed = system, settings, int(seed)
        self.md_system = md_system if md_system is not None else system.system  # e.g. with HMR masses
        self.storage, self.checkpoint_storage = _storage_files(out)
        self.temperatures = temperature_ladder(system.temperature, settings.t_max_K, settings.n_replicas)
        self.timestep_fs, self.friction_per_ps = float(timestep_fs), float(friction_per_ps)
        self.steps_per_iteration = int(steps_per_iteration)
        self.platform, self.properties = openmm.Platform.getPlatformByName(platform), properties or None
        self.checkpoint_interval = int(checkpoint_interval)
        self.sampler: TemperingSampler | None = None
        self.n_swaps_accepted = self.n_swaps_proposed = 0

    @property
    def iteration(self) -> int:
        """Iterations done (0 after ``create``: the equilibrated start)."""
        return int(self.sampler.iteration)

    def _move(self, n_steps: int, iteration: int, stream: int = 0) -> LangevinMiddleMove:
        return LangevinMiddleMove(random_seed=openmm_seed(self.seed, iteration, stream), n_steps=int(n_steps),
                                  timestep=self.timestep_fs * unit.femtosecond,
                                  collision_rate=self.friction_per_ps / unit.picosecond)

    def _use_caches(self, iteration: int) -> None:
        """Fresh context caches on the chosen platform; noise and mixing seeded from (seed, iteration)."""
        self.sampler.energy_context_cache = cache.ContextCache(platform=self.platform,
                                                               platform_properties=self.properties)
        self.sampler.sampler_context_cache = cache.ContextCache(platform=self.platform,
                                                                platform_properties=self.properties)
        for move in self.sampler._mcmc_moves:
            move.random_seed = openmm_seed(self.seed, iteration, 0)
        self._mixing_rng = np.random.RandomState(openmm_seed(self.seed, iteration, 1))

    def create(self, equilibration_steps: int, n_iterations: int) -> None:
        """New storage (stale files of an earlier, uncommitted run are replaced); replicas start at the
        system's structure with Maxwell-Boltzmann velocities and ``equilibration_steps`` of unsaved
        dynamics at their temperatures; ``n_iterations``: planned length (``extend_to`` raises it)."""
        for path in (self.storage, self.checkpoint_storage):
            if path.exists():
                log.info("removing %s of an earlier run that committed no frames", path)
                path.unlink()
        thermo = states.ThermodynamicState(self.md_system, self.temperatures[0] * unit.kelvin)
        rng = np.random.default_rng([self.seed, 0])
        masses = np.array([self.md_system.getParticleMass(i).value_in_unit(unit.dalton)
                           for i in range(self.system.n_atoms)])
        equilibration = self._move(equilibration_steps, 0, stream=2)
        equilibration_cache = cache.ContextCache(platform=self.platform, platform_properties=self.properties)
        replicas = []
        for temperature in self.temperatures:
            sigma = np.sqrt(MOLAR_GAS_CONSTANT * temperature / np.where(masses > 0, masses, np.inf))  # nm/ps
            sampler_state = states.SamplerState(self.system.positions * unit.nanometer,
                                                velocities=rng.normal(size=(len(masses), 3)) * sigma[:, None]
                                                * unit.nanometer / unit.picosecond)
            if equilibration_steps:
                thermo.temperature = temperature * unit.kelvin
                equilibration.apply(thermo, sampler_state, context_cache=equilibration_cache)
            replicas.append(sampler_state)
        thermo.temperature = self.temperatures[0] * unit.kelvin
        self.sampler = TemperingSampler(mcmc_moves=self._move(self.steps_per_iteration, 0),
                                        number_of_iterations=int(n_iterations), online_analysis_interval=None,
                                        replica_mixing_scheme="swap-neighbors")
        reporter = MultiStateReporter(str(self.storage), checkpoint_interval=self.checkpoint_interval)
        self.sampler.create(thermo, replicas, reporter, temperatures=list(self.temperatures * unit.kelvin),
                            n_temperatures=len(self.temperatures))
        self._use_caches(0)
        log.info("parallel tempering of %s: %d replicas at %s K", self.system.name, len(self.temperatures),
                 ", ".join(f"{t:.1f}" for t in self.temperatures))

    def restore(self, max_iteration: int) -> int:
        """Reopen the storage at its newest checkpoint <= ``max_iteration``; returns that iteration.

        The checkpoint interval is the one the storage was created with.
        """
        if not (self.storage.is_file() and self.checkpoint_storage.is_file()):
            raise ValueError(f"cannot resume: the replica storage {self.storage} (+ {self.checkpoint_storage.name}) "
                             "of this tempering dataset is missing; put it back or choose another --out")
        reporter = _CappedReporter(str(self.storage), checkpoint_interval=self.checkpoint_interval)
        reporter.max_iteration = int(max_iteration)
        try:
            self.sampler = TemperingSampler.from_storage(reporter)
        except Exception as err:  # netCDF/openmmtools raise OSError, RuntimeError, KeyError on a damaged file
            reporter.close()
            raise ValueError(f"cannot resume from the replica storage {self.storage}: {type(err).__name__}: "
                             f"{err}".replace("\n", " ")) from None
        stored = np.array([s.temperature.value_in_unit(unit.kelvin) for s in self.sampler._thermodynamic_states])
        if stored.shape != self.temperatures.shape or not np.allclose(stored, self.temperatures, rtol=1e-9):
            self.close()
            raise ValueError(f"the replica storage {self.storage} holds temperatures {np.round(stored, 1).tolist()} "
                             f"K, not this dataset's ladder {np.round(self.temperatures, 1).tolist()} K; "
                             "choose another --out")
        self.checkpoint_interval = int(reporter.checkpoint_interval)
        self._use_caches(self.iteration)
        log.info("parallel tempering of %s resumes at iteration %d", self.system.name, self.iteration)
        return self.iteration

    def extend_to(self, n_iterations: int) -> None:
        """Let the sampler run up to ``n_iterations`` iterations."""
        if self.sampler.number_of_iterations < n_iterations:
            self.sampler.number_of_iterations = int(n_iterations)

    def step(self) -> tuple[np.ndarray, int]:
        """One iteration (swap attempts between neighbouring temperatures, then ``steps_per_iteration``
        Langevin steps of every replica). Returns the positions (n_atoms, 3) nm (float64) of the replica
        now at the system temperature and that replica's index."""
        try:
            with numpy_global_rng(self._mixing_rng):
                self.sampler.run(1)
        except SimulationNaNError as err:
            raise RuntimeError(f"{self.system.name}: a replica blew up in tempering iteration {self.iteration} "
                               f"({' '.join(str(err).split())}); use a smaller --timestep-fs or a lower "
                               "--pt-max-temperature") from None
        replica = int(np.flatnonzero(self.sampler._replica_thermodynamic_states == 0)[0])
        self.n_swaps_accepted += int(self.sampler._n_accepted_matrix.sum())
        self.n_swaps_proposed += int(self.sampler._n_proposed_matrix.sum())
        positions = self.sampler._sampler_states[replica].positions.value_in_unit(unit.nanometer)
        return np.array(positions, dtype=np.float64), replica

    @property
    def swap_acceptance(self) -> float:
        """Fraction of swap attempts accepted in this process (nan before any)."""
        return self.n_swaps_accepted / self.n_swaps_proposed if self.n_swaps_proposed else float("nan")

    def close(self) -> None:
        """Close the storage (everything up to the last iteration is on disk)."""
        if self.sampler is not None and self.sampler._reporter is not None:
            self.sampler._reporter.close()
