"""BoltzmannFlow: exact log q of samples, energies/forces, dtypes, chunking, save/load, clear errors."""
import math

import numpy as np
import pytest
import torch

from regflow_mm.flows import BoltzmannFlow, build_flow, flow_file_hash, load_flow
from regflow_mm.systems import get_system

ARCHS = ["resnvp", "nsf", "ar-nsf"]
TINY = {"resnvp": dict(layers=2, hidden=16, blocks=1), "nsf": dict(layers=2, hidden=16, blocks=1, bins=4),
        "ar-nsf": dict(layers=2, hidden=16, depth=1, bins=4)}


@pytest.fixture(scope="module")
def train_positions(aldp):
    """Perturbed copies of the minimised structure (B, 22, 3) nm, float64."""
    gen = np.random.default_rng(0)
    return aldp.positions[None] + 0.01 * gen.standard_normal((64, aldp.n_atoms, 3))


def make_flow(aldp, train_positions, rep, arch, dtype=torch.float64):
    flow = build_flow(aldp, rep, arch, seed=11, dtype=dtype, fit_to=train_positions, **TINY[arch])
    scale = 0.03 if (rep == "internal" and arch == "resnvp") else 0.1
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in flow.transform.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))
    return flow


def test_gaussian_flow_is_exact():
    """identity representation + one elementwise affine layer = N(mean, diag(std^2)) on R^{3N}."""
    mean = torch.linspace(-1, 1, 6, dtype=torch.float64)
    std = torch.linspace(0.05, 0.2, 6, dtype=torch.float64)
    flow = build_flow(2, "identity", "gaussian", kT=2.5, spec_hash="ho", dtype=torch.float64)
    flow.transform.set_gaussian(mean, std)
    torch.manual_seed(0)
    with torch.no_grad():
        x, log_q = flow.sample(20000, chunk_size=5000)
    assert x.shape == (20000, 2, 3) and flow.latent_dim == 6 and flow.n_atoms == 2
    exact = torch.distributions.Normal(mean, std)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(log_q, exact.log_prob(flat).sum(-1), rtol=0, atol=1e-10)
    torch.testing.assert_close(flow.log_prob(x), log_q, rtol=0, atol=1e-10)
    assert (flat.mean(0) - mean).abs().max() < 5 * (std / math.sqrt(20000)).max()
    assert ((flat.std(0) / std) - 1).abs().max() < 0.05
    xs = x[:7]
    torch.testing.assert_close(flow.energy(xs), -2.5 * exact.log_prob(xs.reshape(-1, 6)).sum(-1))
    forces = flow.forces(xs)
    torch.testing.assert_close(forces.reshape(-1, 6), -2.5 * (xs.reshape(-1, 6) - mean) / std ** 2)
    energies, forces2 = flow.energy_and_forces(xs.numpy())
    assert torch.equal(forces2, forces)


@pytest.mark.parametrize("rep", ["cartesian", "internal"])
@pytest.mark.parametrize("arch", ARCHS)
def test_log_prob_of_samples_matches(aldp, train_positions, rep, arch):
    flow = make_flow(aldp, train_positions, rep, arch)
    torch.manual_seed(1)
    with torch.no_grad():
        x, log_q = flow.sample(16)
        assert x.shape == (16, 22, 3) and log_q.shape == (16,) and x.dtype == torch.float64
        assert bool(torch.isfinite(log_q).all())
        assert (flow.log_prob(x) - log_q).abs().max() < 1e-5
        # Chunked (streaming) evaluation gives the same numbers as one batch.
        assert (flow.log_prob(x, chunk_size=5) - flow.log_prob(x)).abs().max() < 1e-12
        # Streaming sampling: one seed (and chunk size) reproduces the draw; log q stays exact per chunk.
        xa, qa = flow.sample(10, chunk_size=3, generator=torch.Generator().manual_seed(3))
        xb, qb = flow.sample(10, chunk_size=3, generator=torch.Generator().manual_seed(3))
        assert torch.equal(xa, xb) and torch.equal(qa, qb)
        assert (flow.log_prob(xa) - qa).abs().max() < 1e-5
        # Energies are -kT log q in kJ/mol.
        torch.testing.assert_close(flow.energy(x), -aldp.kT * log_q, rtol=1e-10, atol=1e-6)


def test_float32_and_device_moves(aldp, train_positions):
    for rep, arch in [("cartesian", "nsf"), ("internal", "ar-nsf"), ("cartesian", "resnvp")]:
        flow = make_flow(aldp, train_positions, rep, arch, dtype=torch.float32)
        assert flow.dtype == torch.float32
        with torch.no_grad():
            x, log_q = flow.sample(32)
            assert x.dtype == torch.float32 and bool(torch.isfinite(log_q).all())
            assert (flow.log_prob(x) - log_q).abs().max() < 5e-2
            assert flow.log_prob(train_positions).dtype == torch.float32  # float64 numpy input is cast
        flow64 = flow.to(torch.float64)
        assert flow64.representation.dtype == torch.float64 and flow64.prior.sample(2).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda(aldp, train_positions):
    for rep, arch in [("cartesian", "nsf"), ("internal", "ar-nsf")]:
        flow = make_flow(aldp, train_positions, rep, arch).to("cuda")
        with torch.no_grad():
            x, log_q = flow.sample(64)
        assert x.device.type == "cuda"
        assert (flow.log_prob(x) - log_q).abs().max() < 1e-5
        cpu = flow.to("cpu")
        assert (cpu.log_prob(x.cpu()) - log_q.cpu()).abs().max() < 1e-8


