"""Energy-free targeted free-energy perturbation (TFEP) between metastable states, in internal coordinates.

A bijection M of configuration space maps samples of state A onto state B. With u_S the reduced
potential restricted to S (+inf outside; kT), the generalised works

    W_F(x) = u_B(M(x)) - u_A(x) - log|det dM/dx|              x ~ p_A
    W_R(y) = u_A(M^-1(y)) - u_B(y) - log|det dM^-1/dy|        y ~ p_B

give Delta F_{A->B} = F_B - F_A = -ln E_A[exp(-W_F)] = ln E_B[exp(-W_R)] for any bijection
(Zwanzig's identity for the mapped ensemble); the closer M pushes p_A onto p_B, the narrower the
works. Both directions are combined by BAR (pymbar). For two states of one ensemble, Delta F =
-ln(P_B / P_A), the quantity ``free_energy.state_delta_f`` estimates from weighted samples.

The map (``StateMap``): M = R^-1 o T o R, with R the internal-coordinate representation fitted to
both states (positions nm <-> unit box, wide torsions on circles) and T a bijection of the box:
a reflection u -> -u of the moved torsion circles on which B resembles the mirror image of A
(chosen from the data: phi -> -phi, psi -> -psi between the two phi basins of a dipeptide), a
rotation of each moved torsion circle that puts A's circular mean mid-box, circular
rational-quadratic spline couplings (diffeomorphisms of each circle, conditioned on every other
coordinate), and a rotation from mid-box to B's circular mean. So the map respects periodicity:
torsions move around their circles, never through a cut. By default only the wide (circular)
torsions move (``moved="circular"``): bonds, angles and narrow torsions pass unchanged and condition
the move; ``moved="all"`` transforms every coordinate. The log-det in Cartesian terms is

    log|det dM/dx| = logdet_R(x) + logdet_T(R(x)) + logdet_R^-1(T(R(x))),

the density change with respect to the measure on R^{3N}/SE(3) that the flows' log q uses
(``representations/internal.py``): exact for rigid-motion-invariant energies. The representation's
constant scale factors cancel.

Training calls no energy: frames of each state are resampled with their log-weights
(metadynamics/tempering data), paired by exact (POT emd) or minibatch OT on the moved coordinates
under the torus cost (``training.couplings.ot_pairing``), and T is fitted by RegFlow regression
(``training.objectives.regflow_terms``, differences taken on the circle).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

import numpy as np
import ot
import torch
from torch import nn

from regflow_mm.data.dataset import dihedrals
from regflow_mm.flows.base import SequentialFlow
from regflow_mm.flows.elementwise import CircularReflection, CircularShift
from regflow_mm.flows.nets import coupling_mask
from regflow_mm.flows.splines import SplineCoupling
from regflow_mm.importance import kish_ess, resample
from regflow_mm.progress import progress_bar
from regflow_mm.sampling.free_energy import MIN_STATE_ESS, _pymbar, parse_torsion_predicate, torsion_state
from regflow_mm.training.couplings import ot_pairing
from regflow_mm.training.objectives import regflow_loss

log = logging.getLogger(__name__)

# Works of samples mapped outside the target state are +inf (weight exactly 0); pymbar's BAR error
# is NaN with inf entries, so they enter it as this finite stand-in (exp(-1e6) == 0.0 in float64).
_OUTSIDE_WORK = 1e6


# --------------------------------------------------------------------------------------- estimators

def _check_works(work, direction: str) -> np.ndarray:
    work = np.asarray(work, dtype=np.float64)
    if work.ndim != 1 or work.size == 0:
        raise ValueError(f"{direction} works must be a non-empty 1-D array, got shape {work.shape}")
    if np.isnan(work).any():
        raise ValueError(f"{direction} works contain NaN: the map or the energies produced NaN")
    if (work == -np.inf).any():
        raise ValueError(f"{direction} works contain -inf: a sample has infinite energy in its own state")
    if not np.isfinite(work).any():
        raise ValueError(f"every {direction} work is infinite: no mapped sample lands inside the target state; "
                         "train the map longer, check the state definitions, or use more samples")
    return work


def _exp_direction(work: np.ndarray) -> dict:
    """-ln mean exp(-W) (kT) with pymbar EXP's error, the work ESS (Kish, of exp(-W)) and counts."""
    finite = np.isfinite(work)
    result = _pymbar().exp(np.where(finite, work, _OUTSIDE_WORK))
    ess = kish_ess(np.where(finite, -work, -np.inf))["ess"]
    return {"delta_f": float(result["Delta_f"]), "ddelta_f": float(result["dDelta_f"]), "n": int(work.size),
            "n_outside": int((~finite).sum()), "work_ess": float(ess), "work_ess_count": float(ess * work.size),
            "work_mean": float(work[finite].mean()), "work_std": float(work[finite].std())}


