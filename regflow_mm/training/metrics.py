"""Sample-quality metrics of Boltzmann generators (definitions: shared/REFERENCE.md, "Metrics").

All energies are reduced, u = U/kT in kT; angles in radians. Every clipping, filtering or
subsampling is an explicit argument (default: none) and is echoed in the returned dict, so a
reported number always carries the options that produced it.

- ``log_weights``, ``kish_ess``: importance weights and Kish ESS, defined in ``regflow_mm.importance``
  (re-exported here).
- ``energy_w1``: POT ``emd2_1d`` between held-out MD u and u of flow samples resampled
  multinomially with w (seeded ``numpy`` generator).
- ``torsion_w2``: sqrt of exact POT ``emd2`` on backbone torsions with the periodic ground cost
  sum_k min(|d_k|, 2 pi - |d_k|)^2.
- Both take ``md_log_w``, the reference frames' own log-weights (enhanced-sampling data): the
  reference side of the transport problem then carries those normalised weights exactly.
- ``d_chirality_fraction``, ``heldout_nll``, ``invertibility_error``.
- ``force_rmse``: RMSE (kJ/mol/nm, per Cartesian component) of the flow forces kT grad log q against
  reference forces (MD frames), beside the RMS of the reference forces themselves.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import ot
import torch

from ..importance import drop_top, kish_ess, log_weights, normalized_weights, resample  # noqa: F401  (re-exports)


def energy_w1(
    u_md: np.ndarray,
    u_flow: np.ndarray,
    log_w: np.ndarray | None,
    *,
    n_resample: int | None = None,
    seed: int = 0,
    energy_clip_kT: float | None = None,
    drop_top_fraction: float = 0.0,
    md_log_w: np.ndarray | None = None,
) -> dict[str, Any]:
    """E-W1 in kT between held-out MD reduced energies and (weight-resampled) flow sample energies.

    ``md_log_w`` (M,): log-weights of the MD frames (None: equal weights).
    ``u_md`` (M,), ``u_flow`` (N,), ``log_w`` (N,) or None for the raw (unweighted) flow samples.
    ``n_resample`` defaults to N; ``energy_clip_kT`` clamps both sets to [-c, c] before W1;
    ``drop_top_fraction`` drops the largest log-weights before resampling. Returns the metric
    ``e_w1`` plus every option and count used.
    """
    u_md = np.asarray(u_md, dtype=np.float64)
    u_flow = np.asarray(u_flow, dtype=np.float64)
    if u_md.ndim != 1 or u_flow.ndim != 1 or u_md.size == 0 or u_flow.size == 0:
        raise ValueError("u_md and u_flow must be non-empty 1-D arrays of reduced energies (kT)")
    if not np.isfinite(u_md).all():
        raise ValueError("held-out MD energies contain non-finite values: the dataset is corrupt")
    n_resample = int(n_resample or u_flow.size)
    out: dict[str, Any] = {"n_md": int(u_md.size), "n_flow": int(u_flow.size), "seed": int(seed),
                           "energy_clip_kT": energy_clip_kT, "drop_top_fraction": float(drop_top_fraction)}
    if log_w is None:
        if drop_top_fraction:
            raise ValueError("drop_top_fraction needs log-weights; pass log_w or set it to 0")
        finite = np.isfinite(u_flow)
        sample = u_flow[finite]
        out.update(weighted=False, n_nonfinite_dropped=int((~finite).sum()))
        if sample.size == 0:
            raise ValueError("every flow sample has a non-finite energy: E-W1 is undefined")
    else:
        log_w = np.asarray(log_w, dtype=np.float64)
        if log_w.shape != u_flow.shape:
            raise ValueError(f"log_w shape {log_w.shape} does not match u_flow shape {u_flow.shape}")
        keep = drop_top(log_w, drop_top_fraction)
        idx = np.flatnonzero(keep)[resample(log_w[keep], n_resample, np.random.default_rng(seed))]
        sample = u_flow[idx]
        out.update(weighted=True, n_resampled=n_resample, n_dropped=int((~keep).sum()))
    ref = u_md
    if energy_clip_kT is not None:
        c = float(energy_clip_kT)
        out["n_clipped"] = int((np.abs(sample) > c).sum() + (np.abs(ref) > c).sum())
        sample, ref = np.clip(sample, -c, c), np.clip(ref, -c, c)
    ref_w = _reference_weights(md_log_w, ref.size)
    out["md_weighted"] = ref_w is not None
    out["e_w1"] = float(ot.emd2_1d(ref, sample, a=ref_w, metric="euclidean"))  # POT default is sqeuclidean
    return out


def _reference_weights(md_log_w, m: int) -> np.ndarray | None:
    """Normalised reference weights (m,) from log-weights, or None for equal weights."""
    if md_log_w is None:
        return None
    md_log_w = np.asarray(md_log_w, dtype=np.float64)
    if md_log_w.shape != (m,):
        raise ValueError(f"md_log_w must have one entry per MD frame ({m}), got shape {md_log_w.shape}")
    return normalized_weights(md_log_w)


def torus_cost_matrix(a: np.ndarray, b: np.ndarray, period: float = 2.0 * np.pi) -> np.ndarray:
    """Periodic squared ground cost (n, m): sum over angles of min(|d|, period - |d|)^2, angles (n, k), (m, k)
    (rad with the default period 2 pi; flow-space circles have period 1)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"angles must be (n, k) and (m, k) arrays with equal k, got {a.shape} and {b.shape}")
    cost = np.zeros((a.shape[0], b.shape[0]))
    for k in range(a.shape[1]):
        d = np.abs(a[:, None, k] - b[None, :, k]) % period
        cost += np.minimum(d, period - d) ** 2
    return cost


