"""Crash-safe appends to HDF5 files that carry a resume checkpoint (MD datasets, hybrid-MC runs).

Commit order: the new rows and the next checkpoint (tagged with its row count) are written first,
then the file's row counter (the commit point), then the checkpoint replaces the previous one.
A kill at any moment leaves a checkpoint whose row count equals the committed counter, which
:func:`committed_checkpoint` finds; rows past the counter are uncommitted and get truncated.
"""
from __future__ import annotations

from typing import Callable

import h5py

from ..files import check_resume_settings  # noqa: F401  (the one resume-settings check; data/simulate imports it here)

CHECKPOINT, NEXT = "checkpoint", "checkpoint_next"


def commit_rows(fh: h5py.File, counter: str, n_rows: int, write_checkpoint: Callable[[str], h5py.HLObject]) -> None:
    """Commit ``n_rows`` rows (already written) with a checkpoint made by ``write_checkpoint(name)``."""
    if NEXT in fh:
        del fh[NEXT]
    write_checkpoint(NEXT).attrs[counter] = n_rows
    fh.flush()
    fh.attrs[counter] = n_rows
    fh.flush()
    if CHECKPOINT in fh:
        del fh[CHECKPOINT]
    fh.move(NEXT, CHECKPOINT)


def committed_checkpoint(fh: h5py.File, counter: str) -> h5py.HLObject | None:
    """The checkpoint of the committed rows (``fh.attrs[counter]``), or None if there is none."""
    n_rows = int(fh.attrs[counter])
    for name in (NEXT, CHECKPOINT):
        if name in fh and int(fh[name].attrs.get(counter, -1)) == n_rows:
            return fh[name]
    return None


def truncate_uncommitted(fh: h5py.File, counter: str, datasets: tuple[str, ...]) -> int:
    """Drop rows past the committed counter from ``datasets``; returns the committed row count."""
    n_rows = int(fh.attrs[counter])
    for name in datasets:
        if fh[name].shape[0] != n_rows:
            fh[name].resize(n_rows, axis=0)
    return n_rows
