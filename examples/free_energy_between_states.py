"""Recipe: Delta F between two thermodynamic states inside an ordinary OpenMM script.

    .venv/bin/python examples/free_energy_between_states.py FLOW.pt [--to-temperature 350]
        [--to-forcefield amber96.xml amber96_obc.xml] [--md-ps 100] [-n 20000]

Your script already has an openmm.System (here: alanine dipeptide, amber99sbildn + OBC2, built with
OpenMM's ForceField) and a second one over the same atoms: the same system at another temperature,
or another force field / solvent model. ``regflow_mm.sampling.thermodynamic.delta_f_between`` takes
the two Systems, their temperatures (K) and samples (a trained flow, MD frames of either state, or
both) and returns the reduced free-energy difference f_B - f_A = -ln(Z_B / Z_A) (kT, each state in
its own kT) by MBAR on the cross-evaluated reduced potentials (pymbar), with its error and
diagnostics: the samples used per source (MD frames subsampled to uncorrelated ones), each state's
effective sample number, and for the flow the Kish ESS of its importance weights in each state.
A flow's D-chirality samples are dropped (``is_l``). Printed in kT (and kJ/mol for equal temperatures).
"""
from __future__ import annotations

import argparse

import numpy as np
import openmm
from openmm import app, unit

from regflow_mm.flows import load_flow
from regflow_mm.sampling.thermodynamic import delta_f_between
from regflow_mm.systems import get_system


def md_frames(system, topology, positions, temperature, ps, seed):
    """A short Langevin run of ``system`` (1 fs, frames every 0.5 ps): (N, n_atoms, 3) nm."""
    integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    integrator.setRandomNumberSeed(seed + 1)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(positions)
    simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + 1)
    simulation.step(2000)
    frames = []
    for _ in range(int(ps / 0.5)):
        simulation.step(500)
        frames.append(simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
                      .value_in_unit(unit.nanometer))
    return np.asarray(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", help="a flow trained for aldp (regflow-mm train / the pipeline's flow.pt)")
    parser.add_argument("--to-temperature", type=float, default=350.0, help="temperature of state B, K")
    parser.add_argument("--to-forcefield", nargs="+", default=None,
                        help="force-field files of state B (default: state A's, i.e. a temperature change only)")
    parser.add_argument("--md-ps", type=float, default=0.0, help="also this much MD of each state, ps (0: flow only)")
    parser.add_argument("-n", type=int, default=20000, help="flow samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # --- the user's OpenMM setup: two Systems over the same topology ---
    aldp = get_system("aldp")  # only for its PDB file and the flow's chirality check
    pdb = app.PDBFile(aldp.spec.pdb)
    settings = dict(nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False, removeCMMotion=False)
    system_a = app.ForceField("amber99sbildn.xml", "amber99_obc.xml").createSystem(pdb.topology, **settings)
    forcefield_b = args.to_forcefield or ["amber99sbildn.xml", "amber99_obc.xml"]
    system_b = app.ForceField(*forcefield_b).createSystem(pdb.topology, **settings)
    t_a, t_b = 300.0, args.to_temperature

    samples_a = samples_b = None
    if args.md_ps > 0:
        samples_a = md_frames(system_a, pdb.topology, pdb.positions, t_a, args.md_ps, args.seed)
        samples_b = md_frames(system_b, pdb.topology, pdb.positions, t_b, args.md_ps, args.seed + 1)
    flow = load_flow(args.flow, system=aldp)  # checks that the flow was trained for this force field and T
    result = delta_f_between(system_a, system_b, temperature_a=t_a, temperature_b=t_b, samples_a=samples_a,
                             samples_b=samples_b, flow=flow, n_flow_samples=args.n, seed=args.seed,
                             is_l=aldp.is_l, topologies=[pdb.topology, pdb.topology])

    print(f"state A: amber99sbildn.xml + amber99_obc.xml at {t_a:.1f} K; state B: {' + '.join(forcefield_b)} at "
          f"{t_b:.1f} K")
    print(f"Delta f(A -> B) = {result['delta_f']:.4f} +- {result['ddelta_f']:.4f} kT (reduced, {result['method']})")
    if t_a == t_b:
        kT = 0.00831446261815324 * t_a
        print(f"Delta F(A -> B) = {result['delta_f'] * kT:.4f} +- {result['ddelta_f'] * kT:.4f} kJ/mol")
    print(f"samples used per source: {result['n_samples']}")
    print(f"effective samples in A, B: {result['ess'][0]:.1f}, {result['ess'][1]:.1f}")
    flow_info = result["flow"]
    print(f"flow: {flow_info['n_dropped']} of {flow_info['n_drawn']} samples dropped (D-chirality or non-finite); "
          "Kish ESS / N " + ", ".join(f"{k} {v:.4f}" for k, v in flow_info["ess"].items()))
    for key in ("bar", "flow_only"):
        if key in result:
            print(f"{key.replace('_', ' ')}: {result[key]['delta_f']:.4f} +- {result[key]['ddelta_f']:.4f} kT")
    if not result["reliable"]:
        print("UNRELIABLE: fewer than 20 effective samples in a state; use a better flow or more samples")


if __name__ == "__main__":
    main()
