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
minibatch by exact OT (POT ``emd``), as in minibatch-OT flow matching. On ``circular`` dimensions
(circles of period 1) the path wraps around the circle: x_t = (x0 + t wrap(x1 - x0)) mod 1 with
wrap(d) in [-1/2, 1/2), target velocity wrap(x1 - x0), and the OT cost is the torus distance.

Teacher coordinates (``TeacherCoordinates``): the molecular teacher does not run on the student's raw
flow space (a [0, 1] box in which the data of internal coordinates fill a sliver) but on
s = (y - mean) / std per non-circular dimension (fitted on the training data), against a matching
base: N(0, 1) on those dimensions and uniform on the circular ones (which stay circles of period 1,
neither shifted nor scaled). The velocity net sees circular inputs through sin/cos (periodic in them),
so the ODE is a flow on R^k x T^m; its solution is wrapped into [0, 1) on circular dimensions. The
teacher's density on the student's flow space is exact:

    log q(y) = log p_base(z) - int_0^1 div v dt - sum_noncircular log std.

``teacher_flow`` wraps a teacher and a student's representation into a ``BoltzmannFlow`` (sample,
log_prob, evaluation: the teacher is a Boltzmann generator of its own).
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
from ..flows.base import Flow
from ..flows.priors import Prior
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


def wrap_difference(d: torch.Tensor) -> torch.Tensor:
    """Differences on a circle of period 1 wrapped into [-1/2, 1/2) (the shortest signed arc)."""
    return torch.remainder(d + 0.5, 1.0) - 0.5


def _mask(circular, dim: int) -> torch.Tensor:
    circ = torch.zeros(dim, dtype=torch.bool) if circular is None else torch.as_tensor(circular, dtype=torch.bool).cpu()
    if circ.shape != (dim,):
        raise ValueError(f"circular must have one entry per dimension ({dim}), got shape {tuple(circ.shape)}")
    return circ


class VelocityMLP(nn.Module):
    """Time-conditioned MLP velocity field v(t, x): (B, D) -> (B, D).

    t enters through ``n_frequencies`` sine/cosine features concatenated with x. ``circular`` (D,)
    bool: inputs on circles of period 1, fed as (sin 2 pi x, cos 2 pi x), so v is periodic in them.
    """

    def __init__(self, dim: int, hidden: int = 256, n_layers: int = 3, n_frequencies: int = 8,
                 circular=None):
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1:
            raise ValueError(f"VelocityMLP needs positive dim, hidden, n_layers; got {dim}, {hidden}, {n_layers}")
        circ = _mask(circular, dim)
        self.config = {"dim": dim, "hidden": hidden, "n_layers": n_layers, "n_frequencies": n_frequencies}
        if circ.any():
            self.config["circular"] = [bool(c) for c in circ.tolist()]
        self.register_buffer("circular", circ, persistent=False)
        self.n_circular = int(circ.sum())
        # index tensors, not boolean masks: torch.func.vmap (exact divergence) cannot index by a mask
        self.register_buffer("_lin_idx", torch.nonzero(~circ).flatten(), persistent=False)
        self.register_buffer("_circ_idx", torch.nonzero(circ).flatten(), persistent=False)
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(n_frequencies, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = dim + self.n_circular + 2 * n_frequencies
        for _ in range(n_layers):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        angles = t[:, None] * self.frequencies.to(x.dtype)
        if self.n_circular:
            phase = 2 * math.pi * x[:, self._circ_idx]
            x = torch.cat([x[:, self._lin_idx], torch.sin(phase), torch.cos(phase)], dim=1)
        return self.net(torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1))


def prior_sample(prior, n: int) -> torch.Tensor:
    """(n, D) draws from ``prior``: a torch Distribution (``sample((n,))``) or an object with ``sample(n)``."""
    if isinstance(prior, torch.distributions.Distribution):
        return prior.sample((n,))
    return prior.sample(n)


