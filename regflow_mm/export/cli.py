"""`regflow-mm export FLOW --out model.pt`: the flow energy as a TorchScript model for openmm-torch."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a flow's energy -kT log q(x) as TorchScript for openmm-torch",
                              description="Writes a TorchScript module positions (n_atoms, 3) nm -> energy kJ/mol "
                                          "that openmmtorch.TorchForce loads without regflow_mm installed.")
    p.add_argument("flow", help="saved flow file")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--seed", type=int, default=0, help="seed of the flow samples used to trace and check the export")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from regflow_mm.export.forces import export_torchscript
    from regflow_mm.flows import load_flow

    export_torchscript(load_flow(args.flow), args.out, seed=args.seed)
    print(f"wrote {args.out}: load with openmmtorch.TorchForce({str(args.out)!r}) (positions nm -> energy kJ/mol)")
    return 0