def _bar_bootstrap(w_f: np.ndarray, w_r: np.ndarray, n_bootstrap: int, seed: int) -> float:
    """Std of BAR's Delta F over resamples of both work sets (``default_rng(seed)``)."""
    if max(np.ptp(w_f), np.ptp(w_r)) < 1e-9:
        return 0.0  # constant works (an exact map): every resample gives the same Delta F
    pymbar = _pymbar()
    rng = np.random.default_rng(seed)
    estimates = []
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(int(n_bootstrap)):
            f = w_f[rng.integers(0, w_f.size, w_f.size)]
            r = w_r[rng.integers(0, w_r.size, w_r.size)]
            try:
                estimates.append(pymbar.bar(f, r, compute_uncertainty=False)["Delta_f"])
            except pymbar.utils.BoundsError:  # a resample without overlap: its BAR is unbounded
                estimates.append(np.inf)
    return float(np.std(estimates, ddof=1)) if np.isfinite(estimates).all() else math.inf


def tfep_estimate(w_forward, w_reverse=None, n_bootstrap: int = 100, seed: int = 0) -> dict:
    """Delta F_{A->B} (kT) from generalised works: EXP in each direction given, BAR when both are.

    w_forward (N_A,): W_F of samples of A; w_reverse (N_B,): W_R of samples of B (+inf where the
    mapped sample left the target state). Returns {"delta_f", "ddelta_f", "method" ("BAR" or
    "EXP forward"), "forward": {...}, "reverse": {...} or None, "reliable", "best_work_ess_count"};
    each direction holds its own EXP estimate of Delta F_{A->B}, the work ESS (fraction and count),
    and the number of samples mapped outside the target state. ``reliable`` is False when the
    estimate rests on fewer than ``MIN_STATE_ESS`` effective samples (the best direction's work ESS).
    Errors, for independent samples: pymbar's for EXP; for BAR the standard deviation over
    ``n_bootstrap`` resamples of both work sets (heavy-tailed works make pymbar's analytical BAR
    error NaN or optimistic; it is kept as "ddelta_f_pymbar").
    """
    w_f = _check_works(w_forward, "forward (A -> B)")
    forward = _exp_direction(w_f)
    reverse = None
    out = {"forward": forward, "reverse": None}
    if w_reverse is None:
        out.update(delta_f=forward["delta_f"], ddelta_f=forward["ddelta_f"], method="EXP forward")
        best = forward["work_ess_count"]
    else:
        w_r = _check_works(w_reverse, "reverse (B -> A)")
        reverse = _exp_direction(w_r)
        reverse["delta_f"] = -reverse["delta_f"]  # EXP of W_R estimates Delta F_{B->A}
        w_f_bar, w_r_bar = (np.where(np.isfinite(w), w, _OUTSIDE_WORK) for w in (w_f, w_r))
        pymbar = _pymbar()
        with np.errstate(invalid="ignore", divide="ignore"):
            try:
                bar = pymbar.bar(w_f_bar, w_r_bar)
            except pymbar.utils.BoundsError:
                raise ValueError("BAR cannot bracket Delta F: the forward and reverse works do not overlap; use the "
                                 "EXP estimates of each direction, a better map or more samples") from None
        out.update(delta_f=float(bar["Delta_f"]), ddelta_f=_bar_bootstrap(w_f_bar, w_r_bar, n_bootstrap, seed),
                   ddelta_f_pymbar=float(bar["dDelta_f"]), method="BAR", reverse=reverse)
        best = max(forward["work_ess_count"], reverse["work_ess_count"])
    out["best_work_ess_count"] = best
    out["reliable"] = bool(best >= MIN_STATE_ESS and math.isfinite(out["ddelta_f"]))
    return out


