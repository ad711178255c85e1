"""Every CLI command against bad input: exactly one line on stderr, exit status 2, and no file made or
changed, neither beside the inputs nor where the output would go (in-process ``cli.main``)."""
import hashlib

import h5py
import numpy as np
import pytest

from regflow_mm.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny aldp dataset, an untrained flow, and hostile files, in a folder of their own."""
    from regflow_mm.data import simulate
    from regflow_mm.flows import build_flow
    from regflow_mm.systems import get_system

    root = tmp_path_factory.mktemp("inputs")
    aldp = get_system("aldp")
    simulate(aldp, root / "d.h5", ns=0.015, save_interval_ps=0.05, equilibration_ps=1.0, seed=0,
             platform="Reference", progress=False)
    build_flow(aldp, "cartesian", "resnvp", layers=2, hidden=16, blocks=1, seed=0).save(root / "flow.pt")
    (root / "corrupt.h5").write_bytes((root / "d.h5").read_bytes()[:2000])
    (root / "text.h5").write_text("hello\n")
    with h5py.File(root / "foreign.h5", "w") as fh:
        fh["a"] = np.arange(3)
    (root / "zero.pt").write_bytes(b"")
    (root / "afile").write_text("not a folder\n")
    for folder, name, content in (("badteacher", "teacher.pt", b""), ("badckpt", "checkpoint.pt", b"junk")):
        (root / folder).mkdir()  # a run folder holding an unreadable work file: the run must not start
        (root / folder / name).write_bytes(content)
    spec = f'name = "mine"\npdb = "{aldp.spec.pdb}"\nforcefield = {list(aldp.spec.forcefield)!r}\n'
    (root / "hot.toml").write_text(spec.replace("'", '"') + 'temperature = "hot"\n')
    (root / "friction.toml").write_text(spec.replace("'", '"') + "temperature = 300.0\nfriction = -1.0\n")
    return root


TRAIN = ["train", "aldp", "--data", "{i}/d.h5", "--out", "{o}/run", "--quiet"]
FE = ["free-energy", "aldp", "{i}/flow.pt", "-n", "64", "--workers", "0", "--quiet"]
MC = ["mc", "aldp", "{i}/flow.pt", "--iterations", "2", "--md-steps", "2", "--quiet"]
CASES = [  # (argv with {i} = inputs and {o} = the output folder, what the one line must say)
    (["dataset-info", "{i}/corrupt.h5"], "corrupt.h5 is not a readable HDF5 dataset"),
    (["dataset-info", "{i}/foreign.h5"], "not a regflow-mm dataset"),
    (["train", "aldp", "--data", "{i}/corrupt.h5", "--out", "{o}/run"], "not a readable HDF5 dataset"),
    ([*MC, "--out", "{i}/text.h5"], "text.h5 is not a readable hybrid-MC file"),
    ([*MC, "--out", "{i}/foreign.h5"], "foreign.h5 is not a readable hybrid-MC file"),
    ([*MC, "--out", "{o}/mc.h5", "--friction", "-1"], "friction must be >= 0"),
    ([*MC, "--out", "{o}/mc.h5", "--batch-size", "0"], "batch_size must be >= 1"),
    (["mc", "aldp", "{i}/flow.pt", "--iterations", "1", "--md-steps", "20", "--timestep-fs", "50", "--quiet",
      "--out", "{o}/mc.h5"], "MD blew up"),
    (["train", "aldp", "--data", "{i}/d.h5", "--out", "{i}/afile"], "afile is a file, not a folder"),
    (["pipeline", "--out", "{i}/afile"], "afile is a file, not a folder"),
    (["simulate", "{i}/hot.toml", "--ns", "0.001", "--out", "{o}/x.h5"], "temperature must be float, got 'hot'"),
    (["simulate", "{i}/friction.toml", "--ns", "0.001", "--out", "{o}/x.h5"], "friction must be >= 0"),
    (["simulate", "aldp", "--ns", "0.001", "--friction", "-1", "--out", "{o}/x.h5"], "friction must be >= 0"),
    (["simulate", "aldp", "--ns", "0.001", "--timestep-fs", "-1", "--out", "{o}/x.h5"], "timestep must be > 0"),
    (["simulate", "aldp", "--ns", "0.001", "--val-fraction", "1.5", "--out", "{o}/x.h5"], "split fractions"),
    (["simulate", "aldp", "--ns", "0.001", "--chunk-frames", "0", "--out", "{o}/x.h5"], "chunk_frames must be >= 1"),
    (["simulate", "aldp", "--ns", "abc", "--out", "{o}/x.h5"], "argument --ns: invalid float value: 'abc'"),
    (["simulate", "aldp", "--ns", "0.001", "--out", "{i}/text.h5"], "text.h5 is not a readable HDF5 dataset"),
    (["simulate", "aldp", "--ns", "0.001", "--out", "{i}/foreign.h5"], "foreign.h5 is an HDF5 file but not a "
                                                                       "regflow-mm dataset"),
    (["train", "aldp", "--data", "{i}/d.h5", "--method", "regflow", "--out", "{i}/badteacher",
      "--batch-size", "64", "--quiet"],
     "teacher.pt is not a readable teacher CNF file"),
    (["train", "aldp", "--data", "{i}/d.h5", "--method", "mle", "--out", "{i}/badckpt", "--batch-size", "64",
      "--quiet"],
     "checkpoint.pt is not a readable training checkpoint"),
    ([*TRAIN, "--hyper", "foo=1"], "architecture 'nsf' has no hyper-parameters ['foo']"),
    ([*TRAIN, "--hyper", "layers=many"], "hyper-parameter layers must be int"),
    ([*TRAIN, "--set", "batch_size=abc"], "batch_size must be int, got 'abc'"),
    ([*TRAIN, "--set", "nonsense=1"], "unknown training settings ['nonsense']"),
    ([*TRAIN, "--time-budget-s", "0"], "time_budget_s must be > 0"),
    ([*TRAIN, "--n-pairs", "0"], "n_pairs must be > 0"),
    ([*TRAIN, "--batch-size", "100000"], "fewer than 100000 (batch size)"),
    ([*FE, "--state-a", "phi1 <"], "state expression 'phi1 <': not a valid expression"),
    ([*FE, "--state-a", "-90 < phi1 < 0"], "chained comparisons are not allowed"),
    ([*FE, "--state-b", "phi9 > 0"], "unknown torsions ['phi9']"),
    ([*FE, "-n", "0"], "--n-samples and --chunk-size must be >= 1"),
    (["reweight", "aldp", "{i}/zero.pt", "--quiet"], "zero.pt is not a readable flow file"),
    (["evaluate", "{i}/zero.pt", "--data", "{i}/d.h5", "--out", "{o}/eval"], "zero.pt is not a readable flow file"),
    (["evaluate", "{i}/flow.pt", "--data", "{i}/text.h5", "--out", "{o}/eval"], "not a readable HDF5 dataset"),
    (["export", "{i}/zero.pt", "--out", "{o}/model.pt"], "zero.pt is not a readable flow file"),
    (["export-traj", "{i}/d.h5", "--out", "{o}/x.h5"], "need the PyTables package"),
    (["export-traj", "{i}/d.h5", "--out", "{o}/x.txt"], "unsupported trajectory format '.txt'"),
    (["export-traj", "{i}/corrupt.h5", "--out", "{o}/x.dcd"], "not a readable HDF5 dataset"),
    (["pipeline", "--config", "{i}/nothere.toml", "--out", "{o}/p"], "nothere.toml"),
]


def _snapshot(*folders) -> dict:
    """Every path below ``folders``, with mtime and content hash for files (a folder's own mtime may change
    when a file is made and removed again)."""
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest()) if p.is_file() else None
            for folder in folders for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:2]) + f" #{k}" for k, c in enumerate(CASES)])
def test_bad_input_is_one_line_and_changes_no_file(argv, message, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(i=inputs, o=out) for a in argv]
    before = _snapshot(inputs, tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # argparse errors exit, the others return
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"regflow-mm {argv[0]}: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(inputs, tmp_path) == before
