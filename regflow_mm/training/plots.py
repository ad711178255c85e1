"""PNG diagnostics: Ramachandran plots, energy histograms, training curves.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, so nothing depends on
(or changes) the pyplot backend of the calling process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..importance import normalized_weights


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def ramachandran_plot(path: str | Path, angles_md: np.ndarray, angles_flow: np.ndarray,
                      log_w: np.ndarray | None = None, *, bins: int = 60,
                      labels: tuple[str, str] = ("phi", "psi"), md_log_w: np.ndarray | None = None) -> Path:
    """Write a PNG with 2-D histograms of (phi, psi) in rad: MD | flow raw | flow reweighted.

    ``angles_md`` (M, 2), ``angles_flow`` (N, 2); the reweighted panel is drawn only when
    ``log_w`` (N,) is given (weighted histogram with w / sum w; zero-weight samples vanish).
    ``md_log_w`` (M,): log-weights of enhanced-sampling frames; adds an "MD (reweighted)" panel
    beside the frames as sampled.
    """
    if md_log_w is None:
        panels = [("MD", angles_md, None)]
    else:
        panels = [("MD (frames)", angles_md, None), ("MD (reweighted)", angles_md, md_log_w)]
    panels.append(("flow (raw)", angles_flow, None))
    if log_w is not None:
        panels.append(("flow (reweighted)", angles_flow, log_w))
    return ramachandran_panels(path, panels, bins=bins, labels=labels)


def ramachandran_panels(path: str | Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray | None]], *,
                        bins: int = 60, labels: tuple[str, str] = ("phi", "psi")) -> Path:
    """Write a PNG with one 2-D (phi, psi) histogram (rad, log colour scale) per panel.

    ``panels``: (title, angles (n, 2) rad, log-weights (n,) or None for the frames as they are).
    """
    fig = Figure(figsize=(4.2 * len(panels), 4.0))
    edges = np.linspace(-np.pi, np.pi, bins + 1)
    for i, (title, a, log_w) in enumerate(panels):
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[1] != 2:
            raise ValueError(f"Ramachandran panel {title!r} needs an (n, 2) array of (phi, psi) in radians, "
                             f"got shape {a.shape}")
        w = None if log_w is None else normalized_weights(log_w)
        ax = fig.add_subplot(1, len(panels), i + 1)
        ok = np.isfinite(a).all(axis=1)
        h, _, _ = np.histogram2d(a[ok, 0], a[ok, 1], bins=[edges, edges], weights=None if w is None else w[ok],
                                 density=True)
        h = np.where(h > 0, h, np.nan)
        if np.isfinite(h).any():
            ax.pcolormesh(edges, edges, h.T, norm=LogNorm(vmin=np.nanmax(h) * 1e-4, vmax=np.nanmax(h)),
                          cmap="viridis")
        ax.set_title(f"{title} (n={int(ok.sum())})")
        ax.set_xlabel(f"{labels[0]} / rad")
        ax.set_ylabel(f"{labels[1]} / rad")
        ax.set_xlim(-np.pi, np.pi)
        ax.set_ylim(-np.pi, np.pi)
        ax.set_aspect("equal")
    return _save(fig, path)


def energy_histogram(path: str | Path, u_md: np.ndarray, u_flow: np.ndarray, log_w: np.ndarray | None = None,
                     *, bins: int = 80, u_range: tuple[float, float] | None = None,
                     md_log_w: np.ndarray | None = None) -> Path:
    """Write a PNG with densities of reduced energies u (kT): MD, flow raw, flow reweighted.

    ``md_log_w`` (M,): log-weights of enhanced-sampling MD frames (the MD histogram is then reweighted).

    The default range spans the MD energies padded by half their width; flow samples outside it
    (or with infinite energy) are counted in the legend, not silently dropped.
    """
    u_md, u_flow = np.asarray(u_md, dtype=np.float64), np.asarray(u_flow, dtype=np.float64)
    if u_range is None:
        lo, hi = np.percentile(u_md, [0.0, 100.0])
        pad = 0.5 * (hi - lo) + 1.0
        u_range = (lo - pad, hi + pad)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(u_range[0], u_range[1], bins + 1)
    ax.hist(u_md, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="k",
            weights=None if md_log_w is None else normalized_weights(md_log_w),
            label=f"MD (n={u_md.size}{', reweighted' if md_log_w is not None else ''})")
    inside = np.isfinite(u_flow) & (u_flow >= u_range[0]) & (u_flow <= u_range[1])
    if inside.any():
        ax.hist(u_flow[inside], bins=edges, density=True, histtype="step", color="C0",
                label=f"flow raw ({int((~inside).sum())} of {u_flow.size} outside range)")
    else:
        ax.plot([], [], color="C0", label=f"flow raw (all {u_flow.size} outside range)")
    if log_w is not None and inside.any():
        w = normalized_weights(log_w)
        if w[inside].sum() > 0:
            ax.hist(u_flow[inside], bins=edges, weights=w[inside], density=True, histtype="step", color="C3",
                    label=f"flow reweighted ({1.0 - w[inside].sum():.2%} weight outside)")
    ax.set_xlabel("reduced energy u / kT")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def training_curves(path: str | Path, records: Sequence[dict], keys: Sequence[str] | None = None,
                    x_key: str = "step") -> Path:
    """Write a PNG with one panel per logged quantity against ``x_key``.

    ``records`` are the trainer's log rows (dicts); ``keys`` defaults to every numeric key
    other than ``x_key`` present in any row. Missing or non-finite values are skipped.
    """
    if not records:
        raise ValueError("training_curves needs at least one log record")
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items()
                       if k != x_key and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        raise ValueError("no numeric quantities in the log records to plot")
    ncol = min(3, len(keys))
    nrow = (len(keys) + ncol - 1) // ncol
    fig = Figure(figsize=(4.2 * ncol, 3.0 * nrow))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        pts = [(r[x_key], r[key]) for r in records
               if x_key in r and isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
    fig.tight_layout()
    return _save(fig, path)


def mc_trace_plot(path: str | Path, torsion_name: str, angles: np.ndarray, counters: Sequence[dict],
                  acceptance: float) -> Path:
    """Write a PNG of a hybrid-MC run: a torsion (rad) per walker over iterations, and the fate of the
    flow proposals.

    ``angles`` (T, W) rad; ``counters``: one dict per walker with n_proposed, n_accepted,
    n_rejected_nonfinite, n_rejected_chirality (``sampling.hybrid_summary``); ``acceptance`` overall.
    """
    angles = np.asarray(angles)
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for w in range(angles.shape[1]):
        axes[0].plot(np.degrees(angles[:, w]), ".", ms=2, label=f"walker {w}")
    axes[0].set(xlabel="iteration", ylabel=f"{torsion_name} (deg)", ylim=(-180, 180), title="hybrid MC trace")
    axes[0].legend(fontsize=7)
    labels = ["accepted", "rejected\n(Metropolis)", "rejected\n(non-finite)", "rejected\n(chirality)"]
    totals = [sum(c["n_accepted"] for c in counters),
              sum(c["n_proposed"] - c["n_accepted"] - c["n_rejected_nonfinite"] - c["n_rejected_chirality"]
                  for c in counters),
              sum(c["n_rejected_nonfinite"] for c in counters), sum(c["n_rejected_chirality"] for c in counters)]
    axes[1].bar(labels, totals, color=["tab:green", "tab:gray", "tab:red", "tab:orange"])
    axes[1].set(title=f"flow proposals (acceptance {acceptance:.2%})", ylabel="count")
    return _save(fig, path)


def free_energy_plot(path: str | Path, estimates: Sequence[tuple[str, dict]], ylabel: str) -> Path:
    """Write a PNG comparing free-energy estimates: ``estimates`` [(label, {"delta_f", "ddelta_f"} kT)];
    an estimate without a finite ``delta_f`` (e.g. {"error": ...}) is left out of the plot."""
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    for i, (_, est) in enumerate(estimates):
        if "delta_f" in est and np.isfinite(est["delta_f"]):
            ax.errorbar([i], [est["delta_f"]], yerr=[est["ddelta_f"]], fmt="o", capsize=5)
    ax.set_xticks(list(range(len(estimates))), [label for label, _ in estimates])
    ax.set(ylabel=ylabel, title="free-energy difference", xlim=(-0.6, len(estimates) - 0.4))
    return _save(fig, path)
