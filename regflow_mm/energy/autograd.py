"""torch autograd path of the energy evaluator: u = U/kT with gradient -F/kT."""
from __future__ import annotations

import torch


class ReducedEnergy(torch.autograd.Function):
    """`ReducedEnergy.apply(x, evaluator)`: x (B, n_atoms, 3) nm -> u (B,) kT in x's dtype and device.

    Backward returns grad_output * (-F/kT); configurations with u = +inf have zero forces and
    therefore zero gradient.
    """

    @staticmethod
    def forward(ctx, x, evaluator):
        if x.ndim != 3:
            raise ValueError(f"reduced_energy_torch needs a batch (B, {evaluator.n_atoms}, 3) in nm, got shape "
                             f"{tuple(x.shape)}: add a batch axis with x[None]")
        u, reduced_forces = evaluator.reduced_energy_and_forces(x.detach())
        ctx.save_for_backward(torch.as_tensor(-reduced_forces, dtype=x.dtype, device=x.device))
        return torch.as_tensor(u, dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_output):
        (gradient,) = ctx.saved_tensors
        return grad_output[:, None, None] * gradient, None