class TeacherBase(Prior):
    """The teacher's base distribution: N(0, 1) on non-circular dimensions, uniform on [0, 1) on
    ``circular`` ones (circles of period 1). log p(z) (B,) in nats."""

    name = "teacher_base"

    def __init__(self, circular):
        circ = torch.as_tensor(circular, dtype=torch.bool).cpu()
        super().__init__(circ.numel())
        self.register_buffer("circular", circ, persistent=False)

    def get_config(self) -> dict:
        return {"type": self.name, "dim": self.dim, "circular": [bool(c) for c in self.circular.tolist()]}

    def sample(self, n, generator=None):
        z = torch.randn(int(n), self.dim, dtype=self.dtype, device=self.device, generator=generator)
        u = torch.rand(int(n), self.dim, dtype=self.dtype, device=self.device, generator=generator)
        return torch.where(self.circular, u, z)

    def log_prob(self, z):
        self._check(z)
        lin = ~self.circular
        return -0.5 * (z[:, lin] ** 2).sum(-1) - 0.5 * int(lin.sum()) * math.log(2 * math.pi)


class TeacherCoordinates(nn.Module):
    """Affine standardisation s = (y - shift) / scale of a flow space (D,), identity on circular dims.

    ``fit(y, circular)``: shift/scale = mean/std of the training points y (N, D) per non-circular
    dimension (std floored at 1e-6 x the dimension's range, for constant dimensions). ``base()`` is the
    matching ``TeacherBase``; ``from_student_latent`` maps a student's prior draw onto it exactly.
    """

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, circular):
        super().__init__()
        circ = _mask(circular, shift.numel())
        if not (torch.isfinite(shift).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("teacher coordinates need finite shifts and positive finite scales")
        if (shift[circ] != 0).any() or (scale[circ] != 1).any():
            raise ValueError("circular dimensions of the teacher coordinates must have shift 0 and scale 1")
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("circular", circ)

    @classmethod
    def fit(cls, y: torch.Tensor, circular=None) -> "TeacherCoordinates":
        if y.dim() != 2 or y.shape[0] < 2 or not torch.isfinite(y).all():
            raise ValueError(f"teacher coordinates are fitted on finite (N >= 2, D) points, got shape {tuple(y.shape)}")
        circ = _mask(circular, y.shape[1])
        y64 = y.detach().double().cpu()
        span = (y64.amax(0) - y64.amin(0)).clamp_min(1e-12)
        shift = torch.where(circ, 0.0, y64.mean(0))
        scale = torch.where(circ, 1.0, torch.maximum(y64.std(0), 1e-6 * span))
        return cls(shift.to(y.dtype), scale.to(y.dtype), circ)

    @property
    def log_scale(self) -> torch.Tensor:
        """sum over dims of log scale (scalar): log|det dy/ds|."""
        return torch.log(self.scale).sum()

    def standardise(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.shift) / self.scale

    def destandardise(self, s: torch.Tensor) -> torch.Tensor:
        return torch.where(self.circular, torch.remainder(s, 1.0), s * self.scale + self.shift)

    def base(self) -> TeacherBase:
        return TeacherBase(self.circular).to(device=self.shift.device, dtype=self.shift.dtype)

    def from_student_latent(self, x0: torch.Tensor, prior) -> torch.Tensor:
        """Map a student's latent draws x0 (B, D) onto the teacher's base: a uniform box prior goes through
        the normal quantile Phi^-1 on non-circular dims (exact in law), a standard normal one is kept."""
        name = getattr(prior, "name", None)
        if name == "uniform":
            u = x0.double()
            eps = torch.finfo(x0.dtype).eps  # float32 rand can return 0 exactly: Phi^-1(0) = -inf
            z = math.sqrt(2.0) * torch.erfinv(2 * u.clamp(eps, 1 - eps) - 1)
            return torch.where(self.circular, u, z).to(x0.dtype)
        if name == "normal" and not bool(self.circular.any()):
            return x0
        raise ValueError(f"a teacher with circular dimensions needs the student's uniform box prior, got {name!r}")

    def describe(self) -> dict:
        return {"standardised": True, "n_circular": int(self.circular.sum()),
                "circular": "".join("1" if c else "0" for c in self.circular.tolist())}


class TeacherCNF(nn.Module):
    """CNF dx/dt = velocity(t, x), t in [0, 1] from base (0) to data (1).

    Without ``coords`` the ODE runs on the flow space itself against the student's prior (a plain
    CNF, as written by regflow-mm before 2026-12). With ``coords`` (``TeacherCoordinates``) it runs on the
    standardised coordinates against ``coords.base()``, wraps circular dims into [0, 1), and
    ``flow_log_prob`` / ``generate`` give its density and samples on the student's flow space.
    """

    FORMAT = 2

    def __init__(self, velocity: nn.Module, solver: SolverOptions | None = None,
                 coords: TeacherCoordinates | None = None):
        super().__init__()
        self.velocity = velocity
        self.solver = solver or SolverOptions()
        self.coords = coords
        self.nfe = 0
        self.metadata: dict = {}
        circ = getattr(velocity, "circular", None)
        if coords is not None and circ is not None and not torch.equal(circ.cpu(), coords.circular.cpu()):
            raise ValueError("the velocity field's circular dimensions differ from the teacher coordinates'")

    def _v(self, t, x):
        self.nfe += 1
        return self.velocity(t, x)

    def _wrap(self, x: torch.Tensor) -> torch.Tensor:
        if self.coords is None or not bool(self.coords.circular.any()):
            return x
        return torch.where(self.coords.circular, torch.remainder(x, 1.0), x)

    @torch.no_grad()
    def transport(self, x: torch.Tensor, reverse: bool = False, solver: SolverOptions | None = None) -> torch.Tensor:
        """Solve the ODE: base point x0 (B, D) -> x1 (``reverse=False``) or x1 -> x0, in the ODE's
        coordinates; circular dims wrapped into [0, 1) (v is periodic in them, so wrapping at the end is
        the solution on the circle)."""
        solver = solver or self.solver
        ts = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        return self._wrap(odeint(self._v, x, ts, **solver.odeint_kwargs())[-1])

    def sample(self, prior, n: int, solver: SolverOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw x0 ~ prior and integrate; returns ``(x0, x1)``, both (n, D) in the ODE's coordinates."""
        x0 = prior_sample(prior, n)
        return x0, self.transport(x0, solver=solver)

    @torch.no_grad()
    def generate(self, x0: torch.Tensor, prior, solver: SolverOptions | None = None) -> torch.Tensor:
        """The reflow map f*(x0): the student's latent draws x0 (B, D) (from ``prior``) -> teacher samples
        on the student's flow space (B, D)."""
        if self.coords is None:
            return self.transport(x0, solver=solver)
        z = self.coords.from_student_latent(x0, prior)
        return self.coords.destandardise(self.transport(z, solver=solver))

    def integrate_with_divergence(self, x: torch.Tensor, reverse: bool = False, *, divergence: str = "exact",
                                  n_probes: int = 1, generator: torch.Generator | None = None,
                                  solver: SolverOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve the ODE from x (B, D) with the log-determinant of the map: ``(x_end, log|det dx_end/dx|)``,
        log-det = int div v dt along the direction of integration (B,). Circular dims wrapped into [0, 1).

        ``divergence``: "exact" (trace of the Jacobian, D VJPs per evaluation) or "hutchinson"
        (``n_probes`` Rademacher probes, stochastic estimate; ``generator`` seeds the probes,
        drawn once per call and held fixed along the trajectory).
        """
        if divergence not in ("exact", "hutchinson"):
            raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
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

        ts = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0], dtype=x.dtype, device=x.device)
        state0 = (x.detach(), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        with torch.no_grad():
            end, logdet = (s[-1] for s in odeint(dynamics, state0, ts, **solver.odeint_kwargs()))
        return self._wrap(end), logdet

    def log_prob(self, x: torch.Tensor, prior=None, *, divergence: str = "exact", n_probes: int = 1,
                 generator: torch.Generator | None = None, solver: SolverOptions | None = None,
                 batch_size: int | None = None) -> torch.Tensor:
        """log p_1(x) (B,) in nats for points x (B, D) in the ODE's coordinates: integrate (x, accumulated
        div) from t = 1 back to t = 0, then add ``prior.log_prob(x(0))`` (default: the teacher's base).
        Options as ``integrate_with_divergence``."""
        if prior is None:
            if self.coords is None:
                raise ValueError("a plain teacher CNF has no base of its own: pass the student's prior")
            prior = self.coords.base()
        if batch_size is not None and x.shape[0] > batch_size:
            return torch.cat([self.log_prob(x[i:i + batch_size], prior, divergence=divergence, n_probes=n_probes,
                                            generator=generator, solver=solver)
                              for i in range(0, x.shape[0], batch_size)])
        z, logdet = self.integrate_with_divergence(x, reverse=True, divergence=divergence, n_probes=n_probes,
                                                   generator=generator, solver=solver)
        return prior.log_prob(z) + logdet

    def flow_log_prob(self, y: torch.Tensor, prior=None, **options) -> torch.Tensor:
        """log q(y) (B,) in nats of points y (B, D) of the student's flow space (exact with
        divergence="exact"): log p_s(standardise(y)) - sum log scale. Options as ``log_prob``."""
        if self.coords is None:
            return self.log_prob(y, prior, **options)
        return self.log_prob(self.coords.standardise(y), None, **options) - self.coords.log_scale

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the velocity weights, its config, the teacher coordinates and the solver settings (torch.save)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not hasattr(self.velocity, "config"):
            raise ValueError("only velocity fields with a .config (e.g. VelocityMLP) can be saved")
        coords = None if self.coords is None else {k: v.cpu() for k, v in self.coords.state_dict().items()}
        payload = {"format": self.FORMAT, "velocity_config": self.velocity.config,
                   "velocity_state": self.velocity.state_dict(), "coords": coords,
                   "solver": asdict(self.solver), "extra": extra or {}}
        return atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "TeacherCNF":
        """Read a teacher file. Files from before the teacher coordinates (no "format") load as plain CNFs
        (``coords`` None); the runner refuses them where standardised teachers are asked for."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no teacher CNF at {path}; train one with train_flow_matching first")
        hint = ": delete it to train the teacher again"
        blob = load_torch(path, "teacher CNF file", hint, map_location=map_location)
        if not isinstance(blob, dict) or not {"velocity_config", "velocity_state", "solver"} <= set(blob):
            raise ValueError(f"{path} is not a teacher CNF file (no velocity weights){hint}")
        tensors = list(blob["velocity_state"].values()) + list((blob.get("coords") or {}).values())
        if not all(torch.is_tensor(v) and (not v.is_floating_point() or torch.isfinite(v).all()) for v in tensors):
            raise ValueError(f"teacher CNF file {path} holds non-finite (NaN/inf) weights{hint}")
        if blob.get("format", 1) > cls.FORMAT:
            raise ValueError(f"teacher CNF file {path} has format {blob['format']}, newer than this regflow-mm "
                             f"reads ({cls.FORMAT}){hint}")
        velocity = VelocityMLP(**blob["velocity_config"])
        velocity.load_state_dict(blob["velocity_state"])
        velocity.to(map_location)
        coords = None
        if blob.get("coords") is not None:
            c = blob["coords"]
            coords = TeacherCoordinates(c["shift"], c["scale"], c["circular"]).to(map_location)
        cnf = cls(velocity, SolverOptions(**blob["solver"]), coords)
        cnf.metadata = blob.get("extra", {})
        cnf.format = int(blob.get("format", 1))
        return cnf


class TeacherTransform(Flow):
    """A teacher as a Flow layer: its base (B, D) -> the student's flow space (B, D), with the exact
    log|det| (Jacobian trace integrated along the ODE, plus the standardisation's log scale). A plain
    teacher (no coordinates) maps the student's prior space to the flow space directly."""

    def __init__(self, cnf: TeacherCNF, divergence: str = "exact"):
        super().__init__()
        self.cnf, self.divergence = cnf, divergence

    def _forward(self, z):
        s, logdet = self.cnf.integrate_with_divergence(z, divergence=self.divergence)
        if self.cnf.coords is None:
            return s, logdet
        return self.cnf.coords.destandardise(s), logdet + self.cnf.coords.log_scale

    def _inverse(self, y):
        coords = self.cnf.coords
        z, logdet = self.cnf.integrate_with_divergence(y if coords is None else coords.standardise(y), reverse=True,
                                                       divergence=self.divergence)
        return z, logdet if coords is None else logdet - coords.log_scale


def representation_hash(representation) -> str:
    """sha1 of a representation's config and fitted state (float64 bytes): identifies the flow space."""
    import hashlib
    import json

    h = hashlib.sha1(json.dumps({"name": getattr(representation, "name", None), **representation.get_config()},
                                sort_keys=True, default=str).encode())
    for key, value in sorted(representation.state_dict().items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value.detach().cpu().double().numpy()).tobytes())
    return h.hexdigest()


