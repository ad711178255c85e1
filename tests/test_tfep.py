"""TFEP: exact answers with exact maps (Gaussians; internal coordinates of aldp), the state checks, a smoke run."""
import math

import numpy as np
import pytest
import torch

from regflow_mm.data.dataset import dihedrals
from regflow_mm.flows import ElementwiseAffine
from regflow_mm.representations.internal import InternalCoordinates
from regflow_mm.sampling.tfep import (StateMap, TFEPSettings, state_members, tfep_between_states, tfep_estimate,
                                      train_tfep_map)
from regflow_mm.systems import get_system


def test_exact_affine_map_between_gaussians_gives_analytic_delta_f():
    """A = N(0, s_a^2 I_3), B = N(m, s_b^2 I_3) with u = |x - mu|^2 / (2 s^2): Delta F = -3 ln(s_b / s_a).

    The affine map x -> m + (s_b / s_a) x pushes A onto B exactly, so every work equals Delta F."""
    s_a, s_b, m = 0.7, 1.9, np.array([0.5, -1.0, 2.0])
    exact = -3 * math.log(s_b / s_a)
    mapping = ElementwiseAffine(3).to(torch.float64).set_gaussian(mean=torch.as_tensor(m), std=s_b / s_a)

    def u_a(x):
        return (x ** 2).sum(1) / (2 * s_a ** 2)

    def u_b(x):
        return ((x - m) ** 2).sum(1) / (2 * s_b ** 2)

    rng = np.random.default_rng(0)
    xa, xb = rng.normal(0, s_a, (500, 3)), m + rng.normal(0, s_b, (400, 3))
    with torch.no_grad():
        ya, ld_f = mapping(torch.from_numpy(xa))
        yb, ld_r = mapping(torch.from_numpy(xb), inverse=True)
    w_f = u_b(ya.numpy()) - u_a(xa) - ld_f.numpy()
    w_r = u_a(yb.numpy()) - u_b(xb) - ld_r.numpy()
    np.testing.assert_allclose(w_f, exact, atol=1e-12)
    result = tfep_estimate(w_f, w_r)
    assert result["method"] == "BAR" and result["reliable"]
    assert abs(result["delta_f"] - exact) < 1e-9 and result["ddelta_f"] < 1e-6
    assert abs(result["forward"]["delta_f"] - exact) < 1e-12 and abs(result["reverse"]["delta_f"] - exact) < 1e-12
    assert result["forward"]["work_ess"] == pytest.approx(1.0) and result["reverse"]["work_ess"] == pytest.approx(1.0)


def test_ot_trained_map_recovers_gaussian_delta_f_without_energies():
    """RegFlow on exact OT pairs (no energy call) learns the affine map between the two Gaussians."""
    s_a, s_b, m = 0.7, 1.2, np.array([0.5, -1.0, 2.0])
    rng = np.random.default_rng(1)
    mapping = ElementwiseAffine(3).to(torch.float64)
    info = train_tfep_map(mapping, rng.normal(0, s_a, (800, 3)), m + rng.normal(0, s_b, (800, 3)), n_steps=300,
                          batch_size=400, lr=3e-2, regularizer="none", seed=0)
    assert not info["ot"]["approximate"] and info["cpu_s"] > 0
    np.testing.assert_allclose(mapping.log_scale.detach().exp().numpy(), s_b / s_a, rtol=0.1)
    xa = rng.normal(0, s_a, (2000, 3))
    with torch.no_grad():
        y, ld = mapping(torch.from_numpy(xa))
    w_f = ((y.numpy() - m) ** 2).sum(1) / (2 * s_b ** 2) - (xa ** 2).sum(1) / (2 * s_a ** 2) - ld.numpy()
    result = tfep_estimate(w_f)
    assert abs(result["delta_f"] + 3 * math.log(s_b / s_a)) < max(3 * result["ddelta_f"], 0.02)
    assert result["forward"]["work_ess"] > 0.9


@pytest.fixture(scope="module")
def aldp():
    return get_system("aldp")


def _frames(system, n, seed, noise=0.004):
    rng = np.random.default_rng(seed)
    return system.positions[None] + rng.normal(0, noise, (n, system.n_atoms, 3))