# -------------------------------------------------------------------------------------------- the map

def _circular_mean(y: torch.Tensor) -> torch.Tensor:
    """Circular mean (D,) in [0, 1) of points y (N, D) on circles of period 1."""
    angle = 2 * math.pi * y
    return torch.remainder(torch.atan2(angle.sin().mean(0), angle.cos().mean(0)) / (2 * math.pi), 1.0)


def _orientations(y_a: torch.Tensor, y_b: torch.Tensor, turn: torch.Tensor, n_max: int = 2000) -> torch.Tensor:
    """(D,) bool: circles on which B looks more like the mirror image of A than like A turned.

    For each ``turn`` circle, the circular W2 (POT ``wasserstein_circle``) between B and A rotated onto
    B's circular mean, with A as is or reflected (u -> -u); True where the reflection is closer.
    """
    reflect = torch.zeros_like(turn)
    a, b = y_a[:n_max].double(), y_b[:n_max].double()
    for k in turn.nonzero().flatten().tolist():
        costs = []
        for sign in (1.0, -1.0):
            ak = torch.remainder(sign * a[:, k], 1.0)
            ak = torch.remainder(ak - _circular_mean(ak[:, None])[0] + _circular_mean(b[:, k:k + 1])[0], 1.0)
            costs.append(float(np.ravel(ot.wasserstein_circle(ak.numpy(), b[:, k].numpy(), p=2))[0]))
        reflect[k] = costs[1] < costs[0]
    return reflect