def torsion_w2(
    angles_md: np.ndarray,
    angles_flow: np.ndarray,
    log_w: np.ndarray | None,
    *,
    n_resample: int | None = None,
    max_md: int | None = None,
    seed: int = 0,
    drop_top_fraction: float = 0.0,
    md_log_w: np.ndarray | None = None,
) -> dict[str, Any]:
    """T-W2 in rad: sqrt(exact EMD) with the torus cost between MD and (resampled) flow torsions.

    ``md_log_w`` (M,): log-weights of the MD frames (None: equal weights); a ``max_md`` subset keeps
    its frames' renormalised weights.
    ``angles_md`` (M, k), ``angles_flow`` (N, k) rad; ``log_w`` (N,) or None (raw samples, those
    with NaN angles dropped and counted). ``max_md`` subsamples MD frames without replacement
    (seeded); ``n_resample`` defaults to N. Memory is M*N float64 (10k x 10k: 0.8 GB).
    """
    angles_md = np.asarray(angles_md, dtype=np.float64)
    angles_flow = np.asarray(angles_flow, dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    out: dict[str, Any] = {"seed": int(seed), "max_md": max_md, "drop_top_fraction": float(drop_top_fraction)}
    md_w = None if md_log_w is None else np.asarray(md_log_w, dtype=np.float64)
    if md_w is not None and md_w.shape != (angles_md.shape[0],):
        raise ValueError(f"md_log_w must have one entry per MD frame ({angles_md.shape[0]}), got shape {md_w.shape}")
    if max_md is not None and angles_md.shape[0] > max_md:
        subset = np.sort(rng.choice(angles_md.shape[0], size=max_md, replace=False))
        angles_md = angles_md[subset]
        md_w = None if md_w is None else md_w[subset]
    if log_w is None:
        if drop_top_fraction:
            raise ValueError("drop_top_fraction needs log-weights; pass log_w or set it to 0")
        finite = np.isfinite(angles_flow).all(axis=1)
        sample = angles_flow[finite]
        out.update(weighted=False, n_nonfinite_dropped=int((~finite).sum()))
    else:
        log_w = np.asarray(log_w, dtype=np.float64)
        keep = drop_top(log_w, drop_top_fraction)
        n = int(n_resample or angles_flow.shape[0])
        idx = np.flatnonzero(keep)[resample(log_w[keep], n, np.random.default_rng(seed))]
        sample = angles_flow[idx]
        out.update(weighted=True, n_dropped=int((~keep).sum()))
    if sample.shape[0] == 0 or angles_md.shape[0] == 0:
        raise ValueError("T-W2 needs at least one MD and one flow sample with finite torsions")
    cost = torus_cost_matrix(angles_md, sample)
    ref_w = _reference_weights(md_w, cost.shape[0])
    out["md_weighted"] = ref_w is not None
    w2_sq = ot.emd2(np.full(cost.shape[0], 1.0 / cost.shape[0]) if ref_w is None else ref_w,
                    np.full(cost.shape[1], 1.0 / cost.shape[1]), cost, numItermax=max(100_000, 50 * cost.size))
    out.update(t_w2=float(np.sqrt(max(float(w2_sq), 0.0))), n_md=int(cost.shape[0]), n_flow=int(cost.shape[1]))
    return out


def d_chirality_fraction(d_residues: np.ndarray) -> dict[str, Any]:
    """Fraction of samples with at least one D residue; ``d_residues`` (B,) or (B, n_centres) bool
    as returned by ``MolecularSystem.d_residues``."""
    d = np.asarray(d_residues)
    if d.dtype != bool:
        raise ValueError(f"d_residues must be a bool array from MolecularSystem.d_residues, got dtype {d.dtype}")
    if d.ndim == 1:
        d = d[:, None]
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"d_residues must be (B,) or (B, n_centres) with B > 0, got shape {d.shape}")
    any_d = d.any(axis=1)
    return {"d_fraction": float(any_d.mean()), "n": int(d.shape[0]), "n_d": int(any_d.sum()),
            "d_fraction_per_centre": d.mean(axis=0).tolist()}


