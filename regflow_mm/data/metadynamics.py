"""Well-tempered metadynamics on backbone torsions (OpenMM's ``openmm.app.Metadynamics``) for MD datasets.

Plain MD of a peptide rarely leaves its main basin (aldp visits phi > 0 once per 5-10 ns), so a flow
trained on it never sees the rare basins. Metadynamics adds a history-dependent bias V(s, t) on
collective variables s (here torsions) that pushes the system out of visited states. Every stored
frame keeps the *unbiased* potential energy and forces plus the log-weight that reweights it to the
unbiased ensemble (Tiwary & Parrinello, J. Phys. Chem. B 119, 736 (2015))::

    log w_t = (V(s_t, t) - c(t)) / kT,
    c(t) = kT log[ sum_s exp(gamma/(gamma-1) V(s,t)/kT) / sum_s exp(V(s,t)/((gamma-1) kT)) ]

with gamma the bias factor and sums over the bias grid (c(t) removes the growth of the bias over time,
so early frames are not over-weighted). Energies kJ/mol, angles rad, time ps.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import openmm
from openmm import app, unit
from scipy.special import logsumexp


@dataclass(frozen=True)
class MetadynamicsSettings:
    """Well-tempered metadynamics on named torsions of the system (``MolecularSystem.torsions``).

    torsions: names of 1-3 torsions (a tuple or "phi1,psi1"; default: phi1, psi1). bias_factor: gamma > 1 (CV temperature
    T * gamma). height_kJ: initial Gaussian height, kJ/mol. width_rad: Gaussian width (standard
    deviation), rad. deposition_ps: interval between Gaussians, ps. grid_points: bias grid per torsion.
    The defaults fill aldp's phi > 0 basin within 1-2 ns at 300 K.
    """

    torsions: tuple[str, ...] = ("phi1", "psi1")
    bias_factor: float = 6.0
    height_kJ: float = 1.2
    width_rad: float = 0.35
    deposition_ps: float = 1.0
    grid_points: int = 72

    def __post_init__(self):
        torsions = self.torsions.split(",") if isinstance(self.torsions, str) else self.torsions
        object.__setattr__(self, "torsions", tuple(t.strip() for t in torsions if t.strip()))
        if not 1 <= len(self.torsions) <= 3:
            raise ValueError(f"metadynamics needs 1-3 torsions (OpenMM's grid bias), got {list(self.torsions)}")
        if not self.bias_factor > 1:
            raise ValueError(f"metadynamics bias_factor must be > 1, got {self.bias_factor}")
        if not self.height_kJ > 0:
            raise ValueError(f"metadynamics height must be > 0 kJ/mol, got {self.height_kJ}")
        if not self.width_rad > 0:
            raise ValueError(f"metadynamics bias width must be > 0 rad, got {self.width_rad}: use e.g. 0.35")
        if not self.deposition_ps > 0:
            raise ValueError(f"metadynamics deposition interval must be > 0 ps, got {self.deposition_ps}")
        if int(self.grid_points) < 8:
            raise ValueError(f"metadynamics grid needs >= 8 points per torsion, got {self.grid_points}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["torsions"] = list(self.torsions)
        return {"method": "metadynamics", **d}


@dataclass
class TorsionMetadynamics:
    """OpenMM ``Metadynamics`` on a copy of ``system.system``, with bias save/restore and frame weights.

    ``openmm_system`` (the copy holding the bias force) is what the Context must be built from; the
    bias lives in its own force group ``bias_group``. ``steps_per_deposition`` MD steps per Gaussian.
    ``md_system``: the openmm.System to copy (default ``system.system``; e.g. with repartitioned masses).
    """

    system: object  # MolecularSystem
    settings: MetadynamicsSettings
    timestep_fs: float
    md_system: openmm.System | None = None
    openmm_system: openmm.System = field(init=False)
    meta: app.Metadynamics = field(init=False)

    def __post_init__(self):
        s = self.settings
        missing = [t for t in s.torsions if t not in self.system.torsions]
        if missing:
            raise ValueError(f"system {self.system.name!r} has no torsions {missing} for metadynamics; it has "
                             f"{sorted(self.system.torsions)} (choose with --metad-torsions)")
        steps = s.deposition_ps * 1000.0 / self.timestep_fs
        if abs(steps - round(steps)) > 1e-9 or round(steps) < 1:
            raise ValueError(f"metadynamics deposition interval {s.deposition_ps} ps is not a whole number of "
                             f"{self.timestep_fs} fs steps")
        self.steps_per_deposition = int(round(steps))
        self.openmm_system = openmm.XmlSerializer.clone(self.md_system or self.system.system)
        variables = []
        for name in s.torsions:
            cv = openmm.CustomTorsionForce("theta")
            cv.addTorsion(*self.system.torsions[name])
            variables.append(app.BiasVariable(cv, -math.pi, math.pi, s.width_rad, periodic=True,
                                              gridWidth=int(s.grid_points)))
        self.meta = app.Metadynamics(self.openmm_system, variables, self.system.temperature * unit.kelvin,
                                     s.bias_factor, s.height_kJ * unit.kilojoule_per_mole,
                                     self.steps_per_deposition)
        self.bias_group = self.meta._force.getForceGroup()
        self.physical_groups = sum(1 << g for g in range(32) if g != self.bias_group)
        self._offset = None  # c(t) of the current bias; recomputed only after the bias changed

    @property
    def bias_grid(self) -> np.ndarray:
        """Current bias V on the grid, kJ/mol (axes: torsions in reverse order, OpenMM's layout)."""
        gamma = self.settings.bias_factor
        return -np.asarray(self.meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)) * (gamma - 1) / gamma

    def restore_bias(self, bias: np.ndarray) -> None:
        """Put a saved bias grid (kJ/mol, ``bias_grid`` layout) back, before the Context is created.

        OpenMM's Metadynamics can only reload biases written by *other* processes (biasDir), so the
        restart of its own bias sets its grid arrays directly.
        """
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != self.meta._selfBias.shape:
            raise ValueError(f"saved metadynamics bias has shape {bias.shape}, expected {self.meta._selfBias.shape}: "
                             "the grid settings changed; use the same settings to resume")
        self.meta._selfBias = bias.copy()
        self.meta._totalBias = bias.copy()
        self._offset = None
        widths, limits = self.meta._widths, self.meta._limits
        if len(widths) == 1:
            self.meta._table.setFunctionParameters(bias.flatten(), *limits)
        else:
            self.meta._table.setFunctionParameters(*widths, bias.flatten(), *limits)

    def step(self, simulation: app.Simulation, steps: int) -> None:
        start = simulation.currentStep
        self.meta.step(simulation, steps)
        if simulation.currentStep // self.steps_per_deposition != start // self.steps_per_deposition:
            self._offset = None  # a Gaussian was deposited

    def bias_energy(self, context: openmm.Context) -> float:
        """V(s_t, t) of the current configuration, kJ/mol."""
        state = context.getState(getEnergy=True, groups={self.bias_group})
        return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    def offset(self) -> float:
        """c(t) of the current bias, kJ/mol (module docstring)."""
        if self._offset is None:
            kT, gamma = self.system.kT, self.settings.bias_factor
            # Torsion grids are periodic: the last point of each axis repeats the first (count it once).
            v = self.bias_grid[(slice(0, -1),) * len(self.settings.torsions)].ravel() / kT
            self._offset = kT * float(logsumexp(gamma / (gamma - 1) * v) - logsumexp(v / (gamma - 1)))
        return self._offset


def weights_from_bias(bias_kJ: np.ndarray, offset_kJ: np.ndarray, kT: float) -> np.ndarray:
    """Per-frame log-weights (V - c) / kT (dimensionless) of metadynamics frames."""
    return (np.asarray(bias_kJ, np.float64) - np.asarray(offset_kJ, np.float64)) / float(kT)
