"""Stage caching and pipeline config validation."""
import functools
import json
from pathlib import Path

import pytest

from regflow_mm.pipeline.config import SCHEMA, load_config, validate
from regflow_mm.pipeline.stages import Stage, StagedRun


def _counting_stage(name, calls, settings, needs=()):
    def run(folder, inputs):
        calls.append(name)
        (folder / "out.txt").write_text(json.dumps(inputs))
        return {"value": settings["x"] + sum(r["value"] for r in inputs.values())}
    return Stage(name, run, settings, needs)


def test_second_run_does_no_work_and_changes_propagate_downstream(tmp_path):
    calls = []

    def pipeline(xa, xb):
        run = StagedRun(tmp_path)
        run.run(_counting_stage("a", calls, {"x": xa}))
        return run.run(_counting_stage("b", calls, {"x": xb}, needs=("a",)))

    assert pipeline(1, 10) == {"value": 11}
    assert calls == ["a", "b"]
    assert pipeline(1, 10) == {"value": 11}
    assert calls == ["a", "b"], "a cached run must do no work"
    assert pipeline(2, 10) == {"value": 12}
    assert calls == ["a", "b", "a", "b"], "changing a re-runs a and its dependant b"
    assert pipeline(2, 20) == {"value": 22}
    assert calls[-1] == "b" and calls.count("a") == 2
    superseded = sorted(p.name.split(".")[0] for p in tmp_path.glob("*.superseded-*"))
    assert superseded == ["a", "b", "b"], "old results are set aside, never deleted"


def test_interrupted_stage_reruns(tmp_path):
    calls = []

    def flaky(folder, inputs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"ok": True}

    with pytest.raises(KeyboardInterrupt):
        StagedRun(tmp_path).run(Stage("s", flaky, {}))
    assert not (tmp_path / "s" / "stage.json").exists()
    assert StagedRun(tmp_path).run(Stage("s", flaky, {})) == {"ok": True}
    assert StagedRun(tmp_path).run(Stage("s", flaky, {})) == {"ok": True}
    assert len(calls) == 2


def test_stage_order_is_checked(tmp_path):
    with pytest.raises(ValueError, match="needs \\['a'\\] to run first"):
        StagedRun(tmp_path).run(Stage("b", lambda f, i: {}, {}, needs=("a",)))


def test_config_defaults_and_errors(tmp_path):
    cfg = validate({"md": {"ns": 2}})
    assert cfg["md"]["ns"] == 2.0 and isinstance(cfg["md"]["ns"], float)
    assert cfg["train"] == SCHEMA["train"]
    with pytest.raises(ValueError, match="unknown key 'nss' in \\[md\\]; allowed: ns, "):
        validate({"md": {"nss": 2}})
    with pytest.raises(ValueError, match="unknown section \\[mdd\\]"):
        validate({"mdd": {}})
    with pytest.raises(ValueError, match="\\[md\\].ns must be a number, got 'long'"):
        validate({"md": {"ns": "long"}})
    with pytest.raises(ValueError, match="\\[train\\].epochs must be an integer, got a boolean"):
        validate({"train": {"epochs": True}})
    path = tmp_path / "c.toml"
    path.write_text("[md]\nns = [1\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="examples"):
        load_config(tmp_path / "none.toml")


def _background_work(folder, inputs, *, fail_marker=None):
    """A stage for a spawned process: fails once if ``fail_marker`` does not exist yet."""
    if fail_marker is not None and not Path(fail_marker).exists():
        Path(fail_marker).write_text("failed once")
        raise RuntimeError("first attempt fails")
    (folder / "work.txt").write_text("done")
    return {"pid_file": str(folder / "work.txt")}


def _background_reader(folder, inputs):
    return {"read": Path(inputs["bg"]["pid_file"]).read_text()}


def test_background_stage_runs_in_its_own_process_and_is_cached(tmp_path):
    run = StagedRun(tmp_path)
    handle = run.start(Stage("bg", functools.partial(_background_work), {"x": 1}))
    assert handle.process is not None
    assert run.wait(handle) == {"pid_file": str(tmp_path / "bg" / "work.txt")}
    assert run.records["bg"].cached is False
    again = StagedRun(tmp_path)
    handle = again.start(Stage("bg", functools.partial(_background_work), {"x": 1}))
    assert handle.process is None and again.wait(handle)["pid_file"].endswith("work.txt")
    # a background stage reads finished stages like any other
    with pytest.raises(ValueError, match="needs \\['later'\\] to run first"):
        again.start(Stage("c", functools.partial(_background_reader), {}, needs=("later",)))
    handle = again.start(Stage("c", functools.partial(_background_reader), {}, needs=("bg",)))
    assert again.wait(handle) == {"read": "done"}


def test_failed_background_stage_runs_again_in_the_caller(tmp_path):
    marker = tmp_path / "failed-once"
    run = StagedRun(tmp_path)
    handle = run.start(Stage("bg", functools.partial(_background_work, fail_marker=str(marker)), {"x": 1}))
    assert run.wait(handle)["pid_file"].endswith("work.txt")  # the child failed; the caller ran it
    assert handle.process.exitcode != 0 and marker.exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_passes_its_checks(path):
    from regflow_mm.pipeline.config import baseline_settings, smooth_settings, train_settings

    config = load_config(path)
    train_settings(config)  # the settings the pipeline checks before any stage runs
    baseline_settings(config)
    smooth_settings(config)


def test_hydrogen_mass_must_be_off_or_at_least_one_amu():
    assert validate({"md": {"hydrogen_mass_amu": 3}})["md"]["hydrogen_mass_amu"] == 3.0
    with pytest.raises(ValueError, match="hydrogen_mass_amu must be 0"):
        validate({"md": {"hydrogen_mass_amu": 0.5}})


def test_md_keys_added_later_keep_cached_simulations_at_their_default():
    from regflow_mm.pipeline.config import SCHEMA
    from regflow_mm.pipeline.run import _MD_KEYS_ADDED_LATER, _md_key_settings

    md = dict(SCHEMA["md"])
    assert all(md[k] == v for k, v in _MD_KEYS_ADDED_LATER.items())  # the defaults are the old behaviour
    assert set(_md_key_settings(md)) == set(md) - set(_MD_KEYS_ADDED_LATER)
    assert _md_key_settings({**md, "metad_grid_points": 36})["metad_grid_points"] == 36
