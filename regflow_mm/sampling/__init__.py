"""Using a trained flow in OpenMM workflows: flow Monte Carlo moves, hybrid MD/flow walkers,
importance reweighting, free energies and energy-free TFEP.

    >>> from regflow_mm.sampling import FlowIndependenceMove
    >>> move = SequenceMove([LangevinDynamicsMove(n_steps=500), FlowIndependenceMove(flow, flow_path=path)])
    >>> run_adaptive_mc("aldp", path, "amc.h5", 2000, schedule=AdaptSchedule(200))  # flow refitted between segments

Parallel tempering with flow moves: ``regflow_mm.sampling.tempering`` (imports openmmtools' multistate
package, ~1 s, so it is not imported here).
"""
import contextlib
import io
import warnings

# openmmtools imports pymbar, which prints a "JAX NOT FOUND" banner and a timeseries notice on
# import (in every worker process too); import it once here, quietly, before the modules below.
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import openmmtools.mcmc  # noqa: F401

from .adaptive import AdaptSchedule, adaptive_summary, run_adaptive_mc
from .free_energy import delta_f_bar, delta_f_exp, flow_delta_f, parse_torsion_predicate, state_delta_f, torsion_state
from .hybrid import SeededLangevinDynamicsMove, export_walker_trajectory, hybrid_summary, run_hybrid_mc
from .moves import FlowIndependenceMove
from .reweighting import (WeightedSamples, draw_weighted_samples, log_ratio_of_means,
                          weighted_histogram, weighted_mean)
from .thermodynamic import ThermodynamicState, delta_f_between, delta_f_states, mixture_system
from .tfep import StateMap, TFEPSettings, tfep_between_states, tfep_delta_f, tfep_estimate, train_tfep_map

__all__ = ["ThermodynamicState", "delta_f_between", "delta_f_states", "mixture_system", "AdaptSchedule", "adaptive_summary", "run_adaptive_mc", "FlowIndependenceMove", "SeededLangevinDynamicsMove", "WeightedSamples", "delta_f_bar", "delta_f_exp",
           "draw_weighted_samples", "export_walker_trajectory", "flow_delta_f", "hybrid_summary",
           "log_ratio_of_means", "parse_torsion_predicate", "run_hybrid_mc",
           "state_delta_f", "StateMap", "TFEPSettings", "tfep_between_states", "tfep_delta_f", "tfep_estimate", "torsion_state", "train_tfep_map", "weighted_histogram", "weighted_mean"]
