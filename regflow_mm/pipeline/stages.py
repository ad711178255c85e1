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
import multiprocessing
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


@dataclass
class BackgroundStage:
    """A stage started by ``StagedRun.start``; ``process`` is None when it was already cached."""

    stage: Stage
    process: multiprocessing.process.BaseProcess | None


def _run_in_child(root: Path, stage: Stage, inputs: dict[str, StageRecord]) -> None:
    run = StagedRun(root)
    run.records.update(inputs)
    run.run(stage)


class StagedRun:
    """Runs stages in order into ``root``, reusing finished ones (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, StageRecord] = {}

    def _key(self, stage: Stage) -> str:
        missing = [n for n in stage.needs if n not in self.records]
        if missing:
            raise ValueError(f"stage {stage.name!r} needs {missing} to run first")
        return stable_hash({"stage": stage.name, "settings": stage.settings,
                            "inputs": {n: self.records[n].key for n in stage.needs}})

    def _cached(self, stage: Stage, key: str, cached: bool = True) -> dict | None:
        manifest = self.root / stage.name / MANIFEST
        if manifest.is_file():
            done = json.loads(manifest.read_text())
            if done.get("key") == key:
                self.records[stage.name] = StageRecord(stage.name, key, done["results"], done["seconds"], cached)
                return done["results"]
        return None

    def start(self, stage: Stage) -> BackgroundStage:
        """Start a stage in a spawned process (it uses a core of its own) unless it is cached; the
        stages it needs must be finished. ``wait`` collects its results. ``stage.run`` must be
        picklable (a module-level function or a functools.partial of one)."""
        if self._cached(stage, self._key(stage)) is not None:
            log.info("stage %s: cached", stage.name)
            return BackgroundStage(stage, None)
        log.info("stage %s: running in the background", stage.name)
        inputs = {n: self.records[n] for n in stage.needs}
        # daemon: the stage stops with the pipeline; a rerun resumes its files in the next process
        process = multiprocessing.get_context("spawn").Process(target=_run_in_child, args=(self.root, stage, inputs),
                                                               name=f"stage-{stage.name}", daemon=True)
        process.start()
        return BackgroundStage(stage, process)

    def wait(self, background: BackgroundStage) -> dict:
        """Results of a background stage: waits for its process; if the process failed, the stage
        runs (resumes) here, so its own error is raised in this process."""
        if background.process is not None:
            log.info("stage %s: waiting for the background run", background.stage.name)
            background.process.join()
            if background.process.exitcode != 0:
                log.warning("stage %s: the background process ended with code %s; running the stage here",
                            background.stage.name, background.process.exitcode)
            results = self._cached(background.stage, self._key(background.stage), cached=False)
            if results is not None:
                return results
        return self.run(background.stage)

    def run(self, stage: Stage) -> dict:
        key = self._key(stage)
        folder = self.root / stage.name
        manifest = folder / MANIFEST
        if (results := self._cached(stage, key)) is not None:
            log.info("stage %s: cached", stage.name)
            return results
        if manifest.is_file():
            done = json.loads(manifest.read_text())
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
