"""Check an exported flow force inside OpenMM: energies against the flow, then a short MD run.

``check_flow_force(flow, system, positions, backend, md_steps, seed, model_path=None)`` builds a
System of the molecule's masses holding only the flow force (``forces.flow_force``), compares its
energies on ``positions`` (B, n_atoms, 3) nm with ``flow.energy`` (kJ/mol), then runs ``md_steps``
Langevin steps (1 fs, 1/ps, the system's temperature, Reference platform) from ``positions[0]``
with ``dynamics.run_md``. Returns max_rel_energy_error, md_steps (done), md_seconds, md_finite,
first_nonfinite_step and md_failure (the step and the reason: the coordinate that left the flow's
support, non-finite positions or energies), flow_energy_mean / _std (kJ/mol) and ns_per_day.

``check_flow_dynamics(flow, system, start, ...)``: the dynamics assessment of a flow potential
(smooth-flows paper): NVE on the flow potential alone beside NVE on the force field (same start, steps
and timestep; total-energy fluctuation per degree of freedom), long Langevin runs on the flow potential alone
from one or several starts (finite? (phi, psi) T-W2 against MD frames, Ramachandran figure), a short Langevin run
with the flow as a bias in its own force group, and the cost per step of each.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openmm
import torch
from openmm import unit

from .dynamics import run_flow_walkers, run_md
from .forces import flow_force


def _potential_energy(context) -> float:
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def check_flow_force(flow, system, positions: np.ndarray, backend: str, md_steps: int, seed: int,
                     model_path: str | Path | None = None) -> dict:
    """See the module docstring; ``system`` is the MolecularSystem the flow was trained for."""
    force = flow_force(flow, backend=backend, path=model_path)
    flow_system = openmm.System()
    for i in range(system.system.getNumParticles()):
        flow_system.addParticle(system.system.getParticleMass(i))
    flow_system.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(system.temperature, 1.0, 0.001)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(flow_system, integrator, openmm.Platform.getPlatformByName("Reference"))

    test = np.asarray(positions, dtype=np.float64)
    exported, reference = [], flow.double().energy(torch.as_tensor(test)).detach().numpy()
    for x in test:
        context.setPositions(x)
        exported.append(_potential_energy(context))
    exported = np.array(exported)
    inside = np.isfinite(reference)  # frames outside the flow's support have +inf energy in both
    if not inside.any():
        raise ValueError("every check frame lies outside the flow's support: pass frames from its training data")
    rel = float(np.max(np.abs(exported[inside] - reference[inside]) / np.maximum(np.abs(reference[inside]), 1.0)))
    if np.isfinite(exported[~inside]).any():
        rel = float("inf")  # the exported force is finite where the flow's density is zero: a mismatch

    del context
    run = run_md(system, test[0], flow, mode="flow", integrator="langevin", steps=md_steps, timestep_fs=1.0,
                 friction_per_ps=1.0, backend=backend, report_every=10, seed=seed, model_path=model_path)
    energies = run.flow_energy[np.isfinite(run.flow_energy)]
    return {"max_rel_energy_error": rel, "md_steps": run.steps_done, "md_seconds": run.seconds,
            "md_finite": run.finite, "first_nonfinite_step": run.failure["step"] if run.failure else None,
            "md_failure": run.failure["reason"] if run.failure else None,
            "flow_energy_mean": float(energies.mean()) if energies.size else None,
            "flow_energy_std": float(energies.std()) if energies.size else None,
            "ns_per_day": run.steps_done * 1e-6 * 86400 / max(run.seconds, 1e-9)}


def check_flow_dynamics(flow, system, start: np.ndarray, *, md_angles: np.ndarray | None = None,
                        md_log_w: np.ndarray | None = None, nve_ps: float = 5.0, nve_timestep_fs: float = 1.0,
                        equilibrate_ps: float = 1.0, langevin_ps: float = 100.0, langevin_timestep_fs: float = 1.0,
                        hydrogen_mass_amu: float | None = None, bias_ps: float = 1.0, save_interval_ps: float = 0.1,
                        backend: str = "torch", n_torsion: int = 5000, seed: int = 0, figure: str | Path | None = None,
                        langevin_starts: np.ndarray | None = None, contexts: int = 1, executor=None,
                        angles_file: str | Path | None = None, progress=None) -> dict:
    """Dynamics on the exported flow potential (module docstring); ``system`` the MolecularSystem.

    NVE (skipped for ``nve_ps = 0``): ``equilibrate_ps`` of Langevin then ``nve_ps`` of Verlet at ``nve_timestep_fs`` (force-field
    masses), on the flow potential alone and on the force field, both from ``start`` (n_atoms, 3) nm
    with the same velocity seed. Langevin: ``langevin_ps`` at ``langevin_timestep_fs`` with hydrogens of
    ``hydrogen_mass_amu`` (same ensemble; None: the force field's masses, the default with 1 fs: at 2 fs with 3 amu
    hydrogens a smooth flow potential's stiffer modes heated walkers 8-53 K above the force field's, BENCHMARKS.md),
    frames every ``save_interval_ps``, from ``start`` or, with ``langevin_starts`` (W, n_atoms, 3) nm, one walker
    from each (``equilibrium_starts`` draws them from weighted data), split into ``contexts`` groups run through
    ``executor`` (``concurrent.futures``-compatible, e.g. a process pool, one group per worker; None: one after the
    other here); the flow walkers of a group share one OpenMM Context (``langevin_walkers``);
    with ``md_angles`` (M, 2) (phi, psi) rad of MD frames (log-weights ``md_log_w``) the T-W2 of each walker and
    of their pooled frames against them (``n_torsion`` MD frames at most) and, with ``figure``, a Ramachandran PNG;
    the same walkers on the force field (same starts, length and masses) give ``langevin_forcefield``: the
    floor trajectories of that length reach (aldp's alpha/beta basins exchange on a scale of tens of ps, so one
    100 ps trajectory of the force field itself lands 0.4-1.8 rad (median 0.8) from the weighted MD data, 4 walkers
    pooled 0.34-0.44, BENCHMARKS.md issue 12).
    ``bias_ps``: Langevin on the force field plus the flow force (group 1), 0 to skip. ``angles_file``: an ``.npz``
    to keep the walkers' (phi, psi) frames in (``flow`` and ``forcefield``: (frames, 2) rad; ``flow_walker`` and
    ``forcefield_walker``: each frame's walker). ``progress``: a callable(str) told when each run starts.
    Returns a dict of ``MDRun.summary()`` dicts plus ``nve_ratio`` (flow / force-field fluctuation); ``langevin``
    and ``langevin_forcefield`` pool their walkers (``_pooled``: ps, frames, finite, first failure, pooled
    ``t_w2``, mean kinetic temperature; each walker's summary under ``walkers``).
    """
    from ..training.metrics import torsion_w2

    say = progress or (lambda text: None)
    out = {}
    nve_steps = int(round(nve_ps / (nve_timestep_fs * 1e-3)))
    eq_steps = int(round(equilibrate_ps / (nve_timestep_fs * 1e-3)))
    for name, mode in (("nve_flow", "flow"), ("nve_forcefield", "forcefield")) if nve_steps > 0 else ():
        say(f"NVE on the {mode} potential: {eq_steps} Langevin + {nve_steps} Verlet steps at {nve_timestep_fs} fs")
        run = run_md(system, start, flow, mode=mode, integrator="verlet", steps=nve_steps, timestep_fs=nve_timestep_fs,
                     equilibrate_steps=eq_steps, backend=backend, report_every=10, seed=seed)
        out[name] = run.summary()
    if nve_steps > 0:
        fl = out["nve_flow"].get("energy_fluctuation_per_dof")
        ff = out["nve_forcefield"].get("energy_fluctuation_per_dof")
        out["nve_ratio"] = fl / ff if fl is not None and ff else None
    if langevin_ps > 0:
        steps = int(round(langevin_ps / (langevin_timestep_fs * 1e-3)))
        save = max(int(round(save_interval_ps / (langevin_timestep_fs * 1e-3))), 1)
        pair = [system.torsions[k] for k in ("phi1", "psi1")] if {"phi1", "psi1"} <= set(system.torsions) else \
            list(system.torsions.values())[:2]
        starts = np.asarray(start, dtype=np.float64)[None] if langevin_starts is None else \
            np.asarray(langevin_starts, dtype=np.float64)
        if starts.ndim != 3 or starts.shape[1:] != (system.n_atoms, 3):
            raise ValueError(f"langevin_starts must have shape (walkers, {system.n_atoms}, 3) nm, got {starts.shape}")
        settings = {"steps": steps, "timestep_fs": langevin_timestep_fs, "hydrogen_mass_amu": hydrogen_mass_amu,
                    "backend": backend, "save_every": save, "pair": pair}
        panels = [("MD data", md_angles, md_log_w)]
        kept = {}
        if int(contexts) < 1:
            raise ValueError(f"contexts must be >= 1 (OpenMM Contexts the walkers are split into), got {contexts}")
        groups = [g for g in np.array_split(np.arange(len(starts)), min(int(contexts), len(starts))) if len(g)]
        for key, mode in (("langevin", "flow"), ("langevin_forcefield", "forcefield")):
            say(f"Langevin on the {mode} potential: {len(starts)} walker(s) x {steps} steps at {langevin_timestep_fs} fs"
                f" in {len(groups)} group(s)")
            jobs = [(flow if mode == "flow" else None, system, starts[g], mode, seed + int(g[0]), settings)
                    for g in groups]
            runs = list(executor.map(langevin_walkers, *zip(*jobs))) if executor is not None else \
                [langevin_walkers(*job) for job in jobs]
            results = [walker for group in runs for walker in group]
            walkers = [summary for summary, _ in results]
            angles = np.concatenate([a for _, a in results])
            n = int(min(n_torsion, len(md_angles))) if md_angles is not None else 0
            for summary, walker_angles in results:
                if n and len(walker_angles):
                    summary["t_w2"] = torsion_w2(md_angles, walker_angles, None, max_md=n, seed=seed,
                                                 md_log_w=md_log_w)["t_w2"]
            lang = _pooled(walkers)
            kept[mode] = angles
            kept[f"{mode}_walker"] = np.concatenate([np.full(len(a), k) for k, (_, a) in enumerate(results)])
            if n and len(angles):
                # every walker's frames at an even stride, at most 2 n_torsion in all (exact EMD memory: M x N)
                pooled = np.concatenate([a[::max(1, -(-len(starts) * len(a) // (2 * n)))] for _, a in results])
                lang["t_w2"] = torsion_w2(md_angles, pooled, None, max_md=n, seed=seed, md_log_w=md_log_w)["t_w2"]
                lang["t_w2_frames"] = int(len(pooled))
                panels.append((f"Langevin: {'flow' if mode == 'flow' else 'force field'} "
                               f"({len(starts)} x {steps * langevin_timestep_fs * 1e-3:g} ps)", angles, None))
            out[key] = lang
        if angles_file is not None:
            np.savez(angles_file, **kept)
        if figure is not None and len(panels) > 1:
            from ..training.plots import ramachandran_panels

            ramachandran_panels(figure, panels)
            out["langevin"]["figure"] = str(figure)
    if bias_ps > 0:
        steps = int(round(bias_ps / (langevin_timestep_fs * 1e-3)))
        say(f"Langevin on the force field + flow bias (group 1): {steps} steps")
        run = run_md(system, start, flow, mode="bias", integrator="langevin", steps=steps,
                     timestep_fs=langevin_timestep_fs, hydrogen_mass_amu=hydrogen_mass_amu, backend=backend,
                     report_every=50, seed=seed)
        out["bias"] = {**run.summary(), "flow_energy_mean": float(np.mean(run.flow_energy)) if run.finite else None}
    return out


def equilibrium_starts(positions, log_weights: np.ndarray | None, n: int, seed: int,
                       strata: np.ndarray | None = None) -> np.ndarray:
    """``n`` frames (n, n_atoms, 3) nm of ``positions`` (T, n_atoms, 3) drawn with probability proportional to the
    frame weights (``log_weights`` (T,), None: uniform), in frame order: without replacement or, with ``strata``
    (T,) keys (e.g. ``ramachandran_strata``), by systematic resampling of the frames sorted by key, so that every
    stretch of keys holding weight w gets n w walkers to within one (a frame of weight above 1/n can be drawn twice).

    Why strata: a pooled (phi, psi) T-W2 grows like the square root of a basin-population error (moving a
    fraction d of the mass by ~2 rad costs 2 sqrt(d) rad), and 16 independent draws miss aldp's alpha_R population
    (0.42) by 0.12 (one standard deviation) before any dynamics; stratified starts leave at most 1/n."""
    from ..importance import normalized_weights

    if not 1 <= n <= len(positions):
        raise ValueError(f"need 1 <= walkers <= {len(positions)} frames, got {n}")
    p = None if log_weights is None else normalized_weights(np.asarray(log_weights))
    rng = np.random.default_rng(seed)
    if strata is None:
        idx = rng.choice(len(positions), size=n, replace=False, p=p)
    else:
        strata = np.asarray(strata, dtype=np.float64)
        if strata.shape != (len(positions),) or not np.isfinite(strata).all():
            raise ValueError(f"strata must be {len(positions)} finite keys, one per frame; got shape {strata.shape}")
        order = np.argsort(strata, kind="stable")
        cdf = np.cumsum(np.full(len(order), 1.0 / len(order)) if p is None else p[order])
        u = (rng.uniform() + np.arange(n)) / n
        idx = order[np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(order) - 1)]
    return np.asarray(positions[np.sort(idx)], dtype=np.float64)


def ramachandran_strata(angles: np.ndarray) -> np.ndarray:
    """Keys (T,) that order frames by their (phi, psi) (``angles`` (T, 2) rad) basin by basin: phi < 0 before
    phi > 0, then psi read from -2 rad around the circle, so alpha_R (-2 < psi < 1) and beta (psi > 1 or < -2)
    are each one contiguous stretch (for ``equilibrium_starts``)."""
    angles = np.asarray(angles, dtype=np.float64)
    return 10.0 * (angles[:, 0] > 0) + np.mod(angles[:, 1] + 2.0, 2 * np.pi)


def mean_kinetic_temperature(run) -> float:
    """Mean kinetic temperature (K) of an ``MDRun`` over its reports after the first 10% (nan without reports)."""
    temperature = run.temperature
    return float(temperature[temperature.size // 10:].mean()) if temperature.size else float("nan")


def langevin_walkers(flow, system, starts: np.ndarray, mode: str, seed: int,
                     settings: dict) -> list[tuple[dict, np.ndarray]]:
    """Langevin walkers of ``check_flow_dynamics`` (a module-level function, so an executor can run it in another
    process) from ``starts`` (k, n_atoms, 3) nm with ``settings`` (steps, timestep_fs, hydrogen_mass_amu, backend,
    save_every, pair: the two torsions' atom indices). Mode "flow": all k in one OpenMM Context
    (``dynamics.run_flow_walkers``, seed ``seed``); mode "forcefield": one ``run_md`` each (seed + i). Returns per
    walker its run's summary with n_frames, mean_temperature_K (and flow_energy_mean, kJ/mol, in mode "flow"), and
    the torsion pair's angles (S, 2) rad of its saved frames."""
    from ..data.dataset import dihedrals

    common = {"steps": settings["steps"], "timestep_fs": settings["timestep_fs"],
              "hydrogen_mass_amu": settings["hydrogen_mass_amu"], "backend": settings["backend"],
              "report_every": settings["save_every"], "save_every": settings["save_every"]}
    if mode == "flow":
        runs = run_flow_walkers(system, starts, flow, seed=seed, **common)
    else:
        runs = [run_md(system, x, flow, mode=mode, integrator="langevin", seed=seed + i, **common)
                for i, x in enumerate(np.asarray(starts))]
    out = []
    for run in runs:
        angles = dihedrals(run.positions, settings["pair"]) if len(run.positions) else np.zeros((0, 2))
        summary = {**run.summary(), "n_frames": int(len(angles)), "mean_temperature_K": mean_kinetic_temperature(run)}
        if mode == "flow":
            summary["flow_energy_mean"] = float(np.mean(run.flow_energy)) if run.finite else None
        out.append((summary, angles))
    return out


def _pooled(walkers: list[dict]) -> dict:
    """The walkers' runs as one: steps, timestep and seed of the first walker, ps, steps done, seconds (a walker's
    share of its Context's time) and frames summed, finite if all are (the walkers of a failed walker's Context stop
    with it: not finite, failure None), the first failure (with its walker), mean ms per step and kinetic temperature."""
    failed = [(k, w["failure"]) for k, w in enumerate(walkers) if w["failure"]]
    first = walkers[0]
    return {"mode": first["mode"], "n_walkers": len(walkers), "steps": first["steps"], "seed": first["seed"],
            "timestep_fs": first["timestep_fs"], "ps": float(sum(w["ps"] for w in walkers)),
            "steps_done": int(sum(w["steps_done"] for w in walkers)), "seconds": float(sum(w["seconds"] for w in walkers)),
            "n_frames": int(sum(w["n_frames"] for w in walkers)), "finite": all(w["finite"] for w in walkers),
            "failure": {**failed[0][1], "walker": failed[0][0]} if failed else None,
            "ms_per_step": float(np.mean([w["ms_per_step"] for w in walkers])),
            "walkers_per_context": max(int(w.get("walkers_per_context") or 1) for w in walkers),
            "mean_temperature_K": float(np.nanmean([w["mean_temperature_K"] for w in walkers])),
            "walkers": walkers}
