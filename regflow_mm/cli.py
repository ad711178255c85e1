"""The `regflow-mm` command. Each layer registers its subcommands (see ARCHITECTURE.md).

Bad input never ends in a traceback: argument errors and the package's user-facing errors
(ValueError, OSError such as FileNotFoundError, RuntimeError) become one line on stderr,
``regflow-mm <command>: error: <what is wrong and what to do>``, and exit status 2 (``-v`` shows the
traceback instead). Help texts show each option's default.
"""
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

EXIT_USAGE = 2  # bad arguments or bad input files
EXIT_INTERRUPTED = 130


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option help that does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS) or default == []
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage block); subcommand parsers inherit it."""

    def __init__(self, *args, formatter_class=_HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(message) -> str:
    return " ".join(str(message).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="regflow-mm", description="Boltzmann generators for OpenMM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages; tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if "pipeline" in words[:1]:
        # The pipeline runs its stages one process per core with CPU-time budgets: BLAS / OpenMP pools of
        # all cores in every process oversubscribe the CPU, and the trainings then take ~20% fewer steps per
        # CPU-second (measured on the demo). One thread each unless the user set otherwise; torch's own
        # pool follows [run].threads. Set before numpy / torch load (the command modules import them).
        import os

        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        # Expected user-facing failures: one line, no traceback (use -v for details).
        if args.verbose:
            raise
        print(f"regflow-mm {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"regflow-mm {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