class StateMap(nn.Module):
    """M = R^-1 o T o R: a bijection of configurations (see the module docstring), float64.

    representation: a fitted ``InternalCoordinates``; moved (D,) bool: flow-space coordinates T
    changes; y_a, y_b (N, D): flow-space samples of A and B that set the circle rotations and, where
    ``reflect`` is None, the orientation of each moved circle (``_orientations``: e.g. phi -> -phi
    between the two phi basins of a dipeptide); reflect (D,) bool fixes them instead.
    ``forward(x, inverse=False)``: positions (B, n_atoms, 3) nm -> (M(x) nm, log|det dM/dx| (B,)).
    """

    def __init__(self, representation, moved, y_a: torch.Tensor, y_b: torch.Tensor, *, layers: int = 6,
                 hidden: int = 64, blocks: int = 1, bins: int = 8, reflect=None):
        super().__init__()
        if representation.domain != "box":
            raise ValueError("StateMap needs a box representation (internal coordinates)")
        self.representation = representation
        circular = representation.circular.cpu()
        moved = torch.as_tensor(moved, dtype=torch.bool).cpu()
        if moved.shape != circular.shape or not moved.any():
            raise ValueError(f"moved must be a (D={circular.numel()},) bool mask with some True entries")
        if int(layers) < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        turn = circular & moved
        y_a, y_b = y_a.detach().cpu(), y_b.detach().cpu()
        reflect = _orientations(y_a, y_b, turn) if reflect is None else torch.as_tensor(reflect, dtype=torch.bool) & turn
        y_a = torch.where(reflect, torch.remainder(-y_a, 1.0), y_a)
        shift_in = torch.where(turn, 0.5 - _circular_mean(y_a), torch.zeros(circular.shape, dtype=y_a.dtype))
        shift_out = torch.where(turn, _circular_mean(y_b) - 0.5, torch.zeros(circular.shape, dtype=y_b.dtype))
        idx = moved.nonzero().flatten()
        couplings = []
        for i in range(int(layers)):
            sub = coupling_mask(idx.numel(), i) if idx.numel() >= 2 else torch.ones(1, dtype=torch.bool)
            mask = torch.zeros_like(moved)
            mask[idx[sub]] = True
            couplings.append(SplineCoupling(mask, "box", circular, bins=bins, hidden=hidden, blocks=blocks))
        self.transform = SequentialFlow([CircularReflection(reflect), CircularShift(shift_in, turn), *couplings,
                                         CircularShift(shift_out, turn)])
        self.register_buffer("moved", moved)
        self.register_buffer("reflect", reflect)
        self.register_buffer("circular", circular)
        self.to(torch.float64)

    def forward(self, x, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        y, ld_to = self.representation.to_flow_space(x)
        z, ld_t = self.transform(y, inverse=inverse)
        x2, ld_from = self.representation.from_flow_space(z)
        return x2, ld_to + ld_t + ld_from


def train_tfep_map(transform, x_a, x_b, *, moved=None, circular=None, n_steps: int = 1500, batch_size: int = 256,
                   lr: float = 3e-3, ot_method: str = "exact", regularizer: str = "logdet", lambda_r: float = 1e-6,
                   seed: int = 0, progress: bool = False) -> dict:
    """RegFlow fit of a Flow ``transform`` on OT pairs of samples x_a, x_b (N, D) of A and B (equal N).

    Pairs: OT (``ot_method`` "exact" or "minibatch", both bijective) between B and the untrained
    ``transform``'s image of A (its fixed reflections and rotations; the identity for a fresh
    coupling flow) on the ``moved`` coordinates ((D,) bool, default all), torus cost on the
    ``circular`` ones ((D,) bool, circles of period 1);
    targets: the B partner's moved coordinates, the A sample's own elsewhere; regression differences
    on the circles are wrapped. Adam with a cosine learning rate, batches from
    ``torch.Generator().manual_seed(seed)``. No energy is evaluated. Returns {"ot": pairing info,
    "final": last loss parts, "n_steps", "cpu_s", "wall_s"} (this process's CPU time: pairing + regression).
    """
    dtype = next(iter(transform.parameters())).dtype
    x_a = torch.as_tensor(np.asarray(x_a), dtype=dtype)
    x_b = torch.as_tensor(np.asarray(x_b), dtype=dtype)
    if x_a.shape != x_b.shape or x_a.dim() != 2:
        raise ValueError(f"x_a and x_b must be (N, D) with equal shapes, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    dim = x_a.shape[1]
    moved = torch.ones(dim, dtype=torch.bool) if moved is None else torch.as_tensor(moved, dtype=torch.bool)
    circular = torch.zeros(dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular, dtype=torch.bool)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with torch.no_grad():  # pairs by OT between B and A as the untrained map (its fixed layers) places it
        start = transform(x_a)[0]
    src, ot_info = ot_pairing(start[:, moved], x_b[:, moved], method=ot_method, seed=seed, circular=circular[moved])
    x0 = x_a[torch.as_tensor(src)]
    x1 = torch.where(moved, x_b, x0)
    generator = torch.Generator().manual_seed(seed)
    params = list(transform.parameters())
    optimiser = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(int(n_steps), 1))
    parts: dict = {}
    transform.train()
    for _ in progress_bar(range(int(n_steps)), desc="TFEP map", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, x0.shape[0], (min(batch_size, x0.shape[0]),), generator=generator)
        loss, parts = regflow_loss(transform, x0[idx], x1[idx], regularizer=regularizer, lambda_r=lambda_r,
                                   circular=circular)
        if not torch.isfinite(loss):
            raise RuntimeError(f"TFEP map loss became {loss.item()}: lower the learning rate (now {lr})")
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0)
        optimiser.step()
        schedule.step()
    transform.eval()
    return {"ot": ot_info, "final": parts, "n_steps": int(n_steps), "cpu_s": time.process_time() - cpu0,
            "wall_s": time.perf_counter() - wall0}


