"""A flow's energy U_flow(x) = -kT log q(x) (kJ/mol, positions nm) as an ``openmm.Force``.

Two backends:

- ``torch``: an openmm-torch ``TorchForce`` built from a TorchScript export (``torch.jit.trace``
  of :class:`FlowEnergyModule`). The saved ``.pt`` holds code and weights and loads in OpenMM
  without regflow_mm installed. Forces come from TorchForce's autograd of the energy.
- ``python``: an ``openmm.PythonForce`` (OpenMM >= 8.5) calling a module-level function through
  ``functools.partial``, so a System holding it can be serialised (the flow is pickled with it).
  Works with any torch build; slower (one Python call per force evaluation).

Limitation of the trace: checks in the flow that depend on the data become constants. For flows
on a bounded flow space (internal coordinates), a configuration outside the support gets a finite
torch-backend energy instead of +inf; the python backend keeps +inf.

Known crash (openmm-torch 1.5 + torch 2.9.0, seen here): ``XmlSerializer.deserialize`` of a System
holding a ``TorchForce`` segfaults, and so does everything that copies a System that way
(``CustomCVForce`` wrapping, openmmtools ``ThermodynamicState`` copies). Build the TorchForce into the
System you run; where a System must be copied or serialised, use the ``python`` backend.

Support: a flow on a fitted box (internal coordinates with ``support="box"``, e.g. the spline flows of
the demo) has zero density outside the box, a hard wall that molecular dynamics on U_flow crosses
within tens of steps; ``flow_force`` warns (:class:`SupportWarning`) with the remedy: train the flow with
``representation_options={"support": "open"}`` (smooth bijections from the physical domains, density
positive everywhere) and the C-infinity ``smooth`` architecture. ``export.dynamics.run_md`` reports the
step and the coordinate where a trajectory leaves a support.

Use the force as the whole potential (a System of massive particles and this force only) or add
it to an existing System in its own force group (``force_group``) to bias or analyse a simulation.
"""
from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np
import openmm
import torch
from torch import nn

from regflow_mm.flows.sampling import flow_dtype, sample_flow

log = logging.getLogger(__name__)

BACKENDS = ("torch", "python")


class SupportWarning(UserWarning):
    """An exported flow potential has hard walls: dynamics on it may leave the flow's support."""


def support_warning_text(flow) -> str | None:
    """The warning for a flow whose density is zero outside a fitted box, else None."""
    if not getattr(flow.representation, "hard_walls", False):
        return None
    return ("this flow's support is a fitted box (internal coordinates, support='box'): its density is zero "
            "outside the box, so MD on the flow potential may leave the support within tens of steps (energy "
            "+inf, then NaN forces). For dynamics, train with representation_options={'support': 'open'} "
            "(smooth bijections of bonds/angles from their physical domains) and architecture 'smooth' "
            "(C-infinity forces), e.g. the pipeline's [smooth] stage; regflow_mm.export.dynamics.run_md reports "
            "the step and coordinate where a trajectory leaves the support")


class FlowEnergyModule(nn.Module):
    """positions (copies * n_atoms, 3) nm -> U_flow = sum over the copies of -kT log q (scalar, kJ/mol), in the
    positions' dtype.

    ``copies`` > 1: the positions hold that many independent copies of the molecule (walkers of one OpenMM
    Context, ``dynamics.run_flow_walkers``), evaluated as one batch; each copy's forces are those of its own
    energy. The flow runs in its own dtype; a float64 flow on OpenMM's Reference platform is exact to round-off.
    """

    def __init__(self, flow: nn.Module, copies: int = 1):
        super().__init__()
        if int(copies) < 1:
            raise ValueError(f"copies must be >= 1 (molecules in the System), got {copies}")
        self.flow = flow
        self.flow_dtype = flow_dtype(flow)
        self.copies = int(copies)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        x = positions.to(self.flow_dtype).reshape(self.copies, -1, 3)
        return self.flow.energy(x).sum().to(positions.dtype)


def export_torchscript(flow: nn.Module, path: str | Path | None = None, example: torch.Tensor | None = None,
                       check_atol: float = 1e-6, seed: int = 0, copies: int = 1) -> torch.jit.ScriptModule:
    """TorchScript module of the flow energy (traced) of ``copies`` molecules, optionally saved to ``path`` (``.pt``).

    ``example``: positions (copies * n_atoms, 3) nm to trace with (default: flow samples). The trace is
    checked against the eager module on two other sets of flow samples (energies and autograd forces
    within ``check_atol`` relative); a flow whose energy has data-dependent Python control flow
    fails this check with a RuntimeError instead of exporting a wrong model. The traced model takes
    exactly ``copies`` molecules.
    """
    flow = flow.eval()
    module = FlowEnergyModule(flow, copies).eval()
    single = FlowEnergyModule(flow).eval()
    dtype = module.flow_dtype
    # Trace and check on samples of finite energy: a sample outside the flow's support has energy
    # +inf in both versions, and inf - inf would fail the comparison for no fault of the trace.
    n_drawn = max(16, 4 * module.copies)
    drawn, _ = sample_flow(flow, n_drawn, seed)
    finite = [x for x in drawn if np.isfinite(_energy_and_forces(single, torch.as_tensor(x, dtype=dtype))[0])]
    if len(finite) < 3 * module.copies:
        raise RuntimeError(f"only {len(finite)} of {n_drawn} flow samples have a finite flow energy: the flow is "
                           "broken, nothing sensible to export")
    samples = [np.concatenate(finite[k * module.copies:(k + 1) * module.copies]) for k in range(3)]
    example = torch.as_tensor(samples[0], dtype=dtype) if example is None else torch.as_tensor(example, dtype=dtype)
    with warnings.catch_warnings():
        # Shape/support checks inside the flow become constants of the trace; the check below
        # catches a trace that does not generalise.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
    for x in samples[1:]:
        e_ref, f_ref = _energy_and_forces(module, torch.as_tensor(x, dtype=dtype))
        e_jit, f_jit = _energy_and_forces(traced, torch.as_tensor(x, dtype=dtype))
        scale = max(abs(e_ref), 1.0)
        if not (abs(e_ref - e_jit) <= check_atol * scale
                and np.allclose(f_jit, f_ref, rtol=check_atol, atol=check_atol * max(np.abs(f_ref).max(), 1.0))):
            raise RuntimeError(f"the traced flow energy differs from the eager one on new configurations (energy "
                               f"{e_jit} vs {e_ref} kJ/mol, max force difference {np.abs(f_jit - f_ref).max():.3g}): "
                               "the flow has data-dependent Python control flow; use backend='python' instead")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        traced.save(str(path))
        log.info("saved TorchScript flow energy to %s", path)
    return traced


