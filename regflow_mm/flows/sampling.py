"""Generic helpers for using any flow from numpy code: its dtype and device, seeded sampling, log q.

The one seeded sampler of regflow-mm is ``sample_flow(flow, n, seed, chunk_size)``: the flow's
``sample(n, chunk_size=..., generator=...)`` under a ``torch.Generator`` seeded with ``seed`` on the
flow's device (the global torch RNG is not touched). The same (seed, chunk_size, device) gives the
same samples wherever it is called (evaluation, flow MC moves, reweighting, export checks).
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_CHUNK_SIZE = 4096


def flow_dtype(flow: torch.nn.Module) -> torch.dtype:
    """Floating dtype of a flow's parameters/buffers (the torch default dtype when it has none)."""
    for tensor in list(flow.parameters()) + list(flow.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def flow_device(flow: torch.nn.Module) -> torch.device:
    """Device of a flow (its ``device`` attribute, else that of its first parameter/buffer, else CPU)."""
    device = getattr(flow, "device", None)
    if device is not None:
        return torch.device(device)
    for tensor in list(flow.parameters()) + list(flow.buffers()):
        return tensor.device
    return torch.device("cpu")


def as_numpy(t) -> np.ndarray:
    """Torch tensor or array-like -> float64 numpy array (detached, on CPU)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().to(torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


@torch.no_grad()
def sample_flow(flow, n: int, seed: int, chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of ``flow`` drawn in chunks of ``chunk_size`` under a generator seeded with ``seed``.

    ``flow``: a BoltzmannFlow (or any module with ``sample(n, chunk_size=, generator=)``).
    Returns positions (n, n_atoms, 3) nm float64 and log q (n,) float64.
    """
    generator = torch.Generator(device=flow_device(flow)).manual_seed(int(seed))
    x, log_q = flow.sample(int(n), chunk_size=chunk_size, generator=generator)
    x, log_q = as_numpy(x), as_numpy(log_q)
    if x.ndim != 3 or x.shape[2] != 3 or log_q.shape != (x.shape[0],):
        raise ValueError(f"flow.sample({n}) must return positions (n, n_atoms, 3) and log q (n,); "
                         f"got {x.shape} and {log_q.shape}")
    return x, log_q


@torch.no_grad()
def flow_log_prob(flow, x) -> np.ndarray:
    """log q(x) for positions x (B, n_atoms, 3) nm -> (B,) float64 (NaN/inf passed through)."""
    xt = torch.as_tensor(np.asarray(x), dtype=flow_dtype(flow))
    return as_numpy(flow.log_prob(xt))
