"""Flow layers: exact log-dets vs autograd Jacobians, inverses, normalised densities, registry."""
import math

import pytest
import torch

from regflow_mm.flows import (ElementwiseAffine, NormalCDF, SequentialFlow, StandardNormal, UniformBox,
                              architectures, build_flow, get_architecture, register_architecture)
from regflow_mm.flows.autoregressive import AutoregressiveSpline
from regflow_mm.flows.realnvp import AffineCoupling
from regflow_mm.flows.splines import SplineCoupling

ARCHS = ["resnvp", "nsf", "ar-nsf"]
TINY = {"resnvp": dict(layers=2, hidden=16, blocks=1), "nsf": dict(layers=2, hidden=16, blocks=1, bins=4),
        "ar-nsf": dict(layers=2, hidden=16, depth=1, bins=4)}


def randomise(module, scale, seed=0):
    """Perturb all weights (layers start as the identity; tests need non-trivial maps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def aldp_flow(aldp, rep, arch, scale=0.1):
    flow = build_flow(aldp, rep, arch, seed=3, dtype=torch.float64, **TINY[arch])
    # Internal + Res-NVP ends in the normal CDF: keep latents away from Phi's flat tails.
    return randomise(flow, scale if not (rep == "internal" and arch == "resnvp") else 0.03)


def batch_logdet(fn, x):
    """log|det dfn/dx| per row via the full autograd Jacobian (fn acts row-wise)."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v).sum(0), x, vectorize=True)  # (D, B, D)
    return torch.stack([torch.linalg.slogdet(jac[:, b])[1] for b in range(x.shape[0])])


