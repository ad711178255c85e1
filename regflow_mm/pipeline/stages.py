"""Stages of a pipeline, cached by a hash of their settings and inputs.

Each stage writes into its own folder ``<run>/<stage>/`` and finishes by writing
``stage.json`` with the stage's key (a hash of its settings and of the keys of the
stages it reads) and its results. A later run skips a stage whose ``stage.json``
carries the same key; a stage interrupted midway has no ``stage.json`` and runs
again, picking up its own resumable files (MD chunks, training checkpoints).
Changing a setting re-runs that stage and every stage downstream of it; the superseded
folder is kept as ``<stage>.superseded-<old key>`` (nothing on disk is deleted).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "stage.json"


def stable_hash(obj) -> str:
    """SHA-256 of a JSON-able object with sorted keys (floats by repr)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


@dataclass
class Stage:
    """A named step: ``run(folder, inputs) -> results`` (a JSON-able dict).

    ``settings`` are what the stage's result depends on; ``needs`` name earlier stages whose
    results arrive in ``inputs``.
    """

    name: str
    run: Callable[[Path, dict], dict]
    settings: dict
    needs: tuple[str, ...] = ()


@dataclass
class StageRecord:
    name: str
    key: str
    results: dict
    seconds: float
    cached: bool


class StagedRun:
    """Runs stages in order into ``root``, reusing finished ones (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}

    def run(self, stage: Stage) -> dict:
        missing = [n for n in stage.needs if n not in self.records]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing} to run first")
        key = stable_hash({"stage": stage.name, "settings": stage.settings,
                           "inputs": {n: self.records[n].key for n in stage.needs}})
        folder = self.root / stage.name
        manifest = folder / MANIFEST
        if manifest.is_file():
            done = json.loads(manifest.read_text())
            if done.get("key") == key:
                log.info("stage %s: cached", stage.name)
                self.records[stage.name] = StageRecord(stage.name, key, done["results"], done["seconds"], True)
                return done["results"]
            # Settings or inputs changed: set the old results aside, start afresh.
            aside = folder.with_name(f"{stage.name}.superseded-{done.get('key', 'unknown')[:12]}")
            n = 1
            while aside.exists():
                aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
            log.info("stage %s: settings changed, moving the old run to %s", stage.name, aside)
            os.replace(folder, aside)
        folder.mkdir(parents=True, exist_ok=True)
        log.info("stage %s: running", stage.name)
        started = time.perf_counter()
        results = stage.run(folder, {n: self.records[n].results for n in stage.needs})
        seconds = time.perf_counter() - started
        text = json.dumps({"stage": stage.name, "key": key, "settings": stage.settings,
                           "results": results, "seconds": seconds}, indent=2, default=str)
        atomic_write(manifest, lambda tmp: tmp.write_text(text))  # a kill never leaves a half-written manifest
        self.records[stage.name] = StageRecord(stage.name, key, results, seconds, False)
        return results
