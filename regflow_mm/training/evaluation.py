"""Evaluate a BoltzmannFlow against held-out MD: sample, reweight, compute every metric, plot.

Used by the trainer's per-epoch validation, ``regflow-mm evaluate`` and the benchmark. Energies
go through ``EnergyEvaluator`` (its executor shards them over processes or a cluster); metric
definitions and options are those of ``metrics.py`` and are reported with the numbers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import dihedrals
from ..energy import EnergyEvaluator
from ..flows.sampling import sample_flow
from ..systems import check_spec_hash
from . import metrics, plots


def backbone_torsions(system, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Backbone torsions (B, k) in rad of positions (B, n_atoms, 3) nm, and their names."""
    names = list(system.torsions)
    if not names:
        raise ValueError(f"system {system.name!r} defines no backbone torsions: T-W2 and Ramachandran need them")
    return dihedrals(np.asarray(x, dtype=np.float64), [system.torsions[k] for k in names]), names


def ramachandran_pair(names: list[str]) -> tuple[int, int]:
    """Column indices of the first (phi_i, psi_i) pair of the same residue index (else the first two)."""
    for i, a in enumerate(names):
        if a.startswith("phi") and f"psi{a[3:]}" in names:
            return i, names.index(f"psi{a[3:]}")
    return 0, min(1, len(names) - 1)


