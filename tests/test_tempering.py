"""Parallel tempering datasets: target-replica frames with plain energies, exactly-once resume, bad input."""
import importlib
import logging
import shutil

import h5py
import numpy as np
import pytest
from openmm import unit

from regflow_mm.data import load_dataset, simulate
from regflow_mm.data.metadynamics import MetadynamicsSettings
from regflow_mm.data.parallel_tempering import MultiStateReporter, ParallelTempering
from regflow_mm.data.tempering import TemperingSettings, storage_path, temperature_ladder

# Three replicas 300-500 K, an exchange attempt every 20 fs: 200 iterations take a few seconds.
PT = TemperingSettings(n_replicas=3, t_max_K=500.0)
FAST = dict(save_interval_ps=0.02, platform="Reference", equilibration_ps=0.1, progress=False, enhanced=PT)
simulate_module = importlib.import_module("regflow_mm.data.simulate")  # the package exports the function


@pytest.fixture(scope="module")
def pt_data(tmp_path_factory, aldp):
    path = tmp_path_factory.mktemp("tempering") / "aldp.h5"
    simulate(aldp, path, ns=0.004, chunk_frames=50, seed=11, **FAST)
    return load_dataset(path)


def _iterations(path):
    with h5py.File(path, "r") as fh:
        return fh["tempering_iteration"][:], fh["tempering_replica"][:]


def _kill_at(monkeypatch, owner, name, n_calls):
    """Make ``owner.name`` raise on its ``n_calls``-th call, like a kill at that moment."""
    original, calls = getattr(owner, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == n_calls:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, dying)


def test_ladder_is_geometric_from_the_system_temperature(aldp, tmp_path):
    pt = ParallelTempering(aldp, TemperingSettings(n_replicas=5, t_max_K=600.0), tmp_path / "x.h5", 1.0, 1.0, 10)
    t = pt.temperatures
    assert t[0] == aldp.temperature == 300.0 and t[-1] == pytest.approx(600.0) and len(t) == 5
    np.testing.assert_allclose(t[1:] / t[:-1], 2 ** 0.25)  # constant ratio: equal swap rates for constant C_v
    np.testing.assert_allclose(temperature_ladder(300.0, 450.0, 2), [300.0, 450.0])
    assert TemperingSettings.from_dict(PT.to_dict()) == PT and PT.to_dict()["method"] == "tempering"
    assert storage_path(tmp_path / "x.h5").name == "x.h5.tempering.nc"


def test_frames_are_the_target_replica_with_plain_energies(pt_data, frames_match_force_field):
    data, system = pt_data, pt_data.system
    assert len(data) == 200 and not data.weighted and data.metadata["enhanced"] == PT.to_dict()
    np.testing.assert_array_equal(data.log_weights, 0.0)  # Boltzmann at the system temperature
    iterations, replicas = _iterations(data.path)
    np.testing.assert_array_equal(iterations, np.arange(1, 201))
    np.testing.assert_allclose(data.time, iterations * 0.02)
    frames_match_force_field(data)  # energies and forces of the force field at the stored positions
    # The sampler's own record: each frame is the replica at the lowest temperature of its iteration.
    reporter = MultiStateReporter(str(storage_path(data.path)), open_mode="r")
    try:
        temperatures = [s.temperature.value_in_unit(unit.kelvin) for s in reporter.read_thermodynamic_states()[0]]
        reduced, _, _ = reporter.read_energies()  # (iterations + 1, replicas, states), energy / kT_state
        states = reporter.read_replica_thermodynamic_states()  # (iterations + 1, replicas)
    finally:
        reporter.close()
    np.testing.assert_allclose(temperatures, [300.0, 300.0 * (5 / 3) ** 0.5, 500.0])
    np.testing.assert_array_equal(states[1:][np.arange(200), replicas], 0)
    np.testing.assert_allclose(reduced[1:][np.arange(200), replicas, 0] * system.kT, data.energies, atol=1e-6)
    assert len(set(replicas)) > 1  # configurations came down the ladder
    hot = reduced[1:, :, 0][states[1:] == 2] * system.kT
    assert hot.mean() > data.energies.mean() + 10.0  # the top replica samples 500 K (kJ/mol; ~50 at equilibrium)


def test_kill_after_the_replicas_checkpointed_redoes_the_uncommitted_chunk(tmp_path, monkeypatch, caplog, pt_data):
    """Killed between the sampler's checkpoint at iteration 150 and the dataset's commit of frames 101-150."""
    caplog.set_level(logging.INFO, logger="regflow_mm.data")
    out = tmp_path / "killed.h5"
    _kill_at(monkeypatch, simulate_module, "_append", 3)
    with pytest.raises(KeyboardInterrupt):
        simulate(pt_data.system, out, ns=0.004, chunk_frames=50, seed=11, **FAST)
    monkeypatch.undo()
    assert len(load_dataset(out)) == 100
    simulate(pt_data.system, out, ns=0.004, chunk_frames=50, seed=11, **FAST)  # resumes
    assert "resumes at iteration 100" in caplog.text  # not at the storage's newest checkpoint, 150
    data = load_dataset(out)
    iterations, _ = _iterations(out)
    np.testing.assert_array_equal(iterations, np.arange(1, 201))  # every iteration once, in order
    np.testing.assert_allclose(data.time, np.arange(1, 201) * 0.02)
    np.testing.assert_array_equal(data.log_weights, 0.0)
    assert len(data.splits["train"]) == 160
    # Same seed, same platform: the frames before the kill are the uninterrupted run's. (The resumed
    # chain is reseeded and starts from float32 checkpoint positions: equal in distribution only.)
    np.testing.assert_allclose(data.positions[:100], pt_data.positions[:100], atol=1e-6)
    np.testing.assert_allclose(data.energies[:100], pt_data.energies[:100], atol=1e-6)


