"""The flow file format: writing a BoltzmannFlow to one file, and the file's SHA-256.

The file is ``torch.save`` of a plain dict {format, version, config, state_dict, kT, spec_hash, dtype}
(read back with ``weights_only=True`` by ``io.load_flow``, so no code runs on load). This module sits
below ``boltzmann.py`` (``BoltzmannFlow.save`` uses it) and imports nothing else of ``flows``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..files import atomic_write, require_file

FORMAT = "regflow_mm.boltzmann_flow"
VERSION = 1
KEYS = {"format", "version", "config", "state_dict", "kT", "spec_hash", "dtype"}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def require_flow_file(path, hint: str = "") -> Path:
    """The one "does the flow file exist" check: ``path`` as a Path, or FileNotFoundError."""
    return require_file(path, "flow file", hint)


def flow_file_hash(path) -> str:
    """SHA-256 hex digest of a flow file (store it next to results that used the flow)."""
    path = require_flow_file(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_flow(flow, path) -> str:
    """Write a BoltzmannFlow ``flow`` to ``path`` atomically; returns the file's SHA-256."""
    if flow.config is None:
        raise ValueError("this BoltzmannFlow has no config (it was not made by build_flow), so it cannot be "
                         "rebuilt on load; create it with regflow_mm.flows.build_flow")
    dtype = str(flow.dtype).replace("torch.", "")
    payload = {
        "format": FORMAT, "version": VERSION, "config": flow.config,
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "kT": flow.kT, "spec_hash": flow.spec_hash, "dtype": dtype,
    }
    path = atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return flow_file_hash(path)
