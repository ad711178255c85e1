"""Reading a flow file back into a BoltzmannFlow (the format and the writer are in ``storage.py``)."""
from __future__ import annotations

from ..files import load_torch
from ..systems import check_spec_hash
from .boltzmann import BoltzmannFlow
from .factory import flow_from_config
from .storage import DTYPES, FORMAT, KEYS, VERSION, flow_file_hash, require_flow_file, save_flow

__all__ = ["load_flow", "save_flow", "flow_file_hash"]


def load_flow(path, system=None, map_location="cpu") -> BoltzmannFlow:
    """Read a flow saved by ``save_flow``; with ``system``, check that its spec_hash matches.

    Raises FileNotFoundError for a missing file and ValueError for a corrupt/truncated/foreign file or a
    system mismatch.
    """
    path = require_flow_file(path)
    payload = load_torch(path, "flow file", map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a regflow-mm flow file (no '{FORMAT}' header)")
    missing = KEYS - set(payload)
    if missing:
        raise ValueError(f"flow file {path} lacks the entries {sorted(missing)}; it is damaged, save it again")
    if payload["version"] != VERSION:
        raise ValueError(f"flow file {path} has format version {payload['version']}, this code reads {VERSION}")
    if payload["dtype"] not in DTYPES:
        raise ValueError(f"flow file {path}: unknown dtype {payload['dtype']!r}")
    if system is not None:
        check_spec_hash(payload["spec_hash"], system, f"flow file {path}", allow_unknown=False)
    flow = flow_from_config(payload["config"], kT=payload["kT"], spec_hash=payload["spec_hash"])
    flow = flow.to(DTYPES[payload["dtype"]])
    try:
        flow.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"flow file {path}: weights do not fit the stored architecture: "
                         f"{str(err).splitlines()[0]}") from None
    return flow.to(map_location) if map_location is not None else flow
