"""Files a run writes and reads again: atomic writes, existence checks, resume-settings checks.

Below every layer (like ``torch_utils``): any module may import it.

- ``atomic_write(path, write)``: ``write(tmp)`` fills ``<path>.tmp``, which then replaces ``path``
  (``os.replace``), so a kill never leaves a half-written file; parent folders are created.
- ``require_file(path, what="file", hint="")`` -> Path: FileNotFoundError "<what> <path> not found<hint>".
- ``check_resume_settings(out, stored, asked, keys=None, stored_seed=None, seed=None, verb="run", ignore=())``:
  ValueError "<out> was <verb> with other settings (key: stored -> asked, ...); use the same settings to
  resume, or another output path" unless the compared settings (``keys``, or every key of either dict
  except ``ignore``) and the seeds are equal.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)`` writes ``<path>.tmp``, then it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def require_file(path: str | os.PathLike, what: str = "file", hint: str = "") -> Path:
    """``path`` as a Path if it is an existing file, else FileNotFoundError ``"<what> <path> not found<hint>"``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found{hint}")
    return path


def check_resume_settings(out, stored: dict, asked: dict, keys: Iterable[str] | None = None,
                          stored_seed: int | None = None, seed: int | None = None, verb: str = "run",
                          ignore: Iterable[str] = ()) -> None:
    """Refuse to continue ``out`` unless the settings it was made with equal the ones asked for now.

    ``keys``: the settings compared (default: every key of either dict except those in ``ignore``);
    ``stored_seed`` / ``seed``: compared too when given.
    """
    ignore = set(ignore)
    keys = sorted((set(stored) | set(asked)) - ignore) if keys is None else list(keys)
    diff = [f"{k}: {stored.get(k)!r} -> {asked.get(k)!r}" for k in keys if stored.get(k) != asked.get(k)]
    if stored_seed != seed:
        diff.append(f"seed: {stored_seed!r} -> {seed!r}")
    if diff:
        raise ValueError(f"{out} was {verb} with other settings ({'; '.join(diff)}); use the same settings to "
                         "resume, or another output path")
