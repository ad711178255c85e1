"""The `regflow-mm` command. Each layer registers its subcommands (see ARCHITECTURE.md)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules exposing register(subparsers); listed in pipeline order.
_COMMAND_MODULES = [
    "regflow_mm.data.cli",
    "regflow_mm.training.cli",
    "regflow_mm.sampling.cli",
    "regflow_mm.export.cli",
    "regflow_mm.pipeline.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regflow-mm", description="Boltzmann generators for OpenMM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Expected user-facing failures: one line, no traceback (use -v for details).
        if args.verbose:
            raise
        print(f"regflow-mm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"regflow-mm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