@pytest.mark.parametrize("rep", ["cartesian", "internal"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logdet_matches_autograd_and_inverse(aldp, rep, arch):
    flow = aldp_flow(aldp, rep, arch)
    z = flow.prior.sample(3, generator=torch.Generator().manual_seed(1))
    y, logdet = flow.transform(z)
    assert y.shape == z.shape == (3, flow.latent_dim) and logdet.shape == (3,)
    auto = batch_logdet(lambda v: flow.transform(v)[0], z)
    assert (logdet - auto).abs().max() < 1e-8
    z_back, logdet_inv = flow.transform(y, inverse=True)
    assert (z_back - z).abs().max() < 1e-6
    assert (logdet_inv + logdet).abs().max() < 1e-8
    if arch != "ar-nsf":  # AR inverse: D sequential passes; its Jacobian follows from the two checks above
        auto_inv = batch_logdet(lambda v: flow.transform(v, inverse=True)[0], y)
        assert (logdet_inv - auto_inv).abs().max() < 1e-8
    # The map is not the identity (otherwise the checks above would be vacuous).
    assert (y - z).abs().max() > 1e-2 and logdet.abs().min() > 1e-3


def test_box_flows_stay_in_box_and_are_periodic(aldp):
    """NSF / AR-NSF on internal coordinates map [0, 1]^D onto itself; the density is periodic in torsions."""
    for arch in ["nsf", "ar-nsf"]:
        flow = aldp_flow(aldp, "internal", arch, scale=0.3)
        u = flow.prior.sample(200, generator=torch.Generator().manual_seed(2))
        y, _ = flow.transform(u)
        assert bool(((y >= 0) & (y <= 1)).all())
        circ = flow.representation.circular.nonzero().flatten()
        lo, hi = y[:4].clone(), y[:4].clone()
        lo[:, circ[0]], hi[:, circ[0]] = 1e-12, 1 - 1e-12
        q_lo = flow.prior.log_prob(flow.transform(lo, inverse=True)[0]) + flow.transform(lo, inverse=True)[1]
        q_hi = flow.prior.log_prob(flow.transform(hi, inverse=True)[0]) + flow.transform(hi, inverse=True)[1]
        assert (q_lo - q_hi).abs().max() < 1e-6


def test_circle_features_values_and_order():
    """Linear dims first, then cos, then sin of 2 pi u for circular dims, in feature_sources' order."""
    from regflow_mm.flows.nets import CircleFeatures, feature_sources

    circular = torch.tensor([False, True, False, True])
    x = torch.tensor([[0.1, 0.25, 0.3, 0.5]], dtype=torch.float64)
    f = CircleFeatures(circular)(x)
    expected = torch.tensor([[0.1, 0.3, 0.0, -1.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(f, expected, atol=1e-12, rtol=0)
    assert feature_sources(circular).tolist() == [0, 2, 1, 3, 1, 3]
    assert torch.equal(CircleFeatures(torch.zeros(3, dtype=torch.bool))(x[:, :3]), x[:, :3])


@pytest.mark.parametrize("arch", ["nsf", "ar-nsf"])
def test_losses_trace_as_one_graph_for_torsion_flows(aldp, arch):
    """torch.compile captures the MLE and RegFlow losses of a box flow with circular torsions whole: a graph
    break (e.g. a boolean-mask index) splits each layer into frames that hit dynamo's recompile limit and run
    eagerly (measured: 16 vs 21 steps per CPU-s on the demo's NSF)."""
    from regflow_mm.training.objectives import nll_terms, regflow_terms

    flow = aldp_flow(aldp, "internal", arch)
    y = flow.transform(flow.prior.sample(8, generator=torch.Generator().manual_seed(0)))[0].detach()
    z = flow.prior.sample(8, generator=torch.Generator().manual_seed(1))
    circular = flow.representation.circular
    assert bool(circular.any())
    for explained in (torch._dynamo.explain(nll_terms)(flow.transform, flow.prior, y),
                      torch._dynamo.explain(regflow_terms)(flow.transform, z, y, circular=circular,
                                                           scale=torch.ones(y.shape[1], dtype=y.dtype))):
        assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
        assert explained.graph_count == 1


def grid_mass(transform, prior, lo, hi, n):
    """Midpoint-rule integral of q(y) = p(T^-1 y) |det dT^-1/dy| over [lo, hi]^2."""
    centres = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n
    y = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        z, logdet = transform(y, inverse=True)
        log_q = prior.log_prob(z) + logdet
    return float(log_q.exp().sum() * ((hi - lo) / n) ** 2)


@pytest.mark.parametrize("kind", ["resnvp", "nsf", "ar-nsf"])
def test_density_integrates_to_one_on_the_plane(kind):
    torch.manual_seed(4)
    if kind == "resnvp":
        # Moderate log-scales keep the density smooth enough for the grid.
        layers = [AffineCoupling(torch.tensor([i % 2 == 0, i % 2 == 1]), hidden=8, blocks=1, max_log_scale=0.7)
                  for i in range(3)]
    elif kind == "nsf":
        layers = [SplineCoupling(torch.tensor([i % 2 == 0, i % 2 == 1]), bins=5, hidden=8, blocks=1, bound=3.0)
                  for i in range(3)]
    else:
        layers = [AutoregressiveSpline([0, 1] if i % 2 == 0 else [1, 0], bins=5, hidden=8, depth=1, bound=3.0)
                  for i in range(2)]
    transform = randomise(SequentialFlow(layers).double(), 0.5 if kind == "resnvp" else 0.2)
    prior = StandardNormal(2).double()
    _, logdet = transform(prior.sample(2000))
    assert logdet.std() > 0.3  # the density is far from the prior
    half_width, n = (24.0, 960) if kind == "resnvp" else (12.0, 480)
    assert abs(grid_mass(transform, prior, -half_width, half_width, n) - 1) < 1e-3


@pytest.mark.parametrize("kind", ["nsf", "ar-nsf"])
def test_density_integrates_to_one_on_interval_times_circle(kind):
    torch.manual_seed(5)
    circular = torch.tensor([False, True])
    if kind == "nsf":
        layers = [SplineCoupling(torch.tensor([i % 2 == 0, i % 2 == 1]), "box", circular, bins=5, hidden=8,
                                 blocks=1) for i in range(4)]
    else:
        layers = [AutoregressiveSpline([0, 1] if i % 2 == 0 else [1, 0], "box", circular, bins=5, hidden=8,
                                       depth=1) for i in range(2)]
    transform = randomise(SequentialFlow(layers).double(), 0.2)
    prior = UniformBox(2).double()
    _, logdet = transform(prior.sample(2000))
    assert logdet.std() > 0.3  # the density is far from uniform
    assert abs(grid_mass(transform, prior, 0.0, 1.0, 400) - 1) < 1e-3


def test_elementwise_layers():
    affine = ElementwiseAffine(3, shift=[1.0, 2.0, 3.0], log_scale=[0.0, -1.0, 0.5]).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y, logdet = affine(x)
    torch.testing.assert_close(y, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
                               + x * torch.tensor([1.0, math.exp(-1), math.exp(0.5)], dtype=torch.float64))
    torch.testing.assert_close(logdet, torch.full((5,), -0.5, dtype=torch.float64))
    torch.testing.assert_close(affine(y, inverse=True)[0], x)
    cdf = NormalCDF()
    u, ld = cdf(x)
    torch.testing.assert_close(u, torch.distributions.Normal(0.0, 1.0).cdf(x))
    assert (ld - batch_logdet(lambda v: cdf(v)[0], x)).abs().max() < 1e-10
    torch.testing.assert_close(cdf(u, inverse=True)[0], x)
    with pytest.raises(ValueError, match="must be > 0"):
        affine.set_gaussian(std=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="dimension 3"):
        affine(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(batch, dim\)"):
        affine(torch.zeros(3))


def test_layer_construction_errors():
    with pytest.raises(ValueError, match="some but not all"):
        AffineCoupling(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="circular dimensions need domain='box'"):
        SplineCoupling(torch.tensor([True, False]), "real", torch.tensor([False, True]))
    with pytest.raises(ValueError, match="permutation"):
        AutoregressiveSpline([0, 0, 1])
    with pytest.raises(ValueError, match="domain"):
        AutoregressiveSpline([0, 1], domain="sphere")


def test_architecture_registry(aldp):
    assert {"resnvp", "nsf", "ar-nsf", "gaussian"} <= set(architectures())
    with pytest.raises(ValueError, match="unknown architecture 'jet'"):
        get_architecture("jet")
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("nsf", lambda rep: None)

    def tiny_affine(representation, scale=1.0):
        return ElementwiseAffine(representation.dim, log_scale=[math.log(scale)] * representation.dim), \
            StandardNormal(representation.dim)

    register_architecture("test-affine", tiny_affine)
    flow = build_flow(aldp, "cartesian", "test-affine", scale=2.0, dtype=torch.float64)
    assert flow.config == {"representation": {"type": "cartesian", "n_atoms": 22},
                           "architecture": "test-affine", "hyper": {"scale": 2.0}}
    with pytest.raises(ValueError, match="JSON-able"):
        build_flow(aldp, "cartesian", "test-affine", scale=torch.tensor(2.0))
    with pytest.raises(ValueError, match="needs a topology"):
        build_flow(22, "internal", "nsf", kT=2.5)
    with pytest.raises(ValueError, match="needs kT"):
        build_flow(22, "cartesian", "nsf")
    with pytest.raises(ValueError, match="needs a real flow space"):
        build_flow(aldp, "internal", "gaussian")
