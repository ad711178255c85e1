"""`regflow-mm pipeline`: the end-to-end job with a report."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pipeline", help="MD -> RegFlow + MLE -> evaluation -> MC -> free energy -> export -> report",
                              description="Runs every stage into --out, reusing finished stages; rerun the same "
                                          "command to continue after an interruption.")
    p.add_argument("--config", default=None, help="pipeline TOML (default: the aldp CPU demo; see examples/)")
    p.add_argument("--out", required=True, help="run folder (report.md, metrics.json, figures/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_pipeline)


def _pipeline(args) -> int:
    from .run import run_pipeline

    report = run_pipeline(args.config, args.out, progress=not args.quiet)
    print(f"report: {report}")
    return 0
