"""Molecular dynamics in OpenMM on a flow potential U_flow(x) = -kT log q(x) (the exported force).

``run_md(system, positions, flow=None, mode=..., integrator=..., steps=...)`` runs one trajectory on
OpenMM's Reference platform and returns an :class:`MDRun`
(``run_flow_walkers(system, starts, flow, ...)``: many Langevin walkers on the flow potential in one Context):

- ``mode="flow"``: the flow force is the whole potential (a System of the molecule's masses);
- ``mode="bias"``: the force field plus the flow force in its own force group (``flow_group``);
- ``mode="forcefield"``: the force field alone (the reference for the same steps and timestep).

``integrator="verlet"`` (NVE, ``openmm.VerletIntegrator``) or ``"langevin"``
(``openmm.LangevinMiddleIntegrator`` at ``temperature_K`` with ``friction_per_ps``), optionally after
``equilibrate_steps`` Langevin steps (same timestep); ``hydrogen_mass_amu`` repartitions the masses
(``systems.masses``: same configurational ensemble, 2 fs steps).

Nothing fails silently: the positions of every step are checked (finite, and inside the flow's
support where the flow has one: ``representation.describe_outside``), and the energies at every
report. The first failure stops the run and is reported in ``MDRun.failure`` with its step and, for a
configuration outside the support, the coordinate that left it (bond/angle/torsion, atoms, value,
bounds). Units: nm, ps, kJ/mol, K.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import openmm
from openmm import unit

from ..systems import MOLAR_GAS_CONSTANT
from ..systems.platforms import openmm_seed
from .forces import flow_force

MODES = ("flow", "bias", "forcefield")
INTEGRATORS = ("verlet", "langevin")


@dataclass
class MDRun:
    """One trajectory. Energies (kJ/mol) at each report (every ``report_every`` steps, step 0 included);
    ``flow_energy``: the flow force group's energy (mode "flow" and "bias"), else None; ``positions``:
    saved frames (S, n_atoms, 3) nm every ``save_every`` steps; ``failure``: None or
    {"step", "time_ps", "reason"}; ``seconds``: wall time of the production steps (reports included)."""

    mode: str
    integrator: str
    timestep_ps: float
    steps: int
    steps_done: int
    n_dof: int
    report_steps: np.ndarray
    potential: np.ndarray
    kinetic: np.ndarray
    flow_energy: np.ndarray | None
    positions: np.ndarray
    seconds: float
    failure: dict | None = None
    settings: dict = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """The whole run finished with finite positions and energies."""
        return self.failure is None and self.steps_done == self.steps

    @property
    def total(self) -> np.ndarray:
        return self.potential + self.kinetic

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps_done, 1)

    @property
    def temperature(self) -> np.ndarray:
        """Kinetic temperature (K) at each report, from the kinetic energy and ``n_dof``."""
        return kinetic_temperature(self.kinetic, self.n_dof)

    def energy_fluctuation_per_dof(self) -> float:
        """Standard deviation of the total energy over the reports divided by the degrees of freedom
        (kJ/mol per DOF): the NVE conservation measure of the smooth-flows paper. NaN if the run failed."""
        if not self.finite:
            return float("nan")
        return float(np.std(self.total)) / self.n_dof

    def summary(self) -> dict:
        out = {"mode": self.mode, "integrator": self.integrator, "timestep_fs": self.timestep_ps * 1000.0,
               "steps": self.steps, "steps_done": self.steps_done, "ps": self.steps_done * self.timestep_ps,
               "finite": self.finite, "failure": self.failure, "n_dof": self.n_dof,
               "ms_per_step": 1000.0 * self.seconds_per_step, "seconds": self.seconds, **self.settings}
        if self.integrator == "verlet" and self.finite:
            out["energy_fluctuation_per_dof"] = self.energy_fluctuation_per_dof()
            out["total_energy_drift"] = float(self.total[-1] - self.total[0])
        return out


def kinetic_temperature(kinetic_kJ, n_dof: int):
    """Kinetic temperature (K) 2 E_kin / (n_dof R) of kinetic energies in kJ/mol (a number or an array)."""
    return 2.0 * np.asarray(kinetic_kJ, dtype=np.float64) / (n_dof * MOLAR_GAS_CONSTANT)


def _kj(quantity) -> float:
    return quantity.value_in_unit(unit.kilojoule_per_mole)


def build_md_system(molecular_system, flow=None, mode: str = "flow", backend: str = "torch", flow_group: int = 1,
                    hydrogen_mass_amu: float | None = None, remove_cm_motion: bool = False,
                    model_path=None) -> openmm.System:
    """The openmm.System of ``mode`` (module docstring); the force field's CMMotionRemover is dropped
    unless ``remove_cm_motion`` (it is not part of the potential and breaks NVE energy conservation)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "forcefield" and flow is None:
        raise ValueError(f"mode {mode!r} needs a flow (the flow potential -kT log q)")
    base = molecular_system.system
    if hydrogen_mass_amu:
        from ..systems.masses import repartition_hydrogen_mass

        base = repartition_hydrogen_mass(base, molecular_system.topology, hydrogen_mass_amu)
    if mode == "flow":
        md = openmm.System()
        for i in range(base.getNumParticles()):
            md.addParticle(base.getParticleMass(i))
    else:
        md = openmm.XmlSerializer.clone(base)
        for i in reversed(range(md.getNumForces())):
            if isinstance(md.getForce(i), openmm.CMMotionRemover) and not remove_cm_motion:
                md.removeForce(i)
        used = {md.getForce(i).getForceGroup() for i in range(md.getNumForces())}
        if mode == "bias" and flow_group in used:
            raise ValueError(f"force group {flow_group} is already used by the force field (groups {sorted(used)}): "
                             "pick another flow_group for the flow force")
    if mode != "forcefield":
        # Built into the System that runs: a System holding a TorchForce must not be copied (forces.py).
        md.addForce(flow_force(flow, backend=backend, force_group=flow_group if mode == "bias" else 0,
                               path=model_path))
    return md


