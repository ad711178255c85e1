"""Internal coordinates (bonds, angles, torsions of a Z-matrix) mapped to the unit box.

Flow space, dimension D = 3N - 6, in the order [bonds (N-1) | angles (N-2) | torsions (N-3)]:
bonds r (nm) and angles theta (rad) are mapped affinely to [0, 1] by fitted bounds
u = (v - lo) / (hi - lo). Torsions are first centred on c, the per-torsion circular mean of the training
data (fit): d = wrap(phi - c) in [-pi, pi). Wide torsions (backbone, rotors) stay circles,
u = (d + pi) / (2 pi) in [0, 1) (periodic flow dimensions); narrow ones (data spread below
``narrow_span_rad``, e.g. the improper torsions of branching atoms) become fitted intervals like bonds,
u = (d - lo) / (hi - lo), which gives the flow resolution where the data are. Which torsions are
circles is decided by ``fit`` (unless given) and is part of the config, so the flow's couplings can be
built to match.
The seed bonds r(s0,s1), r(s1,s2) and angle theta(s0,s1,s2) lead each block.

Density: log q(x) = log q_U(u) + logdet_to is the density of the configuration modulo rigid motions,
with respect to the measure dx / (dt dR) that Lebesgue measure on R^{3N} induces on R^{3N}/SE(3)
(translations t with Lebesgue measure, rotations R with the Haar measure of total volume 8 pi^2).
So for a rigid-motion-invariant energy u(x), exp(-u(x)) / Z is the target density in the same
measure and log w = -u(x) - log q(x) are correct importance weights. With
J(x) = r01^2 r12^2 sin(theta012) prod_rows r_i^2 sin(theta_i)  (the Jacobian of the Z-matrix,
seeds included), logdet_to = -log J - sum log(hi - lo) over bonds, angles and torsions (hi - lo = 2 pi
for a circle).
``from_flow_space`` puts the seeds in the reference frame s0 = 0, s1 on +x, s2 in the xy plane (y > 0).

Support (``support``): ``"box"`` (above) gives the flow a density that is zero outside the fitted box,
a hard wall that molecular dynamics on the flow potential -kT log q crosses within a few steps.
``"open"`` maps bonds, angles and narrow torsions from their whole physical domains onto (0, 1) with
C-infinity bijections, so the density is positive and smooth on every configuration and only a
physically impossible one (a bond of length 0 or infinity, an angle of 0 or pi, a narrow torsion at
its antipode) sits at zero density (infinite flow energy):

    t = log r (bonds, r in (0, inf)), t = logit(theta / pi) (angles, (0, pi)),
    t = logit((d + pi) / (2 pi)) (narrow torsions, centred d in (-pi, pi)),
    u = F((t - m) / s),

with m the mean of t over the training data, s = ``open_width`` x its standard deviation and F the CDF
chosen by ``open_map``: ``"logistic"`` (F = sigmoid) or ``"normal"`` (F = Phi, the standard normal CDF).
log|du/dv| = log F'(z) - log s + log|dt/dv| replaces -log(hi - lo) of the box in logdet_to.
Outside the data the logistic map's log-density falls linearly in |t - m| / s (the flow energy rises
like kT |t - m| / s, with no wall); the normal map's falls quadratically (a harmonic confinement
kT (t - m)^2 / (2 s^2)), which together with the couplings' probit-affine maps
(``flows.smooth_coupling``, ``interval='probit'``) makes the flow potential along each bond exactly
quadratic in log r with a conditional centre and stiffness: the shape of the force field's own bond and
angle terms. Circle torsions are the same in both supports.
"""
from __future__ import annotations

import math

import torch

from .base import Representation, as_positions
from .zmatrix import ZMatrix, zmatrix_from_topology


def bond_lengths(x, i, j):
    """|x_i - x_j| for index tensors i, j: x (B, N, 3) -> (B, len(i))."""
    return (x[:, i] - x[:, j]).norm(dim=-1)


