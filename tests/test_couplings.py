"""Couplings: reflow pairs reproduce the teacher, resume/extension/sharding give identical stores,
exact OT is the minimal-cost permutation (brute force)."""
import itertools
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch

from regflow_mm.training.cnf import SolverOptions, TeacherCNF, VelocityMLP
from regflow_mm.training.couplings import (derived_seed, generate_ot_pairs, generate_reflow_pairs, load_pairs,
                                           ot_pairing)

D = 3


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    vel = VelocityMLP(D, hidden=16, n_layers=2, n_frequencies=2)
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(D), torch.ones(D)), 1)
    return TeacherCNF(vel, SolverOptions("rk4", n_steps=8)), prior


def _read(path):
    with h5py.File(path, "r") as f:
        return f["x0"][:], f["x1"][:]


def test_reflow_pairs_reproduce_teacher_samples(tmp_path, teacher):
    cnf, prior = teacher
    path = generate_reflow_pairs(cnf, prior, 25, tmp_path / "reflow.h5", chunk_size=10, seed=7, progress=False)
    x0, x1, info = load_pairs(path)
    assert x0.shape == (25, D) and info["kind"] == "reflow" and info["settings"]["seed"] == 7
    torch.testing.assert_close(x1, cnf.transport(x0), rtol=1e-6, atol=1e-6)
    torch.manual_seed(derived_seed(7, 1))
    torch.testing.assert_close(x0[10:20], prior.sample((10,)))


def test_reflow_resume_extend_and_executor_are_identical(tmp_path, teacher):
    cnf, prior = teacher
    full = _read(generate_reflow_pairs(cnf, prior, 30, tmp_path / "full.h5", chunk_size=10, progress=False))
    # killed mid-chunk: 10 committed pairs plus 4 uncommitted rows
    part = generate_reflow_pairs(cnf, prior, 10, tmp_path / "part.h5", chunk_size=10, progress=False)
    with h5py.File(part, "a") as f:
        for name in ("x0", "x1"):
            f[name].resize(14, axis=0)
            f[name][10:] = 99.0
    generate_reflow_pairs(cnf, prior, 30, part, chunk_size=10, progress=False)
    for a, b in zip(_read(part), full):
        np.testing.assert_array_equal(a, b)
    with ThreadPoolExecutor(2) as ex:
        sharded = generate_reflow_pairs(cnf, prior, 30, tmp_path / "sharded.h5", chunk_size=10, executor=ex,
                                        progress=False)
    for a, b in zip(_read(sharded), full):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="other settings"):
        generate_reflow_pairs(cnf, prior, 30, part, chunk_size=10, seed=1, progress=False)


def test_reflow_store_is_idempotent_when_n_pairs_is_not_a_chunk_multiple(tmp_path, teacher):
    cnf, prior = teacher
    fresh = {n: _read(generate_reflow_pairs(cnf, prior, n, tmp_path / f"fresh{n}.h5", chunk_size=10,
                                            progress=False)) for n in (25, 30)}
    path = tmp_path / "p.h5"
    for n in (25, 25, 30, 25):  # rerun, extend past the partial chunk, shrink back
        x0, x1, _ = load_pairs(generate_reflow_pairs(cnf, prior, n, path, chunk_size=10, progress=False))
        assert x0.shape == (n, D)
        for a, b in zip(_read(path), fresh[n]):
            np.testing.assert_array_equal(a, b)
    # a store grown by the old code (25 pairs asked, the partial chunk appended twice) is repaired
    with h5py.File(path, "a") as f:
        f.attrs.update(n_done=30, n_target=25)
    generate_reflow_pairs(cnf, prior, 25, path, chunk_size=10, progress=False)
    for a, b in zip(_read(path), fresh[25]):
        np.testing.assert_array_equal(a, b)


def test_incomplete_store_is_refused(tmp_path, teacher):
    cnf, prior = teacher
    path = generate_reflow_pairs(cnf, prior, 10, tmp_path / "p.h5", chunk_size=10, progress=False)
    with h5py.File(path, "a") as f:
        f.attrs["n_target"] = 20
    with pytest.raises(ValueError, match="incomplete"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError):
        load_pairs(tmp_path / "none.h5")


@pytest.mark.parametrize("n", [5, 7])
def test_exact_ot_is_minimal_cost_permutation(n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        x0, x1 = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + 0.5
        src, info = ot_pairing(x0, x1)
        assert sorted(src.tolist()) == list(range(n)) and info["approximate"] is False
        cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
        best = min(sum(cost[p[j], j] for j in range(n)) for p in itertools.permutations(range(n)))
        assert cost[src, np.arange(n)].sum() == pytest.approx(best, rel=1e-12)
        assert info["mean_cost"] == pytest.approx(best / n)


def test_approximate_ot_methods_are_flagged():
    rng = np.random.default_rng(0)
    x0, x1 = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    exact, _ = ot_pairing(x0, x1)
    src, info = ot_pairing(x0, x1, method="minibatch", block_size=40)
    np.testing.assert_array_equal(src, exact)  # one block == exact
    src, info = ot_pairing(x0, x1, method="minibatch", block_size=8)
    assert info["approximate"] and sorted(src.tolist()) == list(range(40))
    assert info["mean_cost"] >= ot_pairing(x0, x1)[1]["mean_cost"] - 1e-12
    src, info = ot_pairing(x0, x1, method="sinkhorn")
    assert info["approximate"] and info["bijection"] is False
    with pytest.raises(ValueError, match="unknown OT method"):
        ot_pairing(x0, x1, method="greedy")


def test_generate_ot_pairs_store(tmp_path):
    prior = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    data = torch.randn(23, 2, generator=torch.Generator().manual_seed(1)) + 3.0
    path = generate_ot_pairs(data, prior, tmp_path / "ot.h5", chunk_size=10, progress=False)
    x0, x1, info = load_pairs(path)
    torch.testing.assert_close(x1, data)
    src, _ = ot_pairing(x0, x1)
    np.testing.assert_array_equal(src, np.arange(23))  # stored pairs are already optimally matched
    assert info["settings"]["approximate"] is False
