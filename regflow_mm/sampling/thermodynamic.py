"""Free-energy differences between thermodynamic states of one molecule, for OpenMM scripts.

A thermodynamic state is an ``openmm.System`` at a temperature T (K): reduced potential
u_k(x) = U_k(x) / (k_B T_k) (kT of its own state), reduced free energy f_k = -ln Z_k with
Z_k = int exp(-u_k(x)) dx. The states share the molecule (same atoms in the same order) and differ in
temperature, force field or solvent model. Delta f_{A->B} = f_B - f_A is dimensionless (reduced
units; times kT in kJ/mol when both temperatures are equal).

Estimates come from the cross-evaluated reduced potentials u_kn (every state at every sample) with
pymbar MBAR (two states with samples of both: BAR). Sources of samples:

- samples of any of the states (MD, e.g. the frames of a dataset): time series are subsampled to
  uncorrelated frames (pymbar ``timeseries``, statistical inefficiency of the own state's u) so
  that the error bars hold;
- a flow: its samples x ~ q enter as one more sampled state with u_q(x) = -log q(x) (the flow's
  density is with respect to the same measure as exp(-u_k): ``representations``), so flow
  importance sampling and any state's samples are combined by one MBAR.

Diagnostics: samples per source, each state's MBAR effective sample number (Kish ESS of its MBAR
weights; an estimate resting on fewer than ``MIN_STATE_ESS`` is flagged unreliable), the MBAR
overlap, the number of non-finite energies. ``mixture_system`` builds intermediate states
U_lambda = (1 - lambda) U_A + lambda U_B for an MBAR reference between force fields.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import openmm
from openmm import unit

from regflow_mm.importance import kish_ess
from regflow_mm.sampling.free_energy import MIN_STATE_ESS, _pymbar
from regflow_mm.systems import MOLAR_GAS_CONSTANT

log = logging.getLogger(__name__)

# Reduced energies that are not finite (overflow, failed evaluation) enter MBAR as this value:
# weight exp(-1e6) == 0.0 in float64 (pymbar's solver needs finite entries).
_NONFINITE_U = 1e6


@dataclasses.dataclass
class ThermodynamicState:
    """An openmm.System at ``temperature`` (K); ``name`` labels it in messages and results."""

    system: openmm.System
    temperature: float
    name: str = "state"

    def __post_init__(self):
        if isinstance(self.temperature, unit.Quantity):
            self.temperature = self.temperature.value_in_unit(unit.kelvin)
        if not isinstance(self.system, openmm.System):
            raise ValueError(f"state {self.name!r}: system must be an openmm.System, got {type(self.system).__name__}")
        if not (math.isfinite(float(self.temperature)) and self.temperature > 0):
            raise ValueError(f"state {self.name!r}: temperature must be a positive number in K, got {self.temperature}")
        self.temperature = float(self.temperature)

    @property
    def kT(self) -> float:
        """kJ/mol."""
        return MOLAR_GAS_CONSTANT * self.temperature

    @classmethod
    def of(cls, system, temperature: float | None = None, name: str | None = None) -> "ThermodynamicState":
        """From a MolecularSystem (its System and temperature, unless ``temperature`` is given) or an
        openmm.System with ``temperature``."""
        if isinstance(system, ThermodynamicState):
            return system
        if isinstance(system, openmm.System):
            if temperature is None:
                raise ValueError(f"state {name or 'state'!r}: an openmm.System needs a temperature (K)")
            return cls(system, temperature, name or "state")
        return cls(system.system, system.temperature if temperature is None else temperature,
                   name or getattr(system, "name", "state"))

    def evaluator(self, n_workers: int = 0, platform: str | None = "Reference"):
        """An ``EnergyEvaluator`` of this state (reduced energies in its own kT)."""
        from regflow_mm.energy import EnergyEvaluator

        return EnergyEvaluator.from_system(self.system, self.temperature, name=self.name, n_workers=n_workers,
                                           platform=platform)


def check_same_molecule(states, topologies=None) -> None:
    """ValueError naming the system unless every state has the first one's particles in the same order.

    Compared: particle counts, then atom names, elements and residues of ``topologies`` (one per state)
    when given, else the particle masses (amu, 1e-6 tolerance; systems with repartitioned hydrogen
    masses need their topologies).
    """
    first = states[0]
    n = first.system.getNumParticles()
    for k, state in enumerate(states[1:], start=1):
        m = state.system.getNumParticles()
        if m != n:
            raise ValueError(f"system {state.name!r} has {m} particles but {first.name!r} has {n}: the states must "
                             "describe the same atoms in the same order")
        if topologies is not None:
            atoms = [[(a.residue.name, a.name, a.element.symbol if a.element else "") for a in t.atoms()]
                     for t in (topologies[0], topologies[k])]
            bad = next((i for i, (p, q) in enumerate(zip(*atoms)) if p != q), None)
            if bad is not None:
                raise ValueError(f"atom {bad} is {atoms[1][bad]} in system {state.name!r} but {atoms[0][bad]} in "
                                 f"{first.name!r}: reorder the atoms to match")
            continue
        for i in range(n):
            a = first.system.getParticleMass(i).value_in_unit(unit.dalton)
            b = state.system.getParticleMass(i).value_in_unit(unit.dalton)
            if abs(a - b) > 1e-6:
                raise ValueError(f"particle {i} weighs {b:.4f} amu in system {state.name!r} but {a:.4f} amu in "
                                 f"{first.name!r}: the atoms are in another order (or the masses were changed: "
                                 "pass the topologies to compare atoms instead)")


def reduced_potentials(states, x, n_workers: int = 0, platform: str | None = "Reference") -> np.ndarray:
    """(K, N) reduced potentials (each in its own kT) of positions x (N, n_atoms, 3) nm in K states."""
    out = []
    for state in states:
        with state.evaluator(n_workers=n_workers, platform=platform) as evaluator:
            out.append(evaluator.reduced_energy(np.asarray(x, dtype=np.float64)))
    return np.stack(out)


def uncorrelated(u, what: str = "samples") -> np.ndarray:
    """Indices of uncorrelated frames of a time series of reduced energies u (N,) (pymbar timeseries)."""
    u = np.asarray(u, dtype=np.float64)
    if u.size < 3 or not np.isfinite(u).all() or np.ptp(u) == 0:
        return np.arange(u.size)
    pymbar = _pymbar()
    g = pymbar.timeseries.statistical_inefficiency(u)
    idx = np.asarray(pymbar.timeseries.subsample_correlated_data(u, g=g), dtype=np.int64)
    log.info("%s: statistical inefficiency %.1f, %d of %d frames kept", what, g, idx.size, u.size)
    return idx


def mixture_system(system_a: openmm.System, system_b: openmm.System, lam: float) -> openmm.System:
    """An openmm.System with U_lambda = (1 - lam) U_A + lam U_B (kJ/mol), for intermediate states.

    Each system's forces become collective variables of one ``CustomCVForce`` (any force type works);
    particles and masses are those of ``system_a``. ``lam`` in [0, 1].
    """
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    if system_a.getNumParticles() != system_b.getNumParticles():
        raise ValueError(f"the two systems have {system_a.getNumParticles()} and {system_b.getNumParticles()} "
                         "particles: a mixture needs the same atoms")
    mixed = openmm.System()
    for i in range(system_a.getNumParticles()):
        mixed.addParticle(system_a.getParticleMass(i))
    defaults = [_global_parameters(system) for system in (system_a, system_b)]
    clash = sorted(k for k in set(defaults[0]) & set(defaults[1]) if defaults[0][k] != defaults[1][k])
    if clash:
        raise ValueError(f"the two systems define global parameters {clash} with different values: OpenMM shares "
                         "them across one System; rename them in one of the systems")
    for system, weight in ((system_a, "(1-lam)"), (system_b, "lam")):
        force = openmm.CustomCVForce("")
        names = []
        for k, f in enumerate(system.getForces()):
            if isinstance(f, openmm.CMMotionRemover):
                continue
            force.addCollectiveVariable(f"u{k}", openmm.XmlSerializer.clone(f))
            names.append(f"u{k}")
        force.setEnergyFunction(f"{weight}*({'+'.join(names) or '0'})")
        force.addGlobalParameter("lam", float(lam))
        mixed.addForce(force)
    return mixed


def _global_parameters(system: openmm.System) -> dict[str, float]:
    out = {}
    for force in system.getForces():
        for i in range(force.getNumGlobalParameters() if hasattr(force, "getNumGlobalParameters") else 0):
            out[force.getGlobalParameterName(i)] = force.getGlobalParameterDefaultValue(i)
    return out


def delta_f_states(states, samples=None, *, flow=None, n_flow_samples: int = 20000, seed: int = 0,
                   decorrelate: bool = True, is_l=None, topologies=None, n_workers: int = 0,
                   platform: str | None = "Reference", pair: tuple[int, int] = (0, -1)) -> dict:
    """Reduced free-energy differences between thermodynamic states by MBAR (pymbar).

    states: ThermodynamicStates (or MolecularSystems) over the same atoms; samples: one entry per
    state, positions (N_k, n_atoms, 3) nm drawn from that state (a time series: subsampled when
    ``decorrelate``) or None; flow: a BoltzmannFlow whose ``n_flow_samples`` samples (seed ``seed``)
    join as one more sampled state, u = -log q. is_l: positions -> (B,) bool; flow samples where it
    is False (D-chirality) are dropped (weight 0 in every state). ``pair`` = (i, j): the reported
    Delta f = f_j - f_i (default first -> last).
    Returns {"delta_f", "ddelta_f", "f" (K,) relative to state 0, "df" (K,) errors, "method",
    "n_samples" per source, "ess" per state (MBAR effective sample number), "overlap",
    "n_nonfinite", "reliable", "flow_ess" (Kish ESS fraction of exp(-u_k)/q per state, flow only)}.
    """
    states = [ThermodynamicState.of(s, name=None if hasattr(s, "name") else f"state {k}") for k, s in enumerate(states)]
    if len(states) < 2:
        raise ValueError("need at least two thermodynamic states")
    check_same_molecule(states, topologies)
    samples = [None] * len(states) if samples is None else list(samples)
    if len(samples) != len(states):
        raise ValueError(f"samples must have one entry (positions or None) per state: {len(samples)} for "
                         f"{len(states)} states")
    n_atoms = states[0].system.getNumParticles()
    blocks, counts, names = [], [], []
    for state, x in zip(states, samples):
        if x is None:
            counts.append(0)
            continue
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (n_atoms, 3) or x.shape[0] == 0:
            raise ValueError(f"samples of {state.name!r} must be (N > 0, {n_atoms}, 3) positions in nm, got {x.shape}")
        if decorrelate:
            with state.evaluator(n_workers=n_workers, platform=platform) as ev:
                x = x[uncorrelated(ev.reduced_energy(x), f"samples of {state.name!r}")]
        blocks.append(x)
        counts.append(x.shape[0])
        names.append(state.name)
    flow_info = {}
    if flow is not None:
        from regflow_mm.flows.sampling import sample_flow

        xq, log_q = sample_flow(flow, int(n_flow_samples), seed)
        keep = np.isfinite(log_q) & np.isfinite(xq).all(axis=(1, 2))
        if is_l is not None:
            keep &= np.asarray(is_l(np.where(np.isfinite(xq), xq, 0.0)), dtype=bool)
        flow_info = {"n_drawn": int(n_flow_samples), "n_dropped": int((~keep).sum())}
        if not keep.any():
            raise ValueError("every flow sample was dropped (non-finite or D-chirality): the flow cannot serve "
                             "as a proposal for these states")
        blocks.append(xq[keep])
        counts.append(int(keep.sum()))
        names.append("flow")
    if not blocks:
        raise ValueError("no samples: give samples of at least one state or a flow")
    x_all = np.concatenate(blocks)
    u_kn = reduced_potentials(states, x_all, n_workers=n_workers, platform=platform)
    if flow is not None:
        from regflow_mm.flows.sampling import flow_log_prob

        u_flow = np.concatenate([-flow_log_prob(flow, b) for b in blocks[:-1]] + [-log_q[keep]]) \
            if len(blocks) > 1 else -log_q[keep]
        u_kn = np.vstack([u_kn, u_flow[None]])
    n_nonfinite = int((~np.isfinite(u_kn)).sum())
    if n_nonfinite:
        log.warning("%d reduced energies are not finite: weight 0 in their states", n_nonfinite)
    u_kn = np.where(np.isfinite(u_kn), u_kn, _NONFINITE_U)
    n_k = np.array(counts, dtype=np.int64)
    result = _mbar(u_kn, n_k, pair, len(states))
    if flow is not None:
        n_q = counts[-1]
        u_q = u_kn[-1, -n_q:]
        flow_info["ess"] = {state.name: kish_ess(-u_kn[k, -n_q:] + u_q)["ess"] for k, state in enumerate(states)}
    result.update(n_samples=dict(zip(names, [b.shape[0] for b in blocks])), n_nonfinite=n_nonfinite, states=[s.name for s in states],
                  temperatures_K=[s.temperature for s in states], flow=flow_info or None,
                  method="BAR (MBAR on two states)" if len(n_k) == 2 and (n_k > 0).all() else "MBAR")
    i, j = pair
    result["reliable"] = bool(min(result["ess"][i], result["ess"][j]) >= MIN_STATE_ESS
                              and math.isfinite(result["ddelta_f"]))
    return result


def _mbar(u_kn: np.ndarray, n_k: np.ndarray, pair: tuple[int, int], n_states: int) -> dict:
    pymbar = _pymbar()
    # States without samples sit in u_kn too (N_k = 0): MBAR estimates their f from the others' samples.
    mbar = pymbar.MBAR(u_kn, n_k, solver_protocol="robust")
    fe = mbar.compute_free_energy_differences(compute_uncertainty=True)
    f, df = fe["Delta_f"], fe["dDelta_f"]
    i, j = (k % n_states for k in pair)
    ess = np.asarray(mbar.compute_effective_sample_number(), dtype=np.float64)
    try:
        overlap = float(mbar.compute_overlap()["scalar"])
    except Exception:  # noqa: BLE001 - overlap is a diagnostic; a degenerate case must not lose the estimate
        overlap = float("nan")
    return {"delta_f": float(f[i, j]), "ddelta_f": float(df[i, j]), "f": [float(v) for v in f[0, :n_states]],
            "df": [float(v) for v in df[0, :n_states]], "ess": [float(e) for e in ess[:n_states]], "overlap": overlap}


def delta_f_between(system_a, system_b, *, temperature_a: float | None = None, temperature_b: float | None = None,
                    samples_a=None, samples_b=None, flow=None, n_flow_samples: int = 20000, seed: int = 0,
                    decorrelate: bool = True, is_l=None, topologies=None, n_workers: int = 0,
                    platform: str | None = "Reference") -> dict:
    """Delta f = f_B - f_A (reduced, kT) between two systems over the same atoms: the OpenMM-script API.

    system_a / system_b: openmm.System (then give temperature_a / temperature_b in K) or
    MolecularSystem; samples_a / samples_b: positions (N, n_atoms, 3) nm of each state (MD frames;
    either may be None); flow: a BoltzmannFlow used as an importance-sampling proposal for both.
    Returns ``delta_f_states``'s dict (delta_f, ddelta_f, diagnostics, ``reliable``); with samples
    of both states and a flow, also "bar" (samples only) and "flow_only" (flow samples only).
    """
    a = ThermodynamicState.of(system_a, temperature_a, "A")
    b = ThermodynamicState.of(system_b, temperature_b, "B")
    if topologies is None and hasattr(system_a, "topology") and hasattr(system_b, "topology"):
        topologies = [system_a.topology, system_b.topology]
    common = dict(seed=seed, decorrelate=decorrelate, is_l=is_l, topologies=topologies, n_workers=n_workers,
                  platform=platform, n_flow_samples=n_flow_samples)
    result = delta_f_states([a, b], [samples_a, samples_b], flow=flow, **common)
    if flow is not None and samples_a is not None and samples_b is not None:
        result["bar"] = _brief(delta_f_states([a, b], [samples_a, samples_b], **common))
        result["flow_only"] = _brief(delta_f_states([a, b], None, flow=flow, **common))
    return result


def _brief(result: dict) -> dict:
    return {k: result[k] for k in ("delta_f", "ddelta_f", "method", "n_samples", "ess", "reliable")}
