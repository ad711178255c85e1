"""Normalizing flows: layers with exact log-dets, priors, and BoltzmannFlow (the object users touch).

    >>> from regflow_mm.flows import build_flow, load_flow
    >>> flow = build_flow(system, representation="cartesian", architecture="nsf", fit_to=train_positions)
    >>> x, log_q = flow.sample(1000); flow.save("flow.pt")
"""
from .autoregressive import AutoregressiveSpline
from .base import Flow, SequentialFlow
from .boltzmann import BoltzmannFlow
from .elementwise import CircularReflection, CircularShift, ElementwiseAffine, NormalCDF
from .factory import (BUILTIN_ARCHITECTURES, architectures, build_flow, flow_from_config, get_architecture,
                      register_architecture)
from .io import load_flow
from .priors import default_prior
from .sampling import as_numpy, flow_device, flow_dtype, flow_log_prob, sample_flow
from .storage import flow_file_hash, require_flow_file, save_flow
from .nets import ResidualMLP
from .priors import Prior, StandardNormal, UniformBox, prior_from_config
from .realnvp import AffineCoupling
from .splines import SplineCoupling, rq_spline

__all__ = ["Flow", "SequentialFlow", "BoltzmannFlow", "CircularReflection", "CircularShift", "ElementwiseAffine", "NormalCDF", "build_flow",
           "register_architecture", "architectures", "get_architecture", "default_prior", "flow_from_config",
           "load_flow", "save_flow", "flow_file_hash", "require_flow_file", "BUILTIN_ARCHITECTURES",
           "as_numpy", "flow_device", "flow_dtype", "flow_log_prob", "sample_flow", "Prior", "StandardNormal", "UniformBox", "prior_from_config",
           "AffineCoupling", "SplineCoupling", "AutoregressiveSpline", "ResidualMLP", "rq_spline"]
