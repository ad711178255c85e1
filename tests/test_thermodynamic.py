"""Free energies between thermodynamic states (OpenMM systems) against harmonic-oscillator answers."""
from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch

from regflow_mm.flows import build_flow
from regflow_mm.sampling.thermodynamic import (ThermodynamicState, delta_f_between, delta_f_states, mixture_system,
                                               reduced_potentials)
from regflow_mm.systems import MOLAR_GAS_CONSTANT

K_A, K_B, T_A, T_B = 200.0, 450.0, 300.0, 350.0


def well(k: float, n_particles: int = 1, mass: float = 12.0, name: str = "k") -> openmm.System:
    """Particles in U = k/2 |x|^2 each (k kJ/mol/nm^2, a global parameter called ``name``)."""
    system = openmm.System()
    force = openmm.CustomExternalForce(f"0.5*{name}*(x^2+y^2+z^2)")
    force.addGlobalParameter(name, k)
    for i in range(n_particles):
        system.addParticle(mass)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def exact_f(k: float, temperature: float) -> float:
    """Reduced free energy -ln Z of one particle in the well at T: -3/2 ln(2 pi kT / k)."""
    return -1.5 * math.log(2 * math.pi * MOLAR_GAS_CONSTANT * temperature / k)


def draw(k: float, temperature: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, math.sqrt(MOLAR_GAS_CONSTANT * temperature / k), (n, 1, 3))


def test_bar_between_two_oscillators_matches_analytic():
    """Different spring constants and temperatures: BAR on the cross-evaluated reduced potentials."""
    exact = exact_f(K_B, T_B) - exact_f(K_A, T_A)
    result = delta_f_between(well(K_A), well(K_B), temperature_a=T_A, temperature_b=T_B,
                             samples_a=draw(K_A, T_A, 3000, 0), samples_b=draw(K_B, T_B, 3000, 1))
    assert result["method"].startswith("BAR") and result["reliable"]
    assert abs(result["delta_f"] - exact) < 2.5 * result["ddelta_f"] and result["ddelta_f"] < 0.05
    assert result["n_samples"] == {"A": pytest.approx(3000, rel=0.1), "B": pytest.approx(3000, rel=0.1)}


def test_flow_samples_and_mbar_over_intermediate_states():
    """A flow proposal alone, and MBAR with an unsampled intermediate state (spring constant between)."""
    exact = exact_f(K_B, T_A) - exact_f(K_A, T_A)
    flow = build_flow(1, "identity", "gaussian", kT=MOLAR_GAS_CONSTANT * T_A, dtype=torch.float64)
    flow.transform.set_gaussian(mean=0.0, std=math.sqrt(MOLAR_GAS_CONSTANT * T_A / 300.0))
    result = delta_f_between(well(K_A), well(K_B), temperature_a=T_A, temperature_b=T_A, flow=flow,
                             n_flow_samples=6000, seed=3)
    assert abs(result["delta_f"] - exact) < 3 * result["ddelta_f"] and result["ddelta_f"] < 0.05
    assert result["n_samples"] == {"flow": 6000} and min(result["flow"]["ess"].values()) > 0.5
    states = [ThermodynamicState(well(k), T_A, f"k={k}") for k in (K_A, 300.0, K_B)]
    mbar = delta_f_states(states, [draw(K_A, T_A, 2000, 4), None, draw(K_B, T_A, 2000, 5)])
    assert abs(mbar["delta_f"] - exact) < 2.5 * mbar["ddelta_f"]
    assert abs(mbar["f"][1] - (exact_f(300.0, T_A) - exact_f(K_A, T_A))) < 3 * mbar["df"][1]


def test_mixture_system_interpolates_energies():
    x = draw(K_A, T_A, 5, 6)
    with pytest.raises(ValueError, match=r"global parameters \['k'\] with different values"):
        mixture_system(well(K_A), well(K_B), 0.25)
    mixed = ThermodynamicState(mixture_system(well(K_A), well(K_B, name="kb"), 0.25), T_A, "mix")
    u = reduced_potentials([ThermodynamicState(well(K_A), T_A), ThermodynamicState(well(K_B), T_A), mixed], x)
    np.testing.assert_allclose(u[2], 0.75 * u[0] + 0.25 * u[1], rtol=1e-10)


def test_bad_systems_and_samples_are_one_line_errors():
    with pytest.raises(ValueError, match="system 'B' has 2 particles but 'A' has 1"):
        delta_f_between(well(K_A), well(K_B, 2), temperature_a=T_A, temperature_b=T_A, samples_a=draw(K_A, T_A, 10, 0))
    with pytest.raises(ValueError, match=r"particle 0 weighs 1.0000 amu in system 'B' but 12.0000 amu in 'A'"):
        delta_f_between(well(K_A), well(K_B, mass=1.0), temperature_a=T_A, temperature_b=T_A,
                        samples_a=draw(K_A, T_A, 10, 0))
    with pytest.raises(ValueError, match="an openmm.System needs a temperature"):
        delta_f_between(well(K_A), well(K_B), temperature_a=T_A, samples_a=draw(K_A, T_A, 10, 0))
    with pytest.raises(ValueError, match="no samples"):
        delta_f_between(well(K_A), well(K_B), temperature_a=T_A, temperature_b=T_A)
    with pytest.raises(ValueError, match=r"samples of 'B' must be \(N > 0, 1, 3\)"):
        delta_f_between(well(K_A), well(K_B), temperature_a=T_A, temperature_b=T_A, samples_b=np.zeros((4, 2, 3)))


def test_free_energy_cli_modes_give_one_line_errors(capsys):
    from regflow_mm.cli import main

    for argv, message in ((["free-energy", "aldp"], "free-energy needs a FLOW file, or --tfep-data"),
                          (["free-energy", "aldp", "--data-a", "x.h5"], "--data-a needs --to or --to-temperature"),
                          (["free-energy", "aldp", "--to-temperature", "350"], "a thermodynamic Delta F needs samples"),
                          (["free-energy", "aldp", "--to", "al4", "--to-temperature", "350", "--data-a", "none.h5"],
                           "system 'B (al4, 350 K)' has 42 particles but 'A (aldp, 300 K)' has 22")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
