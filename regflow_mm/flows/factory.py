"""Build BoltzmannFlows by name: representation x architecture, with a config that save/load round-trips.

    >>> flow = build_flow(get_system("aldp"), representation="internal", architecture="nsf", layers=4)

An architecture is a builder ``builder(representation, **hyper) -> (transform: Flow, prior: Prior)``.
The built-in ones are listed in ``BUILTIN_ARCHITECTURES`` below; ``register_architecture(name, builder)``
adds a user's own (for the running process). Hyper-parameters must be JSON-able: they are stored in
the flow file and passed again on load.

Imports within ``flows`` run one way: layers, priors, storage -> boltzmann -> factory -> io.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from typing import Callable

import torch

from ..representations import REPRESENTATIONS, representation_from_config
from ..representations.base import Representation
from .autoregressive import build_ar_nsf
from .boltzmann import BoltzmannFlow
from .elementwise import ElementwiseAffine
from .priors import default_prior
from .realnvp import build_resnvp
from .smooth_coupling import smooth_architecture
from .splines import build_nsf

ArchitectureBuilder = Callable[..., tuple]


def _gaussian(representation, **hyper):
    if hyper:
        raise ValueError(f"architecture 'gaussian' takes no hyper-parameters, got {sorted(hyper)}")
    if representation.domain != "real":
        raise ValueError("architecture 'gaussian' needs a real flow space (cartesian or identity representation)")
    return ElementwiseAffine(representation.dim), default_prior(representation)


BUILTIN_ARCHITECTURES: dict[str, ArchitectureBuilder] = {
    "gaussian": _gaussian,     # one elementwise affine layer
    "resnvp": build_resnvp,    # realnvp.py: affine couplings
    "nsf": build_nsf,          # splines.py: rational-quadratic spline couplings
    "ar-nsf": build_ar_nsf,    # autoregressive.py: inverse-autoregressive splines
    "smooth": smooth_architecture,  # smooth_coupling.py: C-infinity mixture couplings (box flow spaces)
}
_ARCHITECTURES: dict[str, ArchitectureBuilder] = dict(BUILTIN_ARCHITECTURES)


def register_architecture(name: str, builder: ArchitectureBuilder, overwrite: bool = False) -> None:
    """Make ``build_flow(..., architecture=name)`` call ``builder(representation, **hyper)``.

    The builder returns ``(transform, prior)`` with ``prior.dim == representation.dim``.
    """
    if not callable(builder):
        raise ValueError(f"architecture builder for {name!r} must be callable")
    if name in _ARCHITECTURES and not overwrite and _ARCHITECTURES[name] is not builder:
        raise ValueError(f"architecture {name!r} is already registered; pass overwrite=True to replace it")
    _ARCHITECTURES[name] = builder


def architectures() -> list[str]:
    """Names of the known architectures (built-in and registered)."""
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> ArchitectureBuilder:
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {architectures()}")
    return _ARCHITECTURES[name]


def check_hyper(architecture: str, hyper: dict) -> None:
    """ValueError for a hyper-parameter the architecture's builder does not take, or a value whose type
    differs from the builder's default (an int is a valid float); builders with ``**kwargs`` take any."""
    params = dict(list(inspect.signature(get_architecture(architecture)).parameters.items())[1:])
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(f"architecture {architecture!r} has no hyper-parameters {unknown}; it takes {known}")
    for key, value in hyper.items():
        default = params[key].default
        if isinstance(default, bool) or not isinstance(default, (int, float, str)):
            ok = not isinstance(default, bool) or isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = type(value) is type(default)
        if not ok:
            raise ValueError(f"architecture {architecture!r}: hyper-parameter {key} must be "
                             f"{type(default).__name__} like its default {default!r}, got {value!r}")