def test_state_map_work_is_exact_in_internal_coordinates(aldp):
    """With p_A uniform in the map's flow space and p_B its exact push-forward by T (any weights), every
    work equals the constant put into u_B, in both directions: the Cartesian log-det (representation
    Jacobians included) is consistent, and M^-1 inverts M."""
    rep = InternalCoordinates.from_topology(aldp.topology, narrow_span_rad=0.0).to(torch.float64)
    x = _frames(aldp, 64, 0)
    rep.fit(x)
    y = rep.to_flow_space(torch.from_numpy(x))[0].detach()
    torch.manual_seed(0)
    moved = torch.ones(rep.dim, dtype=torch.bool)  # bonds and angles change too: their Jacobian enters the work
    state_map = StateMap(rep, moved, y, torch.remainder(y + 0.3, 1.0), layers=4, hidden=16)
    with torch.no_grad():  # a non-trivial T: random conditioner outputs instead of the identity start
        for p in state_map.transform.parameters():
            p.add_(0.3 * torch.randn_like(p))
    transform, c = state_map.transform, 2.5

    def u_a(xx):  # density 1 on the flow space: u = -log q = -logdet_to
        return -rep.to_flow_space(torch.as_tensor(xx))[1].detach().numpy()

    def u_b(xx):  # log q_B(z) = log|det dT^-1/dz| at z
        z, ld_to = rep.to_flow_space(torch.as_tensor(xx))
        return -(transform(z, inverse=True)[1] + ld_to).detach().numpy() + c

    xt = torch.from_numpy(_frames(aldp, 32, 1, noise=0.002))
    with torch.no_grad():
        mx, ld = state_map(xt)
        back, ld_back = state_map(mx, inverse=True)
    w_f = u_b(mx.numpy()) - u_a(xt.numpy()) - ld.numpy()
    np.testing.assert_allclose(w_f, c, atol=1e-8)
    np.testing.assert_allclose(ld_back.numpy(), -ld.numpy(), atol=1e-8)
    for a, b in zip(rep.internal(back), rep.internal(xt)):  # equal up to a rigid motion
        np.testing.assert_allclose(torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi, 0.0, atol=1e-8)
    w_r = u_a(back.numpy()) - u_b(mx.numpy()) - ld_back.numpy()
    result = tfep_estimate(w_f, w_r)
    assert abs(result["delta_f"] - c) < 1e-8 and abs(result["reverse"]["delta_f"] - c) < 1e-8
    assert state_map.transform.layers[2].net.out[1].weight.abs().sum() > 0  # not the identity


def test_works_and_states_give_one_line_errors(aldp):
    with pytest.raises(ValueError, match=r"every forward \(A -> B\) work is infinite"):
        tfep_estimate(np.full(5, np.inf))
    with pytest.raises(ValueError, match="reverse .* NaN"):
        tfep_estimate(np.zeros(3), np.array([0.0, np.nan]))
    x = _frames(aldp, 10, 2)  # the minimised structure has phi1 < 0
    with pytest.raises(ValueError, match=r"state B 'phi1 > 0' selects no frame of the training data \(10 frames\)"):
        state_members(aldp, x, "phi1 < 0", "phi1 > 0", "the training data")
    with pytest.raises(ValueError, match=r"states A 'phi1 < 0' and B 'phi1 < 10' overlap: 10 frames"):
        state_members(aldp, x, "phi1 < 0", "phi1 < 10", "the training data")
    with pytest.raises(ValueError, match="unknown torsions"):
        state_members(aldp, x, "phi7 < 0", "phi1 > 0", "the training data")
    with pytest.raises(ValueError, match="moved must be 'circular' or 'all'"):
        TFEPSettings(moved="bonds")


def test_tfep_between_states_runs_energy_free_training(aldp):
    """Two 'states' of psi1 made by turning the torsion (not Boltzmann data: only the mechanics are checked)."""
    rep = InternalCoordinates.from_topology(aldp.topology, narrow_span_rad=0.0).to(torch.float64)
    x = _frames(aldp, 200, 3)
    rep.fit(x)
    y = rep.to_flow_space(torch.from_numpy(x))[0].detach()
    psi = next(i for i, q in enumerate(rep.torsion_atoms.tolist()) if sorted(q[1:3]) == sorted(aldp.torsions["psi1"][1:3]))
    k = rep.n_bonds + rep.n_angles + psi
    y[100:, k] = torch.remainder(y[100:, k] + 0.5, 1.0)  # half the frames turned by 180 degrees about psi's bond
    frames = rep.from_flow_space(y)[0].detach().numpy()
    psi = np.degrees(dihedrals(frames, [aldp.torsions["psi1"]])[:, 0])
    sign = np.sign(psi[0])
    assert np.all(np.sign(psi[:100]) == sign) and np.all(np.sign(psi[100:]) == -sign)
    state_a, state_b = ("psi1 > 0", "psi1 < 0") if sign > 0 else ("psi1 < 0", "psi1 > 0")
    result = tfep_between_states(aldp, frames, np.zeros(len(frames)), state_a, state_b,
                                 settings=TFEPSettings(n_train=64, n_eval=64, n_steps=5, layers=2, hidden=8))
    assert result["train"]["n_energy_calls"] == 0 and result["n_energy_calls_eval"] > 0
    assert result["method"] == "BAR" and 1 <= result["n_moved"] < result["dim"]
    assert {"forward", "reverse", "frames_weight_ess", "train"} <= set(result)