def evaluate_flow(flow, system, md_positions: np.ndarray, md_reduced_energy: np.ndarray, *, evaluator,
                  n_samples: int = 10_000, n_torsion: int | None = None, seed: int = 0,
                  energy_clip_kT: float | None = None, drop_top_fraction: float = 0.0,
                  n_invertibility: int = 512, chunk_size: int = 4096,
                  plots_dir: str | Path | None = None, plot_prefix: str = "",
                  md_log_weights: np.ndarray | None = None, n_bootstrap: int = 0,
                  n_nll: int | None = None) -> dict[str, Any]:
    """All metrics of ``flow`` against held-out reference frames (MD, or enhanced sampling with weights).

    ``md_positions`` (M, n_atoms, 3) nm and their reduced energies ``md_reduced_energy`` (M,) kT;
    ``md_log_weights`` (M,) the frames' log-weights to the target ensemble (None: plain MD, equal
    weights); ``evaluator`` an EnergyEvaluator of ``system``. ``n_torsion`` caps both sides of T-W2
    (at most min(n_samples, M); default 10000; exact EMD memory grows as n^2). ``n_bootstrap`` > 0 adds a
    bootstrap interval of the ESS (ess_p05, ess_p95). ``n_nll`` caps the reference frames of the held-out
    NLL (a seeded subset, with their weights; for flows whose likelihood is costly, e.g. a CNF). Returns flat
    scalar metrics (ess, e_w1, e_w1_raw, t_w2, t_w2_raw, nll, d_fraction, d_fraction_md, above_max_fraction:
    raw samples with u above the reference's highest, basins_missing: Ramachandran basins of the reference the
    flow does not sample (``metrics.basin_coverage``), invertibility_max_abs, timings in s) plus ``details``
    with the options and counts of each metric (``details["basins"]``: populations per residue).
    """
    check_spec_hash(flow.spec_hash, system, "the flow")
    md_positions = np.asarray(md_positions)
    md_u = np.asarray(md_reduced_energy, dtype=np.float64)
    if md_positions.shape[0] != md_u.shape[0] or md_positions.shape[0] == 0:
        raise ValueError("md_positions and md_reduced_energy must describe the same, non-empty set of frames")
    out: dict[str, Any] = {"n_samples": int(n_samples), "n_md": int(md_u.size), "seed": int(seed)}
    details: dict[str, Any] = {}
    flow.eval()

    t = time.perf_counter()
    x, log_q = sample_flow(flow, n_samples, seed, chunk_size)
    out["sample_s"] = time.perf_counter() - t
    t = time.perf_counter()
    u = evaluator.reduced_energy(x)
    out["energy_s"] = time.perf_counter() - t
    out["n_nonfinite_energy"] = int((~np.isfinite(u)).sum())
    log_w = metrics.log_weights(log_q, u)

    md_lw = None if md_log_weights is None else np.asarray(md_log_weights, dtype=np.float64)
    details["ess"] = metrics.kish_ess(log_w, drop_top_fraction=drop_top_fraction, n_bootstrap=n_bootstrap,
                                      seed=seed)
    out["ess"] = details["ess"]["ess"]
    if n_bootstrap:
        out["ess_p05"], out["ess_p95"] = details["ess"]["ess_fraction_p05"], details["ess"]["ess_fraction_p95"]
    out["above_max_fraction"] = float(np.mean(~(u <= md_u.max())))  # non-finite energies count as above
    details["e_w1"] = metrics.energy_w1(md_u, u, log_w, seed=seed, energy_clip_kT=energy_clip_kT,
                                        drop_top_fraction=drop_top_fraction, md_log_w=md_lw)
    details["e_w1_raw"] = metrics.energy_w1(md_u, u, None, energy_clip_kT=energy_clip_kT, md_log_w=md_lw)
    out["e_w1"], out["e_w1_raw"] = details["e_w1"]["e_w1"], details["e_w1_raw"]["e_w1"]

    ang_flow, names = backbone_torsions(system, x)
    ang_md, _ = backbone_torsions(system, md_positions)
    # Never more per side than either set holds: resampling a few samples into thousands of copies
    # makes the exact EMD degenerate and slow without adding information.
    n_torsion = int(min(n_torsion or 10_000, n_samples, md_u.size))
    t = time.perf_counter()
    details["t_w2"] = metrics.torsion_w2(ang_md, ang_flow, log_w, n_resample=n_torsion, max_md=n_torsion,
                                         seed=seed, drop_top_fraction=drop_top_fraction, md_log_w=md_lw)
    details["t_w2_raw"] = metrics.torsion_w2(ang_md, ang_flow[:n_torsion], None, max_md=n_torsion, seed=seed,
                                             md_log_w=md_lw)
    out["t_w2_s"] = time.perf_counter() - t
    out["t_w2"], out["t_w2_raw"] = details["t_w2"]["t_w2"], details["t_w2_raw"]["t_w2"]
    details["torsions"] = names
    details["basins"] = metrics.basin_coverage(ang_md, md_lw, ang_flow, log_w, names)
    out["basins_missing"] = details["basins"]["n_missing"]

    details["chirality"] = metrics.d_chirality_fraction(system.d_residues(x))
    out["d_fraction"] = details["chirality"]["d_fraction"]
    out["d_fraction_md"] = metrics.d_chirality_fraction(system.d_residues(md_positions))["d_fraction"]

    t = time.perf_counter()
    nll_rows = np.arange(md_u.size)
    if n_nll is not None and n_nll < md_u.size:
        nll_rows = np.sort(np.random.default_rng(seed).choice(md_u.size, n_nll, replace=False))
    details["nll"] = metrics.heldout_nll(flow, torch.as_tensor(md_positions[nll_rows], dtype=flow.dtype), chunk_size,
                                         None if md_lw is None else md_lw[nll_rows])
    details["nll"]["n_frames"] = int(nll_rows.size)
    out["nll_s"] = time.perf_counter() - t
    out["nll"] = details["nll"]["nll"]
    out["nll_in_support"] = details["nll"]["nll_in_support"]
    out["outside_support_fraction"] = details["nll"]["outside_support_fraction"]

    gen = torch.Generator(device=flow.device).manual_seed(int(seed) + 1)
    z = flow.prior.sample(min(n_invertibility, n_samples), generator=gen)
    details["invertibility"] = metrics.invertibility_error(flow.transform, z)
    out["invertibility_max_abs"] = details["invertibility"]["max_abs"]

    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        i, j = ramachandran_pair(names)
        plots.ramachandran_plot(plots_dir / f"{plot_prefix}ramachandran.png", ang_md[:, [i, j]],
                                ang_flow[:, [i, j]], log_w, labels=(names[i], names[j]), md_log_w=md_lw)
        plots.energy_histogram(plots_dir / f"{plot_prefix}energy_histogram.png", md_u, u, log_w, md_log_w=md_lw)
    out["details"] = details
    return out


def evaluate_on_frames(flow, dataset, frames, *, n_samples: int, seed: int = 0, n_torsion: int = 5000,
                       n_bootstrap: int = 200, chunk_size: int = 2000) -> dict[str, float]:
    """``scalar_metrics`` of ``evaluate_flow`` against frames ``frames`` (indices) of ``dataset`` (a Dataset),
    with their weights if it is weighted; energies in this process, no gradients."""

    with EnergyEvaluator(dataset.system, n_workers=0) as evaluator, torch.no_grad():
        res = evaluate_flow(flow, dataset.system, dataset.positions[frames], dataset.reduced_energies()[frames],
                            evaluator=evaluator, n_samples=n_samples, seed=seed, n_torsion=n_torsion,
                            n_bootstrap=n_bootstrap, chunk_size=chunk_size,
                            md_log_weights=dataset.log_weights[frames] if dataset.weighted else None)
    return scalar_metrics(res)


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The flat numeric entries of an ``evaluate_flow`` result (for CSV logs and tables)."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
