"""Pipeline configuration: a TOML file checked against a schema of typed defaults.

Every section and key has a default here, so a config file only states what differs.
Unknown sections/keys and wrong types are one-line errors naming the key.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

# section -> key -> default (the default's type is the required type; None means "str or unset").
SCHEMA: dict[str, dict] = {
    "run": {"seed": 0, "device": "cpu"},
    "system": {"name": "aldp"},
    "md": {"ns": 5.0, "save_interval_ps": 1.0, "timestep_fs": 1.0, "equilibration_ps": 10.0,
           "platform": "auto"},
    "flow": {"representation": "cartesian", "architecture": "nsf", "n_layers": 6, "hidden": 128},
    "teacher": {"epochs": 40, "batch_size": 256, "hidden": 256, "lr": 1e-3},
    "pairs": {"target": "reflow", "n_pairs": 20000},
    "train": {"method": "regflow", "epochs": 30, "batch_size": 256, "lr": 5e-4, "lambda_r": 1e-6,
              "regulariser": "logdet", "lambda_n": 0.0, "cpu_minutes": 0.0},
    "baseline": {"method": "mle", "enabled": True},
    "evaluate": {"n_samples": 5000},
    "mc": {"n_iterations": 200, "md_steps_per_iteration": 500, "n_walkers": 1},
    "free_energy": {"n_samples": 20000},
    "export": {"backend": "torch", "md_steps": 1000},
}

_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def default_config() -> dict:
    return copy.deepcopy(SCHEMA)


def validate(raw: dict, source: str = "config") -> dict:
    """Merge ``raw`` over the defaults, rejecting unknown keys and wrong types."""
    config = default_config()
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ValueError(f"{source}: unknown section [{section}]; sections are {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ValueError(f"{source}: unknown key {key!r} in [{section}]; allowed: "
                                 f"{', '.join(SCHEMA[section])}")
            config[section][key] = _checked(value, SCHEMA[section][key], f"{source}: [{section}].{key}")
    return config


def load_config(path: str | Path | None) -> dict:
    """The validated config of a TOML file (``None``: all defaults, the aldp CPU demo)."""
    if path is None:
        return default_config()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline config {path} not found (examples are in examples/*.toml)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML: {err}") from None
    return validate(raw, str(path))


def _checked(value, default, where):
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and expected is not bool:
        raise ValueError(f"{where} must be {_TYPES[expected]}, got a boolean")
    if not isinstance(value, expected):
        raise ValueError(f"{where} must be {_TYPES[expected]}, got {value!r}")
    return value
