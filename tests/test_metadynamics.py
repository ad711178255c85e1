"""Well-tempered metadynamics datasets: unbiased energies, exact frame weights, exact resume, bad input."""
import h5py
import numpy as np
import pytest

from regflow_mm.data import load_dataset, simulate
from regflow_mm.data.metadynamics import MetadynamicsSettings
from regflow_mm.systems import get_system

# Large Gaussians deposited every 20 fs: the bias grows visibly within a few hundred steps.
METAD = MetadynamicsSettings(height_kJ=5.0, deposition_ps=0.02, grid_points=36)
FAST = dict(save_interval_ps=0.02, platform="Reference", equilibration_ps=0.1, progress=False, enhanced=METAD)


@pytest.fixture(scope="module")
def metad_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("metad") / "aldp.h5"
    simulate(get_system("aldp"), path, ns=0.004, chunk_frames=50, seed=13, **FAST)
    return load_dataset(path)


def test_frames_store_unbiased_energies_and_their_weights(metad_data, frames_match_force_field):
    data, system = metad_data, metad_data.system
    assert len(data) == 200 and data.weighted and data.metadata["enhanced"]["method"] == "metadynamics"
    frames_match_force_field(data)  # energies and forces of the force field alone (no bias)
    with h5py.File(data.path, "r") as fh:
        bias, offset, grid = fh["bias_energy"][:], fh["bias_offset"][:], fh["checkpoint"]["bias"][()]
    assert bias[-1] > 1.0 and (bias >= -1e-9).all()  # the bias has grown and is a sum of Gaussians
    np.testing.assert_allclose(data.log_weights, (bias - offset) / system.kT, rtol=0, atol=1e-12)
    # Independent check of the last frame against the final bias grid (axes psi, phi on [-pi, pi]):
    # V(s) by linear interpolation (OpenMM's spline differs slightly) and c(t) by its formula.
    from scipy.interpolate import RegularGridInterpolator
    from scipy.special import logsumexp

    from regflow_mm.data import dihedrals

    axis = np.linspace(-np.pi, np.pi, grid.shape[0])
    phi, psi = dihedrals(data.positions[-1:].astype(np.float64), [system.torsions["phi1"], system.torsions["psi1"]])[0]
    assert RegularGridInterpolator((axis, axis), grid)([psi, phi])[0] == pytest.approx(bias[-1], rel=0.05, abs=0.2)
    v, gamma = grid[:-1, :-1].ravel() / system.kT, METAD.bias_factor  # the periodic grid repeats its first row
    c = system.kT * (logsumexp(gamma / (gamma - 1) * v) - logsumexp(v / (gamma - 1)))
    assert offset[-1] == pytest.approx(c, abs=0.05 * system.kT)


def test_metadynamics_resumes_exactly(tmp_path, metad_data):
    """Stopping after 100 frames and rerunning gives the uninterrupted run: same frames, same weights."""
    part = tmp_path / "part.h5"
    simulate(get_system("aldp"), part, ns=0.002, chunk_frames=50, seed=13, **FAST)
    with h5py.File(part, "r") as fh:
        assert isinstance(fh["checkpoint"], h5py.Group) and fh["checkpoint"]["bias"][()].max() > 0
    simulate(get_system("aldp"), part, ns=0.004, chunk_frames=50, seed=13, **FAST)
    resumed = load_dataset(part)
    np.testing.assert_allclose(resumed.time, metad_data.time)
    np.testing.assert_allclose(resumed.positions, metad_data.positions, atol=1e-6)
    np.testing.assert_allclose(resumed.log_weights, metad_data.log_weights, atol=1e-9)


def test_torn_metadynamics_commit_resumes_from_the_committed_chunk(tmp_path, metad_data):
    torn = tmp_path / "torn.h5"
    simulate(get_system("aldp"), torn, ns=0.002, chunk_frames=50, seed=13, **FAST)
    with h5py.File(torn, "r+") as fh:
        for name in ("positions", "forces", "energies", "time", "log_weights", "bias_energy", "bias_offset"):
            fh[name].resize(150, axis=0)  # uncommitted rows of a chunk torn by a kill
        group = fh.create_group("checkpoint_next")
        group.attrs["n_frames"] = 150
    simulate(get_system("aldp"), torn, ns=0.004, chunk_frames=50, seed=13, **FAST)
    resumed = load_dataset(torn)
    np.testing.assert_allclose(resumed.positions, metad_data.positions, atol=1e-6)
    np.testing.assert_allclose(resumed.log_weights, metad_data.log_weights, atol=1e-9)


def test_plain_and_metadynamics_frames_do_not_mix(tmp_path, metad_data):
    before = metad_data.path.read_bytes()
    with pytest.raises(ValueError, match="was simulated with .*use the same settings"):
        simulate(get_system("aldp"), metad_data.path, ns=0.006, chunk_frames=50, seed=13,
                 **{**FAST, "enhanced": None})
    assert metad_data.path.read_bytes() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(width_rad=0.0), "bias width must be > 0"),
    (dict(bias_factor=1.0), "bias_factor must be > 1"),
    (dict(torsions=("phi1", "psi1", "phi2", "psi2")), "needs 1-3 torsions"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetadynamicsSettings(**kwargs)


def test_unknown_torsion_is_refused(tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(ValueError, match="has no torsions \\['psi7'\\]"):
        simulate(get_system("aldp"), out, ns=0.001, **{**FAST, "enhanced": MetadynamicsSettings(torsions=("psi7",))})
    assert not out.exists()


def test_corrupt_weights_are_refused(tmp_path, metad_data):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(metad_data.path.read_bytes())
    with h5py.File(bad, "r+") as fh:
        fh["log_weights"][3] = np.nan
    with pytest.raises(ValueError, match="log-weights contain NaN"):
        load_dataset(bad)
    with h5py.File(bad, "r+") as fh:
        fh["log_weights"][:] = -np.inf
    with pytest.raises(ValueError, match="every frame has weight 0"):
        load_dataset(bad)


def test_cli_metadynamics(tmp_path, capsys):
    from regflow_mm.cli import main

    out = tmp_path / "cli.h5"
    assert main(["simulate", "aldp", "--ns", "0.001", "--save-interval-ps", "0.02", "--out", str(out),
                 "--equilibration-ps", "0", "--platform", "Reference", "--enhanced", "metadynamics",
                 "--metad-deposition-ps", "0.02", "--quiet"]) == 0
    assert "enhanced     metadynamics" in capsys.readouterr().out
    assert main(["simulate", "aldp", "--ns", "0.001", "--out", str(tmp_path / "y.h5"),
                 "--enhanced", "metadynamics", "--metad-width", "0"]) == 2
