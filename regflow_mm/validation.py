"""Type checks of settings dataclasses (system specs, training settings), below every layer.

``check_types(obj, what)``: every field of the dataclass ``obj`` must hold a value of its annotated
type (``int``, ``float``, ``str``, ``bool``, ``dict``, ``tuple[str, ...]``, ``X | None``); an int is a
valid float, a bool is not a number. ValueError "<what>: <field> must be <type>, got <value>" otherwise,
so that a wrong type in a spec file or a ``--set`` flag is refused before anything runs.
"""
from __future__ import annotations

import functools
import types
import typing
from dataclasses import fields


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _matches(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is typing.Any:
        return True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0] if args else typing.Any
        return isinstance(value, (tuple, list)) and all(_matches(v, item) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def _name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_name(typing.get_args(tp)[0])}"
    return getattr(typing.get_origin(tp) or tp, "__name__", str(tp))


def check_types(obj, what: str) -> None:
    """ValueError naming the first field of the dataclass ``obj`` whose value is not of its annotated type."""
    hints = _hints(type(obj))
    for f in fields(obj):
        tp = hints.get(f.name)
        value = getattr(obj, f.name)
        if tp is not None and not _matches(value, tp):
            raise ValueError(f"{what}: {f.name} must be {_name(tp)}, got {value!r}")