def bond_angles(x, i, j, k):
    """Angle i-j-k at j in rad, (B, len(i)), via atan2 (accurate near 0 and pi)."""
    a, b = x[:, i] - x[:, j], x[:, k] - x[:, j]
    return torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))


def torsion_angles(x, i, j, k, l):
    """Dihedral i-j-k-l in rad in (-pi, pi], (B, len(i)) (IUPAC sign; equal to dihedral l-k-j-i)."""
    b1, b2, b3 = x[:, j] - x[:, i], x[:, k] - x[:, j], x[:, l] - x[:, k]
    n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
    sin_part = (torch.linalg.cross(n1, n2) * b2).sum(-1) / b2.norm(dim=-1)
    return torch.atan2(sin_part, (n1 * n2).sum(-1))


def place_atom(xj, xk, xl, r, theta, phi):
    """NeRF: position of atom i with |ij| = r, angle i-j-k = theta, torsion i-j-k-l = phi; (B, 3)."""
    bc = xj - xk
    bc = bc / bc.norm(dim=-1, keepdim=True)
    n = torch.linalg.cross(xk - xl, bc)
    n = n / n.norm(dim=-1, keepdim=True)
    m = torch.linalg.cross(n, bc)
    d = (-r * torch.cos(theta))[:, None] * bc + (r * torch.sin(theta))[:, None] * (
        torch.cos(phi)[:, None] * m + torch.sin(phi)[:, None] * n)
    return xj + d


SUPPORTS = ("box", "open")
OPEN_MAPS = ("logistic", "normal")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def log_sigmoid_grad(z):
    """log sigmoid'(z) = -softplus(-z) - softplus(z), finite for every finite z."""
    return -torch.nn.functional.softplus(-z) - torch.nn.functional.softplus(z)


def _open_cdf(z, open_map: str):
    """F(z) of support "open": sigmoid or the standard normal CDF."""
    return torch.sigmoid(z) if open_map == "logistic" else torch.special.ndtr(z)


def _open_log_pdf(z, open_map: str):
    """log F'(z), finite for every finite z."""
    return log_sigmoid_grad(z) if open_map == "logistic" else -0.5 * z * z - _LOG_SQRT_2PI


def _open_icdf(u, open_map: str):
    """F^-1(u) for u in [0, 1]; 0 and 1 (reached only by rounding: a bond of length 0 or infinity) are
    moved to the nearest representable interior point."""
    eps = torch.finfo(u.dtype).eps
    uc = u.clamp(eps, 1 - eps)
    return torch.log(uc) - torch.log1p(-uc) if open_map == "logistic" else torch.special.ndtri(uc)


def _wrap(angle):
    """Angles (rad) wrapped into [-pi, pi)."""
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