def run_md(molecular_system, positions, flow=None, *, mode: str = "flow", integrator: str = "verlet",
           steps: int = 1000, timestep_fs: float = 1.0, temperature_K: float | None = None,
           friction_per_ps: float = 1.0, equilibrate_steps: int = 0, hydrogen_mass_amu: float | None = None,
           backend: str = "torch", flow_group: int = 1, report_every: int = 10, save_every: int = 0,
           check_every: int = 1, seed: int = 0, model_path=None, max_temperature_factor: float = 10.0) -> MDRun:
    """One trajectory from ``positions`` (n_atoms, 3) nm; see the module docstring.

    Velocities are drawn at ``temperature_K`` (default: the system's) with ``seed``; the Langevin
    integrators use ``seed`` too. ``check_every``: steps between position checks (1: every step, so a
    failure is reported at its exact step). A kinetic temperature above ``max_temperature_factor`` x
    ``temperature_K`` at a report is a failure too (a runaway on a too-stiff potential stays finite for long).
    """
    if integrator not in INTEGRATORS:
        raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")
    _check_run_settings(steps, report_every, check_every, timestep_fs, max_temperature_factor)
    temperature = float(temperature_K or molecular_system.temperature)
    system = build_md_system(molecular_system, flow, mode, backend, flow_group, hydrogen_mass_amu,
                             model_path=model_path)
    dt = timestep_fs * 1e-3
    if integrator == "verlet":
        integ = openmm.VerletIntegrator(dt)
    else:
        integ = openmm.LangevinMiddleIntegrator(temperature, friction_per_ps, dt)
        integ.setRandomNumberSeed(openmm_seed(seed, 0))  # OpenMM reads seed 0 as "random": derive one
    context = openmm.Context(system, integ, openmm.Platform.getPlatformByName("Reference"))
    x0 = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    context.setPositions(x0)
    context.setVelocitiesToTemperature(temperature, openmm_seed(seed, 1))
    rep = getattr(flow, "representation", None) if mode != "forcefield" else None
    # Positions are checked for being finite every step; against the support only where it has walls
    # (support "open" covers every configuration of finite positions).
    describe = getattr(rep, "describe_outside", None) if getattr(rep, "hard_walls", False) else None
    flow_groups = {0} if mode == "flow" else ({flow_group} if mode == "bias" else None)
    settings = {"temperature_K": temperature, "hydrogen_mass_amu": hydrogen_mass_amu, "backend": backend,
                "seed": seed, "equilibrate_steps": int(equilibrate_steps),
                "friction_per_ps": friction_per_ps if integrator == "langevin" else None}

    failure = None
    if equilibrate_steps:
        eq = openmm.LangevinMiddleIntegrator(temperature, friction_per_ps, dt)
        eq.setRandomNumberSeed(openmm_seed(seed, 2))
        eq_context = openmm.Context(system, eq, openmm.Platform.getPlatformByName("Reference"))
        eq_context.setPositions(x0)
        eq_context.setVelocitiesToTemperature(temperature, openmm_seed(seed, 1))
        _, failure = _advance(eq_context, eq, int(equilibrate_steps), check_every, describe, dt, "equilibration ")
        if failure is None:
            state = eq_context.getState(getPositions=True, getVelocities=True)
            context.setPositions(state.getPositions())
            context.setVelocities(state.getVelocities())
        del eq_context

    # Every potential here is invariant under rigid motions (flow: internal coordinates or mean-free;
    # force field: no cutoff or periodic box, CMMotionRemover dropped): 6 conserved DOF are not counted.
    n_dof = 3 * system.getNumParticles() - 6
    report_steps, pot, kin, flow_e, frames = [], [], [], [], []
    done, started = 0, time.perf_counter()
    if failure is None:
        while True:
            if done % report_every == 0 or done == steps:
                state = context.getState(getEnergy=True)
                e_pot, e_kin = _kj(state.getPotentialEnergy()), _kj(state.getKineticEnergy())
                report_steps.append(done)
                pot.append(e_pot)
                kin.append(e_kin)
                if flow_groups is not None:
                    flow_e.append(e_pot if mode == "flow" else
                                  _kj(context.getState(getEnergy=True, groups=flow_groups).getPotentialEnergy()))
                if not (math.isfinite(e_pot) and math.isfinite(e_kin)):
                    failure = {"step": done, "time_ps": done * dt,
                               "reason": f"non-finite energy (potential {e_pot}, kinetic {e_kin} kJ/mol)"}
                    break
                t_kin = float(kinetic_temperature(e_kin, n_dof))
                if t_kin > max_temperature_factor * temperature:
                    failure = _runaway(done, dt, t_kin, max_temperature_factor, temperature)
                    break
            if save_every and done % save_every == 0:
                frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            if done >= steps:
                break
            n = _steps_to_next_stop(done, steps, report_every, save_every)
            advanced, failure = _advance(context, integ, n, check_every, describe, dt, "", offset=done)
            done += advanced
            if failure is not None:
                break
    seconds = time.perf_counter() - started
    return MDRun(mode=mode, integrator=integrator, timestep_ps=dt, steps=int(steps), steps_done=done, n_dof=n_dof,
                 report_steps=np.array(report_steps), potential=np.array(pot), kinetic=np.array(kin),
                 flow_energy=np.array(flow_e) if flow_groups is not None else None,
                 positions=np.array(frames).reshape(-1, system.getNumParticles(), 3), seconds=seconds,
                 failure=failure, settings=settings)


