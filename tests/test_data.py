"""MD datasets: stored values are right, runs resume after a kill, bad input is refused."""
import os
import signal
import subprocess
import sys
import time

import h5py
import mdtraj
import numpy as np
import openmm
import pytest
from openmm import unit

from regflow_mm.data import time_block_splits, export_trajectory, load_dataset, read_metadata, simulate
from regflow_mm.systems import get_system

FAST = dict(save_interval_ps=0.05, platform="Reference", equilibration_ps=0.5, progress=False)


@pytest.fixture(scope="module")
def aldp_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "aldp.h5"
    simulate(get_system("aldp"), path, ns=0.003, chunk_frames=25, seed=7, **FAST)
    return load_dataset(path)


def test_dataset_contents_reevaluate(aldp_data):
    data, system = aldp_data, aldp_data.system
    assert len(data) == 60 and data.positions.shape == (60, 22, 3) and data.positions.dtype == np.float32
    np.testing.assert_allclose(data.time, np.arange(1, 61) * 0.05)
    context = system.make_context()
    for k in (0, 31, 59):
        context.setPositions(data.positions[k].astype(np.float64))
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        # stored positions are float32: energies agree to that precision
        assert energy == pytest.approx(data.energies[k], abs=0.05)
        np.testing.assert_allclose(forces, data.forces[k], atol=2.0, rtol=1e-3)
    md = data.metadata
    assert md["system_hash"] == system.spec_hash and md["seed"] == 7
    assert md["integrator"]["timestep_fs"] == 1.0 and md["integrator"]["friction_per_ps"] == 1.0
    assert {"openmm", "torch", "regflow_mm"} <= set(md["versions"])


def test_splits_partition_the_run_with_validation_spread_over_it(aldp_data):
    s = aldp_data.splits
    np.testing.assert_array_equal(np.sort(np.concatenate([s["train"], s["val"], s["test"]])), np.arange(60))
    assert len(s["train"]) == 48 and len(s["val"]) == 6 and len(s["test"]) == 6
    np.testing.assert_array_equal(s["test"], np.arange(54, 60))  # the held-out block stays last
    # default 10 validation blocks, at most one per validation frame: 6 frames spread over 54
    np.testing.assert_array_equal(s["val"], [8, 17, 26, 35, 44, 53])
    assert aldp_data.split("val").shape == (6, 22, 3)
    with pytest.raises(ValueError, match="too few for train/val/test"):
        time_block_splits(5)
    with pytest.raises(ValueError, match="val_blocks must be >= 1"):
        time_block_splits(100, val_blocks=0)


def test_time_block_splits_blocks():
    one = time_block_splits(100, 0.1, 0.2, val_blocks=1)  # consecutive train, val, test
    np.testing.assert_array_equal(np.concatenate([one["train"], one["val"], one["test"]]), np.arange(100))
    assert (len(one["train"]), len(one["val"]), len(one["test"])) == (70, 10, 20)
    five = time_block_splits(1000, 0.1, 0.1, val_blocks=5)  # 5 blocks of 20 frames, each ending a segment
    val = five["val"].reshape(5, 20)
    np.testing.assert_array_equal(val[:, -1] + 1, [180, 360, 540, 720, 900])
    np.testing.assert_array_equal(np.diff(val, axis=1), 1)
    assert np.intersect1d(five["train"], five["val"]).size == 0 and five["test"][0] == 900


def test_killed_simulation_resumes_into_one_continuous_trajectory(tmp_path):
    whole, killed = tmp_path / "whole.h5", tmp_path / "killed.h5"
    args = dict(ns=0.02, chunk_frames=20, seed=3, **FAST)
    simulate(get_system("aldp"), whole, **args)

    cmd = [sys.executable, "-m", "regflow_mm.cli", "simulate", "aldp", "--ns", "0.02", "--out", str(killed),
           "--save-interval-ps", "0.05", "--platform", "Reference", "--equilibration-ps", "0.5",
           "--chunk-frames", "20", "--seed", "3", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.05)
        try:
            with h5py.File(killed, "r", locking=False) as fh:
                if fh.attrs.get("n_frames", 0) >= 60:
                    break
        except (OSError, KeyError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with h5py.File(killed, "r", locking=False) as fh:
        n_at_kill = int(fh.attrs["n_frames"])
    assert 60 <= n_at_kill < 400, "the kill should land mid-run"

    simulate(get_system("aldp"), killed, **args)  # the rerun resumes
    a, b = load_dataset(whole), load_dataset(killed)
    assert len(b) == 400
    np.testing.assert_allclose(b.time, np.arange(1, 401) * 0.05)  # no gap, no duplicate
    # Reference platform + checkpointed RNG state: the resumed trajectory is the uninterrupted one.
    np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)
    np.testing.assert_allclose(b.energies, a.energies, atol=1e-6)