def _energy_and_forces(module, x: torch.Tensor) -> tuple[float, np.ndarray]:
    x = x.detach().clone().requires_grad_(True)
    energy = module(x)
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.detach().to(torch.float64).numpy()


def _python_force_computation(state: openmm.State, flow: nn.Module, copies: int = 1) -> tuple[float, np.ndarray]:
    """PythonForce callback: (U_flow kJ/mol summed over ``copies`` molecules, forces (copies * n, 3) kJ/mol/nm) at
    the state's positions."""
    positions = state.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer)
    x = torch.tensor(np.asarray(positions), dtype=flow_dtype(flow)).reshape(copies, -1, 3).requires_grad_(True)
    energy = flow.energy(x).sum()
    (grad,) = torch.autograd.grad(energy, x)
    return float(energy.detach()), -grad.detach().to(torch.float64).numpy().reshape(-1, 3)


_TORCH_KERNELS_LOADED = False


def _load_torch_kernels() -> None:
    """Load openmm-torch's platform kernels if OpenMM's start-up plugin scan missed them.

    OpenMM loads its plugins when ``openmm`` is first imported; if torch was not imported
    before, the openmm-torch kernel library cannot find libtorch's CUDA dependencies
    (libnvrtc) and is skipped, and a TorchForce Context then fails with "does not support all
    required kernels". Now that torch is loaded, load the skipped library explicitly.
    """
    global _TORCH_KERNELS_LOADED
    if _TORCH_KERNELS_LOADED:
        return
    for failure in openmm.Platform.getPluginLoadFailures():
        if "OpenMMTorchReference" in failure or "OpenMMTorchCPU" in failure or "OpenMMTorchCUDA" in failure:
            library = failure.split("Error loading library ", 1)[-1].split(": ", 1)[0]
            try:
                openmm.Platform.loadPluginLibrary(library)
            except openmm.OpenMMException as err:
                log.warning("could not load openmm-torch kernels %s: %s", library, err)
    _TORCH_KERNELS_LOADED = True


class _DropSimtkDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "importing 'simtk.openmm' is deprecated" not in record.getMessage()


def import_openmmtorch():
    """``import openmmtorch`` (after torch, whose import makes its CUDA libraries loadable), without the
    "importing 'simtk.openmm' is deprecated" warning its own ``import simtk.openmm`` logs on the root logger."""
    root, drop = logging.getLogger(), _DropSimtkDeprecation()
    root.addFilter(drop)
    try:
        import openmmtorch
    finally:
        root.removeFilter(drop)
    return openmmtorch


def flow_force(flow, backend: str = "torch", force_group: int = 0, path: str | Path | None = None,
               copies: int = 1) -> openmm.Force:
    """``openmm.Force`` computing U_flow(x) = -kT log q(x) in kJ/mol and its forces (kJ/mol/nm).

    flow: a ``BoltzmannFlow`` or the path of a saved flow.
    backend: "torch" (openmm-torch TorchForce of the traced energy; ``path`` keeps the .pt)
        or "python" (openmm.PythonForce).
    force_group: OpenMM force group (0-31), e.g. to read the flow energy apart from the force field.
    copies: independent copies of the molecule in the System (particles copy k * n_atoms ...): the force is the
        sum of their flow energies, evaluated as one batch (many walkers for about the cost of one).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= force_group <= 31:
        raise ValueError(f"force_group must be in 0..31, got {force_group}")
    if int(copies) < 1:
        raise ValueError(f"copies must be >= 1 (molecules in the System), got {copies}")
    if isinstance(flow, (str, Path)):
        from regflow_mm.flows import load_flow

        flow = load_flow(flow)
    flow = flow.eval()
    text = support_warning_text(flow)
    if text is not None:
        warnings.warn(text, SupportWarning, stacklevel=2)
    if backend == "torch":
        openmmtorch = import_openmmtorch()

        _load_torch_kernels()
        scripted = export_torchscript(flow, path, copies=copies)
        force = openmmtorch.TorchForce(scripted)
    else:
        force = openmm.PythonForce(functools.partial(_python_force_computation, flow=flow, copies=int(copies)), {})
    force.setForceGroup(force_group)
    force.setName(f"regflow-mm flow energy ({backend})")
    return force
