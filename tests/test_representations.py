"""Representations: Z-matrix coverage, internal <-> Cartesian round trips of MD frames, exact log-dets."""
import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from regflow_mm.representations import (CartesianRepresentation, IdentityRepresentation, InternalCoordinates,
                                        ZMatrix, build_zmatrix, helmert_basis, representation_from_config,
                                        torsion_angles, zmatrix_from_topology)
from regflow_mm.systems import get_system

PEPTIDES = ["aldp", "al3", "al4"]


@pytest.fixture(scope="module")
def md_frames():
    """name -> (system, 8 Langevin MD frames (8, N, 3) float64 nm, 50 fs apart, at the system's T)."""
    out = {}
    for name in PEPTIDES:
        system = get_system(name)
        integrator = openmm.LangevinMiddleIntegrator(system.temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                     1.0 * unit.femtosecond)
        integrator.setRandomNumberSeed(7)
        context = openmm.Context(system.system, integrator, openmm.Platform.getPlatformByName("CPU"),
                                 {"Threads": "1"})
        context.setPositions(system.positions)
        context.setVelocitiesToTemperature(system.temperature * unit.kelvin, 7)
        frames = []
        for _ in range(8):
            integrator.step(50)
            state = context.getState(getPositions=True)
            frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        out[name] = (system, np.asarray(frames, dtype=np.float64))
    return out


def kabsch_rmsd_max(a, b):
    """Max per-atom deviation (nm) after optimally superposing b onto a with a PROPER rotation.

    a, b (N, 3) float64; mirror images are not superposable, so chirality errors show up here.
    """
    a0, b0 = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(b0.T @ a0)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return np.abs(b0 @ rot - a0).max()


def pairwise(x):
    return np.linalg.norm(x[:, :, None] - x[:, None, :], axis=-1)


@pytest.mark.parametrize("name", PEPTIDES)
def test_zmatrix_places_every_atom_exactly_once(name):
    system = get_system(name)
    z = zmatrix_from_topology(system.topology)
    order = z.order
    assert len(order) == system.n_atoms == len(set(order))
    assert sorted(order) == list(range(system.n_atoms))
    bonded = {frozenset((b[0].index, b[1].index)) for b in system.topology.bonds()}
    placed = set(z.seeds)
    for i, j, k, l in z.rows:
        assert frozenset((i, j)) in bonded and frozenset((j, k)) in bonded
        assert {j, k, l} <= placed
        placed.add(i)
    # Backbone phi/psi (incl. those through the ACE/NME caps) are flow coordinates.
    torsions = {tuple(r) for r in z.rows} | {tuple(r[::-1]) for r in z.rows}
    for label, atoms in system.torsions.items():
        assert tuple(atoms) in torsions, f"{name}: {label} {atoms} is not a Z-matrix torsion"
    # Hydrogens never serve as bond/angle partners of heavy atoms.
    atoms = list(system.topology.atoms())
    for i, j, k, _ in z.rows:
        if atoms[i].element.symbol != "H":
            assert atoms[j].element.symbol != "H" and atoms[k].element.symbol != "H"


def test_zmatrix_errors():
    with pytest.raises(ValueError, match="twice"):
        ZMatrix(5, (0, 1, 2), ((3, 2, 1, 0), (3, 2, 1, 0)))
    with pytest.raises(ValueError, match="does not place atoms"):
        ZMatrix(5, (0, 1, 2), ((3, 2, 1, 0),))
    with pytest.raises(ValueError, match="placed before"):
        ZMatrix(5, (0, 1, 2), ((3, 4, 1, 0), (4, 3, 2, 1)))
    with pytest.raises(ValueError, match="connected molecule"):
        build_zmatrix(6, [(0, 1), (1, 2), (3, 4), (4, 5)])
    with pytest.raises(ValueError, match="chain of at least 3"):
        build_zmatrix(2, [(0, 1)])
    # A branched molecule without residues (neopentane carbon skeleton) still places every atom once.
    z = build_zmatrix(5, [(0, 1), (0, 2), (0, 3), (0, 4)])
    assert sorted(z.order) == list(range(5))


@pytest.mark.parametrize("name", PEPTIDES)
def test_internal_round_trip_md_frames(name, md_frames):
    system, frames = md_frames[name]
    rep = InternalCoordinates.from_topology(system.topology).to(torch.float64).fit(frames)
    u, logdet_to = rep.to_flow_space(frames)
    assert u.shape == (8, 3 * system.n_atoms - 6)
    assert bool(((u >= 0) & (u <= 1)).all())
    back, logdet_from = rep.from_flow_space(u)
    back = back.numpy()
    # Positions agree after superposition with a proper rotation (the frame fixes the 6 rigid DOF) ...
    worst = max(kabsch_rmsd_max(frames[b], back[b]) for b in range(len(frames)))
    assert worst < 1e-5
    # ... and so do all pairwise distances.
    assert np.abs(pairwise(frames) - pairwise(back)).max() < 1e-5
    torch.testing.assert_close(logdet_to, -logdet_from, rtol=0, atol=1e-10)
    # The reconstruction lies in the seed frame: s0 at the origin, s1 on +x, s2 in the xy plane (y > 0).
    s0, s1, s2 = rep.zmatrix.seeds
    assert np.abs(back[:, s0]).max() == 0
    assert np.abs(back[:, s1, 1:]).max() == 0 and (back[:, s1, 0] > 0).all()
    assert np.abs(back[:, s2, 2]).max() == 0 and (back[:, s2, 1] > 0).all()