def run_flow_walkers(molecular_system, starts, flow, *, steps: int = 1000, timestep_fs: float = 1.0,
                     temperature_K: float | None = None, friction_per_ps: float = 1.0,
                     hydrogen_mass_amu: float | None = None, backend: str = "torch", report_every: int = 10,
                     save_every: int = 0, check_every: int = 1, seed: int = 0,
                     max_temperature_factor: float = 10.0) -> list[MDRun]:
    """Langevin walkers on the flow potential alone, all in one OpenMM Context; one ``MDRun`` per walker.

    ``starts`` (W, n_atoms, 3) nm. The System holds W non-interacting copies of the molecule (the force field's
    masses, or hydrogens of ``hydrogen_mass_amu``) and one flow force that evaluates them as one batch
    (``flow_force(copies=W)``): W independent trajectories (the Langevin noise is drawn per particle) for about
    the cost of one, since a flow's cost per configuration is call overhead at batch size 1 (BENCHMARKS.md).
    Each walker's kinetic energy comes from its own velocities, its flow energy (kJ/mol) from ``flow.energy``
    of its positions at each report; its ``seconds`` is its share (1/W) of the Context's wall time. Checks as in
    ``run_md``, per walker: the first failure (non-finite positions or energy, leaving a support, runaway
    kinetic temperature) stops the Context; that walker's run holds the failure, the others stop at the same step
    (not finite, failure None). Other arguments as ``run_md``.
    """
    import torch

    from ..flows.sampling import flow_dtype

    starts = np.asarray(starts, dtype=np.float64)
    n_atoms = molecular_system.n_atoms
    if starts.ndim != 3 or starts.shape[1:] != (n_atoms, 3) or len(starts) < 1:
        raise ValueError(f"starts must have shape (walkers, {n_atoms}, 3) nm, got {starts.shape}")
    _check_run_settings(steps, report_every, check_every, timestep_fs, max_temperature_factor)
    n_walkers = len(starts)
    temperature = float(temperature_K or molecular_system.temperature)
    one = build_md_system(molecular_system, flow, "forcefield", hydrogen_mass_amu=hydrogen_mass_amu)
    masses = np.array([one.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n_atoms)])
    system = openmm.System()
    for _ in range(n_walkers):
        for m in masses:
            system.addParticle(m)
    system.addForce(flow_force(flow, backend=backend, copies=n_walkers))
    dt = timestep_fs * 1e-3
    integ = openmm.LangevinMiddleIntegrator(temperature, friction_per_ps, dt)
    integ.setRandomNumberSeed(openmm_seed(seed, 0))
    context = openmm.Context(system, integ, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(starts.reshape(-1, 3))
    context.setVelocitiesToTemperature(temperature, openmm_seed(seed, 1))
    rep = flow.representation
    describe = (lambda x: rep.describe_outside(np.asarray(x).reshape(-1, n_atoms, 3))) \
        if getattr(rep, "hard_walls", False) else None
    dtype = flow_dtype(flow)
    n_dof = 3 * n_atoms - 6  # per walker: its flow energy is invariant under its own rigid motions
    settings = {"temperature_K": temperature, "hydrogen_mass_amu": hydrogen_mass_amu, "backend": backend,
                "seed": seed, "equilibrate_steps": 0, "friction_per_ps": friction_per_ps,
                "walkers_per_context": n_walkers}

    report_steps, pot, kin, frames = [], [], [], []
    failure, failed, done, started = None, None, 0, time.perf_counter()
    while True:
        if done % report_every == 0 or done == steps or (save_every and done % save_every == 0):
            state = context.getState(getPositions=True, getVelocities=True)
            x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer).reshape(n_walkers, n_atoms, 3)
            if done % report_every == 0 or done == steps:
                v = state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
                e_kin = 0.5 * (masses[None, :, None] * np.asarray(v).reshape(n_walkers, n_atoms, 3) ** 2).sum((1, 2))
                with torch.no_grad():
                    e_pot = flow.energy(torch.as_tensor(np.asarray(x), dtype=dtype)).double().numpy()
                report_steps.append(done)
                pot.append(e_pot)
                kin.append(e_kin)
                bad = ~(np.isfinite(e_pot) & np.isfinite(e_kin))
                hot = kinetic_temperature(e_kin, n_dof) > max_temperature_factor * temperature
                if bad.any():
                    failed = int(np.flatnonzero(bad)[0])
                    failure = {"step": done, "time_ps": done * dt,
                               "reason": f"non-finite energy (potential {e_pot[failed]}, kinetic {e_kin[failed]} kJ/mol)"}
                    break
                if hot.any():
                    failed = int(np.flatnonzero(hot)[0])
                    failure = _runaway(done, dt, float(kinetic_temperature(e_kin[failed], n_dof)),
                                       max_temperature_factor, temperature)
                    break
            if save_every and done % save_every == 0:
                frames.append(np.asarray(x))
        if done >= steps:
            break
        n = _steps_to_next_stop(done, steps, report_every, save_every)
        advanced, failure = _advance(context, integ, n, check_every, describe, dt, "", offset=done)
        done += advanced
        if failure is not None:
            x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            nonfinite = np.flatnonzero(~np.isfinite(np.asarray(x).reshape(n_walkers, -1)).all(1))
            outside = [k for k in range(n_walkers) if describe is not None and nonfinite.size == 0
                       and rep.describe_outside(np.asarray(x).reshape(n_walkers, n_atoms, 3)[k:k + 1]) is not None]
            failed = int(nonfinite[0]) if nonfinite.size else (outside[0] if outside else 0)
            if not nonfinite.size and not outside:
                failure["reason"] += f" (all {n_walkers} walkers of the context)"
            break
    seconds = (time.perf_counter() - started) / n_walkers
    pot, kin = np.array(pot).reshape(-1, n_walkers), np.array(kin).reshape(-1, n_walkers)
    frames = np.array(frames).reshape(-1, n_walkers, n_atoms, 3)
    return [MDRun(mode="flow", integrator="langevin", timestep_ps=dt, steps=int(steps), steps_done=done,
                  n_dof=n_dof, report_steps=np.array(report_steps), potential=pot[:, k], kinetic=kin[:, k],
                  flow_energy=pot[:, k].copy(), positions=frames[:, k], seconds=seconds,
                  failure=failure if k == failed else None, settings={**settings, "walker": k})
            for k in range(n_walkers)]