@torch.no_grad()
def map_works(state_map: StateMap, x, u_source, u_target: Callable[[np.ndarray], np.ndarray],
              in_target: Callable[[np.ndarray], np.ndarray], inverse: bool = False,
              batch_size: int = 4096) -> np.ndarray:
    """Generalised works (kT) of source samples x (N, n_atoms, 3) nm with reduced energies u_source (N,).

    The works are u_target(M(x)) - u_source - log|det dM/dx| (or with M^-1 when ``inverse``); +inf where
    ``in_target`` (positions -> (B,) bool) says the mapped sample is outside the target state (its
    energy is then not evaluated).
    """
    x = np.asarray(x, dtype=np.float64)
    u_source = np.asarray(u_source, dtype=np.float64)
    works = []
    for i in range(0, x.shape[0], batch_size):
        mapped, logdet = state_map(torch.from_numpy(x[i:i + batch_size]), inverse=inverse)
        mapped = mapped.numpy()
        inside = np.asarray(in_target(mapped), dtype=bool) & np.isfinite(mapped).all(axis=(1, 2))
        u = np.full(mapped.shape[0], np.inf)
        if inside.any():
            u[inside] = u_target(mapped[inside])
        works.append(u - u_source[i:i + batch_size] - logdet.numpy())
    return np.concatenate(works)


# ------------------------------------------------------------------------------------ between states

@dataclasses.dataclass
class TFEPSettings:
    """TFEP between torsion-defined states. Counts are frames per state (n_eval at most the Kish ESS of
    the state's evaluation frames); ``moved``: "circular" (wide torsions only) or "all"; map size
    (layers, hidden, blocks, bins) and RegFlow training settings."""

    n_train: int = 3000
    n_eval: int = 2000
    moved: str = "circular"
    layers: int = 6
    hidden: int = 64
    blocks: int = 1
    bins: int = 8
    n_steps: int = 800
    batch_size: int = 256
    lr: float = 3e-3
    ot_method: str = "exact"
    lambda_r: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        if self.moved not in ("circular", "all"):
            raise ValueError(f"TFEP moved must be 'circular' or 'all', got {self.moved!r}")
        for name in ("n_train", "n_eval", "layers", "hidden", "bins", "n_steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TFEP {name} must be >= 1, got {getattr(self, name)}")
        if self.ot_method not in ("exact", "minibatch"):
            raise ValueError(f"TFEP ot_method must be 'exact' or 'minibatch' (a bijective pairing), got {self.ot_method!r}")


