"""Training objectives for flows in a representation's flow space.

Each returns ``(loss, parts)``: a scalar tensor to minimise and a dict of floats for logging.
``regflow_terms`` / ``nll_terms`` are the same computations returning only tensors (``{"loss": ...,
part: ...}``), with no host synchronisation, so that ``torch.compile`` captures them in one graph
(the trainer's ``compile`` setting); ``as_parts(terms)`` gives the float dict.

- ``regflow_loss``: RegFlow regression E||(f(x0) - x1) / s||^2 + lambda_r R on fixed pairs, targets
  noised x1 + lambda_n eps; R = "none" | "logdet" ((log|det J_f(x0)|)^2, reuses the forward
  log-det) | "fwd_bwd" (||f^-1(f(x0)) - x0||^2, about twice the cost). The norm is summed over
  the D flow-space dimensions and averaged over the batch, exactly as written; on ``circular``
  dimensions (circles [0, 1)) the difference is taken on the circle, wrapped into [-1/2, 1/2).
  ``s`` (D,) is 1 (raw flow-space units) or ``regression_scale(x1)``, each dimension's own spread.
- ``nll_loss``: maximum likelihood, -E log q(y) with log q(y) = log p_prior(f^-1(y)) + log|det J_f^-1(y)|.
- ``force_matching_loss``: E||F/kT - grad_x log q(x)||^2 on Cartesian coordinates (kT/nm).
- ``reverse_kl_loss``: E_q[log q(x) + u(x)] (kT) with reparameterised flow samples and
  differentiable reduced energies (``EnergyEvaluator.reduced_energy_torch``).
"""
from __future__ import annotations

import torch

from .cnf import wrap_difference

REGULARIZERS = ("none", "logdet", "fwd_bwd")
REGRESSION_UNITS = ("standardised", "raw")


def regression_scale(x1: torch.Tensor, circular: torch.Tensor | None = None) -> torch.Tensor:
    """Each dimension's spread s (D,) of the RegFlow targets x1 (N, D), in flow-space units.

    Interval dimensions: the standard deviation; circles of period 1 (``circular`` (D,) bool): the circular
    standard deviation sqrt(-2 ln R) / (2 pi), R the mean resultant length, at most 1/sqrt(12) (a uniform
    circle's). Floored at 1e-8. Dividing the regression errors by s weighs a bond's error of one standard
    deviation as much as a torsion's: in raw units the narrowest, stiffest coordinates (bond spreads ~1e-2 of
    the box) count ~1e-4 as much as a wide torsion, and the student's error there exceeds their width.
    """
    if x1.dim() != 2 or x1.shape[0] < 2 or not torch.isfinite(x1).all():
        raise ValueError(f"regression_scale needs finite targets of shape (N >= 2, D), got {tuple(x1.shape)}")
    x = x1.detach().double()
    scale = x.std(0)
    if circular is not None:
        circ = torch.as_tensor(circular, dtype=torch.bool, device=x.device)
        if circ.shape != scale.shape:
            raise ValueError(f"circular must have one entry per dimension ({scale.numel()}), got {tuple(circ.shape)}")
        angle = 2 * torch.pi * x
        r = torch.sqrt(torch.cos(angle).mean(0) ** 2 + torch.sin(angle).mean(0) ** 2)
        circ_std = torch.sqrt(-2 * torch.log(r.clamp(1e-300, 1.0))) / (2 * torch.pi)
        scale = torch.where(circ, circ_std.clamp_max(12 ** -0.5), scale)
    return scale.clamp_min(1e-8).to(x1.dtype)


