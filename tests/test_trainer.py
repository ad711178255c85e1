"""Trainer: objectives decrease and give loadable flows, exact resume after a kill, NaN handling,
2-process data parallelism (gloo) equals one process, and the CLI end to end on a tiny aldp dataset."""
from pathlib import Path
import signal
import json
import math
import os
import socket
import time

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from regflow_mm.flows import build_flow, load_flow
from regflow_mm.training.distributed import DistInfo
from regflow_mm.training.trainer import TrainConfig, Trainer, TrainingDiverged

N_ATOMS = 4
KT = 2.5


def _flow(representation="cartesian", seed=0):
    return build_flow(N_ATOMS, representation, "resnvp", kT=KT, layers=2, hidden=16, blocks=1, seed=seed)


def _pairs(n=256, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3 * N_ATOMS - 3, generator=gen)
    return x0, 0.5 * x0.roll(1, dims=1) + 0.3


def _config(**kw):
    base = dict(method="regflow", batch_size=32, epochs=2, log_every=4, checkpoint_every=4, device="cpu",
                lr=3e-3, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _train_losses(trainer):
    return [r["loss"] for r in trainer.records if r["kind"] == "train"]


@pytest.mark.parametrize("regularizer,lambda_n", [("logdet", 0.0), ("fwd_bwd", 0.05)])
def test_regflow_decreases_and_saves_loadable_flow(tmp_path, regularizer, lambda_n):
    flow = _flow()
    trainer = Trainer(flow, _config(regularizer=regularizer, lambda_r=1e-3, lambda_n=lambda_n, epochs=3), tmp_path,
                      _pairs(), progress=False)
    trainer.fit()
    losses = _train_losses(trainer)
    assert losses[-1] < 0.7 * losses[0]
    trainer.ema_flow.save(tmp_path / "flow.pt")
    loaded = load_flow(tmp_path / "flow.pt")
    x, _ = trainer.ema_flow.sample(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.log_prob(x.detach()), trainer.ema_flow.log_prob(x.detach()))


def test_mle_decreases(tmp_path):
    flow = _flow()
    y = _pairs()[1] + 0.1 * torch.randn(256, 3 * N_ATOMS - 3, generator=torch.Generator().manual_seed(2))
    trainer = Trainer(flow, _config(method="mle", epochs=3), tmp_path, (y,), progress=False)
    trainer.fit()
    losses = _train_losses(trainer)
    assert losses[-1] < losses[0] - 1.0
    trainer.ema_flow.save(tmp_path / "flow.pt")
    assert isinstance(load_flow(tmp_path / "flow.pt").log_prob(torch.zeros(1, N_ATOMS, 3)), torch.Tensor)


def test_nll_plus_force_matching_decreases(tmp_path):
    # harmonic target in absolute coordinates: x ~ N(0.3, 0.2^2), F/kT = grad log p = -(x - 0.3) / 0.04
    gen = torch.Generator().manual_seed(3)
    x = 0.3 + 0.2 * torch.randn(256, N_ATOMS, 3, generator=gen)
    forces = -(x - 0.3) / 0.04
    trainer = Trainer(_flow("identity"), _config(method="nll+fm", w_fm=1e-3, epochs=3), tmp_path, (x, forces),
                      progress=False)
    trainer.fit()
    rows = [r for r in trainer.records if r["kind"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["force_matching"] < rows[0]["force_matching"]
    trainer.ema_flow.save(tmp_path / "flow.pt")
    load_flow(tmp_path / "flow.pt")


class _Killed(Exception):
    pass


def test_resume_after_kill_continues_identically(tmp_path):
    cfg = _config(lambda_n=0.1, epochs=3, checkpoint_every=5, lr_schedule="cosine")
    full = Trainer(_flow(), cfg, tmp_path / "full", _pairs(), progress=False)
    full.fit()

    def kill_at_13(step):
        if step == 13:
            raise _Killed  # progress after the checkpoint at step 10 is lost, as with SIGKILL

    with pytest.raises(_Killed):
        Trainer(_flow(), cfg, tmp_path / "killed", _pairs(), on_step_end=kill_at_13, progress=False).fit()
    resumed = Trainer(_flow(seed=99), cfg, tmp_path / "killed", _pairs(), progress=False)
    assert resumed.resumed_from == 10
    resumed.fit()
    for a, b in zip(full.flow.state_dict().values(), resumed.flow.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert _train_losses(full) == _train_losses(resumed)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "log.jsonl")]
    assert logged == [r["step"] for r in full.records]  # no duplicated rows after the resume
    with pytest.raises(ValueError, match="other settings"):
        Trainer(_flow(), _config(lr=1.0), tmp_path / "killed", _pairs(), progress=False)


def test_nan_loss_keeps_last_good_checkpoint(tmp_path):
    def poison(step):
        if step == 6:
            with torch.no_grad():
                next(trainer.flow.transform.parameters()).fill_(float("nan"))

    trainer = Trainer(_flow(), _config(checkpoint_every=4), tmp_path, _pairs(), on_step_end=poison, progress=False)
    with pytest.raises(TrainingDiverged, match="step 6") as err:
        trainer.fit()
    assert err.value.step == 6
    report = json.loads((tmp_path / "nan_report.json").read_text())
    assert report["step"] == 6 and report["last_checkpoint_step"] == 4
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["flow"].values())
    with pytest.raises(ValueError, match="NaN"):
        Trainer(_flow(), _config(), tmp_path / "bad", (torch.full((64, 9), math.nan), torch.zeros(64, 9)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_flow(), _config(lambda_n=0.1, log_every=1), out_dir, _pairs(),
                          dist=DistInfo(rank=rank, world_size=world), progress=False)
        trainer.fit(handle_signals=False)
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_matches_one_process(tmp_path):
    torch.set_num_threads(1)
    single = Trainer(_flow(), _config(lambda_n=0.1, log_every=1), tmp_path / "single", _pairs(), progress=False)
    single.fit()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    ddp_losses = [r["loss"] for r in ddp if r["kind"] == "train"]
    assert len(ddp_losses) == len(_train_losses(single)) == 16
    np.testing.assert_allclose(ddp_losses, _train_losses(single), rtol=1e-5, atol=1e-6)
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    for a, b in zip(state["flow"].values(), single.flow.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_aldp(tmp_path_factory):
    from regflow_mm.data import simulate
    from regflow_mm.systems import get_system

    path = tmp_path_factory.mktemp("data") / "aldp_tiny.h5"
    simulate(get_system("aldp"), path, ns=0.015, save_interval_ps=0.05, equilibration_ps=1.0, seed=0,
             platform="Reference", progress=False)
    return path


def test_cli_train_and_evaluate_on_tiny_aldp(tmp_path, tiny_aldp):
    from regflow_mm.training.cli import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "run"
    argv = ["train", "aldp", "--data", str(tiny_aldp), "--out", str(out), "--method", "regflow", "--target", "ot",
            "--architecture", "resnvp", "--hyper", "layers=2", "--hyper", "hidden=16", "--epochs", "2",
            "--batch-size", "64", "--val-samples", "64", "--device", "cpu", "--quiet", "--set", "val_torsion_samples=64"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "regflow" and saved["target"] == "ot" and saved["seed"] == 0
    assert (out / "pairs_ot.h5").exists() and (out / "plots" / "ramachandran.png").stat().st_size > 1000
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [0, 1]
    assert all(k in rows[-1] for k in ("ess", "e_w1", "t_w2", "nll"))
    flow = load_flow(out / "flow.pt")
    assert flow.n_atoms == 22
    # rerunning the finished command resumes at the end: no extra step, no file rewritten
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.suffix in (".pt", ".json")}
    assert args.func(args) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()
            if p.suffix in (".pt", ".json")} == written
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == rows[-1]["step"]

    args = parser.parse_args(["evaluate", str(out / "flow.pt"), "--data", str(tiny_aldp), "--split", "val",
                              "--n-samples", "128", "--energy-workers", "0", "--device", "cpu",
                              "--out", str(tmp_path / "eval")])
    assert args.func(args) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["ess"] <= 1.0 and metrics["n_samples"] == 128
    assert 0.0 < metrics["ess_p05"] <= metrics["ess_p95"] <= 1.0  # the bootstrap interval (200 resamples)
    assert (tmp_path / "eval" / "plots" / "energy_histogram.png").exists()
    # an independent reference run: every frame
    args = parser.parse_args(["evaluate", str(out / "flow.pt"), "--data", str(tiny_aldp), "--split", "all",
                              "--n-samples", "128", "--n-bootstrap", "0", "--energy-workers", "0", "--device", "cpu",
                              "--out", str(tmp_path / "eval_all")])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "eval_all" / "metrics.json").read_text())["n_reference_frames"] == 300
    args = parser.parse_args(["evaluate", str(out / "flow.pt"), "--data", str(tiny_aldp), "--split", "holdout"])
    with pytest.raises(ValueError, match="--split 'holdout'.*or use all"):
        args.func(args)
    # the training run's metrics.json is never the evaluation's output
    args = parser.parse_args(["evaluate", str(out / "flow.pt"), "--data", str(tiny_aldp), "--out", str(out)])
    with pytest.raises(ValueError, match="is a training run folder"):
        args.func(args)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(written["metrics.json"][1])


