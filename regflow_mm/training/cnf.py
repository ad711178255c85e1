"""Teacher continuous normalizing flow (CNF) trained by conditional flow matching.

The teacher lives in the student's flow space (D dims) and transports the student's prior
(t = 0) to the data (t = 1) along dx/dt = v(t, x). It provides the reflow map
f*(x0) = x0 + int_0^1 v(t, x_t) dt and exact log-likelihoods by the instantaneous
change-of-variables formula

    log p_1(x(1)) = log p_0(x(0)) - int_0^1 div v(t, x(t)) dt,

integrated with torchdiffeq. ``divergence="exact"`` computes the trace of the D x D Jacobian
with ``torch.func`` (vmap over the batch, jacrev over dimensions: D vector-Jacobian products per
function evaluation); ``divergence="hutchinson"`` is the stochastic trace estimator
(Rademacher probes), an unbiased estimate, not the exact likelihood.

Training (``train_flow_matching``): linear interpolant x_t = (1 - t) x0 + t x1 (+ optional
sigma noise), target velocity x1 - x0, x0 ~ prior independently or re-paired within each
minibatch by exact OT (POT ``emd``), as in minibatch-OT flow matching.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import ot
import torch
from torch import nn
from torchdiffeq import odeint

from ..files import atomic_write, load_torch
from ..progress import progress_bar

FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "heun3")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")


@dataclass
class SolverOptions:
    """ODE solver settings: adaptive ``method`` with ``rtol``/``atol``, or a fixed-step method
    with ``n_steps`` steps over [0, 1]."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    n_steps: int = 100

    def __post_init__(self):
        if self.method not in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
            raise ValueError(f"unknown ODE method {self.method!r}; use one of {FIXED_STEP_METHODS + ADAPTIVE_METHODS}")
        if self.method in FIXED_STEP_METHODS and self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1 for fixed-step method {self.method}, got {self.n_steps}")

    def odeint_kwargs(self) -> dict:
        if self.method in FIXED_STEP_METHODS:
            return {"method": self.method, "options": {"step_size": 1.0 / self.n_steps}}
        return {"method": self.method, "rtol": self.rtol, "atol": self.atol}


class VelocityMLP(nn.Module):
    """Time-conditioned MLP velocity field v(t, x): (B, D) -> (B, D).

    t enters through ``n_frequencies`` sine/cosine features concatenated with x.
    """

    def __init__(self, dim: int, hidden: int = 256, n_layers: int = 3, n_frequencies: int = 8):
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1:
            raise ValueError(f"VelocityMLP needs positive dim, hidden, n_layers; got {dim}, {hidden}, {n_layers}")
        self.config = {"dim": dim, "hidden": hidden, "n_layers": n_layers, "n_frequencies": n_frequencies}
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = dim + 2 * n_frequencies
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        angles = t[:, None] * self.frequencies.to(x.dtype)
        return self.net(torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1))


def prior_sample(prior, n: int) -> torch.Tensor:
    """(n, D) draws from ``prior``: a torch Distribution (``sample((n,))``) or an object with ``sample(n)``."""
    if isinstance(prior, torch.distributions.Distribution):
        return prior.sample((n,))
    return prior.sample(n)