class InternalCoordinates(Representation):
    """Z-matrix internal coordinates on [0, 1]^{3N-6} (torsions periodic). See the module docstring.

    Args:
        zmatrix: the Z-matrix (``zmatrix_from_topology``).
        margin: fraction of the fitted range added on each side of the bond/angle/narrow-torsion bounds.
        circular_torsions: (N-3,) bools, True for torsions kept on the circle; None lets ``fit`` choose
            (circle unless the data's spread around its circular mean is below ``narrow_span_rad``).
        narrow_span_rad: spread (max - min of the centred torsion, rad) below which ``fit`` makes a
            torsion an interval; 0 keeps every torsion a circle.
        support: ``"box"`` (fitted affine box: zero density outside it) or ``"open"`` (smooth bijections
            from the physical domains; the flow density is positive on every configuration, see the
            module docstring). ``margin`` applies to ``"box"`` only.
        open_width: ``"open"`` only: the width s of the map in units of the data's standard
            deviation of t (larger: more of (0, 1) spent on the tails).
        open_map: ``"open"`` only: ``"logistic"`` (u = sigmoid(z)) or ``"normal"`` (u = Phi(z): harmonic
            confinement, for flow potentials run in dynamics; module docstring).
    """

    name = "internal"
    domain = "box"

    def __init__(self, zmatrix: ZMatrix, margin: float = 0.25, circular_torsions=None,
                 narrow_span_rad: float = math.pi / 2, support: str = "box", open_width: float = 1.0,
                 open_map: str = "logistic"):
        n = zmatrix.n_atoms
        if n < 3:
            raise ValueError(f"internal coordinates need >= 3 atoms, got {n}")
        super().__init__(n, 3 * n - 6)
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if support not in SUPPORTS:
            raise ValueError(f"support must be one of {SUPPORTS} (internal coordinates), got {support!r}")
        if not open_width > 0:
            raise ValueError(f"open_width must be > 0 (the open map's width in data standard deviations), got {open_width}")
        if open_map not in OPEN_MAPS:
            raise ValueError(f"open_map must be one of {OPEN_MAPS}, got {open_map!r}")
        self.support = support
        self.open_width = float(open_width)
        self.open_map = open_map
        self.zmatrix = zmatrix
        self.margin = float(margin)
        s0, s1, s2 = zmatrix.seeds
        rows = torch.tensor(zmatrix.rows, dtype=torch.long).reshape(-1, 4)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_bond_i", torch.cat([torch.tensor([s1, s2]), rows[:, 0]]), persistent=False)
        self.register_buffer("_bond_j", torch.cat([torch.tensor([s0, s1]), rows[:, 1]]), persistent=False)
        self.register_buffer("_angle_i", torch.cat([torch.tensor([s2]), rows[:, 0]]), persistent=False)
        self.register_buffer("_angle_j", torch.cat([torch.tensor([s1]), rows[:, 1]]), persistent=False)
        self.register_buffer("_angle_k", torch.cat([torch.tensor([s0]), rows[:, 2]]), persistent=False)
        self.n_bonds, self.n_angles, self.n_torsions = n - 1, n - 2, n - 3
        dtype = torch.get_default_dtype()
        # Unfitted defaults cover covalent bonds and bond angles; fit() narrows them to the data.
        self.register_buffer("bond_lo", torch.full((n - 1,), 0.05, dtype=dtype))
        self.register_buffer("bond_hi", torch.full((n - 1,), 0.25, dtype=dtype))
        self.register_buffer("angle_lo", torch.full((n - 2,), 0.5, dtype=dtype))
        self.register_buffer("angle_hi", torch.full((n - 2,), math.pi - 0.01, dtype=dtype))
        # Per-torsion offset (rad): fit() sets the circular mean of the data, so that each torsion's
        # mass sits mid-box instead of straddling the 0/1 seam (a rotation of the circle: log-det 0).
        # Models that are not periodic-aware (the Euclidean teacher CNF, l2 regression) need this.
        self.register_buffer("torsion_offset", torch.zeros(n - 3, dtype=dtype))
        # Bounds of the centred torsions (rad); (-pi, pi) for circles.
        self.register_buffer("torsion_lo", torch.full((n - 3,), -math.pi, dtype=dtype))
        self.register_buffer("torsion_hi", torch.full((n - 3,), math.pi, dtype=dtype))
        # support "open": centre m and width s of u = F((t - m) / s) for every coordinate (only the
        # bonds, angles and narrow torsions use them); unfitted: bonds 0.12 nm, angles 1.9 rad, torsion 0.
        self.register_buffer("open_centre", torch.cat([torch.full((n - 1,), math.log(0.12)),
                                                       torch.full((n - 2,), math.log(1.9 / (math.pi - 1.9))),
                                                       torch.zeros(n - 3)]).to(dtype))
        self.register_buffer("open_scale", torch.ones(3 * n - 6, dtype=dtype))
        if not narrow_span_rad >= 0:
            raise ValueError(f"narrow_span_rad must be >= 0, got {narrow_span_rad}")
        self.narrow_span_rad = float(narrow_span_rad)
        self._choose_circular = circular_torsions is None
        circ = torch.ones(n - 3, dtype=torch.bool) if circular_torsions is None else \
            torch.as_tensor(list(circular_torsions), dtype=torch.bool)
        if circ.shape != (n - 3,):
            raise ValueError(f"circular_torsions must have {n - 3} entries (one per torsion), got {tuple(circ.shape)}")
        self.circular[self.n_bonds + self.n_angles:] = circ

    @classmethod
    def from_topology(cls, topology, **options) -> "InternalCoordinates":
        return cls(zmatrix_from_topology(topology), **options)

    @property
    def circular_torsions(self) -> torch.Tensor:
        """(N-3,) bool: torsions kept on the circle."""
        return self.circular[self.n_bonds + self.n_angles:]

    def get_config(self):
        config = {"type": self.name, "n_atoms": self.n_atoms, "zmatrix": self.zmatrix.to_config(),
                  "margin": self.margin, "narrow_span_rad": self.narrow_span_rad}
        if self.support != "box":
            config.update(support=self.support, open_width=self.open_width)
            if self.open_map != "logistic":  # files written before open_map existed are logistic
                config["open_map"] = self.open_map
        if not self._choose_circular:
            config["circular_torsions"] = [bool(c) for c in self.circular_torsions.tolist()]
        return config

    @classmethod
    def from_config(cls, config: dict) -> "InternalCoordinates":
        # Files written before narrow torsions existed have no circular_torsions: all circles.
        return cls(ZMatrix.from_config(config["zmatrix"]), margin=config.get("margin", 0.25),
                   circular_torsions=config.get("circular_torsions"),
                   narrow_span_rad=config.get("narrow_span_rad", 0.0), support=config.get("support", "box"),
                   open_width=config.get("open_width", 1.0), open_map=config.get("open_map", "logistic"))

    @property
    def torsion_atoms(self) -> torch.Tensor:
        """(N-3, 4) atom indices (i, j, k, l) of the torsion coordinates, in flow-space order."""
        return self._rows

    def internal(self, x: torch.Tensor):
        """Bonds (B, N-1) nm, angles (B, N-2) rad, torsions (B, N-3) rad in [-pi, pi] of positions."""
        r = self._rows
        bonds = bond_lengths(x, self._bond_i, self._bond_j)
        angles = bond_angles(x, self._angle_i, self._angle_j, self._angle_k)
        torsions = torsion_angles(x, r[:, 0], r[:, 1], r[:, 2], r[:, 3])
        return bonds, angles, torsions

    @torch.no_grad()
    def fit(self, positions):
        """Bounds from training positions (B, N, 3) nm: [min - m*range, max + m*range], m = margin.

        Also centres the torsions and, if the constructor left it open, decides which are circles.
        """
        x = as_positions(positions, self.n_atoms, torch.float64, self.device)
        bonds, angles, torsions = self.internal(x)
        offset = torch.atan2(torsions.sin().mean(0), torsions.cos().mean(0))
        self.torsion_offset.copy_(offset)
        centred = _wrap(torsions - offset)
        tmin, tmax = centred.min(0).values, centred.max(0).values
        if self._choose_circular:
            self.circular[self.n_bonds + self.n_angles:] = (tmax - tmin) >= self.narrow_span_rad
            self._choose_circular = False
        circ = self.circular_torsions
        span = (tmax - tmin).clamp_min(1e-2)
        self.torsion_lo.copy_(torch.where(circ, -math.pi, (tmin - self.margin * span).clamp_min(-math.pi)))
        self.torsion_hi.copy_(torch.where(circ, math.pi, (tmax + self.margin * span).clamp_max(math.pi)))
        for values, lo, hi, floor, ceil, min_range in ((bonds, self.bond_lo, self.bond_hi, 1e-3, math.inf, 1e-3),
                                                       (angles, self.angle_lo, self.angle_hi, 1e-3,
                                                        math.pi - 1e-3, 1e-2)):
            vmin, vmax = values.min(0).values, values.max(0).values
            span = (vmax - vmin).clamp_min(min_range)
            lo.copy_((vmin - self.margin * span).clamp_min(floor))
            hi.copy_((vmax + self.margin * span).clamp_max(ceil))
        t = self._open_t(bonds, angles, centred)
        self.open_centre.copy_(t.mean(0))
        self.open_scale.copy_(self.open_width * t.std(0).clamp_min(1e-3))
        return self

    @property
    def hard_walls(self) -> bool:
        """True when the flow density is zero outside a fitted box (support "box"): dynamics on the
        flow potential can leave the support."""
        return self.support == "box"

    def _open_t(self, bonds, angles, centred):
        """The unbounded coordinates t (B, D) of support "open" (module docstring); circle columns: centred."""
        return self._open_t_log_dt(bonds, angles, centred)[0]

    def _open_t_log_dt(self, bonds, angles, centred):
        """t (B, D) of ``_open_t`` and log |dt/dv| (B, D) (0 for circle columns), from one set of logs."""
        # circle columns take p = 1/2 inside the unused branch, so its gradient stays finite
        p = torch.where(self.circular_torsions, 0.5, (centred + math.pi) / (2 * math.pi))
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        log_b, log_a, log_pi_a = bonds.log(), angles.log(), (math.pi - angles).log()
        t = torch.cat([log_b, log_a - log_pi_a, torch.where(self.circular_torsions, centred, log_p - log_1mp)], -1)
        log_dt = torch.cat([-log_b, math.log(math.pi) - log_a - log_pi_a,
                            torch.where(self.circular_torsions, torch.zeros_like(p),
                                        -math.log(2 * math.pi) - log_p - log_1mp)], -1)
        return t, log_dt

    def _open_z(self, bonds, angles, centred):
        """z = (t - m) / s (B, D), the circle mask (D,), and log |du/dv| (B, D) of support "open"."""
        t, log_dt = self._open_t_log_dt(bonds, angles, centred)
        z = (t - self.open_centre) / self.open_scale
        circ = torch.cat([torch.zeros(self.n_bonds + self.n_angles, dtype=torch.bool, device=z.device),
                          self.circular_torsions])
        log_du = torch.where(circ, torch.full_like(z, -math.log(2 * math.pi)),
                             _open_log_pdf(z, self.open_map) - self.open_scale.log() + log_dt)
        return z, circ, log_du

    def describe_outside(self, x) -> str | None:
        """None if every configuration of positions (B, N, 3) nm lies in the flow's support; else which
        coordinate of the first one outside it leaves, its value and the bounds (one line)."""
        x = self.positions(x)
        with torch.no_grad():
            u, _ = self.to_flow_space(x)
        bad = ~((u >= 0) & (u <= 1)) | ~torch.isfinite(u)
        if not bad.any():
            return None
        frame, col = [int(v) for v in bad.nonzero()[0]]
        bonds, angles, torsions = self.internal(x[frame: frame + 1])
        nb, na = self.n_bonds, self.n_angles
        if col < nb:
            atoms, value, lo, hi, unit_ = (int(self._bond_i[col]), int(self._bond_j[col])), bonds[0, col], \
                self.bond_lo[col], self.bond_hi[col], "nm"
            kind = "bond"
        elif col < nb + na:
            k = col - nb
            atoms = (int(self._angle_i[k]), int(self._angle_j[k]), int(self._angle_k[k]))
            value, lo, hi, unit_, kind = angles[0, k], self.angle_lo[k], self.angle_hi[k], "rad", "angle"
        else:
            k = col - nb - na
            atoms = tuple(int(a) for a in self._rows[k])
            value = torsions[0, k]
            lo, hi = self.torsion_offset[k] + self.torsion_lo[k], self.torsion_offset[k] + self.torsion_hi[k]
            unit_, kind = "rad", "torsion"
        return (f"configuration {frame}: {kind} of atoms {'-'.join(map(str, atoms))} = {float(value):.4f} {unit_} "
                f"outside the flow's support [{float(lo):.4f}, {float(hi):.4f}] {unit_}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Flow files saved before torsion offsets existed keep their meaning: offset 0.
        state_dict.setdefault(prefix + "torsion_offset", torch.zeros_like(self.torsion_offset))
        state_dict.setdefault(prefix + "torsion_lo", torch.full_like(self.torsion_lo, -math.pi))
        state_dict.setdefault(prefix + "torsion_hi", torch.full_like(self.torsion_hi, math.pi))
        # Files saved before support "open" existed are box flows, which do not read these.
        state_dict.setdefault(prefix + "open_centre", self.open_centre.clone())
        state_dict.setdefault(prefix + "open_scale", self.open_scale.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _jacobian_log(self, bonds, angles):
        """log J = log(r01^2 r12^2 sin theta012 prod r_i^2 sin theta_i)  (module docstring)."""
        return 2 * bonds.log().sum(-1) + angles.sin().log().sum(-1)

    def _scale_log(self):
        return ((self.bond_hi - self.bond_lo).log().sum() + (self.angle_hi - self.angle_lo).log().sum()
                + (self.torsion_hi - self.torsion_lo).log().sum())

    def to_flow_space(self, x):
        x = self.positions(x)
        bonds, angles, torsions = self.internal(x)
        if self.support == "open":
            centred = _wrap(torsions - self.torsion_offset)
            z, circ, log_du = self._open_z(bonds, angles, centred)
            nb_na = self.n_bonds + self.n_angles
            u = torch.where(circ, torch.cat([z[:, :nb_na], (centred + math.pi) / (2 * math.pi)], -1),
                            _open_cdf(z, self.open_map))
            return u, log_du.sum(-1) - self._jacobian_log(bonds, angles)
        u = torch.cat([(bonds - self.bond_lo) / (self.bond_hi - self.bond_lo),
                       (angles - self.angle_lo) / (self.angle_hi - self.angle_lo),
                       (_wrap(torsions - self.torsion_offset) - self.torsion_lo)
                       / (self.torsion_hi - self.torsion_lo)], dim=-1)
        return u, -self._jacobian_log(bonds, angles) - self._scale_log()

    def _open_internal(self, u):
        """support "open": (bonds, angles, torsions) of flow-space u (B, D), inverse of to_flow_space."""
        nb, na = self.n_bonds, self.n_angles
        t = self.open_centre + self.open_scale * _open_icdf(u, self.open_map)
        bonds = t[:, :nb].exp()
        angles = math.pi * torch.sigmoid(t[:, nb:nb + na])
        centred = torch.where(self.circular_torsions, 2 * math.pi * u[:, nb + na:] - math.pi,
                              2 * math.pi * torch.sigmoid(t[:, nb + na:]) - math.pi)
        return bonds, angles, centred

    def from_flow_space(self, y):
        u = self._check_flow(y)
        nb, na = self.n_bonds, self.n_angles
        if self.support == "open":
            bonds, angles, centred = self._open_internal(u)
            torsions = self.torsion_offset + centred
            x = self._place(u, bonds, angles, torsions)
            _, _, log_du = self._open_z(bonds, angles, centred)
            return x, self._jacobian_log(bonds, angles) - log_du.sum(-1)
        bonds = self.bond_lo + (self.bond_hi - self.bond_lo) * u[:, :nb]
        angles = self.angle_lo + (self.angle_hi - self.angle_lo) * u[:, nb:nb + na]
        torsions = self.torsion_offset + self.torsion_lo + (self.torsion_hi - self.torsion_lo) * u[:, nb + na:]
        return self._place(u, bonds, angles, torsions), self._jacobian_log(bonds, angles) + self._scale_log()

    def _place(self, u, bonds, angles, torsions):
        """Positions (B, N, 3) nm of internal coordinates, seeds in the reference frame."""
        batch = u.shape[0]
        zeros = u.new_zeros(batch)
        s0, s1, s2 = self.zmatrix.seeds
        pos = {s0: u.new_zeros(batch, 3),
               s1: torch.stack([bonds[:, 0], zeros, zeros], -1)}
        pos[s2] = pos[s1] + torch.stack([-bonds[:, 1] * angles[:, 0].cos(), bonds[:, 1] * angles[:, 0].sin(),
                                         zeros], -1)
        for row, (i, j, k, l) in enumerate(self.zmatrix.rows):
            pos[i] = place_atom(pos[j], pos[k], pos[l], bonds[:, row + 2], angles[:, row + 1], torsions[:, row])
        return torch.stack([pos[a] for a in range(self.n_atoms)], dim=1)
