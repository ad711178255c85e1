"""Adaptive flow MC (flow fine-tuned between segments) against exact harmonic-oscillator answers."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from regflow_mm.flows import build_flow, flow_file_hash, load_flow
from regflow_mm.sampling import adaptive
from regflow_mm.sampling.adaptive import AdaptSchedule, adaptive_summary, flow_versions_dir, run_adaptive_mc


def _run(ho, flow_path, out, n, **kw):
    options = dict(temperature=ho.T, n_walkers=2, md_steps=0, batch_size=32, seed=3, checkpoint_every=7,
                   finetune_steps=40, finetune_batch_size=64, finetune_lr=0.02, progress=False)
    options.update(kw)
    return run_adaptive_mc(ho.testsystem, flow_path, out, n, **options)


def test_adaptive_chain_matches_analytic_moments(harmonic_oscillator, statistical_error, tmp_path):
    """Flow-only chain, flow refitted after every segment: mean 0 and variance sigma^2 within 6 sigma."""
    ho = harmonic_oscillator
    sigma = ho.sigma()
    path = tmp_path / "q0.pt"
    ho.gaussian_flow([0.5 * sigma, 0.0, -0.3 * sigma], 1.4 * sigma).save(path)
    summary = _run(ho, path, tmp_path / "chain.h5", 1500, schedule=AdaptSchedule(300), finetune_steps=30)
    with h5py.File(tmp_path / "chain.h5") as fh:
        x = fh["positions"][:, :, 0].astype(np.float64)  # (T, W, 3)
        np.testing.assert_array_equal(fh["flow_version"][()], np.repeat(np.arange(5), 300))
    assert [v["start_iteration"] for v in summary["flow_versions"]] == [0, 300, 600, 900, 1200]
    assert [s["flow_version"] for s in summary["segments"]] == [0, 1, 2, 3, 4]
    for v in summary["flow_versions"]:
        assert flow_file_hash(flow_versions_dir(tmp_path / "chain.h5") / v["file"]) == v["sha256"]
    assert 0.3 < summary["acceptance"] < 1.0
    for d in range(3):
        for series, target in ((x[:, :, d], 0.0), (x[:, :, d] ** 2, sigma**2)):
            mean = series.mean()
            err = np.sqrt(sum(statistical_error(series[:, w]) ** 2 for w in range(2))) / 2
            assert abs(mean - target) < 6 * err, (d, mean, target, err)


def test_acceptance_rises_over_segments_from_a_poor_flow(harmonic_oscillator, tmp_path):
    """Langevin + flow; the initial flow is off by 1 sigma and twice too wide; refits make it near-exact."""
    ho = harmonic_oscillator
    sigma = ho.sigma()
    path = tmp_path / "poor.pt"
    ho.gaussian_flow([sigma, -sigma, sigma], 2.0 * sigma).save(path)
    summary = _run(ho, path, tmp_path / "chain.h5", 800, schedule=AdaptSchedule(200), md_steps=20,
                   timestep_fs=10.0, friction_per_ps=5.0, finetune_steps=150, finetune_lr=0.05)
    acceptance = [s["acceptance"] for s in summary["segments"]]
    assert acceptance[0] < 0.5
    assert acceptance[-1] > 0.85
    assert summary["acceptance_last_quarter"] > summary["acceptance_first_quarter"] + 0.35
    assert summary["acceptance_rise"] > 3 * summary["acceptance_rise_se"] > 0
    nll = [v["nll_after"] for v in summary["flow_versions"][1:]]
    assert all(v["nll_after"] < v["nll_before"] for v in summary["flow_versions"][1:])
    assert len(nll) == 3
    final = load_flow(flow_versions_dir(tmp_path / "chain.h5") / summary["flow_versions"][-1]["file"])
    np.testing.assert_allclose(final.transform.shift.detach().numpy(), 0.0, atol=0.25 * sigma)
    np.testing.assert_allclose(final.transform.log_scale.exp().detach().numpy(), sigma, rtol=0.2)


def test_acceptance_standard_error_by_batch_means():
    """Independent proposals: the batch-means error equals the binomial one; acceptances in runs (a chain
    stuck on a state for 25 iterations, then free for 25) give a far larger error than the binomial."""
    from regflow_mm.sampling.adaptive import _acceptance_se

    rng = np.random.default_rng(0)
    k, p = 16, 0.4
    iid = rng.binomial(k, p, size=(2000, 10))
    binomial = math.sqrt(p * (1 - p) / iid.size / k)
    assert abs(_acceptance_se(iid, k) / binomial - 1) < 0.3
    runs = np.repeat(rng.binomial(1, p, size=(80, 10)) * k, 25, axis=0)  # all or nothing, 25 iterations long
    assert _acceptance_se(runs, k) > 3 * math.sqrt(p * (1 - p) / runs.size / k)
    assert math.isnan(_acceptance_se(iid[:1], k))


def test_resume_after_kills_repeats_the_uninterrupted_chain(harmonic_oscillator, tmp_path, monkeypatch):
    """Killed inside a block and right after a fine-tuning step: the resumed file equals the uninterrupted one."""
    ho = harmonic_oscillator
    path = tmp_path / "q0.pt"
    ho.gaussian_flow(0.3 * ho.sigma(), 1.5 * ho.sigma()).save(path)
    schedule = AdaptSchedule(20)
    _run(ho, path, tmp_path / "full.h5", 60, schedule=schedule)

    part = tmp_path / "part.h5"
    _run(ho, path, part, 30, schedule=schedule)
    with h5py.File(part, "r+") as fh:  # a kill in the middle of the next block
        for name in ("positions", "accepted", "flow_version", "sign_changes", "positive_states"):
            fh[name].resize(33, axis=0)
    _run(ho, path, part, 40, schedule=schedule)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed after version 2 is saved, before its segment's first block
        m.setattr(adaptive, "run_block", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(ho, path, part, 60, schedule=schedule)
    with h5py.File(part) as fh:
        assert int(fh.attrs["n_iterations"]) == 40
        assert len(json.loads(fh.attrs["flow_versions"])) == 3
    resumed = _run(ho, path, part, 60, schedule=schedule)

    with h5py.File(tmp_path / "full.h5") as a, h5py.File(part) as b:
        for name in ("positions", "accepted", "flow_version", "sign_changes", "positive_states"):
            assert a[name].shape == b[name].shape
            np.testing.assert_array_equal(a[name][()], b[name][()])
        assert json.loads(a.attrs["flow_versions"]) == json.loads(b.attrs["flow_versions"])
    assert resumed["n_iterations"] == 60

    v1 = flow_versions_dir(part) / "v001.pt"
    v1.write_bytes(v1.read_bytes() + b"x")
    with pytest.raises(ValueError, match=r"flow version 1 .* changed on disk"):
        _run(ho, path, part, 80, schedule=schedule)
    v1.unlink()
    with pytest.raises(FileNotFoundError, match="flow version 1 .* is missing"):
        _run(ho, path, part, 80, schedule=schedule)
    with pytest.raises(ValueError, match="other settings"):
        _run(ho, tmp_path / "q0.pt", tmp_path / "full.h5", 80, schedule=AdaptSchedule(30))

    with monkeypatch.context() as m:  # killed inside the first block: the rerun starts again
        m.setattr(adaptive, "run_block", killed)
        with pytest.raises(KeyboardInterrupt):
            _run(ho, path, tmp_path / "first.h5", 60, schedule=schedule)
    _run(ho, path, tmp_path / "first.h5", 60, schedule=schedule)
    with h5py.File(tmp_path / "full.h5") as a, h5py.File(tmp_path / "first.h5") as b:
        np.testing.assert_array_equal(a["positions"][()], b["positions"][()])


def test_schedules_that_update_inside_a_segment_are_refused():
    with pytest.raises(ValueError, match=r"iteration 150 would change the flow inside segment 1 \(iterations 100..199\)"):
        AdaptSchedule(100, adapt_every=150)
    with pytest.raises(ValueError, match="iteration 250 would change the flow inside segment 2"):
        AdaptSchedule(100, adapt_at=(100, 250))
    with pytest.raises(ValueError, match="increasing"):
        AdaptSchedule(100, adapt_at=(200, 100))
    with pytest.raises(ValueError, match="segment_iterations"):
        AdaptSchedule(0)
    schedule = AdaptSchedule(100, adapt_every=200, max_updates=2)
    assert [schedule.n_updates(i) for i in (0, 199, 200, 399, 400, 600, 1000)] == [0, 0, 1, 1, 2, 2, 2]
    assert AdaptSchedule(50, adapt_at=(100, 400)).n_updates(399) == 1


def test_bad_targets_give_clear_errors(harmonic_oscillator, tmp_path):
    ho = harmonic_oscillator
    path = tmp_path / "q0.pt"
    ho.gaussian_flow(0.0, ho.sigma()).save(path)
    with pytest.raises(ValueError, match="needs temperature= in K"):
        run_adaptive_mc(ho.testsystem, path, tmp_path / "x.h5", 10, schedule=AdaptSchedule(5))
    with pytest.raises(ValueError, match="train_data needs a MolecularSystem"):
        run_adaptive_mc(ho.testsystem, path, tmp_path / "x.h5", 10, schedule=AdaptSchedule(5), temperature=ho.T,
                        train_data=path)
    with pytest.raises(ValueError, match="schedule must be an AdaptSchedule"):
        run_adaptive_mc(ho.testsystem, path, tmp_path / "x.h5", 10, schedule=5, temperature=ho.T)
    with pytest.raises(FileNotFoundError, match="flow file"):
        run_adaptive_mc(ho.testsystem, tmp_path / "none.pt", tmp_path / "x.h5", 10, schedule=AdaptSchedule(5),
                        temperature=ho.T)


def test_cli_adaptive_mc_on_aldp(aldp, tmp_path, capsys):
    from regflow_mm.cli import main

    flow_path = tmp_path / "aldp.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(flow_path)
    args = ["mc", "aldp", str(flow_path), "--out", str(tmp_path / "mc.h5"), "--iterations", "8", "--walkers", "2",
            "--md-steps", "10", "--flow-moves", "2", "--batch-size", "8", "--checkpoint-every", "3"]
    assert main(args + ["--adapt", "--segment-iterations", "4", "--finetune-steps", "5", "--acceptance-samples", "64",
                        "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: no progress bar
    assert "| acceptance, first / last quarter |" in out and "| segment 1 (flow v1) |" in out
    assert "| acceptance rise, last - first quarter (batch-means SE) |" in out
    assert "| stationary acceptance of the proposal, v0 -> v1 (64 paired samples each) |" in out
    summary = adaptive_summary(tmp_path / "mc.h5")
    assert summary["n_iterations"] == 8 and len(summary["flow_versions"]) == 2
    assert "phi1_positive_fraction" in summary

    assert main(args + ["--segment-iterations", "4"]) == 2
    assert "--segment-iterations needs --adapt" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b.h5"), "--adapt"]) == 2
    assert "--adapt needs --segment-iterations" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "c.h5"), "--adapt", "--segment-iterations", "4",
                        "--adapt-every", "6"]) == 2
    assert "inside segment 1" in capsys.readouterr().err


def test_training_data_joins_the_fine_tuning(aldp, tmp_path):
    from regflow_mm.data import load_dataset
    from regflow_mm.data.simulate import simulate

    data = simulate(aldp, tmp_path / "md.h5", 0.001, save_interval_ps=0.05, platform="Reference",
                    equilibration_ps=0.2, progress=False)
    n_train = load_dataset(data).split_indices("train").size
    flow_path = tmp_path / "aldp.pt"
    build_flow(aldp, "cartesian", "gaussian", seed=0, dtype=torch.float64, fit_to=aldp.positions[None]).save(flow_path)
    summary = run_adaptive_mc(aldp, flow_path, tmp_path / "mc.h5", 6, schedule=AdaptSchedule(3), train_data=data,
                              n_walkers=2, md_steps=5, flow_moves=1, batch_size=4, finetune_steps=3,
                              finetune_batch_size=8, progress=False)
    assert [v["n_train_frames"] for v in summary["flow_versions"]] == [0, 3 * 2 + n_train]
    assert summary["settings"]["train_data"] == str(data.resolve())
    # the fine-tuning frames are relabelled over aldp's three methyl groups (systems.symmetry)
    assert summary["settings"]["relabel_equivalent_atoms"] == [list(g) for g in aldp.equivalent_atom_groups]
    assert len(aldp.equivalent_atom_groups) == 3
    with pytest.raises(ValueError, match="other settings"):
        run_adaptive_mc(aldp, flow_path, tmp_path / "mc.h5", 8, schedule=AdaptSchedule(3), n_walkers=2, md_steps=5,
                        flow_moves=1, batch_size=4, finetune_steps=3, finetune_batch_size=8, progress=False)


def test_importance_weighted_proposals_fit_the_target_without_chain_frames(harmonic_oscillator, tmp_path):
    """finetune_proposal_mass = 1: the flow is refit on its own samples weighted by exp(-u - log q) only; from a
    flow 1 sigma off and twice too wide, two updates bring it to the exact Gaussian (mean 0, std sigma)."""
    ho = harmonic_oscillator
    sigma = ho.sigma()
    path = tmp_path / "poor.pt"
    ho.gaussian_flow([sigma, -sigma, sigma], 2.0 * sigma).save(path)
    summary = _run(ho, path, tmp_path / "chain.h5", 12, schedule=AdaptSchedule(4), finetune_steps=150,
                   finetune_lr=0.05, finetune_proposals=4000, finetune_proposal_mass=1.0)
    versions = summary["flow_versions"]
    assert len(versions) == 3 and summary["settings"]["finetune_proposals"] == 4000
    # ESS of the proposals rises as the flow improves (the first set is from the poor flow)
    assert versions[1]["proposal_ess"] < 0.5 * 4000 < versions[2]["proposal_ess"]
    final = load_flow(flow_versions_dir(tmp_path / "chain.h5") / versions[-1]["file"])
    np.testing.assert_allclose(final.transform.shift.detach().numpy(), 0.0, atol=0.15 * sigma)
    np.testing.assert_allclose(final.transform.log_scale.exp().detach().numpy(), sigma, rtol=0.1)
    # the chain is refused with a proposal mass outside (0, 1]
    with pytest.raises(ValueError, match="finetune_proposal_mass in \\(0, 1\\]"):
        _run(ho, path, tmp_path / "bad.h5", 4, schedule=AdaptSchedule(2), finetune_proposals=10,
             finetune_proposal_mass=0.0)