def test_torn_commit_resumes_from_the_checkpoint_of_the_committed_frames(tmp_path):
    """A kill inside a chunk commit (new frames + next checkpoint written, n_frames not yet) resumes exactly."""
    args = dict(chunk_frames=20, seed=5, **FAST)
    whole, torn = tmp_path / "whole.h5", tmp_path / "torn.h5"
    simulate(get_system("aldp"), whole, ns=0.004, **args)
    simulate(get_system("aldp"), torn, ns=0.002, **args)
    with h5py.File(torn, "r+") as fh:
        assert fh.attrs["n_frames"] == 40
        for name in ("positions", "forces", "energies", "time"):
            fh[name].resize(60, axis=0)  # uncommitted frames of the torn chunk
        fh.create_dataset("checkpoint_next", data=np.zeros(16, np.uint8))
        fh["checkpoint_next"].attrs["n_frames"] = 60
    assert len(load_dataset(torn)) == 40  # readers see only committed frames
    simulate(get_system("aldp"), torn, ns=0.004, **args)
    a, b = load_dataset(whole), load_dataset(torn)
    np.testing.assert_allclose(b.time, a.time)
    np.testing.assert_allclose(b.positions, a.positions, atol=1e-6)


def test_existing_dataset_of_another_system_is_refused_and_kept(aldp_data, tmp_path):
    before = aldp_data.path.read_bytes()
    with pytest.raises(ValueError, match="holds system 'aldp'.*refusing to append 'al4'"):
        simulate(get_system("al4"), aldp_data.path, ns=0.001, **FAST)
    with pytest.raises(ValueError, match="was simulated with .*use the same settings"):
        simulate(get_system("aldp"), aldp_data.path, ns=0.01, seed=7, **{**FAST, "save_interval_ps": 0.1})
    assert aldp_data.path.read_bytes() == before
    with pytest.raises(ValueError, match="was made for system 'aldp'.*not 'al4'"):
        load_dataset(aldp_data.path, system=get_system("al4"))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="regflow-mm simulate"):
        load_dataset(tmp_path / "none.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    with pytest.raises(ValueError, match="not a readable HDF5 dataset"):
        load_dataset(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a regflow-mm dataset"):
        read_metadata(other)


def test_a_changed_stored_value_fails_its_checksum(aldp_data, tmp_path):
    """Bytes of one stored energy changed on disk (not through HDF5): the fletcher32 checksum refuses it."""
    path = tmp_path / "edited.h5"
    path.write_bytes(aldp_data.path.read_bytes())
    with h5py.File(path, "r") as fh:
        assert fh["energies"].fletcher32 and fh["positions"].fletcher32
        offset = fh["energies"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 8 * 3 + 7] ^= 0x01  # the sign/exponent byte of energy 3
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="stored data of this HDF5 dataset cannot be read .*changed or damaged"):
        load_dataset(path)


def test_nan_frames_are_reported(aldp_data, tmp_path):
    path = tmp_path / "nan.h5"
    path.write_bytes(aldp_data.path.read_bytes())
    with h5py.File(path, "r+") as fh:
        fh["positions"][5, 3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite positions in 1 frames \\(first: 5\\)"):
        load_dataset(path)


def test_export_trajectory_for_viewers(aldp_data, tmp_path):
    out = export_trajectory(aldp_data.path, tmp_path / "traj.dcd")
    traj = mdtraj.load(str(out), top=str(out.with_suffix(".pdb")))
    assert traj.n_frames == 60 and traj.n_atoms == 22
    np.testing.assert_allclose(traj.xyz, aldp_data.positions, atol=1e-3)
    with pytest.raises(ValueError, match="unsupported trajectory format"):
        export_trajectory(aldp_data.path, tmp_path / "traj.xyz2")


def test_cli_simulate_and_info(tmp_path):
    from regflow_mm.cli import main

    out = tmp_path / "cli.h5"
    assert main(["simulate", "aldp", "--ns", "0.002", "--save-interval-ps", "0.05", "--out", str(out),
                 "--equilibration-ps", "0", "--quiet"]) == 0
    assert main(["dataset-info", str(out)]) == 0
    assert main(["simulate", "nosuch", "--ns", "1", "--out", str(tmp_path / "x.h5")]) == 2


def test_seed_zero_reproduces_a_run(tmp_path):
    # OpenMM reads a seed of 0 as "random": seeds reach it mapped to 1..2^31-1
    from regflow_mm.systems.platforms import openmm_seed

    runs = [simulate(get_system("aldp"), tmp_path / f"r{k}.h5", ns=0.002, seed=0, **FAST) for k in range(2)]
    a, b = (load_dataset(r).positions for r in runs)
    np.testing.assert_array_equal(a, b)
    assert all(1 <= openmm_seed(k) < 2**31 for k in (0, 1, -5, 2**40)) and openmm_seed(0) != openmm_seed(1)


def test_two_default_cli_runs_give_identical_frames_and_name_their_seed(tmp_path, capsys):
    from regflow_mm.cli import main

    outs = [tmp_path / f"default{k}.h5" for k in range(2)]
    for out in outs:  # no --seed: the default seed must reproduce, not mean "random" to OpenMM
        assert main(["simulate", "aldp", "--ns", "0.002", "--save-interval-ps", "0.05", "--out", str(out),
                     "--equilibration-ps", "0.1", "--quiet"]) == 0
    a, b = (load_dataset(o) for o in outs)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.energies, b.energies)
    from regflow_mm.systems.platforms import openmm_seed

    assert a.metadata["seed"] == 0 and a.metadata["openmm_seed"] == openmm_seed(0)
    capsys.readouterr()
    assert main(["dataset-info", str(outs[0])]) == 0
    assert f"seed 0 (OpenMM random seed {openmm_seed(0)})" in capsys.readouterr().out
