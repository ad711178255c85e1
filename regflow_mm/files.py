"""Files a run writes and reads again: atomic writes, existence checks, safe readers, resume-settings checks.

Below every layer (like ``torch_utils``): any module may import it (h5py is imported on use).

- ``atomic_write(path, write)``: ``write(tmp)`` fills ``<path>.tmp``, which then replaces ``path``
  (``os.replace``), so a kill never leaves a half-written file; parent folders are created.
- ``require_file(path, what="file", hint="")`` -> Path: FileNotFoundError "<what> <path> not found<hint>".
- ``output_dir(path, what="--out")`` -> Path: ValueError when ``path`` exists and is not a folder.
- ``load_torch(path, what, hint="")``: ``torch.load(weights_only=True)``; a damaged, empty, foreign or
  code-carrying file gives ValueError "<path> is not a readable <what> (corrupt or truncated, or ...)<hint>".
- ``hdf5_file(path, mode="r", what="HDF5 file", hint="")``: context manager around ``h5py.File``; a file
  that is not HDF5, is truncated, or whose data fail their fletcher32 checksum on read gives ValueError
  "<path> is not a readable <what> (<reason>)<hint>".
- ``CHECKSUM``: keyword arguments for ``create_dataset`` that store a fletcher32 checksum per chunk.
- ``check_resume_settings(out, stored, asked, keys=None, stored_seed=None, seed=None, verb="run", ignore=())``:
  ValueError "<out> was <verb> with other settings (key: stored -> asked, ...); use the same settings to
  resume, or another output path" unless the compared settings (``keys``, or every key of either dict
  except ``ignore``) and the seeds are equal.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

# fletcher32 checksums on every chunk of a stored array: HDF5 verifies them on each read.
CHECKSUM = {"fletcher32": True}


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


def output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as a Path, or ValueError when it exists and is not a folder (a run folder is asked for)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder: give a new or existing folder path")
    return path


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_torch(path: str | os.PathLike, what: str, hint: str = "", map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain values only, so a file cannot run code.

    ValueError "<path> is not a readable <what> (<reason>)<hint>" for an empty, truncated, foreign or
    code-carrying file.
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises RuntimeError/EOFError/UnpicklingError/... for damaged files
        raise ValueError(f"{path} is not a readable {what} (corrupt or truncated, or it holds more than tensors and "
                         f"plain values; {_reason(err)}){hint}") from None


@contextlib.contextmanager
def hdf5_file(path: str | os.PathLike, mode: str = "r", what: str = "HDF5 file", hint: str = "",
              **kwargs) -> Iterator:
    """``h5py.File(path, mode, **kwargs)`` as a context manager whose read failures are one-line errors.

    Opening a file that is not HDF5 or is truncated, reading data that fail their checksum, and a
    missing dataset or attribute (a foreign file) give ValueError "<path> is not a readable <what> (<reason>)<hint>"; a missing file stays FileNotFoundError.
    """
    import h5py

    try:
        fh = h5py.File(path, mode, **kwargs)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise ValueError(f"{path} is not a readable {what} ({_reason(err)}){hint}") from None
    try:
        with fh:
            yield fh
    except KeyError as err:  # h5py: a missing dataset or attribute
        raise ValueError(f"{path} is not a readable {what} ({_reason(err)}){hint}") from None
    except OSError as err:  # h5py: a chunk that fails its checksum or decompression
        raise ValueError(f"{path}: stored data of this {what} cannot be read ({_reason(err)}): the file was "
                         f"changed or damaged{hint}") from None


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