def test_internal_torsions_match_mdtraj(md_frames):
    import mdtraj
    system, frames = md_frames["al4"]
    quads = np.array(list(system.torsions.values()))
    ours = torsion_angles(torch.from_numpy(frames), *[torch.from_numpy(quads[:, c]) for c in range(4)]).numpy()
    ref = mdtraj.compute_dihedrals(mdtraj.Trajectory(frames, None), quads)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_internal_logdet_matches_autograd(md_frames):
    """from_flow_space log-det = log|det d(frame coords)/du| (autograd) + log(r01^2 * y2) (rigid-motion measure).

    The square map is u (3N-6) -> the 3N-6 free Cartesian coordinates in the seed frame:
    x of s1, (x, y) of s2, and all coordinates of the other atoms; y2 = distance of s2 from the s0-s1 axis.
    """
    system, frames = md_frames["aldp"]
    rep = InternalCoordinates.from_topology(system.topology).to(torch.float64).fit(frames)
    s0, s1, s2 = rep.zmatrix.seeds
    others = [a for a in range(system.n_atoms) if a not in (s0, s1, s2)]
    u, _ = rep.to_flow_space(frames[:3])

    def frame_coords(v):
        x, _ = rep.from_flow_space(v[None])
        x = x[0]
        return torch.cat([x[s1, :1], x[s2, :2], x[others].reshape(-1)])

    for b in range(3):
        jac = torch.autograd.functional.jacobian(frame_coords, u[b])
        assert jac.shape == (rep.dim, rep.dim)
        auto = torch.linalg.slogdet(jac)[1]
        x, logdet = rep.from_flow_space(u[b:b + 1])
        measure = torch.log(x[0, s1, 0] ** 2 * x[0, s2, 1])
        assert abs(float(logdet[0] - (auto + measure))) < 1e-8


def test_internal_fit_and_config_round_trip(md_frames):
    system, frames = md_frames["al3"]
    rep = InternalCoordinates.from_topology(system.topology, margin=0.5).to(torch.float64).fit(frames)
    bonds, angles, _ = rep.internal(torch.from_numpy(frames))
    span = bonds.max(0).values - bonds.min(0).values
    torch.testing.assert_close(rep.bond_lo, (bonds.min(0).values - 0.5 * span.clamp_min(1e-3)).clamp_min(1e-3))
    assert bool((rep.angle_hi <= math.pi).all() and (rep.angle_lo < angles.min(0).values).all())
    clone = representation_from_config(rep.get_config()).to(torch.float64)
    clone.load_state_dict(rep.state_dict())
    torch.testing.assert_close(clone.to_flow_space(frames)[0], rep.to_flow_space(frames)[0], rtol=0, atol=0)
    # fit made every torsion whose centred spread is below narrow_span_rad an interval, the rest circles
    _, _, tors = rep.internal(torch.from_numpy(frames).double())
    centred = torch.remainder(tors - rep.torsion_offset + math.pi, 2 * math.pi) - math.pi
    spread = centred.max(0).values - centred.min(0).values
    assert torch.equal(rep.circular_torsions, spread >= rep.narrow_span_rad)
    assert torch.equal(clone.circular, rep.circular)
    assert bool((rep.torsion_lo[~rep.circular_torsions] < centred.min(0).values[~rep.circular_torsions]).all())
    all_circles = InternalCoordinates.from_topology(system.topology, narrow_span_rad=0.0).fit(frames)
    assert int(all_circles.circular.sum()) == system.n_atoms - 3


def test_internal_narrow_torsions_exact_logdet(md_frames):
    """With interval torsions, from_flow_space inverts to_flow_space and the log-dets cancel."""
    system, frames = md_frames["aldp"]
    mask = [k % 2 == 0 for k in range(system.n_atoms - 3)]
    rep = InternalCoordinates.from_topology(system.topology, circular_torsions=mask).to(torch.float64).fit(frames)
    assert rep.circular_torsions.tolist() == mask
    u, logdet_to = rep.to_flow_space(frames)
    assert bool(((u >= 0) & (u <= 1)).all())
    x, logdet_from = rep.from_flow_space(u)
    u2, _ = rep.to_flow_space(x)
    torch.testing.assert_close(u2, u, rtol=0, atol=1e-9)
    torch.testing.assert_close(logdet_from, -logdet_to, rtol=0, atol=1e-9)


