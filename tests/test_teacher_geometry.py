"""The molecular teacher: torus-aware OT, wrapped flow-matching paths, standardised coordinates with an
exact likelihood, reproducible reflow pairs, and refusal of teachers made for another flow space."""
import itertools
import math

import numpy as np
import pytest
import torch
from torchdiffeq import odeint

from regflow_mm.flows.priors import UniformBox
from regflow_mm.training.cnf import (SolverOptions, TeacherCNF, TeacherCoordinates, VelocityMLP, interpolate,
                                     minibatch_ot_pairing, representation_hash, teacher_flow, train_flow_matching,
                                     FlowMatchingConfig)
from regflow_mm.training.couplings import generate_reflow_pairs, load_pairs, ot_pairing, pairing_cost


def _brute_force(cost: np.ndarray) -> np.ndarray:
    """src minimising sum_j cost[src[j], j] over all permutations."""
    n = cost.shape[0]
    best = min(itertools.permutations(range(n)), key=lambda p: sum(cost[p[j], j] for j in range(n)))
    return np.array(best)


def test_torus_ot_is_the_exact_assignment_where_euclidean_differs():
    circ = np.array([True, False, True])
    for seed in range(50):
        rng = np.random.default_rng(seed)
        x0, x1 = rng.random((6, 3)), rng.random((6, 3))
        torus, euclid = _brute_force(pairing_cost(x0, x1, circ)), _brute_force(pairing_cost(x0, x1))
        if not np.array_equal(torus, euclid):
            break
    else:
        pytest.fail("no example where the torus and Euclidean assignments differ")
    src, info = ot_pairing(x0, x1, circular=circ)
    np.testing.assert_array_equal(src, torus)
    np.testing.assert_array_equal(ot_pairing(x0, x1)[0], euclid)
    d = np.abs(x0[torus] - x1)
    d[:, circ] = np.minimum(d[:, circ], 1 - d[:, circ])
    assert info["mean_cost"] == pytest.approx((d ** 2).sum(1).mean(), rel=1e-12)
    # the flow-matching minibatch pairing uses the same torus cost
    t0, t1 = torch.as_tensor(x0), torch.as_tensor(x1)
    torch.testing.assert_close(minibatch_ot_pairing(t0, t1, torch.as_tensor(circ)), t0[torch.as_tensor(torus)])
    assert not torch.equal(minibatch_ot_pairing(t0, t1), t0[torch.as_tensor(torus)])


def test_wrapped_interpolation_never_leaves_the_circle():
    gen = torch.Generator().manual_seed(0)
    circ = torch.tensor([True, False, True, True])
    x0, x1 = torch.rand(4000, 4, generator=gen, dtype=torch.float64), torch.rand(4000, 4, generator=gen,
                                                                                   dtype=torch.float64)
    x1[:, 1] = 5 * x1[:, 1] - 2  # a real (non-circular) dimension
    for tv in (0.0, 0.3, 0.5, 0.999, 1.0):
        t = torch.full((4000,), tv, dtype=torch.float64)
        xt, u = interpolate(x0, x1, t, circ)
        assert ((xt[:, circ] >= 0) & (xt[:, circ] < 1)).all()
        assert (u[:, circ].abs() <= 0.5).all()  # the shorter arc
        torch.testing.assert_close(xt[:, 1], (1 - tv) * x0[:, 1] + tv * x1[:, 1])
    t = torch.rand(4000, generator=gen, dtype=torch.float64)
    xt, u = interpolate(x0, x1, t, circ)
    # x_t lies on the shorter arc: its circle distance to x0 is t |u|, to x1 (1 - t) |u|
    arc = lambda a, b: torch.minimum((a - b).abs() % 1, 1 - (a - b).abs() % 1)  # noqa: E731
    torch.testing.assert_close(arc(xt, x0)[:, circ], (t[:, None] * u.abs())[:, circ], atol=1e-12, rtol=0)
    torch.testing.assert_close(arc(xt, x1)[:, circ], ((1 - t[:, None]) * u.abs())[:, circ], atol=1e-12, rtol=0)
    # the trained teacher's samples stay on the circle too
    vel = VelocityMLP(4, hidden=16, n_layers=2, n_frequencies=2, circular=circ).double()
    coords = TeacherCoordinates.fit(x1, circ)
    train_flow_matching(vel, coords.standardise(x1), coords.base(), FlowMatchingConfig(n_steps=20, batch_size=64),
                        progress=False, circular=circ)
    cnf = TeacherCNF(vel, SolverOptions("rk4", n_steps=4), coords)
    y = cnf.generate(torch.rand(500, 4, generator=gen, dtype=torch.float64), UniformBox(4))
    assert ((y[:, circ] >= 0) & (y[:, circ] < 1)).all()


