"""Fine-tuning a flow by maximum likelihood on a fixed set of configurations (adaptive flow MC).

A fixed number of Adam steps (learning rate decayed to 0 on a cosine, so the result does not
jitter by one Adam step) on ``objectives.nll_loss`` over minibatches drawn (with replacement,
with probabilities proportional to the frames' weights) under a ``torch.Generator`` seeded with
``seed``: the same flow, frames and settings give the same fine-tuned flow. Only the transform's
parameters move; the representation's normalisation (fitted once) and the prior stay fixed, so the
representation's log-det does not depend on the trained parameters and the NLL in flow space is the
NLL of the positions up to a constant.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..flows.sampling import flow_dtype
from .objectives import nll_loss


def fine_tune_nll(flow, positions, *, steps: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                  log_weights=None, grad_clip: float = 10.0) -> dict:
    """Fine-tune ``flow`` (in place) on positions (N, n_atoms, 3) nm by ``steps`` Adam steps on -log q
    (learning rate ``lr`` at the start, cosine-decayed).

    log_weights: (N,) log-weights of the frames (None: equal weights); frames with weight 0, non-finite
    coordinates or outside the flow's support are left out. Returns n_frames (used), steps,
    nll_before / nll_after (mean -log q in flow space over at most 8192 of the used frames, nats, weighted).
    """
    if int(steps) < 1 or int(batch_size) < 1 or not lr > 0:
        raise ValueError(f"fine-tuning needs steps >= 1, batch_size >= 1 and lr > 0; got {steps}, {batch_size}, {lr}")
    x = np.asarray(positions, dtype=np.float64)
    if x.ndim != 3 or x.shape[1:] != (flow.n_atoms, 3):
        raise ValueError(f"fine-tuning positions must be (N, {flow.n_atoms}, 3) nm, got {x.shape}")
    lw = np.zeros(len(x)) if log_weights is None else np.asarray(log_weights, dtype=np.float64)
    if lw.shape != (len(x),) or np.isnan(lw).any():
        raise ValueError(f"log_weights must be (N,) = ({len(x)},) without NaN, got shape {lw.shape}")
    keep = np.isfinite(x).all(axis=(1, 2)) & np.isfinite(lw)
    dtype = flow_dtype(flow)
    with torch.no_grad():
        y, _ = flow.to_flow_space(torch.as_tensor(x[keep], dtype=dtype))
        ok = (flow.representation.in_support(y) & torch.isfinite(y).all(-1)).cpu().numpy()
    y = y[torch.as_tensor(ok)]
    lw = lw[keep][ok]
    if y.shape[0] == 0:
        raise ValueError("no usable frame to fine-tune the flow on (all non-finite, zero-weight or outside its support)")
    w = np.exp(lw - lw.max())
    probs = torch.as_tensor(w / w.sum(), dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed))

    # the NLL before/after is a diagnostic: over a fixed subset of at most 8192 frames (a full pass over
    # 64k frames costs as much as ~100 training steps)
    subset = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:8192]
    y_eval, p_eval = y[subset.to(y.device)], probs[subset] / probs[subset].sum()

    def mean_nll() -> float:
        total = 0.0
        with torch.no_grad():
            for a in range(0, y_eval.shape[0], 4096):
                z, logdet_inv = flow.transform(y_eval[a:a + 4096], inverse=True)
                log_q = (flow.prior.log_prob(z) + logdet_inv).to(torch.float64).cpu()
                total += float((p_eval[a:a + 4096] * log_q).sum())
        return -total

    nll_before = mean_nll()
    params = [p for p in flow.transform.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(lr))
    flow.train()
    for step in range(int(steps)):
        for group in optimizer.param_groups:
            group["lr"] = float(lr) * 0.5 * (1.0 + math.cos(math.pi * step / int(steps)))
        idx = torch.multinomial(probs, int(batch_size), replacement=True, generator=generator)
        loss, _ = nll_loss(flow.transform, flow.prior, y[idx.to(y.device)])
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning NLL became {loss.item()}: lower the fine-tuning learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    flow.eval()
    return {"n_frames": int(y.shape[0]), "steps": int(steps), "nll_before": nll_before, "nll_after": mean_nll()}
