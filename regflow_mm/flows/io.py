"""One-file storage of a BoltzmannFlow: config, weights, normalisation, spec_hash, kT, dtype.

The file is ``torch.save`` of a plain dict (loaded with ``weights_only=True``, so no code runs on load).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .boltzmann import BoltzmannFlow

FORMAT = "regflow_mm.boltzmann_flow"
VERSION = 1
_KEYS = {"format", "version", "config", "state_dict", "kT", "spec_hash", "dtype"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def flow_file_hash(path) -> str:
    """SHA-256 hex digest of a flow file (store it next to results that used the flow)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow file {path} not found")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_flow(flow: BoltzmannFlow, path) -> str:
    """Write ``flow`` to ``path`` atomically; returns the file's SHA-256."""
    if flow.config is None:
        raise ValueError("this BoltzmannFlow has no config (it was not made by build_flow), so it cannot be "
                         "rebuilt on load; create it with regflow_mm.flows.build_flow")
    dtype = str(flow.dtype).replace("torch.", "")
    payload = {
        "format": FORMAT, "version": VERSION, "config": flow.config,
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "kT": flow.kT, "spec_hash": flow.spec_hash, "dtype": dtype,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return flow_file_hash(path)


def load_flow(path, system=None, map_location="cpu") -> BoltzmannFlow:
    """Read a flow saved by ``save_flow``; with ``system``, check that its spec_hash matches.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt/truncated/foreign file or a
    system mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flow file {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... for damaged files
        raise ValueError(f"{path} is not a readable flow file (corrupt or truncated?): "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a regflow-mm flow file (no '{FORMAT}' header)")
    missing = _KEYS - set(payload)
    if missing:
        raise ValueError(f"flow file {path} lacks the entries {sorted(missing)}; it is damaged, save it again")
    if payload["version"] != VERSION:
        raise ValueError(f"flow file {path} has format version {payload['version']}, this code reads {VERSION}")
    if payload["dtype"] not in _DTYPES:
        raise ValueError(f"flow file {path}: unknown dtype {payload['dtype']!r}")
    if system is not None:
        expected = getattr(system, "spec_hash", system)
        if payload["spec_hash"] != expected:
            name = getattr(system, "name", "the given system")
            raise ValueError(f"flow file {path} was trained for system hash {payload['spec_hash']}, but {name} "
                             f"has hash {expected}: the force field, structure or temperature differ")
    flow = BoltzmannFlow.from_config(payload["config"], kT=payload["kT"], spec_hash=payload["spec_hash"])
    flow = flow.to(_DTYPES[payload["dtype"]])
    try:
        flow.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"flow file {path}: weights do not fit the stored architecture: "
                         f"{str(err).splitlines()[0]}") from None
    return flow.to(map_location) if map_location is not None else flow