class TeacherCNF(nn.Module):
    """CNF dx/dt = velocity(t, x) on the flow space, t in [0, 1] from prior (0) to data (1)."""

    def __init__(self, velocity: nn.Module, solver: SolverOptions | None = None):
        super().__init__()
        self.velocity = velocity
        self.solver = solver or SolverOptions()
        self.nfe = 0

    def _v(self, t, x):
        self.nfe += 1
        return self.velocity(t, x)

    @torch.no_grad()
    def transport(self, x: torch.Tensor, reverse: bool = False, solver: SolverOptions | None = None) -> torch.Tensor:
        """Solve the ODE: prior point x0 (B, D) -> x1 (``reverse=False``) or data x1 -> x0."""
        solver = solver or self.solver
        ts = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        return odeint(self._v, x, ts, **solver.odeint_kwargs())[-1]

    def sample(self, prior, n: int, solver: SolverOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x0 ~ prior and integrate; returns ``(x0, x1)``, both (n, D)."""
        x0 = prior_sample(prior, n)
        return x0, self.transport(x0, solver=solver)

    def log_prob(self, x: torch.Tensor, prior, *, divergence: str = "exact", n_probes: int = 1,
                 generator: torch.Generator | None = None, solver: SolverOptions | None = None,
                 batch_size: int | None = None) -> torch.Tensor:
        """log p_1(x) (B,) in nats for flow-space points x (B, D): integrate (x, accumulated div)
        from t = 1 back to t = 0, then add ``prior.log_prob(x(0))``.

        ``divergence``: "exact" (trace of the Jacobian, D VJPs per evaluation) or "hutchinson"
        (``n_probes`` Rademacher probes, stochastic estimate; ``generator`` seeds the probes,
        drawn once per call and held fixed along the trajectory).
        """
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
        if batch_size is not None and x.shape[0] > batch_size:
            return torch.cat([self.log_prob(x[i:i + batch_size], prior, divergence=divergence, n_probes=n_probes,
                                            generator=generator, solver=solver)
                              for i in range(0, x.shape[0], batch_size)])
        solver = solver or self.solver
        probes = None
        if divergence == "hutchinson":
            probes = torch.randint(0, 2, (n_probes, *x.shape), generator=generator, dtype=torch.int64)
            probes = (2 * probes - 1).to(dtype=x.dtype, device=x.device)

        def single(t, xi):
            return self.velocity(t, xi[None])[0]

        def dynamics(t, state):
            self.nfe += 1
            xt = state[0]
            if divergence == "exact":
                jac = torch.func.vmap(torch.func.jacrev(single, argnums=1), in_dims=(None, 0))(t, xt)
                div = torch.diagonal(jac, dim1=1, dim2=2).sum(1)
                with torch.no_grad():
                    v = self.velocity(t, xt)
            else:
                v, vjp = torch.func.vjp(lambda y: self.velocity(t, y), xt)
                div = sum((vjp(p)[0] * p).sum(1) for p in probes) / probes.shape[0]
            return v.detach(), div.detach()

        ts = torch.tensor([1.0, 0.0], dtype=x.dtype, device=x.device)
        state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        with torch.no_grad():
            z, acc = (s[-1] for s in odeint(dynamics, state0, ts, **solver.odeint_kwargs()))
            # acc = int_1^0 div dt = -int_0^1 div dt
            return prior.log_prob(z) + acc

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the velocity weights, its config and the solver settings (torch.save)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.velocity, "config"):
            raise ValueError("only velocity fields with a .config (e.g. VelocityMLP) can be saved")
        payload = {"velocity_config": self.velocity.config, "velocity_state": self.velocity.state_dict(),
                   "solver": asdict(self.solver), "extra": extra or {}}
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "TeacherCNF":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no teacher CNF at {path}; train one with train_flow_matching first")
        hint = ": delete it to train the teacher again"
        blob = load_torch(path, "teacher CNF file", hint, map_location=map_location)
        if not isinstance(blob, dict) or not {"velocity_config", "velocity_state", "solver"} <= set(blob):
            raise ValueError(f"{path} is not a teacher CNF file (no velocity weights){hint}")
        if not all(torch.is_tensor(v) and torch.isfinite(v).all() for v in blob["velocity_state"].values()):
            raise ValueError(f"teacher CNF file {path} holds non-finite (NaN/inf) weights{hint}")
        velocity = VelocityMLP(**blob["velocity_config"])
        velocity.load_state_dict(blob["velocity_state"])
        velocity.to(map_location)
        cnf = cls(velocity, SolverOptions(**blob["solver"]))
        cnf.metadata = blob.get("extra", {})
        return cnf


@dataclass
class FlowMatchingConfig:
    """Conditional flow matching settings. ``coupling``: "independent" or "minibatch_ot"."""

    n_steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    coupling: str = "independent"
    sigma: float = 0.0
    grad_clip: float = 10.0
    seed: int = 0
    log_every: int = 100
    extra: dict = field(default_factory=dict)


def minibatch_ot_pairing(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Reorder x0 (B, D) so that row i is its exact squared-Euclidean OT partner of x1[i] (POT emd)."""
    cost = torch.cdist(x0.double(), x1.double()).pow(2).cpu().numpy()
    n = x0.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost, numItermax=max(100_000, 50 * n * n))
    return x0[torch.as_tensor(plan.argmax(axis=0), device=x0.device)]


def flow_matching_loss(velocity: nn.Module, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                       sigma: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ||v(t, x_t) - (x1 - x0)||^2, x_t = (1 - t) x0 + t x1 + sigma * noise."""
    xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1
    if sigma > 0:
        xt = xt + sigma * noise
    return (velocity(t, xt) - (x1 - x0)).pow(2).sum(1).mean()


def train_flow_matching(velocity: nn.Module, data: torch.Tensor, prior, config: FlowMatchingConfig,
                        callback: Callable[[int, float], None] | None = None,
                        progress: bool = True) -> list[dict]:
    """Fit ``velocity`` to flow-space data (N, D) by conditional flow matching; returns the loss log.

    Seeded: batches, times, prior draws and noise come from ``config.seed``.
    """
    if config.coupling not in ("independent", "minibatch_ot"):
        raise ValueError(f"coupling must be 'independent' or 'minibatch_ot', got {config.coupling!r}")
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be (N >= 2, D) flow-space points, got shape {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("flow-matching data contains NaN/inf; clean the dataset first")
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    opt = torch.optim.AdamW(velocity.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.n_steps)
    log: list[dict] = []
    running = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in progress_bar(range(config.n_steps), desc="flow matching", disable=not progress):
            idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=gen)
            x1 = data[idx]
            x0 = prior_sample(prior, config.batch_size).to(x1)
            if config.coupling == "minibatch_ot":
                x0 = minibatch_ot_pairing(x0, x1)
            t = torch.rand(config.batch_size, generator=gen).to(x1)
            noise = torch.randn(x1.shape, generator=gen).to(x1) if config.sigma > 0 else None
            loss = flow_matching_loss(velocity, x0, x1, t, config.sigma, noise)
            if not torch.isfinite(loss):
                raise RuntimeError(f"flow-matching loss became {loss.item()} at step {step}: lower the teacher's "
                                   f"learning rate (teacher_lr, now {config.lr})")
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(velocity.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            running += loss.item()
            if (step + 1) % config.log_every == 0 or step + 1 == config.n_steps:
                n = (step % config.log_every) + 1
                log.append({"step": step + 1, "fm_loss": running / n})
                if callback is not None:
                    callback(step + 1, running / n)
                running = 0.0
    return log
