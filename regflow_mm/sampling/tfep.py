"""Energy-free targeted free-energy perturbation (TFEP) with a RegFlow-trained map.

A bijection M of the coordinate space maps samples of state A towards state B. For x ~ p_A the
generalised work is

    W(x) = u_B(M(x)) - u_A(x) - log|det dM/dx|        (kT)

and Delta F_{A->B} = -ln E_A[exp(-W)] (exact for any bijection; the closer M pushes p_A onto
p_B, the smaller the variance). Estimated with pymbar EXP. When A and B are metastable states
of one ensemble, u_B is u restricted to B (+inf outside): the estimate is then exact if M(A)
covers B.

Training M needs no energies: pairs (x_A, x_B) from an exact OT coupling (POT) between MD samples
of A and B (``regflow_mm.training.couplings.ot_pairing``), regressed with the RegFlow loss
(``regflow_mm.training.objectives.regflow_loss``).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from regflow_mm.progress import progress_bar
from regflow_mm.sampling.free_energy import _pymbar
from regflow_mm.training.couplings import ot_pairing
from regflow_mm.importance import kish_ess
from regflow_mm.training.objectives import regflow_loss

log = logging.getLogger(__name__)


def train_tfep_map(transform, x_a, x_b, *, n_steps: int = 500, batch_size: int = 256, lr: float = 5e-3,
                   regularizer: str = "logdet", lambda_r: float = 1e-6, lambda_n: float = 0.0,
                   ot_method: str = "exact", seed: int = 0, progress: bool = True) -> dict:
    """Fit ``transform`` (a Flow on (B, D)) so that transform(x_A) ~ OT partner of x_A in B.

    x_a, x_b: (N, D) coordinates of MD samples of A and B (equal N; the OT coupling pairs them).
    Returns a dict with the OT info and the final loss parts. Energy-free: no force field calls.
    """
    dtype = next(iter(transform.parameters())).dtype
    x_a = torch.as_tensor(np.asarray(x_a), dtype=dtype)
    x_b = torch.as_tensor(np.asarray(x_b), dtype=dtype)
    if x_a.shape != x_b.shape or x_a.dim() != 2:
        raise ValueError(f"x_a and x_b must be (N, D) with equal shapes, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    src, ot_info = ot_pairing(x_a, x_b, method=ot_method, seed=seed)
    x0, x1 = x_a[torch.as_tensor(src)], x_b
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(transform.parameters(), lr=lr)
    parts: dict = {}
    transform.train()
    for _ in progress_bar(range(n_steps), desc="TFEP map", disable=not progress, dynamic_ncols=True):
        idx = torch.randint(0, x0.shape[0], (min(batch_size, x0.shape[0]),), generator=generator)
        loss, parts = regflow_loss(transform, x0[idx], x1[idx], regularizer=regularizer, lambda_r=lambda_r,
                                   lambda_n=lambda_n, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    transform.eval()
    return {"ot": ot_info, "final": parts, "n_steps": n_steps}


@torch.no_grad()
def tfep_delta_f(transform, x_a, reduced_energy_a: Callable[[np.ndarray], np.ndarray],
                 reduced_energy_b: Callable[[np.ndarray], np.ndarray], batch_size: int = 4096) -> dict:
    """Delta F_{A->B} (kT) by TFEP: x_a (N, D) samples of A, M = ``transform``.

    reduced_energy_a / _b: (B, D) coordinates -> (B,) u in kT (+inf where undefined).
    Returns {"delta_f", "ddelta_f", "n", "work_ess" (Kish ESS of exp(-W) as a fraction of N),
    "n_nonfinite" (samples with infinite work, weight 0)}.
    """
    dtype = next(iter(transform.parameters())).dtype
    x_a = np.asarray(x_a, dtype=np.float64)
    work = []
    for i in range(0, x_a.shape[0], batch_size):
        xa = x_a[i:i + batch_size]
        y, logdet = transform(torch.as_tensor(xa, dtype=dtype))
        y = y.to(torch.float64).numpy()
        work.append(np.asarray(reduced_energy_b(y), dtype=np.float64) - np.asarray(reduced_energy_a(xa), dtype=np.float64)
                    - logdet.to(torch.float64).numpy())
    work = np.concatenate(work)
    if np.isnan(work).any():
        raise ValueError("TFEP work contains NaN: the map or the energies produced NaN")
    finite = np.isfinite(work)
    if not finite.any():
        raise ValueError("every mapped sample has infinite work (none lands in state B): train the map longer "
                         "or check the state definitions")
    # exp(-inf) = 0: samples mapped outside B contribute zero, but still count in N.
    result = _pymbar().exp(np.where(finite, work, np.inf))
    return {"delta_f": float(result["Delta_f"]), "ddelta_f": float(result["dDelta_f"]), "n": int(work.size),
            "work_ess": kish_ess(np.where(finite, -work, -np.inf))["ess"], "n_nonfinite": int((~finite).sum())}
