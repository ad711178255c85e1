"""Recipe: a saved flow's energy U_flow(x) = -kT log q(x) as an OpenMM force, alone and as a bias.

    .venv/bin/python examples/export_flow_force_md.py FLOW.pt [--system aldp] [--backend torch|python] [--steps 1000] [--out model.pt]

(a) Langevin MD with U_flow as the ONLY potential: a System of the molecule's particle masses
    plus the flow force. Where q matches the Boltzmann distribution p, exp(-U_flow/kT) = q ~ p,
    so this MD samples (approximately) the same ensemble as the force field.
(b) Bias: the system's own force field in force group 0 plus U_flow in force group 1; the MD
    samples ~ p(x) q(x), i.e. it is restrained to where the flow has mass. Each part is read
    apart: context.getState(getEnergy=True, groups={1}). With --monitor-only the integrator
    moves on group 0 alone (integrator.setIntegrationForceGroups) and U_flow is only watched,
    e.g. to see MD leave the region the flow has learnt.
Energies in kJ/mol, time in ps, temperature in K. Flows in internal coordinates have a bounded
support: outside it U_flow = +inf (python backend) and MD cannot go on; this script says so.
"""
from __future__ import annotations

import argparse
import math

import openmm
from openmm import unit

from regflow_mm.export.forces import flow_force
from regflow_mm.flows import load_flow
from regflow_mm.systems import get_system

TIMESTEP_PS = 0.001
REPORT_EVERY = 100  # steps


def group_energies(context: openmm.Context, groups: dict[str, set[int]]) -> dict[str, float]:
    """Potential energy (kJ/mol) of each named set of force groups."""
    return {name: context.getState(getEnergy=True, groups=g).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            for name, g in groups.items()}


def run_md(context: openmm.Context, steps: int, groups: dict[str, set[int]]) -> None:
    """``steps`` integrator steps, printing the group energies every REPORT_EVERY steps; stops at a non-finite one."""
    done = 0
    while True:
        energies = group_energies(context, groups)
        print(f"step {done:6d}  t = {done * TIMESTEP_PS:7.3f} ps  "
              + "  ".join(f"{name} = {value:12.4f} kJ/mol" for name, value in energies.items()))
        if not all(math.isfinite(v) for v in energies.values()):
            print(f"energy became non-finite at step {done}: the configuration left the flow's support (+inf) "
                  "or the MD blew up; stopping this run")
            return
        if done >= steps:
            return
        n = min(REPORT_EVERY, steps - done)
        try:
            context.getIntegrator().step(n)
        except (openmm.OpenMMException, ValueError, RuntimeError) as err:
            print(f"MD failed between steps {done} and {done + n} (non-finite energy or forces): {err}; "
                  "stopping this run")
            return
        done += n


def new_context(system: openmm.System, molecular_system, platform: str, seed: int) -> openmm.Context:
    temperature = molecular_system.temperature * unit.kelvin
    integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0 / unit.picosecond, TIMESTEP_PS * unit.picosecond)
    integrator.setRandomNumberSeed(seed)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
    context.setPositions(molecular_system.positions * unit.nanometer)  # an MD-like structure of the system
    context.setVelocitiesToTemperature(temperature, seed)
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", help="a flow saved for the system")
    parser.add_argument("--system", default="aldp", help="built-in system name or TOML spec (default aldp)")
    parser.add_argument("--backend", choices=("torch", "python"), default="torch",
                        help="torch: openmm-torch TorchForce of the traced energy; python: openmm.PythonForce")
    parser.add_argument("--steps", type=int, default=1000, help="1 fs Langevin steps per run (default 1000)")
    parser.add_argument("--out", default=None, help="save the TorchScript energy model here, e.g. model.pt (torch)")
    parser.add_argument("--monitor-only", action="store_true", help="part (b): integrate the force field alone")
    parser.add_argument("--platform", default="Reference", help="OpenMM platform (Reference, CPU, CUDA)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.out and args.backend != "torch":
        parser.error("--out saves the TorchScript model of the torch backend; drop it or use --backend torch")
    molecular_system = get_system(args.system)
    flow = load_flow(args.flow, molecular_system)  # checks that the flow was trained for this system
    print(f"(a) Langevin MD on U_flow alone, {molecular_system.temperature:.1f} K, {args.backend} backend")
    flow_only = openmm.System()
    for i in range(molecular_system.n_atoms):
        flow_only.addParticle(molecular_system.system.getParticleMass(i))
    flow_only.addForce(flow_force(flow, backend=args.backend, path=args.out))
    if args.out:
        print(f"TorchScript model saved to {args.out} (loads in openmmtorch.TorchForce without regflow_mm)")
    run_md(new_context(flow_only, molecular_system, args.platform, args.seed), args.steps, {"U_flow": {0}})

    print("(b) force field (group 0) + U_flow (group 1)" + (", U_flow monitored only" if args.monitor_only else ""))
    biased = openmm.XmlSerializer.clone(molecular_system.system)  # all its forces are in group 0
    # Scaling U_flow with a CustomCVForce would need a copy of the force, and deserialising a
    # TorchForce crashes openmm-torch 1.5 (PyPI); add it as it is.
    biased.addForce(flow_force(flow, backend=args.backend, force_group=1))
    context = new_context(biased, molecular_system, args.platform, args.seed)
    if args.monitor_only:
        context.getIntegrator().setIntegrationForceGroups({0})
    run_md(context, args.steps, {"U_ff": {0}, "U_flow": {1}})


if __name__ == "__main__":
    main()
