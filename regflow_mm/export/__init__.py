"""A flow's energy -kT log q(x) as an OpenMM force (openmm-torch TorchForce or openmm.PythonForce).

    >>> from regflow_mm.export import flow_force
    >>> system.addForce(flow_force(flow, backend="torch", force_group=1))
"""
from .check import check_flow_force
from .dynamics import MDRun, run_flow_walkers, run_md
from .forces import BACKENDS, FlowEnergyModule, SupportWarning, export_torchscript, flow_force

__all__ = ["BACKENDS", "FlowEnergyModule", "MDRun", "SupportWarning", "check_flow_force", "export_torchscript",
           "flow_force", "run_flow_walkers", "run_md"]
