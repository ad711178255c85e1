"""Training of Boltzmann-generator flows: RegFlow regression on fixed couplings, MLE, NLL + force matching.

    >>> from regflow_mm.training import TrainConfig, run_training
    >>> run_training(TrainConfig(system="aldp", data="aldp.h5", method="regflow", target="reflow"), "runs/aldp")

Modules: ``metrics`` (ESS, E-W1, T-W2, chirality, NLL, invertibility), ``plots``, ``objectives``,
``cnf`` (flow-matching teacher CNF, exact likelihood), ``couplings`` (reflow / OT pairs on disk),
``trainer`` (loop, EMA, checkpoints, resume, NaN stop), ``distributed`` (torchrun / gloo),
``evaluation`` (all metrics of a flow vs held-out MD), ``runner`` (a full run from a config), ``cli``.
"""
from .cnf import FlowMatchingConfig, SolverOptions, TeacherCNF, VelocityMLP, train_flow_matching
from .couplings import generate_ot_pairs, generate_reflow_pairs, load_pairs, ot_pairing
from .evaluation import evaluate_flow
from .metrics import (d_chirality_fraction, energy_w1, heldout_nll, invertibility_error, kish_ess, log_weights,
                      torsion_w2)
from .objectives import force_matching_loss, nll_loss, regflow_loss, reverse_kl_loss
from .runner import run_training
from .trainer import TrainConfig, Trainer, TrainingDiverged

__all__ = ["FlowMatchingConfig", "SolverOptions", "TeacherCNF", "VelocityMLP", "train_flow_matching",
           "generate_ot_pairs", "generate_reflow_pairs", "load_pairs", "ot_pairing", "evaluate_flow",
           "d_chirality_fraction", "energy_w1", "heldout_nll", "invertibility_error", "kish_ess", "log_weights",
           "torsion_w2", "force_matching_loss", "nll_loss", "regflow_loss", "reverse_kl_loss", "run_training",
           "TrainConfig", "Trainer", "TrainingDiverged"]