def _make_representation(target, name: str, options: dict) -> Representation:
    if name not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {name!r}; known: {sorted(REPRESENTATIONS)}")
    cls = REPRESENTATIONS[name]
    if name == "internal":
        topology = getattr(target, "topology", target)
        if isinstance(topology, int) or not hasattr(topology, "bonds"):
            raise ValueError("the internal representation needs a topology: pass a MolecularSystem or an "
                             "openmm.app.Topology, not an atom count")
        return cls.from_topology(topology, **options)
    if isinstance(target, int):
        n_atoms = target
    elif hasattr(target, "n_atoms"):
        n_atoms = target.n_atoms
    elif hasattr(target, "getNumAtoms"):
        n_atoms = target.getNumAtoms()
    else:
        raise ValueError(f"build_flow needs a MolecularSystem, an openmm Topology or an atom count, got "
                         f"{type(target).__name__}")
    return cls(n_atoms, **options)


def _check_jsonable(name: str, value) -> None:
    try:
        json.dumps(value)
    except TypeError as err:
        raise ValueError(f"{name} must be JSON-able (numbers, strings, lists, dicts) to be saved: {err}") from None


def flow_from_config(config: dict, kT: float, spec_hash: str | None = None) -> BoltzmannFlow:
    """A freshly initialised BoltzmannFlow of the architecture in ``config`` (weights not loaded)."""
    for key in ("representation", "architecture", "hyper"):
        if key not in config:
            raise ValueError(f"flow config lacks the key {key!r}; got keys {sorted(config)}")
    representation = representation_from_config(config["representation"])
    transform, prior = get_architecture(config["architecture"])(representation, **config["hyper"])
    return BoltzmannFlow(representation, transform, prior, kT=kT, spec_hash=spec_hash, config=dict(config))


def build_flow(system_or_n_atoms, representation: str = "cartesian", architecture: str = "resnvp", *,
               kT: float | None = None, spec_hash: str | None = None, fit_to=None,
               representation_options: dict | None = None, seed: int | None = None,
               dtype: torch.dtype | None = None, **hyper) -> BoltzmannFlow:
    """A new BoltzmannFlow.

    Args:
        system_or_n_atoms: a MolecularSystem (gives kT, spec_hash and topology), an openmm Topology or an
            atom count (then give ``kT``).
        representation: ``"cartesian"`` (mean-free, scaled), ``"internal"`` (Z-matrix; needs a topology) or
            ``"identity"`` (absolute coordinates).
        architecture: ``"resnvp"``, ``"nsf"``, ``"ar-nsf"``, ``"gaussian"`` (one elementwise affine layer) or a
            registered name.
        kT: kJ/mol; overrides the system's. spec_hash: overrides the system's.
        fit_to: training positions (B, n_atoms, 3) nm to fit the representation's normalisation.
        representation_options: keyword arguments of the representation (JSON-able).
        seed: seeds the weight initialisation (the global torch RNG is left untouched).
        dtype: e.g. torch.float64; default the torch default dtype.
        hyper: the architecture's hyper-parameters (JSON-able).
    """
    options = dict(representation_options or {})
    _check_jsonable("representation_options", options)
    _check_jsonable("hyper-parameters", hyper)
    kT = kT if kT is not None else getattr(system_or_n_atoms, "kT", None)
    if kT is None:
        raise ValueError("build_flow needs kT (kJ/mol) when given an atom count or a topology")
    spec_hash = spec_hash if spec_hash is not None else getattr(system_or_n_atoms, "spec_hash", None)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(int(seed))
        rep = _make_representation(system_or_n_atoms, representation, options)
        if dtype is not None:
            rep = rep.to(dtype)
        if fit_to is not None:
            # Before the transform: fitting can decide the flow space's layout (which torsions are
            # circles), which the couplings and the saved config must match.
            rep.fit(fit_to)
        check_hyper(architecture, hyper)
        config = {"representation": rep.get_config(), "architecture": architecture, "hyper": dict(hyper)}
        transform, prior = get_architecture(architecture)(rep, **hyper)
        flow = BoltzmannFlow(rep, transform, prior, kT=float(kT), spec_hash=spec_hash, config=config)
    if dtype is not None:
        flow = flow.to(dtype)
    return flow

