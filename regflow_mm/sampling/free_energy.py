"""Free-energy differences (kT) with uncertainties.

- Between user-defined states of one ensemble (e.g. aldp phi < 0 vs phi > 0) from weighted flow
  samples: Delta F_{A->B} = -ln(P_B / P_A), P_S = sum_{i in S} w_i / sum_i w_i (delta-method error).
- Between two thermodynamic states (another temperature, a modified system) from samples of one
  or both: pymbar EXP / BAR; or from one set of flow samples, Delta F_{A->B} =
  -ln(E_q[w_B] / E_q[w_A]) with w_S = exp(-u_S) / q.
"""
from __future__ import annotations

import ast
import contextlib
import inspect
import io
import math
from typing import Callable

import numpy as np
from scipy.special import logsumexp

from regflow_mm.importance import kish_ess, log_weights, normalized_weights
from regflow_mm.sampling.reweighting import log_ratio_of_means


def _pymbar():
    # pymbar 4 prints a "JAX NOT FOUND" banner on import; keep it out of CLI output.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        import pymbar
    return pymbar


# Below this Kish ESS (a count) inside either state, a state free energy and its error are UNRELIABLE.
MIN_STATE_ESS = 20.0


def state_delta_f(log_w, in_a, in_b, block_size: int | None = None, n_bootstrap: int = 200,
                  seed: int = 0) -> dict:
    """Delta F_{A->B} = F_B - F_A = -ln(P_B / P_A) in kT from weighted samples of one ensemble.

    log_w (N,) log-weights to the target ensemble: importance weights of flow samples, metadynamics
    frame weights, or 0 for plain MD; in_a, in_b (N,) bool membership. The error ``ddelta_f`` is the
    delta-method error for independent samples (``block_size`` None), or, for time series (MD,
    enhanced sampling), the standard deviation over ``n_bootstrap`` resamples of contiguous blocks of
    ``block_size`` frames (``default_rng(seed)``; blocks longer than the correlation time).
    Returns {"delta_f", "ddelta_f", "p_a", "p_b", "n", "n_a", "n_b", "ess_a", "ess_b", "error_method"};
    ess_S is the Kish ESS (a count) of the weights inside S: the error means little when it is small.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    in_a, in_b = np.asarray(in_a, dtype=bool), np.asarray(in_b, dtype=bool)
    if not (log_w.shape == in_a.shape == in_b.shape) or log_w.ndim != 1:
        raise ValueError(f"log_w, in_a, in_b must be matching 1-D arrays, got {log_w.shape}, {in_a.shape}, {in_b.shape}")
    if not np.isfinite(log_w[in_a]).any() or not np.isfinite(log_w[in_b]).any():
        raise ValueError(f"state A holds {int(in_a.sum())} and state B {int(in_b.sum())} samples with non-zero "
                         "weight: both need some; draw more samples or redefine the states")
    log_ratio, err = log_ratio_of_means(np.where(in_a, log_w, -np.inf), np.where(in_b, log_w, -np.inf))
    method = "delta method (independent samples)"
    if block_size is not None:
        err, method = _block_bootstrap_error(log_w, in_a, in_b, int(block_size), int(n_bootstrap), seed), \
            f"block bootstrap ({int(block_size)}-frame blocks, {int(n_bootstrap)} resamples)"
    w = normalized_weights(log_w)
    return {"delta_f": -log_ratio, "ddelta_f": err, "p_a": float(w[in_a].sum()), "p_b": float(w[in_b].sum()),
            "n": int(log_w.size), "n_a": int(in_a.sum()), "n_b": int(in_b.sum()),
            "ess_a": _kish_count(log_w[in_a]), "ess_b": _kish_count(log_w[in_b]), "error_method": method}


def _block_bootstrap_error(log_w, in_a, in_b, block_size: int, n_bootstrap: int, seed: int) -> float:
    """Std of Delta F over resamples of contiguous blocks; inf when a resample loses a state."""
    n = log_w.size
    if not 1 <= block_size <= n // 2 or n_bootstrap < 2:
        raise ValueError(f"block bootstrap needs 1 <= block_size <= N/2 = {n // 2} and n_bootstrap >= 2, got "
                         f"{block_size} and {n_bootstrap}")
    n_blocks = n // block_size
    starts = np.arange(n_blocks) * block_size
    rng = np.random.default_rng(seed)
    estimates = np.empty(n_bootstrap)
    for k in range(n_bootstrap):
        idx = (starts[rng.integers(0, n_blocks, n_blocks)][:, None] + np.arange(block_size)).ravel()
        lw = log_w[idx]
        estimates[k] = logsumexp(np.where(in_a[idx], lw, -np.inf)) - logsumexp(np.where(in_b[idx], lw, -np.inf))
    return float(np.std(estimates, ddof=1)) if np.isfinite(estimates).all() else math.inf


def _kish_count(log_w: np.ndarray) -> float:
    """Kish ESS of ``log_w`` as a count (``importance.kish_ess`` gives it as a fraction of N)."""
    return kish_ess(log_w)["ess"] * log_w.size


def torsion_state(torsions: dict[str, np.ndarray], predicate: Callable[..., np.ndarray]) -> np.ndarray:
    """Membership (N,) bool from a predicate on named torsion arrays (rad), e.g. ``lambda phi1: phi1 > 0``.

    The predicate's argument names select the torsions it receives.
    """
    names = list(inspect.signature(predicate).parameters)
    missing = [k for k in names if k not in torsions]
    if missing:
        raise ValueError(f"state predicate asks for torsions {missing}; available: {sorted(torsions)}")
    result = np.asarray(predicate(**{k: np.asarray(torsions[k]) for k in names}), dtype=bool)
    with np.errstate(invalid="ignore"):
        finite = np.all([np.isfinite(torsions[k]) for k in names], axis=0) if names else True
    return result & finite


def parse_torsion_predicate(expression: str, torsions=None) -> Callable[..., np.ndarray]:
    """A predicate from a small expression over torsion names in degrees, e.g. ``"phi1 > 0"``.

    Allowed: torsion names, numbers, single comparisons (``a < b``; write ``(-90 < phi1) & (phi1 < 0)``
    for a range), ``&``, ``|``, ``~``, parentheses, ``abs``. ``torsions``: the names a system has
    (then an unknown name is refused here, before any sample is drawn). Angles reach the expression in
    degrees. ValueError for anything else.
    """
    def refuse(why: str):
        raise ValueError(f"state expression {expression!r}: {why}; use torsion names, numbers, single "
                         "comparisons, &, |, ~ and abs(...), e.g. \"(phi1 > -90) & (phi1 < 0)\"")

    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError as err:
        refuse(f"not a valid expression ({err.msg})")
    allowed = (ast.Expression, ast.Compare, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Constant,
               ast.BitAnd, ast.BitOr, ast.Invert, ast.USub, ast.UAdd, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
               ast.Call, ast.Sub, ast.Add)
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            refuse(f"{type(node).__name__} is not allowed")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id == "abs"
                                               and len(node.args) == 1 and not node.keywords):
            refuse("only abs(x) may be called")
        if isinstance(node, ast.Compare) and len(node.ops) > 1:
            refuse("chained comparisons are not allowed")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                               or not isinstance(node.value, (int, float))):
            refuse(f"{node.value!r} is not a number")
        if isinstance(node, ast.Name) and node.id != "abs":
            names.add(node.id)
    if not _is_boolean(tree.body):
        refuse("not a condition (a comparison, or comparisons joined by &, | or ~)")
    if torsions is not None and names - set(torsions):
        refuse(f"unknown torsions {sorted(names - set(torsions))} (this system has {sorted(torsions)})")
    code = compile(tree, "<state>", "eval")
    arg_names = sorted(names)

    def predicate(**torsions):
        env = {k: np.degrees(torsions[k]) for k in arg_names}
        return eval(code, {"__builtins__": {}, "abs": np.abs}, env)  # restricted by the AST check above

    predicate.__signature__ = inspect.Signature(
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in arg_names])
    return predicate


def _is_boolean(node) -> bool:
    if isinstance(node, ast.Compare):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        return _is_boolean(node.left) and _is_boolean(node.right)
    return isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert) and _is_boolean(node.operand)


def delta_f_exp(u_a_on_a, u_b_on_a) -> dict:
    """Delta F_{A->B} (kT) by exponential averaging (pymbar EXP) from samples of A.

    u_a_on_a, u_b_on_a: (N,) reduced energies of the A samples in states A and B.
    """
    w_f = np.asarray(u_b_on_a, dtype=np.float64) - np.asarray(u_a_on_a, dtype=np.float64)
    _check_work(w_f, "u_b_on_a - u_a_on_a")
    result = _pymbar().exp(w_f)
    return {"delta_f": float(result["Delta_f"]), "ddelta_f": float(result["dDelta_f"]), "method": "EXP", "n_a": w_f.size}


def delta_f_bar(u_a_on_a, u_b_on_a, u_a_on_b, u_b_on_b) -> dict:
    """Delta F_{A->B} (kT) by BAR (pymbar) from samples of both states (reduced energies, kT)."""
    w_f = np.asarray(u_b_on_a, dtype=np.float64) - np.asarray(u_a_on_a, dtype=np.float64)
    w_r = np.asarray(u_a_on_b, dtype=np.float64) - np.asarray(u_b_on_b, dtype=np.float64)
    _check_work(w_f, "forward work")
    _check_work(w_r, "reverse work")
    result = _pymbar().bar(w_f, w_r)
    return {"delta_f": float(result["Delta_f"]), "ddelta_f": float(result["dDelta_f"]), "method": "BAR",
            "n_a": w_f.size, "n_b": w_r.size}


def flow_delta_f(log_q, u_a, u_b) -> dict:
    """Delta F_{A->B} = -ln(E_q[w_B] / E_q[w_A]) (kT) from one set of flow samples.

    log_q, u_a, u_b: (N,) log-densities and reduced energies of the flow samples in both states.
    """
    log_w_a = log_weights(log_q, u_a)
    log_w_b = log_weights(log_q, u_b)
    log_ratio, err = log_ratio_of_means(log_w_a, log_w_b)
    return {"delta_f": -log_ratio, "ddelta_f": err, "method": "flow importance sampling", "n": int(log_w_a.size)}


def _check_work(w: np.ndarray, what: str) -> None:
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {w.shape}")
    if np.isnan(w).any():
        raise ValueError(f"{what} contains NaN: check the reduced energies")
    if math.isinf(float(np.min(w))) and np.min(w) < 0:
        raise ValueError(f"{what} contains -inf: a sample has infinite energy in its own state")