def test_kill_mid_chunk_and_torn_commit_resume_from_the_committed_frames(tmp_path, monkeypatch, aldp):
    out = tmp_path / "torn.h5"
    _kill_at(monkeypatch, ParallelTempering, "step", 60)  # during iteration 60: frames 1-50 are committed
    with pytest.raises(KeyboardInterrupt):
        simulate(aldp, out, ns=0.002, chunk_frames=50, seed=2, **FAST)
    monkeypatch.undo()
    with h5py.File(out, "r+") as fh:  # plus uncommitted rows of a torn chunk
        assert fh.attrs["n_frames"] == 50
        for name in ("positions", "forces", "energies", "time", "log_weights", "tempering_iteration",
                     "tempering_replica"):
            fh[name].resize(60, axis=0)
    simulate(aldp, out, ns=0.002, chunk_frames=50, seed=2, **FAST)
    iterations, _ = _iterations(out)
    np.testing.assert_array_equal(iterations, np.arange(1, 101))
    assert len(load_dataset(out)) == 100


def test_extending_a_run_cuts_frames_past_the_last_replica_checkpoint(tmp_path, caplog, aldp):
    """150 frames with checkpoints every 100 iterations: extending restarts the replicas at 100."""
    caplog.set_level(logging.INFO, logger="regflow_mm.data")
    out = tmp_path / "ext.h5"
    simulate(aldp, out, ns=0.003, chunk_frames=100, seed=4, **FAST)
    first = load_dataset(out)
    simulate(aldp, out, ns=0.004, chunk_frames=100, seed=4, **FAST)
    assert "restart from iteration 100; dropping frames 101-150" in caplog.text
    data = load_dataset(out)
    iterations, _ = _iterations(out)
    np.testing.assert_array_equal(iterations, np.arange(1, 201))
    np.testing.assert_allclose(data.positions[:100], first.positions[:100])
    simulate(aldp, out, ns=0.004, chunk_frames=100, seed=4, **FAST)  # finished: nothing is redone
    np.testing.assert_array_equal(load_dataset(out).positions, data.positions)


def test_tempering_and_other_datasets_do_not_mix(tmp_path, pt_data, aldp):
    before = pt_data.path.read_bytes()
    for other in (None, MetadynamicsSettings(), TemperingSettings(n_replicas=4, t_max_K=500.0)):
        with pytest.raises(ValueError, match="was simulated with other settings \\(enhanced: .*use the same settings"):
            simulate(aldp, pt_data.path, ns=0.006, chunk_frames=50, seed=11, **{**FAST, "enhanced": other})
    assert pt_data.path.read_bytes() == before
    plain = tmp_path / "plain.h5"
    simulate(aldp, plain, ns=0.001, chunk_frames=50, seed=11, **{**FAST, "enhanced": None})
    with pytest.raises(ValueError, match="was simulated with other settings \\(enhanced: None -> "):
        simulate(aldp, plain, ns=0.002, chunk_frames=50, seed=11, **FAST)
    assert not storage_path(plain).exists()


def test_bad_tempering_input_is_refused(tmp_path, pt_data, aldp):
    for n in (1, 0):
        with pytest.raises(ValueError, match="a replica ladder needs at least two temperatures"):
            TemperingSettings(n_replicas=n)
    out = tmp_path / "x.h5"
    for t_max in (300.0, 250.0):
        with pytest.raises(ValueError, match="must be above the system temperature 300.0 K"):
            simulate(aldp, out, ns=0.001, **{**FAST, "enhanced": TemperingSettings(t_max_K=t_max)})
    assert not out.exists() and not storage_path(out).exists()
    lonely = tmp_path / "lonely.h5"  # a tempering dataset copied without its replica storage
    shutil.copy(pt_data.path, lonely)
    with pytest.raises(ValueError, match="replica storage .*lonely.h5.tempering.nc .* is missing"):
        simulate(aldp, lonely, ns=0.006, chunk_frames=50, seed=11, **FAST)
    assert len(load_dataset(lonely)) == 200


def test_cli_tempering(tmp_path, capsys):
    from regflow_mm.cli import main

    out = tmp_path / "cli.h5"
    assert main(["simulate", "aldp", "--ns", "0.001", "--save-interval-ps", "0.02", "--out", str(out),
                 "--equilibration-ps", "0", "--platform", "Reference", "--enhanced", "tempering",
                 "--pt-replicas", "2", "--pt-max-temperature", "400", "--quiet"]) == 0
    assert "enhanced     tempering, 2 replicas 300.0-400.0 K" in capsys.readouterr().out
    assert main(["simulate", "aldp", "--ns", "0.001", "--out", str(tmp_path / "y.h5"),
                 "--enhanced", "tempering", "--pt-replicas", "1"]) == 2
    assert "a replica ladder needs at least two temperatures" in capsys.readouterr().err