def state_members(system, positions, state_a: str, state_b: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(in_A, in_B) (T,) bool of frames (T, n_atoms, 3) nm for two torsion expressions (degrees).

    ValueError naming the state when a state selects no frame of ``what``, or when the two overlap.
    """
    pred_a = parse_torsion_predicate(state_a, system.torsions)
    pred_b = parse_torsion_predicate(state_b, system.torsions)
    torsions = _torsions(system, positions)
    in_a, in_b = torsion_state(torsions, pred_a), torsion_state(torsions, pred_b)
    both = int((in_a & in_b).sum())
    if both:
        raise ValueError(f"states A {state_a!r} and B {state_b!r} overlap: {both} frames of {what} satisfy both; "
                         "make the conditions exclusive")
    for label, expr, inside in (("A", state_a, in_a), ("B", state_b, in_b)):
        if not inside.any():
            raise ValueError(f"state {label} {expr!r} selects no frame of {what} ({len(inside)} frames); "
                             "widen it or use data that visit it")
    return in_a, in_b


def _torsions(system, positions) -> dict[str, np.ndarray]:
    names = list(system.torsions)
    angles = dihedrals(np.asarray(positions, dtype=np.float64), [system.torsions[k] for k in names])
    return {k: angles[:, j] for j, k in enumerate(names)}


def _torsion_names(system, rep, mask: torch.Tensor) -> list[str]:
    """Names of the flow-space torsions selected by ``mask`` (D,): the system's torsion about the same bond
    (e.g. phi1), else the four atoms."""
    named = {frozenset(q[1:3]): name for name, q in system.torsions.items()}
    first = rep.n_bonds + rep.n_angles
    out = []
    for k in mask.nonzero().flatten().tolist():
        if k < first:
            continue
        i, j, kk, l = rep.torsion_atoms[k - first].tolist()
        out.append(named.get(frozenset((j, kk)), f"torsion {i}-{j}-{kk}-{l}"))
    return out


def _membership(system, expression: str) -> Callable[[np.ndarray], np.ndarray]:
    """positions (B, n, 3) -> (B,) bool: inside the state (and L-chiral, when the system checks chirality)."""
    predicate = parse_torsion_predicate(expression, system.torsions)

    def inside(x):
        result = torsion_state(_torsions(system, x), predicate)
        return result & system.is_l(x) if hasattr(system, "is_l") else result
    return inside


def _draw_state(positions, log_w, mask, n: int, rng, label: str, expr: str, what: str,
                cap_at_ess: bool = False) -> tuple[np.ndarray, float]:
    """n frames of one state resampled with their weights (at most its Kish ESS when ``cap_at_ess``, so
    that the resampled set holds few repeats); returns (positions (m, ...), Kish ESS count)."""
    idx = np.flatnonzero(mask)
    lw = np.asarray(log_w, dtype=np.float64)[idx]
    if not np.isfinite(lw).any():
        raise ValueError(f"state {label} {expr!r}: every frame of {what} in it has weight 0")
    ess_count = kish_ess(lw)["ess"] * idx.size
    if cap_at_ess:
        n = max(1, min(n, int(ess_count)))
    return np.asarray(positions[idx[resample(lw, n, rng)]], dtype=np.float64), float(ess_count)


def tfep_between_states(system, train_positions, train_log_w, state_a: str, state_b: str, *,
                        eval_positions=None, eval_log_w=None, evaluator=None,
                        settings: TFEPSettings | None = None, progress: bool = False) -> dict:
    """Delta F(A -> B) (kT) by TFEP with an energy-free RegFlow map trained on the frames of both states.

    system: a MolecularSystem (torsions, topology, chirality); train_positions (T, n_atoms, 3) nm with
    log-weights train_log_w (T,) to the unbiased ensemble (zeros for plain MD): the map's training
    frames. eval_positions / eval_log_w: independent frames for the works (default: the training
    frames, resampled with another seed). evaluator: ``EnergyEvaluator`` of ``system`` (default: one
    in this process). Returns ``tfep_estimate``'s dict plus "train" (CPU time, OT info,
    energy calls during training, measured: 0), "n_energy_calls_eval", the frames' weight ESS per
    state, the states and settings.
    """
    from regflow_mm.energy import EnergyEvaluator
    from regflow_mm.representations.internal import InternalCoordinates

    settings = settings or TFEPSettings()
    same_data = eval_positions is None
    if same_data:
        eval_positions, eval_log_w = train_positions, train_log_w
    train_log_w = np.zeros(len(train_positions)) if train_log_w is None else np.asarray(train_log_w, np.float64)
    eval_log_w = np.zeros(len(eval_positions)) if eval_log_w is None else np.asarray(eval_log_w, np.float64)
    in_a, in_b = state_members(system, train_positions, state_a, state_b, "the training data")
    rng = np.random.default_rng(settings.seed)
    xa, ess_a = _draw_state(train_positions, train_log_w, in_a, settings.n_train, rng, "A", state_a, "the training data")
    xb, ess_b = _draw_state(train_positions, train_log_w, in_b, settings.n_train, rng, "B", state_b, "the training data")

    rep = InternalCoordinates.from_topology(system.topology).to(torch.float64)
    rep.fit(np.concatenate([xa, xb]))
    with torch.no_grad():
        ya, yb = rep.to_flow_space(torch.from_numpy(xa))[0], rep.to_flow_space(torch.from_numpy(xb))[0]
    circular = rep.circular.cpu()
    moved = circular.clone() if settings.moved == "circular" else torch.ones_like(circular)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        state_map = StateMap(rep, moved, ya, yb, layers=settings.layers, hidden=settings.hidden,
                             blocks=settings.blocks, bins=settings.bins)
    own = evaluator is None
    evaluator = evaluator or EnergyEvaluator(system, n_workers=0)
    try:
        calls0 = evaluator.stats.n_configurations
        train = train_tfep_map(state_map.transform, ya, yb, moved=moved, circular=circular, n_steps=settings.n_steps,
                               batch_size=settings.batch_size, lr=settings.lr, ot_method=settings.ot_method,
                               lambda_r=settings.lambda_r, seed=settings.seed, progress=progress)
        train["n_energy_calls"] = evaluator.stats.n_configurations - calls0
        what = "the training data" if same_data else "the evaluation data"
        e_in_a, e_in_b = (in_a, in_b) if same_data else state_members(system, eval_positions, state_a, state_b, what)
        rng = np.random.default_rng(settings.seed + 1)
        ea, eval_ess_a = _draw_state(eval_positions, eval_log_w, e_in_a, settings.n_eval, rng, "A", state_a, what, True)
        eb, eval_ess_b = _draw_state(eval_positions, eval_log_w, e_in_b, settings.n_eval, rng, "B", state_b, what, True)
        calls0 = evaluator.stats.n_configurations
        cpu0 = time.process_time()
        u_a, u_b = evaluator.reduced_energy(ea), evaluator.reduced_energy(eb)
        w_f = map_works(state_map, ea, u_a, evaluator.reduced_energy, _membership(system, state_b))
        w_r = map_works(state_map, eb, u_b, evaluator.reduced_energy, _membership(system, state_a), inverse=True)
        eval_cpu = time.process_time() - cpu0
        n_calls = evaluator.stats.n_configurations - calls0
    finally:
        if own:
            evaluator.close()
    result = tfep_estimate(w_f, w_r, seed=settings.seed)
    result.update(state_a=state_a, state_b=state_b, train=train, n_energy_calls_eval=int(n_calls),
                  eval_cpu_s=eval_cpu, n_moved=int(moved.sum()), dim=int(moved.numel()),
                  moved_torsions=_torsion_names(system, rep, moved), reflected=_torsion_names(system, rep, state_map.reflect),
                  eval_data="training data (resampled again)" if same_data else "independent data",
                  frames_weight_ess={"train_a": ess_a, "train_b": ess_b, "eval_a": eval_ess_a, "eval_b": eval_ess_b},
                  settings=dataclasses.asdict(settings))
    low = min(eval_ess_a, eval_ess_b)
    if low < MIN_STATE_ESS:
        result["reliable"] = False
        result["note"] = f"the evaluation frames hold only {low:.1f} effective samples in a state"
    return result


def tfep_delta_f(transform, x_a, reduced_energy_a, reduced_energy_b, batch_size: int = 4096) -> dict:
    """Forward TFEP with a Flow ``transform`` acting on coordinate vectors x_a (N, D) of A (any space where
    the reduced energies, (B, D) -> (B,) kT, are densities): ``tfep_estimate`` of W_F."""
    dtype = next(iter(transform.parameters()), torch.zeros((), dtype=torch.float64)).dtype
    x_a = np.asarray(x_a, dtype=np.float64)
    works = []
    with torch.no_grad():
        for i in range(0, x_a.shape[0], batch_size):
            xa = x_a[i:i + batch_size]
            y, logdet = transform(torch.as_tensor(xa, dtype=dtype))
            works.append(np.asarray(reduced_energy_b(y.to(torch.float64).numpy()), dtype=np.float64)
                         - np.asarray(reduced_energy_a(xa), dtype=np.float64) - logdet.to(torch.float64).numpy())
    return tfep_estimate(np.concatenate(works))