@torch.no_grad()
def heldout_nll(flow, x: np.ndarray | torch.Tensor, batch_size: int = 4096,
                log_w: np.ndarray | None = None) -> dict[str, Any]:
    """Mean negative log-likelihood -log q(x) in nats of held-out configurations ``x`` (B, n_atoms, 3) nm.

    Uses ``flow.log_prob`` (the density over the representation's coordinates, see BoltzmannFlow).
    ``log_w`` (B,): frame log-weights (enhanced-sampling data) for a weighted mean.
    Non-finite values are counted, never dropped silently: any makes ``nll`` = inf.
    """
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if x.shape[0] == 0:
        raise ValueError("heldout_nll needs at least one configuration")
    lps = [flow.log_prob(x[i:i + batch_size]).detach().double().cpu() for i in range(0, x.shape[0], batch_size)]
    lp = torch.cat(lps)
    n_bad = int((~torch.isfinite(lp)).sum())
    w = None if log_w is None else torch.as_tensor(normalized_weights(log_w))
    if w is not None and w.shape != lp.shape:
        raise ValueError(f"log_w must have one entry per configuration ({lp.numel()}), got {tuple(w.shape)}")
    mean = lp.mean() if w is None else (w * lp).sum()
    nll = float(-mean) if n_bad == 0 else math.inf
    ok = torch.isfinite(lp)
    inside = (lp[ok].mean() if w is None else (w[ok] * lp[ok]).sum() / w[ok].sum()) if ok.any() else None
    return {"nll": nll, "n": int(lp.numel()), "n_nonfinite": n_bad, "weighted": w is not None,
            "nll_in_support": None if inside is None else float(-inside),
            "outside_support_fraction": float(1 - (w[ok].sum() if w is not None else ok.double().mean()))}


@torch.no_grad()
def invertibility_error(transform, z: torch.Tensor, batch_size: int = 4096) -> dict[str, Any]:
    """Round-trip error of a Flow ``transform`` on latent points ``z`` (B, D):
    max/mean |f^-1(f(z)) - z| (flow-space units) and max |logdet_f + logdet_f^-1| (nats)."""
    errs, ld_errs = [], []
    for i in range(0, z.shape[0], batch_size):
        zi = z[i:i + batch_size]
        y, ld = transform(zi)
        zr, ld_inv = transform(y, inverse=True)
        errs.append((zr - zi).abs().amax(dim=1).double().cpu())
        ld_errs.append((ld + ld_inv).abs().double().cpu())
    e, le = torch.cat(errs), torch.cat(ld_errs)
    return {"max_abs": float(e.max()), "mean_abs": float(e.mean()), "logdet_max_abs": float(le.max()),
            "n": int(e.numel())}


