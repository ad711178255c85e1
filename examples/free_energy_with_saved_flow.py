"""Recipe: importance reweighting and a free-energy difference from a saved flow alone (no MD).

    .venv/bin/python examples/free_energy_with_saved_flow.py FLOW.pt [--system aldp] [-n 20000]

Flow samples x ~ q get importance weights w = exp(-u(x)) / q(x) (u = U/kT, from the force field
through the batched EnergyEvaluator); weighted averages then estimate averages under the
Boltzmann distribution p ~ exp(-u) at the system's temperature. Printed:
- the Kish effective sample size (ESS, fraction of N and count): a small ESS means few samples
  carry the estimate and the error bars are unreliable;
- the reweighted population of phi1 > 0 (probability, with delta-method standard error);
- Delta F(phi1 < 0 -> phi1 > 0) = -ln(P(phi1 > 0) / P(phi1 < 0)) in kT and kJ/mol.
Samples with D-chirality get weight 0 (Cartesian flows can emit mirror images; they are not
the L peptide whose Boltzmann distribution we want), as do samples with non-finite energy.
For other states and observables see ``regflow-mm free-energy`` / ``regflow-mm reweight``.
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import load_flow
from regflow_mm.sampling.free_energy import state_delta_f
from regflow_mm.sampling.reweighting import draw_weighted_samples, weighted_mean
from regflow_mm.systems import get_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flow", help="a flow saved for the system (regflow-mm train / BoltzmannFlow.save)")
    parser.add_argument("--system", default="aldp", help="built-in system name or TOML spec (default aldp)")
    parser.add_argument("-n", type=int, default=20000, help="number of flow samples (default 20000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="energy worker processes (default: one per core; 0 = in this process)")
    args = parser.parse_args()

    system = get_system(args.system)
    if "phi1" not in system.torsions:
        raise SystemExit(f"system {system.name} has no torsion phi1 (it has {sorted(system.torsions)})")
    flow = load_flow(args.flow, system)  # checks that the flow was trained for this force field and T
    with EnergyEvaluator(system, n_workers=args.workers) as evaluator:
        samples = draw_weighted_samples(flow, evaluator, args.n, seed=args.seed, molecular_system=system)

    is_l = samples.is_l if samples.is_l is not None else np.ones(samples.n, dtype=bool)
    samples = dataclasses.replace(samples, log_w=np.where(is_l, samples.log_w, -np.inf))
    print(f"system {system.name}: T = {system.temperature:.1f} K, kT = {system.kT:.4f} kJ/mol")
    print(f"flow samples: {samples.n}; weight 0: {int(np.sum(~is_l))} with D-chirality, "
          f"{samples.n_nonfinite} in all (incl. non-finite energy)")
    if samples.n_nonfinite == samples.n:
        raise SystemExit("every sample has weight 0: nothing to reweight (is the flow trained for this system?)")
    ess = samples.ess()["ess"]
    print(f"Kish ESS: {ess:.4f} of N = {ess * samples.n:.1f} samples")

    phi1 = samples.torsions["phi1"]  # rad in (-pi, pi]; NaN only where the weight is 0
    with np.errstate(invalid="ignore"):
        positive, negative = phi1 > 0, phi1 < 0
    p, dp = weighted_mean(positive.astype(float), samples.log_w)
    print(f"P(phi1 > 0) = {float(p):.4f} +- {float(dp):.4f} (reweighted population, probability)")
    try:
        result = state_delta_f(samples.log_w, negative, positive)
    except ValueError as err:  # one state holds no weighted sample: Delta F is undefined, say why
        print(f"Delta F(phi1<0 -> phi1>0): undefined: {err}")
        return
    df, ddf = result["delta_f"], result["ddelta_f"]
    print(f"Delta F(phi1<0 -> phi1>0) = {df:.3f} +- {ddf:.3f} kT = "
          f"{df * system.kT:.3f} +- {ddf * system.kT:.3f} kJ/mol "
          f"(ESS in states: {result['ess_a']:.1f} / {result['ess_b']:.1f} samples)")


if __name__ == "__main__":  # the EnergyEvaluator's worker processes re-import this file
    main()