def check_teacher_matches(cnf: TeacherCNF, student, path: str | Path) -> None:
    """ValueError unless the teacher file at ``path`` was trained for ``student``'s system and flow space."""
    meta = cnf.metadata or {}
    hint = "; train a teacher for this flow (delete the teacher file) or pass the matching student flow"
    if meta.get("spec_hash") is not None and student.spec_hash is not None and meta["spec_hash"] != student.spec_hash:
        raise ValueError(f"teacher {path} was trained for system hash {meta['spec_hash'][:12]}, the flow is for "
                         f"{student.spec_hash[:12]}{hint}")
    found = meta.get("representation_hash")
    if found is None:
        raise ValueError(f"teacher {path} does not record the flow space it was trained on (older regflow-mm){hint}")
    if found != representation_hash(student.representation):
        raise ValueError(f"teacher {path} was trained on another representation (flow space) than the flow's{hint}")


def teacher_flow(cnf: TeacherCNF, student, path: str | Path = "teacher", divergence: str = "exact",
                 check: bool = True):
    """The teacher as a ``BoltzmannFlow`` on ``student``'s representation (checked to be the teacher's unless
    ``check`` is False, for files that do not record it): ``sample`` / ``log_prob`` / ``evaluate_flow`` work on
    it like on any flow. A plain teacher's base is the student's prior."""
    from ..flows.boltzmann import BoltzmannFlow

    if check:
        check_teacher_matches(cnf, student, path)
    transform = TeacherTransform(cnf, divergence).to(device=student.device, dtype=student.dtype)
    base = student.prior if cnf.coords is None else cnf.coords.base()
    base = base.to(device=student.device, dtype=student.dtype)
    return BoltzmannFlow(student.representation, transform, base, student.kT, spec_hash=student.spec_hash,
                         config={"architecture": "teacher-cnf", "teacher": str(path)})


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


