"""Progress bars: tqdm, redrawn at most once a minute when stderr is not a terminal.

A redirected log (``make demo > log``) otherwise receives a carriage-return frame on every refresh,
~0.5 KB/s for the length of the run; periodic frames keep such logs small while still showing progress.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 60.0


def progress_bar(*args, **kwargs) -> tqdm:
    """``tqdm(*args, **kwargs)``; when stderr is not a terminal, mininterval and maxinterval are raised
    to ``LOG_INTERVAL_S`` seconds."""
    if not _is_terminal(kwargs.get("file", sys.stderr)):
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_INTERVAL_S)
        kwargs["maxinterval"] = max(float(kwargs.get("maxinterval", 10.0)), LOG_INTERVAL_S)
    return tqdm(*args, **kwargs)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or stream-like objects without isatty
        return False