def test_cartesian_representation_exact(md_frames):
    system, frames = md_frames["aldp"]
    n = system.n_atoms
    rep = CartesianRepresentation(n).to(torch.float64).fit(frames)
    centred = frames - frames.mean(1, keepdims=True)
    assert abs(float(rep.scale) - np.sqrt((centred ** 2).mean())) < 1e-12
    y, logdet = rep.to_flow_space(frames)
    assert y.shape == (8, 3 * n - 3)
    torch.testing.assert_close(logdet, torch.full((8,), -(3 * n - 3) * math.log(float(rep.scale)),
                                                  dtype=torch.float64), rtol=0, atol=1e-12)
    back, logdet_from = rep.from_flow_space(y)
    np.testing.assert_allclose(back.numpy(), centred, atol=1e-12)
    torch.testing.assert_close(logdet_from, -logdet)
    # Translation invariance, and an orthonormal basis of the mean-free subspace.
    shifted, _ = rep.to_flow_space(frames + np.array([0.3, -1.0, 2.0]))
    torch.testing.assert_close(shifted, y, rtol=0, atol=1e-12)
    basis = helmert_basis(n)
    torch.testing.assert_close(basis.T @ basis, torch.eye(n - 1, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(basis.sum(0), torch.zeros(n - 1, dtype=torch.float64), rtol=0, atol=1e-14)

    # Square map y -> coordinates of x in an orthonormal basis of the mean-free subspace: log-det = (3N-3) log s.
    full = torch.kron(basis, torch.eye(3, dtype=torch.float64))  # (3N, 3N-3), orthonormal columns

    def coords(v):
        x, _ = rep.from_flow_space(v[None])
        return full.T @ x[0].reshape(-1)

    jac = torch.autograd.functional.jacobian(coords, y[0])
    assert abs(float(torch.linalg.slogdet(jac)[1] - logdet_from[0])) < 1e-8


def test_identity_representation():
    rep = IdentityRepresentation(3).to(torch.float64)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    y, logdet = rep.to_flow_space(x)
    assert y.shape == (4, 9) and bool((logdet == 0).all())
    assert torch.equal(rep.from_flow_space(y)[0], x)


def test_representation_bad_inputs(md_frames):
    system, frames = md_frames["aldp"]
    reps = [CartesianRepresentation(22), InternalCoordinates.from_topology(system.topology),
            IdentityRepresentation(22)]
    for rep in reps:
        with pytest.raises(ValueError, match=r"shape \(B, 22, 3\)"):
            rep.to_flow_space(np.zeros((4, 21, 3)))
        bad = frames.copy()
        bad[2, 5, 1] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            rep.to_flow_space(bad)
        with pytest.raises(ValueError, match="flow-space points"):
            rep.from_flow_space(torch.zeros(3, rep.dim + 1))
        with pytest.raises(ValueError, match="numpy array or torch tensor"):
            rep.to_flow_space(frames.tolist())
    with pytest.raises(ValueError, match="zero spread"):
        CartesianRepresentation(22).fit(np.zeros((3, 22, 3)))
    with pytest.raises(ValueError, match="unknown representation"):
        representation_from_config({"type": "polar"})


def test_torsions_are_centred_mid_box_and_old_files_load():
    """fit() puts each torsion's circular mean at u = 0.5 (away from the seam); log-det unchanged."""
    import math

    import torch

    from regflow_mm.representations import InternalCoordinates
    from regflow_mm.systems import get_system

    system = get_system("aldp")
    x = torch.as_tensor(system.positions, dtype=torch.float64)[None] + 0.01 * torch.randn(64, system.n_atoms, 3,
                                                                                          dtype=torch.float64)
    plain = InternalCoordinates.from_topology(system.topology, narrow_span_rad=0.0).double()
    fitted = InternalCoordinates.from_topology(system.topology, narrow_span_rad=0.0).double().fit(x)
    u, logdet = fitted.to_flow_space(x)
    angle = 2 * math.pi * u[:, fitted.n_bonds + fitted.n_angles:]
    centre = torch.atan2(angle.sin().mean(0), angle.cos().mean(0))
    torch.testing.assert_close(centre.abs(), torch.full_like(centre, math.pi), atol=1e-9, rtol=0)
    back, _ = fitted.from_flow_space(u)
    d = lambda p: torch.cdist(p, p)  # noqa: E731 (rigid-motion-free comparison)
    torch.testing.assert_close(d(back), d(x), atol=1e-9, rtol=0)
    plain.load_state_dict({k: v for k, v in fitted.state_dict().items() if k != "torsion_offset"})
    assert torch.count_nonzero(plain.torsion_offset) == 0  # files saved before offsets keep offset 0
    fitted.torsion_offset.zero_()
    torch.testing.assert_close(fitted.to_flow_space(x)[1], logdet)  # a rotation of the circle: same log-det