def as_parts(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The logged floats of a ``*_terms`` dict of scalar tensors."""
    return {k: v.item() for k, v in terms.items()}


def regflow_loss(transform, x0: torch.Tensor, x1: torch.Tensor, **options) -> tuple[torch.Tensor, dict]:
    """RegFlow loss on pairs x0 (B, D) latent, x1 (B, D) flow-space targets (options: ``regflow_terms``)."""
    terms = regflow_terms(transform, x0, x1, **options)
    return terms["loss"], as_parts(terms)


def regflow_terms(transform, x0: torch.Tensor, x1: torch.Tensor, *, regularizer: str = "none",
                  lambda_r: float = 0.0, lambda_n: float = 0.0, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, circular: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """RegFlow loss and its parts as scalar tensors, on pairs x0 (B, D) latent, x1 (B, D) targets.

    ``transform`` is a Flow (latent -> flow space). ``noise`` (B, D) is eps for the target noise;
    drawn from ``generator`` when omitted and ``lambda_n > 0``. ``circular`` (D,) bool: dimensions
    that are circles of period 1, where y - x1 is wrapped into [-1/2, 1/2) (the torus distance).
    ``scale`` (D,): errors are divided by it after wrapping (``regression_scale``); None: raw units.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
    if x0.shape != x1.shape or x0.dim() != 2:
        raise ValueError(f"x0 and x1 must be (B, D) with equal shapes, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    if lambda_n > 0:
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        x1 = x1 + lambda_n * noise
    y, logdet = transform(x0)
    diff = y - x1
    if circular is not None:  # no data-dependent branch here: torch.compile keeps one graph
        diff = torch.where(circular.to(diff.device), wrap_difference(diff), diff)
    if scale is not None:
        diff = diff / scale.to(diff)
    regression = diff.pow(2).sum(1).mean()
    terms = {"regression": regression.detach()}
    loss = regression
    if regularizer == "logdet":
        reg = logdet.pow(2).mean()
    elif regularizer == "fwd_bwd":
        x0_back, _ = transform(y, inverse=True)
        reg = (x0_back - x0).pow(2).sum(1).mean()
    else:
        reg = None
    if reg is not None:
        loss = loss + lambda_r * reg
        terms[regularizer] = reg.detach()
    terms["loss"] = loss
    return terms


def nll_loss(transform, prior, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Negative log-likelihood (nats) of flow-space data y (B, D); ``prior.log_prob`` on latents (B,)."""
    terms = nll_terms(transform, prior, y)
    return terms["loss"], as_parts(terms)


def nll_terms(transform, prior, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``nll_loss`` as scalar tensors: {"nll", "loss"} (equal)."""
    z, logdet_inv = transform(y, inverse=True)
    nll = -(prior.log_prob(z) + logdet_inv).mean()
    return {"nll": nll.detach(), "loss": nll}


def force_matching_loss(flow, x: torch.Tensor, forces_kT_per_nm: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Force matching E||F_ref/kT - grad_x log q(x)||^2 (kT/nm)^2, summed over atoms and xyz.

    ``x`` (B, n_atoms, 3) nm; ``forces_kT_per_nm`` (B, n_atoms, 3) = F / kT; ``flow.log_prob``
    must be differentiable w.r.t. x (the flow force is kT grad_x log q). The graph is kept so the
    loss can be back-propagated into the flow parameters.
    """
    if x.shape != forces_kT_per_nm.shape:
        raise ValueError(f"x {tuple(x.shape)} and forces {tuple(forces_kT_per_nm.shape)} must have equal shapes")
    x = x.detach().requires_grad_(True)
    log_q = flow.log_prob(x)
    (grad,) = torch.autograd.grad(log_q.sum(), x, create_graph=True)
    fm = (forces_kT_per_nm.to(grad) - grad).pow(2).flatten(1).sum(1).mean()
    return fm, {"force_matching": fm.item(), "loss": fm.item()}


def reverse_kl_loss(transform, prior, to_cartesian, reduced_energy_torch, n: int, *,
                    energy_cap_kT: float | None = None) -> tuple[torch.Tensor, dict]:
    """Reverse KL up to log Z: E_q[log q(x) + u(x)] in kT over ``n`` reparameterised samples.

    ``to_cartesian(y) -> (x (B, n_atoms, 3) nm, log|det dx/dy| (B,))`` maps flow space to
    Cartesian; ``reduced_energy_torch(x)`` -> u (B,) kT with autograd. ``energy_cap_kT``, when
    set, replaces u above the cap by the linear continuation cap + log1p(u - cap) (reported);
    samples with non-finite u are dropped from the mean and counted.
    """
    z = prior.sample((n,)) if isinstance(prior, torch.distributions.Distribution) else prior.sample(n)
    y, logdet = transform(z)
    x, logdet_rep = to_cartesian(y)
    log_q = prior.log_prob(z) - logdet - logdet_rep
    u = reduced_energy_torch(x)
    n_capped = 0
    if energy_cap_kT is not None:
        above = u > energy_cap_kT
        n_capped = int(above.sum())
        u = torch.where(above, energy_cap_kT + torch.log1p((u - energy_cap_kT).clamp_min(0)), u)
    ok = torch.isfinite(u) & torch.isfinite(log_q)
    if not ok.any():
        raise FloatingPointError("every reverse-KL sample has a non-finite energy or density")
    kl = (log_q[ok] + u[ok]).mean()
    return kl, {"reverse_kl": kl.item(), "loss": kl.item(), "n_nonfinite": int((~ok).sum()), "n_capped": n_capped,
                "energy_cap_kT": energy_cap_kT}