def test_forces_match_finite_differences(aldp, train_positions):
    flow = make_flow(aldp, train_positions, "cartesian", "nsf")
    x = torch.from_numpy(train_positions[:2])
    energy, forces = flow.energy_and_forces(x)
    h = 1e-6
    for atom, axis in [(0, 0), (7, 1), (21, 2)]:
        dx = torch.zeros_like(x)
        dx[:, atom, axis] = h
        fd = -(flow.energy(x + dx) - flow.energy(x - dx)) / (2 * h)
        torch.testing.assert_close(forces[:, atom, axis], fd, rtol=1e-6, atol=1e-5)
    # Cartesian flow energies are translation invariant, so the forces sum to zero.
    assert forces.sum(1).abs().max() < 1e-8


def test_rigid_motion_invariance(aldp, train_positions):
    x = torch.from_numpy(train_positions[:4])
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rot = q * torch.sign(torch.det(q))
    moved = x @ rot.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    internal = make_flow(aldp, train_positions, "internal", "nsf")
    assert (internal.log_prob(moved) - internal.log_prob(x)).abs().max() < 1e-8
    cartesian = make_flow(aldp, train_positions, "cartesian", "nsf")
    assert (cartesian.log_prob(x + 0.7) - cartesian.log_prob(x)).abs().max() < 1e-8


def test_out_of_support_is_minus_infinity(aldp, train_positions):
    flow = make_flow(aldp, train_positions, "internal", "nsf")
    x = torch.from_numpy(train_positions[:3]).clone()
    x[1] *= 1.5  # bonds far outside the fitted bounds
    log_q = flow.log_prob(x)
    assert torch.isfinite(log_q[[0, 2]]).all() and log_q[1] == -math.inf
    energy, forces = flow.energy_and_forces(x)
    assert energy[1] == math.inf and bool((forces[1] == 0).all()) and bool(torch.isfinite(forces).all())


@pytest.mark.parametrize("rep,arch", [("cartesian", "resnvp"), ("cartesian", "nsf"), ("cartesian", "ar-nsf"),
                                      ("internal", "nsf"), ("internal", "resnvp")])
def test_save_load_bit_identical(aldp, train_positions, rep, arch, tmp_path):
    flow = make_flow(aldp, train_positions, rep, arch)
    path = tmp_path / "flow.pt"
    digest = flow.save(path)
    assert digest == flow_file_hash(path) and len(digest) == 64
    loaded = load_flow(path, system=aldp)
    assert loaded.config == flow.config and loaded.kT == flow.kT and loaded.spec_hash == aldp.spec_hash
    assert loaded.dtype == torch.float64
    x = torch.from_numpy(train_positions[:8])
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
        xa, qa = flow.sample(8, generator=torch.Generator().manual_seed(9))
        xb, qb = loaded.sample(8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(xa, xb) and torch.equal(qa, qb)
    for key, value in flow.state_dict().items():  # normalisation (scale / bounds) included
        assert torch.equal(loaded.state_dict()[key], value)


def test_load_errors(aldp, train_positions, tmp_path):
    flow = make_flow(aldp, train_positions, "cartesian", "nsf")
    path = tmp_path / "flow.pt"
    flow.save(path)
    with pytest.raises(ValueError, match="trained for system hash"):
        load_flow(path, system=get_system("al3"))
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_flow(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a flow at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_flow(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a regflow-mm flow file"):
        load_flow(foreign)
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]
    damaged = tmp_path / "damaged.pt"
    torch.save(payload, damaged)
    with pytest.raises(ValueError, match="lacks the entries"):
        load_flow(damaged)
    payload = torch.load(path, weights_only=True)
    payload["config"]["hyper"]["hidden"] = 32
    torch.save(payload, damaged)
    with pytest.raises(ValueError, match="weights do not fit"):
        load_flow(damaged)
    with pytest.raises(FileNotFoundError):
        load_flow(tmp_path / "missing.pt")
    bare = BoltzmannFlow(flow.representation, flow.transform, flow.prior, kT=flow.kT)
    with pytest.raises(ValueError, match="no config"):
        bare.save(tmp_path / "bare.pt")


def test_bad_inputs(aldp, train_positions):
    flow = make_flow(aldp, train_positions, "cartesian", "resnvp")
    with pytest.raises(ValueError, match=r"shape \(B, 22, 3\)"):
        flow.log_prob(torch.zeros(3, 22, 2))
    with pytest.raises(ValueError, match=r"shape \(B, 22, 3\)"):
        flow.energy(np.zeros((3, 66)))
    bad = train_positions[:3].copy()
    bad[1, 3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        flow.forces(bad)
    with pytest.raises(ValueError, match="floating point"):
        flow.log_prob(torch.zeros(2, 22, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        flow.sample(10, chunk_size=0)
    with pytest.raises(ValueError, match=">= 0"):
        flow.sample(-1)
    with pytest.raises(ValueError, match="kT must be a positive"):
        BoltzmannFlow(flow.representation, flow.transform, flow.prior, kT=-1.0)
    assert flow.sample(0)[0].shape == (0, 22, 3)
    single = flow.log_prob(train_positions[0])  # one (n_atoms, 3) configuration
    assert single.shape == (1,)