# Ramachandran basins of one residue's (phi, psi), rad: alpha_L / C7ax for phi > 0; for phi < 0,
# alpha_R for -2.1 < psi < 0.87 (-120 to 50 degrees) and beta / C7eq / PII otherwise.
BASINS = ("beta", "alpha_R", "alpha_L")


def basin_labels(phi: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """(B,) index into ``BASINS`` of each (phi, psi) pair in rad (NaN angles: -1)."""
    phi, psi = np.asarray(phi, dtype=np.float64), np.asarray(psi, dtype=np.float64)
    labels = np.where(phi > 0, 2, np.where((psi > -2.1) & (psi < 0.87), 1, 0))
    return np.where(np.isfinite(phi) & np.isfinite(psi), labels, -1)


def basin_coverage(ref_angles: np.ndarray, ref_log_w: np.ndarray | None, flow_angles: np.ndarray,
                   flow_log_w: np.ndarray, names: list[str], *, min_population: float = 1e-3,
                   min_flow_samples: int = 20) -> dict[str, Any]:
    """Ramachandran basin populations of every residue, reference (weighted) vs flow (reweighted).

    ``ref_angles`` (M, k), ``flow_angles`` (N, k) rad in the torsion order ``names``; ``ref_log_w`` (M,)
    or None, ``flow_log_w`` (N,) importance log-weights. A basin is present in the reference when its
    weighted population is at least ``min_population``; the flow covers it when at least
    ``min_flow_samples`` raw samples fall in it (so the reweighted population rests on samples).
    Returns per residue {basin: {ref, flow_reweighted, flow_raw_count}} and ``n_missing`` (basins of
    the reference the flow does not cover).
    """
    w_ref = (np.full(len(ref_angles), 1.0 / len(ref_angles)) if ref_log_w is None
             else normalized_weights(ref_log_w))
    w_flow = normalized_weights(flow_log_w)
    out: dict[str, Any] = {"residues": {}, "n_missing": 0, "min_population": min_population,
                           "min_flow_samples": min_flow_samples}
    for i, name in enumerate(names):
        if not name.startswith("phi") or f"psi{name[3:]}" not in names:
            continue
        j = names.index(f"psi{name[3:]}")
        ref_lab = basin_labels(ref_angles[:, i], ref_angles[:, j])
        flow_lab = basin_labels(flow_angles[:, i], flow_angles[:, j])
        residue = {}
        for b, basin in enumerate(BASINS):
            ref_pop = float(w_ref[ref_lab == b].sum())
            count = int((flow_lab == b).sum())
            residue[basin] = {"ref": ref_pop, "flow_reweighted": float(w_flow[flow_lab == b].sum()),
                              "flow_raw_count": count}
            if ref_pop >= min_population and count < min_flow_samples:
                out["n_missing"] += 1
        out["residues"][name[3:]] = residue
    return out


def force_rmse(flow, positions: np.ndarray, forces: np.ndarray, chunk_size: int = 256) -> dict[str, Any]:
    """Flow forces vs reference forces on the same frames: positions (B, n, 3) nm, forces (B, n, 3)
    kJ/mol/nm (e.g. held-out MD frames). Returns ``rmse`` (kJ/mol/nm per component, over all frames and
    components), ``reference_rms`` (the same for a zero force: the scale), ``n_frames`` and
    ``n_outside`` (frames outside the flow's support, left out; their flow force is undefined)."""
    positions = np.asarray(positions, dtype=np.float64)
    forces = np.asarray(forces, dtype=np.float64)
    if positions.shape != forces.shape or positions.ndim != 3:
        raise ValueError(f"positions {positions.shape} and forces {forces.shape} must both be (B, n_atoms, 3)")
    dtype = next(flow.parameters()).dtype
    energies, flow_forces = flow.energy_and_forces(torch.as_tensor(positions, dtype=dtype), chunk_size=chunk_size)
    inside = torch.isfinite(energies).cpu().numpy()
    if not inside.any():
        raise ValueError("every frame lies outside the flow's support: no flow forces to compare")
    diff = flow_forces.detach().cpu().double().numpy()[inside] - forces[inside]
    return {"rmse": float(np.sqrt(np.mean(diff ** 2))), "reference_rms": float(np.sqrt(np.mean(forces[inside] ** 2))),
            "n_frames": int(inside.sum()), "n_outside": int((~inside).sum())}

