"""Trainer schedule and result selection: time-budget cosine annealing, keep-best by validation NLL."""
import math

import pytest
import torch

from regflow_mm.flows import build_flow
from regflow_mm.training.trainer import TrainConfig, Trainer


def _trainer(tmp_path, aldp, **settings):
    flow = build_flow(aldp, "cartesian", "gaussian", seed=0)
    y = torch.randn(512, flow.representation.dim)
    config = TrainConfig(method="mle", representation="cartesian", architecture="gaussian", batch_size=64,
                         lr=1e-2, ema_decay=0.0, **settings)
    return Trainer(flow, config, tmp_path, (y,), progress=False)


def test_cosine_anneals_over_the_time_budget(tmp_path, aldp):
    trainer = _trainer(tmp_path, aldp, lr_schedule="cosine", epochs=10_000, time_budget_s=100.0)
    for cpu, expected in ((0.0, 1.0), (25.0, 0.5 * (1 + math.cos(math.pi / 4))), (50.0, 0.5), (100.0, 0.0),
                          (150.0, 0.0)):
        trainer.cpu_time = cpu
        assert trainer.scheduler.lr_lambdas[0](0) == pytest.approx(expected, abs=1e-12)
    # Without a budget the step horizon sets the schedule.
    by_steps = _trainer(tmp_path / "steps", aldp, lr_schedule="cosine", epochs=2)
    assert by_steps.scheduler.lr_lambdas[0](by_steps.total_steps // 2) == pytest.approx(0.5)


def test_keep_best_returns_the_lowest_validation_nll_and_stops_early(tmp_path, aldp):
    scores = iter([5.0, 3.0, 4.0, 4.5, 6.0, 7.0, 8.0])
    trainer = _trainer(tmp_path, aldp, epochs=50, keep_best=True, early_stop_patience=3)
    trainer.validate = lambda flow: {"nll": next(scores)}
    summary = trainer.fit()
    # epochs of 8 steps: validations at 8, 16 (best, nll 3), 24, 32, 40 -> 3 without improvement
    assert summary["stopped_by"] == "early_stopping" and summary["step"] == 40
    assert summary["best_step"] == 16 and summary["best_val_nll"] == 3.0
    best_state = {k: v.clone() for k, v in trainer.best["state"].items()}
    result = trainer.result_flow()
    for k, v in result.state_dict().items():
        torch.testing.assert_close(v, best_state[k], rtol=0, atol=0)


def test_patience_needs_keep_best():
    with pytest.raises(ValueError, match="needs keep_best"):
        TrainConfig(early_stop_patience=2)


class _Planted:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_checkpoint_runs_no_code(tmp_path, aldp):
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": _Planted(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        _trainer(tmp_path, aldp, epochs=1)
    assert not marker.exists()


def _weighted_trainer(tmp_path, aldp, log_w, **settings):
    flow = build_flow(aldp, "cartesian", "gaussian", seed=0)
    y = torch.randn(log_w.shape[0], flow.representation.dim)
    config = TrainConfig(method="mle", representation="cartesian", architecture="gaussian", batch_size=64,
                         lr=1e-2, ema_decay=0.0, data_weight_power=0.5, **settings)
    return Trainer(flow, config, tmp_path, (y,), row_log_weights=log_w, progress=False)


def test_weighted_batches_draw_rows_with_their_probabilities(tmp_path, aldp):
    # rows 0..3 carry weights 1:2:3:4, the rest -inf (never drawn)
    log_w = torch.full((256,), -math.inf, dtype=torch.float64)
    log_w[:4] = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    trainer = _weighted_trainer(tmp_path, aldp, log_w)
    rows = torch.cat([trainer.batch_indices(step)[0] for step in range(500)])  # 32,000 draws
    assert rows.max() < 4
    freq = torch.bincount(rows, minlength=4).double() / rows.numel()
    expected = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sigma = (expected * (1 - expected) / rows.numel()).sqrt()
    assert ((freq - expected).abs() < 6 * sigma).all()
    # the batch of a step depends only on (seed, step): a second trainer (a resumed run) draws the same rows
    again = _weighted_trainer(tmp_path / "again", aldp, log_w)
    assert torch.equal(again.batch_indices(123)[0], trainer.batch_indices(123)[0])


def test_bad_data_weights_are_refused(tmp_path, aldp):
    with pytest.raises(ValueError, match=r"data_weight_power must be in \[0, 1\]"):
        TrainConfig(method="mle", data_weight_power=1.5)
    with pytest.raises(ValueError, match="RegFlow trains on teacher pairs"):
        TrainConfig(method="regflow", data_weight_power=0.5)
    with pytest.raises(ValueError, match="row_log_weights must be"):
        _weighted_trainer(tmp_path, aldp, torch.full((256,), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_log_weights must be"):
        _weighted_trainer(tmp_path / "b", aldp, torch.full((256,), -math.inf, dtype=torch.float64))


class _Killed(Exception):
    pass


def _reweighting_trainer(out, aldp, late_log_w, **kwargs):
    flow = build_flow(aldp, "cartesian", "gaussian", seed=0)
    y = torch.randn(256, flow.representation.dim, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(method="mle", representation="cartesian", architecture="gaussian", batch_size=32,
                         lr=1e-2, max_steps=40, checkpoint_every=5, log_every=5, reweight_fraction=0.25)
    return Trainer(flow, config, out, (y,), late_row_log_weights=late_log_w, progress=False, **kwargs)


def test_the_last_part_of_the_run_draws_reweighted_batches_and_resumes_there(tmp_path, aldp):
    # late weights allow rows 0..3 only: the last 25% of the 40 steps (30..39) draw from them, the rest do not
    late = torch.full((256,), -math.inf, dtype=torch.float64)
    late[:4] = 0.0
    trainer = _reweighting_trainer(tmp_path, aldp, late)
    summary = trainer.fit()
    assert summary["reweighted_from_step"] == 30 and summary["step"] == 40
    assert all(trainer.batch_indices(s)[0].max() < 4 for s in range(30, 40))
    assert all(trainer.batch_indices(s)[0].max() >= 4 for s in range(30))
    # killed inside the weighted part (last checkpoint at step 35): the resumed run keeps the switch step

    def kill_at_37(step):
        if step == 37:
            raise _Killed

    with pytest.raises(_Killed):
        _reweighting_trainer(tmp_path / "r", aldp, late, on_step_end=kill_at_37).fit()
    again = _reweighting_trainer(tmp_path / "r", aldp, late)
    assert again.step == 35 and again.reweighted_from_step == 30
    again.fit()
    for a, b in zip(again.flow.parameters(), trainer.flow.parameters()):
        torch.testing.assert_close(a, b)


def test_bad_reweighting_settings_are_refused(tmp_path, aldp):
    with pytest.raises(ValueError, match=r"reweight_fraction must be in \[0, 1\)"):
        TrainConfig(method="mle", reweight_fraction=1.0)
    with pytest.raises(ValueError, match="RegFlow trains on teacher pairs"):
        TrainConfig(method="regflow", reweight_fraction=0.2)
    with pytest.raises(ValueError, match="needs late_row_log_weights"):
        _reweighting_trainer(tmp_path, aldp, None)