def test_dataset_of_another_system_is_refused(tmp_path, tiny_aldp):
    from regflow_mm.training.runner import run_training

    with pytest.raises(ValueError, match="made for system"):
        run_training(TrainConfig(system="al4", data=str(tiny_aldp), device="cpu"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="training frames"):
        run_training(TrainConfig(data=str(tiny_aldp), batch_size=100_000, device="cpu"), tmp_path / "b",
                     progress=False)


def test_ema_update_with_and_without_warmup():
    from regflow_mm.training.trainer import ema_update_fn

    a, b = torch.zeros(2), torch.ones(2)
    ema_update_fn(0.999, warmup=True)([a], [b], torch.tensor(1))
    torch.testing.assert_close(a, torch.full((2,), 1 - 2 / 11))
    a = torch.zeros(2)
    ema_update_fn(0.999, warmup=False)([a], [b], torch.tensor(1))
    torch.testing.assert_close(a, torch.full((2,), 0.001))


def test_stop_signal_checkpoints_and_is_not_a_finished_run(tmp_path):
    """SIGINT/SIGTERM mid-training: checkpoint written, KeyboardInterrupt raised (nothing saved as trained)."""
    trainer = Trainer(_flow(), _config(), tmp_path, _pairs(), progress=False,
                      on_step_end=lambda step: step == 5 and trainer._request_stop(signal.SIGINT, None))
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 5.*rerun to resume"):
        trainer.fit(handle_signals=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 5
    resumed = Trainer(_flow(), _config(), tmp_path, _pairs(), progress=False)
    assert resumed.fit(handle_signals=False)["step"] == resumed.total_steps


def test_compiled_training_matches_eager(tmp_path):
    """compile = true runs the same optimisation (inductor kernels agree with eager to float32 rounding)."""
    y = _pairs()[1]
    runs = {}
    for compiled in (False, True):
        trainer = Trainer(_flow(), _config(method="mle", epochs=1, compile=compiled), tmp_path / str(compiled), (y,),
                          progress=False)
        trainer.fit()
        runs[compiled] = trainer
    eager, comp = _train_losses(runs[False]), _train_losses(runs[True])
    assert len(eager) == len(comp) == 2
    np.testing.assert_allclose(comp, eager, rtol=1e-4)
    for a, b in zip(runs[False].flow.parameters(), runs[True].flow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiling_step_is_outside_the_cpu_budget(tmp_path, monkeypatch):
    """The first step of a compiled fit() (inductor's compilation) is reported as compile_cpu_s and does not
    use up time_budget_s: a cold and a warm compile cache buy the same training steps."""
    def slow_first_call(fn, **kwargs):  # stands in for a cold compile: 0.5 CPU s on the first call only
        calls = []

        def call(*args, **kw):
            if not calls:  # busy, not sleep: the budget counts process CPU time
                t = time.process_time()
                while time.process_time() - t < 0.5:
                    pass
            calls.append(1)
            return fn(*args, **kw)
        return call

    monkeypatch.setattr(torch, "compile", slow_first_call)
    trainer = Trainer(_flow(), _config(method="mle", epochs=1000, time_budget_s=0.2, compile=True), tmp_path,
                      (_pairs()[1],), progress=False)
    summary = trainer.fit()
    assert summary["stopped_by"] == "time_budget"
    assert summary["compile_cpu_s"] >= 0.5 > summary["cpu_time_s"] >= 0.2
    assert summary["step"] > 2


def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    y = _pairs()[1]
    eager = Trainer(_flow(), _config(method="mle", epochs=1), tmp_path / "eager", (y,), progress=False)
    eager.fit()
    with pytest.warns(RuntimeWarning, match="torch.compile of nll_terms failed .*no C\\+\\+ compiler"):
        fallback = Trainer(_flow(), _config(method="mle", epochs=1, compile=True), tmp_path / "fb", (y,),
                           progress=False)
        fallback.fit()
    assert _train_losses(fallback) == _train_losses(eager)


def test_regflow_kill_after_pairs_resumes_with_the_same_pairs(tmp_path, tiny_aldp, monkeypatch):
    """n_pairs not a multiple of the pair chunk: a kill after the pairs, before the first checkpoint, and
    reruns of the finished run keep exactly n_pairs pairs and train what an uninterrupted run trains."""
    from regflow_mm.training.runner import run_training

    cfg = TrainConfig(system="aldp", data=str(tiny_aldp), method="regflow", target="reflow", architecture="resnvp",
                      hyper={"layers": 2, "hidden": 16}, n_pairs=100, pair_chunk_size=64, teacher_steps=20,
                      teacher_hidden=16, teacher_layers=1, ode_method="rk4", ode_steps=4, epochs=1, batch_size=32,
                      val_samples=0, device="cpu", seed=3)
    whole = run_training(cfg, tmp_path / "whole", progress=False)

    def killed(self, *a, **k):
        raise KeyboardInterrupt("killed before the first checkpoint")

    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", killed)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, tmp_path / "killed", progress=False)
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    resumed = run_training(cfg, tmp_path / "killed", progress=False)
    again = run_training(cfg, tmp_path / "whole", progress=False)  # rerun of the finished run
    assert whole["n_pairs"] == resumed["n_pairs"] == again["n_pairs"] == 100
    for run in ("whole", "killed"):
        with h5py.File(tmp_path / run / "pairs_reflow.h5", "r") as fh:
            assert fh["x0"].shape[0] == fh.attrs["n_done"] == 100
    a = torch.load(tmp_path / "whole" / "flow.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "flow.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0)


def test_finished_time_budget_run_takes_no_step_on_rerun(tmp_path):
    cfg = _config(time_budget_s=0.05, epochs=1000, checkpoint_every=10_000)
    first = Trainer(_flow(), cfg, tmp_path, _pairs(), progress=False).fit(handle_signals=False)
    assert first["stopped_by"] == "time_budget" and 0 < first["step"] < first["total_steps"]
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    again = Trainer(_flow(), cfg, tmp_path, _pairs(), progress=False).fit(handle_signals=False)
    assert (again["step"], again["steps_this_run"], again["stopped_by"]) == (first["step"], 0, "time_budget")
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_nan_before_any_checkpoint_names_no_checkpoint(tmp_path):
    def poison(step):
        if step == 2:
            with torch.no_grad():
                next(trainer.flow.transform.parameters()).fill_(float("nan"))

    trainer = Trainer(_flow(), _config(checkpoint_every=100), tmp_path, _pairs(), on_step_end=poison, progress=False)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit(handle_signals=False)
    assert str(err.value) == ("training stopped: non-finite loss (nan) at step 2; no update was applied and no "
                              "checkpoint was written yet. Train again into another output folder with a lower "
                              "learning rate (now 0.003) or a larger regularisation")
    assert not (tmp_path / "checkpoint.pt").exists()


def test_init_flow_starts_from_the_saved_weights_and_refuses_another_kind(tmp_path, tiny_aldp):
    from regflow_mm.systems import get_system
    from regflow_mm.training.runner import run_training

    common = dict(system="aldp", data=str(tiny_aldp), method="mle", representation="internal", architecture="resnvp",
                  hyper={"layers": 2, "hidden": 16}, batch_size=64, device="cpu", val_samples=0, seed=3)
    run_training(TrainConfig(**common, epochs=2), tmp_path / "first", progress=False)
    start = tmp_path / "first" / "flow.pt"
    # lr ~ 0: the warm-started flow is the saved one (weights and normalisation), not a fresh initialisation
    info = run_training(TrainConfig(**common, epochs=1, lr=1e-12, ema_decay=0.0, init_flow=str(start)),
                        tmp_path / "warm", progress=False)
    x, _ = load_flow(start).sample(64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_flow(tmp_path / "warm" / "flow.pt").log_prob(x), load_flow(start).log_prob(x),
                               rtol=0, atol=1e-4)
    assert info["init_flow_sha256"] == __import__("regflow_mm.flows", fromlist=["x"]).flow_file_hash(start)
    cold = run_training(TrainConfig(**common, epochs=1, lr=1e-12, ema_decay=0.0), tmp_path / "cold", progress=False)
    assert "init_flow_sha256" not in cold
    assert not torch.allclose(load_flow(tmp_path / "cold" / "flow.pt").log_prob(x), load_flow(start).log_prob(x),
                              atol=1e-2)
    with pytest.raises(ValueError, match="init_flow .* not a flow of this run's kind.*hyper"):
        run_training(TrainConfig(**{**common, "hyper": {"layers": 3, "hidden": 16}}, epochs=1, init_flow=str(start)),
                     tmp_path / "other", progress=False)
    with pytest.raises(ValueError, match="made for|spec"):
        from regflow_mm.training.runner import build_student
        build_student(TrainConfig(**{**common, "system": "al3"}, init_flow=str(start)), get_system("al3"),
                      np.zeros((4, 33, 3)))


def test_keep_best_judges_the_steps_after_the_last_validation(tmp_path):
    # validation every 100 epochs never comes within 3 epochs: the run ends with a validation of its last step,
    # and keep_best's result is the EMA flow of that step, not the initialisation
    calls = []

    def validate(flow):
        calls.append(1)
        return {"nll": -float(len(calls))}  # every validation better than the one before

    trainer = Trainer(_flow(), _config(epochs=3, keep_best=True, val_every_epochs=100), tmp_path, _pairs(),
                      validate=validate, progress=False)
    summary = trainer.fit(handle_signals=False)
    vals = [r for r in trainer.records if r["kind"] == "val"]
    assert [r["step"] for r in vals] == [summary["step"]] and summary["best_step"] == summary["step"]
    x0 = _pairs()[0][:8]
    torch.testing.assert_close(trainer.result_flow().transform(x0)[0], trainer.ema_flow.transform(x0)[0])
    again = Trainer(_flow(), _config(epochs=3, keep_best=True, val_every_epochs=100), tmp_path, _pairs(),
                    validate=validate, progress=False).fit(handle_signals=False)
    assert again["steps_this_run"] == 0 and len(calls) == 1  # a finished run is not validated again


def test_regflow_route_fine_tunes_the_student_on_a_shared_teacher(tmp_path, tiny_aldp):
    from regflow_mm.training.runner import prepare_teacher, run_regflow_then_mle, run_training

    common = dict(system="aldp", data=str(tiny_aldp), representation="internal", architecture="nsf",
                  hyper={"layers": 2, "hidden": 16}, batch_size=64, device="cpu", val_samples=0, seed=2)
    student = TrainConfig(**common, method="regflow", target="reflow", teacher_steps=20, n_pairs=128, epochs=2,
                          ode_method="rk4", ode_steps=4)
    teacher = prepare_teacher(student, tmp_path / "teacher", progress=False)
    assert {Path(teacher[k]).name for k in ("teacher", "pairs", "flow_space")} == {"teacher.pt", "pairs_reflow.h5",
                                                                                   "flow_space.pt"}
    route = tmp_path / "route"
    route.mkdir()
    for name in ("teacher", "pairs"):  # the pipeline links the teacher stage's files into the student's folder
        (route / Path(teacher[name]).name).write_bytes(Path(teacher[name]).read_bytes())
    info = run_regflow_then_mle(student, TrainConfig(**common, method="mle", epochs=1), route, progress=False)
    assert "teacher_train_s" not in info["regflow"]  # reused, not trained again
    assert info["init_flow_sha256"] == __import__("regflow_mm.flows", fromlist=["x"]).flow_file_hash(route / "flow.pt")
    assert (route / "mle_finetune" / "flow.pt").is_file() and info["train"]["step"] > 0
    with pytest.raises(ValueError, match="RegFlow route is a 'regflow' student then 'mle' fine-tuning"):
        run_regflow_then_mle(TrainConfig(**common, method="mle"), TrainConfig(**common, method="mle"), route)
    with pytest.raises(ValueError, match="reflow teacher belongs to method 'regflow' with target 'reflow'"):
        prepare_teacher(TrainConfig(**common, method="regflow", target="ot"), tmp_path / "t2")


def test_warm_start_refuses_to_resume_from_a_changed_start_file(tmp_path, tiny_aldp):
    from regflow_mm.training.runner import run_training

    common = dict(system="aldp", data=str(tiny_aldp), method="mle", representation="internal", architecture="resnvp",
                  hyper={"layers": 2, "hidden": 16}, batch_size=64, device="cpu", val_samples=0)
    run_training(TrainConfig(**common, epochs=1, seed=0), tmp_path / "a", progress=False)
    run_training(TrainConfig(**common, epochs=1, seed=1), tmp_path / "b", progress=False)
    start = tmp_path / "start.pt"
    start.write_bytes((tmp_path / "a" / "flow.pt").read_bytes())
    warm = TrainConfig(**common, epochs=1, seed=0, init_flow=str(start))
    run_training(warm, tmp_path / "warm", progress=False)
    start.write_bytes((tmp_path / "b" / "flow.pt").read_bytes())  # the start file is replaced by another flow
    with pytest.raises(ValueError, match="continues a run started from another .*start.pt .*SHA-256 changed"):
        run_training(TrainConfig(**{**warm.to_dict(), "epochs": 2}), tmp_path / "warm", progress=False)