def minibatch_ot_pairing(x0: torch.Tensor, x1: torch.Tensor, circular=None) -> torch.Tensor:
    """Reorder x0 (B, D) so that row i is the exact OT partner of x1[i] (POT emd) under squared-Euclidean
    cost, the torus distance on ``circular`` dims (``couplings.pairing_cost``)."""
    from .couplings import pairing_cost  # couplings imports this module

    circ = None if circular is None else _mask(circular, x0.shape[1]).numpy()
    cost = pairing_cost(x0.detach().double().cpu().numpy(), x1.detach().double().cpu().numpy(), circ)
    n = x0.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost, numItermax=max(100_000, 50 * n * n))
    return x0[torch.as_tensor(plan.argmax(axis=0), device=x0.device)]


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                circular: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional path and velocity: (x_t, u) = (x0 + t d, d), d = x1 - x0 (B, D), t (B,); on ``circular``
    dims d = wrap(x1 - x0) in [-1/2, 1/2) and x_t is taken mod 1 (the shorter arc of the circle)."""
    d = x1 - x0
    if circular is not None and bool(circular.any()):
        circular = circular.to(d.device)
        d = torch.where(circular, wrap_difference(d), d)
        xt = x0 + t[:, None] * d
        return torch.where(circular, torch.remainder(xt, 1.0), xt), d
    return x0 + t[:, None] * d, d


def flow_matching_loss(velocity: nn.Module, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                       sigma: float = 0.0, noise: torch.Tensor | None = None,
                       circular: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ||v(t, x_t) - u||^2 with (x_t, u) = ``interpolate`` (+ sigma * noise on x_t)."""
    xt, target = interpolate(x0, x1, t, circular)
    if sigma > 0:
        xt = xt + sigma * noise
    return (velocity(t, xt) - target).pow(2).sum(1).mean()