def _teacher(dim=3, circ=(False, True, False), seed=0):
    torch.manual_seed(seed)
    circ = torch.tensor(circ)
    vel = VelocityMLP(dim, hidden=16, n_layers=2, n_frequencies=2, circular=circ).double()
    shift = torch.where(circ, 0.0, torch.linspace(0.2, 0.7, dim, dtype=torch.float64))
    scale = torch.where(circ, 1.0, torch.linspace(0.05, 0.3, dim, dtype=torch.float64))
    return TeacherCNF(vel, SolverOptions("rk4", n_steps=64), TeacherCoordinates(shift, scale, circ))


def test_teacher_log_prob_is_the_change_of_variables_of_its_map():
    cnf = _teacher()
    base = cnf.coords.base()
    z = base.sample(6, generator=torch.Generator().manual_seed(1))

    def f(zi):  # the teacher's map, differentiable through the discrete solver (independent of the divergence)
        x1 = odeint(cnf.velocity, zi[None], torch.tensor([0.0, 1.0], dtype=zi.dtype), method="rk4",
                    options={"step_size": 1 / 64})[-1][0]
        return x1 * cnf.coords.scale + cnf.coords.shift  # no wrap: same Jacobian, y mod 1 on circles below

    y, expected = [], []
    for zi in z:
        jac = torch.autograd.functional.jacobian(f, zi)
        y.append(torch.where(cnf.coords.circular, f(zi) % 1, f(zi)).detach())
        expected.append(base.log_prob(zi[None])[0] - torch.linalg.slogdet(jac)[1])
    y, expected = torch.stack(y), torch.stack(expected)
    # data -> noise integration retraces the path up to the solver's error (rk4, 64 steps)
    torch.testing.assert_close(cnf.flow_log_prob(y), expected, atol=1e-4, rtol=0)
    # the teacher flow layer: forward log|det| equals minus the inverse's, and inverts
    from regflow_mm.training.cnf import TeacherTransform

    layer = TeacherTransform(cnf)
    yy, ld = layer(z)
    zz, ld_inv = layer(yy, inverse=True)
    torch.testing.assert_close(yy, y, atol=1e-10, rtol=0)
    # noise -> data: the integrated divergence is the log-det of the discrete map (to the solver's error)
    torch.testing.assert_close(base.log_prob(z) - ld, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(zz, torch.where(cnf.coords.circular, z % 1, z), atol=1e-6, rtol=0)
    torch.testing.assert_close(ld, -ld_inv, atol=1e-6, rtol=0)


def test_teacher_density_integrates_to_one_on_line_times_circle():
    cnf = _teacher(dim=2, circ=(False, True))
    shift, scale = float(cnf.coords.shift[0]), float(cnf.coords.scale[0])
    a = torch.linspace(shift - 9 * scale, shift + 9 * scale, 121, dtype=torch.float64)
    c = (torch.arange(24, dtype=torch.float64) + 0.5) / 24  # midpoint rule on the circle (periodic: spectral)
    grid = torch.stack(torch.meshgrid(a, c, indexing="ij"), -1).reshape(-1, 2)
    cnf.solver = SolverOptions("rk4", n_steps=8)
    q = cnf.flow_log_prob(grid).exp().reshape(121, 24)
    mass = torch.trapezoid(q.mean(1), a)
    assert float(mass) == pytest.approx(1.0, abs=2e-3)


def test_reflow_pairs_are_reproducible_from_their_seed_and_bound_to_their_teacher(tmp_path):
    cnf = _teacher(dim=3)
    cnf.solver = SolverOptions("rk4", n_steps=8)
    prior = UniformBox(3).double()
    a = generate_reflow_pairs(cnf, prior, 25, tmp_path / "a.h5", chunk_size=10, seed=3, dtype=torch.float64,
                              progress=False)
    b = generate_reflow_pairs(cnf, prior, 25, tmp_path / "b.h5", chunk_size=10, seed=3, dtype=torch.float64,
                              progress=False)
    c = generate_reflow_pairs(cnf, prior, 25, tmp_path / "c.h5", chunk_size=10, seed=4, dtype=torch.float64,
                              progress=False)
    (x0a, x1a, info), (x0b, x1b, _), (x0c, _, _) = load_pairs(a), load_pairs(b), load_pairs(c)
    assert torch.equal(x0a, x0b) and torch.equal(x1a, x1b)
    assert not torch.equal(x0a, x0c)
    torch.testing.assert_close(x1a, cnf.generate(x0a.double(), prior).float())
    assert ((x1a[:, 1] >= 0) & (x1a[:, 1] < 1)).all()
    assert info["settings"]["teacher_coords"]["circular"] == "010"
    other = _teacher(dim=3)
    other.coords.scale.mul_(1.01)  # same weights, other standardisation: another teacher
    with pytest.raises(ValueError, match="other settings"):
        generate_reflow_pairs(other, prior, 25, a, chunk_size=10, seed=3, dtype=torch.float64, progress=False)


@pytest.fixture(scope="module")
def aldp_flows():
    from regflow_mm.flows import build_flow
    from regflow_mm.systems import get_system

    system = get_system("aldp")
    rng = np.random.default_rng(0)
    frames = [system.positions[None] + 0.003 * rng.standard_normal((40, system.n_atoms, 3)) for _ in range(2)]
    flows = [build_flow(system, "internal", "nsf", fit_to=f, seed=0, layers=1, hidden=8) for f in frames]
    return system, flows, frames


def test_teacher_from_another_flow_space_or_system_is_refused(tmp_path, aldp_flows):
    system, (flow, other), (frames, _) = aldp_flows
    circ = flow.representation.circular
    y = flow.to_flow_space(torch.as_tensor(frames, dtype=flow.dtype))[0].detach()
    cnf = TeacherCNF(VelocityMLP(y.shape[1], hidden=8, n_layers=1, n_frequencies=2, circular=circ),
                     SolverOptions("rk4", n_steps=2), TeacherCoordinates.fit(y, circ))
    cnf.save(tmp_path / "teacher.pt", extra={"spec_hash": flow.spec_hash,
                                            "representation_hash": representation_hash(flow.representation)})
    loaded = TeacherCNF.load(tmp_path / "teacher.pt")
    tf = teacher_flow(loaded, flow, tmp_path / "teacher.pt")
    x, log_q = tf.sample(4, generator=torch.Generator().manual_seed(0))
    lp = tf.log_prob(x)
    ok = torch.isfinite(lp)
    assert ok.sum() >= 2
    torch.testing.assert_close(lp[ok], log_q[ok], atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="another representation"):
        teacher_flow(loaded, other, tmp_path / "teacher.pt")
    other_system = type("Flow", (), {"spec_hash": "f" * 40, "representation": flow.representation})()
    with pytest.raises(ValueError, match="system hash"):
        teacher_flow(loaded, other_system, tmp_path / "teacher.pt")
    # a teacher file of the raw kind (before 2026-12) records no flow space: refused, with what to do
    blob = torch.load(tmp_path / "teacher.pt", weights_only=True)
    old = {k: blob[k] for k in ("velocity_config", "velocity_state", "solver")} | {"extra": {}}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="delete the teacher file"):
        teacher_flow(TeacherCNF.load(tmp_path / "old.pt"), flow, tmp_path / "old.pt")


def test_teacher_coordinates_reject_bad_input():
    with pytest.raises(ValueError, match="circular"):
        TeacherCoordinates.fit(torch.rand(10, 3), [True, False])
    with pytest.raises(ValueError, match="finite"):
        TeacherCoordinates.fit(torch.tensor([[0.0, math.nan], [1.0, 2.0]]))
    coords = TeacherCoordinates.fit(torch.rand(10, 2, dtype=torch.float64), [False, True])
    with pytest.raises(ValueError, match="uniform box prior"):
        from regflow_mm.flows.priors import StandardNormal

        coords.from_student_latent(torch.rand(4, 2, dtype=torch.float64), StandardNormal(2))