def _check_run_settings(steps, report_every, check_every, timestep_fs, max_temperature_factor) -> None:
    for name, value in (("steps", steps), ("report_every", report_every), ("check_every", check_every)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not timestep_fs > 0 or not max_temperature_factor > 0:
        raise ValueError(f"timestep_fs and max_temperature_factor must be > 0, got {timestep_fs}, "
                         f"{max_temperature_factor}")


def _runaway(step: int, dt: float, t_kin: float, factor: float, temperature: float) -> dict:
    """The failure of a trajectory whose kinetic temperature ``t_kin`` (K) exceeded ``factor`` x ``temperature``."""
    return {"step": step, "time_ps": step * dt,
            "reason": f"ran away: kinetic temperature {t_kin:.4g} K, more than {factor:g} x {temperature:g} K "
                      f"(a smaller timestep, or a smoother potential)"}


def _steps_to_next_stop(done: int, steps: int, report_every: int, save_every: int) -> int:
    """Steps from ``done`` to the next report, saved frame or the end."""
    n = min(report_every - done % report_every, steps - done)
    return min(n, save_every - done % save_every) if save_every else n


def _advance(context, integ, n: int, check_every: int, describe, dt: float, label: str, offset: int = 0):
    """``n`` steps in pieces of ``check_every``, checking the positions after each piece.

    Returns (steps done, failure or None)."""
    done = 0
    while done < n:
        k = min(check_every, n - done)
        try:
            integ.step(k)
        except (openmm.OpenMMException, ValueError, RuntimeError) as err:
            return done, {"step": offset + done + k, "time_ps": (offset + done + k) * dt,
                          "reason": f"{label}force evaluation failed: {str(err).splitlines()[0][:300]}"}
        done += k
        x = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        step = offset + done
        if not np.isfinite(x).all():
            atoms = np.flatnonzero(~np.isfinite(x).all(1))[:5].tolist()
            return done, {"step": step, "time_ps": step * dt,
                          "reason": f"{label}positions became non-finite (atoms {atoms})"}
        if describe is not None:
            where = describe(np.asarray(x)[None])
            if where is not None:
                return done, {"step": step, "time_ps": step * dt,
                              "reason": f"{label}left the flow's support: {where.split(': ', 1)[-1]}"}
    return done, None