def train_flow_matching(velocity: nn.Module, data: torch.Tensor, prior, config: FlowMatchingConfig,
                        callback: Callable[[int, float], None] | None = None,
                        progress: bool = True, circular=None,
                        row_log_weights: torch.Tensor | None = None) -> list[dict]:
    """Fit ``velocity`` to data (N, D) in the ODE's coordinates by conditional flow matching against
    ``prior``; returns the loss log. ``circular`` (D,) bool: circle dims (wrapped paths, torus OT cost).
    ``row_log_weights`` (N,): batches draw rows with probability proportional to exp(log-weight)
    (reweighted, e.g. metadynamics, frames); None: uniform.

    Seeded: batches, times, prior draws and noise come from ``config.seed``.
    """
    if config.coupling not in ("independent", "minibatch_ot"):
        raise ValueError(f"coupling must be 'independent' or 'minibatch_ot', got {config.coupling!r}")
    if data.dim() != 2 or data.shape[0] < 2:
        raise ValueError(f"data must be (N >= 2, D) flow-space points, got shape {tuple(data.shape)}")
    if not torch.isfinite(data).all():
        raise ValueError("flow-matching data contains NaN/inf; clean the dataset first")
    circ = None if circular is None else _mask(circular, data.shape[1]).to(data.device)
    if circ is not None and not circ.any():
        circ = None
    probs = None
    if row_log_weights is not None:
        lw = torch.as_tensor(row_log_weights, dtype=torch.float64).flatten()
        if lw.shape != (data.shape[0],) or torch.isnan(lw).any() or not torch.isfinite(lw).any():
            raise ValueError(f"row_log_weights must be (N = {data.shape[0]},) with finite entries")
        probs = torch.exp(lw - lw.max())
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    opt = torch.optim.AdamW(velocity.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.n_steps)
    log: list[dict] = []
    running = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for step in progress_bar(range(config.n_steps), desc="flow matching", disable=not progress):
            if probs is None:
                idx = torch.randint(0, data.shape[0], (config.batch_size,), generator=gen)
            else:
                idx = torch.multinomial(probs, config.batch_size, replacement=True, generator=gen)
            x1 = data[idx]
            x0 = prior_sample(prior, config.batch_size).to(x1)
            if config.coupling == "minibatch_ot":
                x0 = minibatch_ot_pairing(x0, x1, circ)
            t = torch.rand(config.batch_size, generator=gen).to(x1)
            noise = torch.randn(x1.shape, generator=gen).to(x1) if config.sigma > 0 else None
            loss = flow_matching_loss(velocity, x0, x1, t, config.sigma, noise, circ)
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
