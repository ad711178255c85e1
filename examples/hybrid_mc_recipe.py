"""Recipe: hybrid MD / flow Monte Carlo inside openmmtools' MCMCSampler.

    .venv/bin/python examples/hybrid_mc_recipe.py FLOW.pt [--iterations 200]

A trained Boltzmann generator proposes independent configurations; Langevin dynamics explores
locally between proposals. The chain targets the Boltzmann distribution of the thermodynamic
state exactly (Metropolis-Hastings with the flow density in the acceptance ratio).

Points to keep:
- the System must have no constraints (regflow_mm systems have none): flow proposals do not
  satisfy constraints;
- give both the OpenMM integrator and the move a seed (openmmtools leaves the integrator's
  unset; ``SeededLangevinDynamicsMove`` fixes that);
- pass ``flow_path`` so the move can be serialised (openmmtools' ``utils.serialize`` stores the
  flow file path and SHA-256, not the network);
- ``reject_d_chirality=True`` keeps the chain among L amino acids (Cartesian flows can emit D ones).
For many walkers, checkpointing and a trajectory file, use ``regflow-mm mc`` / ``run_hybrid_mc``.
"""
from __future__ import annotations

import argparse

import numpy as np
import openmm
from openmm import unit
from openmmtools import cache
from openmmtools.mcmc import MCMCSampler, SequenceMove
from openmmtools.states import SamplerState, ThermodynamicState

from regflow_mm.data.dataset import dihedrals
from regflow_mm.flows import load_flow
from regflow_mm.sampling import FlowIndependenceMove, SeededLangevinDynamicsMove
from regflow_mm.systems import get_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", help="a flow saved for the system")
    parser.add_argument("--system", default="aldp")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--md-steps", type=int, default=500, help="1 fs Langevin steps between flow moves")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    system = get_system(args.system)
    flow = load_flow(args.flow, system=system)
    thermodynamic_state = ThermodynamicState(system.system, temperature=system.temperature * unit.kelvin)
    sampler_state = SamplerState(positions=system.positions * unit.nanometer)

    langevin = SeededLangevinDynamicsMove(random_seed=args.seed, timestep=1.0 * unit.femtosecond,
                                          collision_rate=1.0 / unit.picosecond, n_steps=args.md_steps)
    flow_move = FlowIndependenceMove(flow, flow_path=args.flow, molecular_system=system,
                                     reject_d_chirality=True, seed=args.seed)
    sampler = MCMCSampler(thermodynamic_state, sampler_state, move=SequenceMove([langevin, flow_move]))

    # The Reference platform is the fastest for ~20 atoms; any platform works.
    context_cache = cache.ContextCache(platform=openmm.Platform.getPlatformByName("Reference"))
    phi_index = system.torsions["phi1"]
    phi = []
    for _ in range(args.iterations):
        sampler.run(1, context_cache=context_cache)
        x = sampler.sampler_state.positions.value_in_unit(unit.nanometer)[None]
        phi.append(dihedrals(np.asarray(x), [phi_index])[0, 0])
    phi = np.array(phi)
    print(f"flow moves: {flow_move.statistics}, acceptance {flow_move.acceptance_rate:.3f}")
    print(f"phi1 > 0 in {np.mean(phi > 0):.3f} of {phi.size} frames; "
          f"{int(np.abs(np.diff(phi > 0)).sum())} basin changes")


if __name__ == "__main__":
    main()
