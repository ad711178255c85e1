"""The end-to-end pipeline on a tiny config: report, caching, resume after interruption."""
import json

import pytest

from regflow_mm.pipeline import run as pipeline_run
from regflow_mm.pipeline.config import validate
from regflow_mm.pipeline.run import run_pipeline

TINY = {
    "md": {"ns": 0.05, "save_interval_ps": 0.1, "equilibration_ps": 1.0, "reference_ns": 0.03,
           "reference_save_interval_ps": 0.1},
    "flow": {"layers": 2, "hidden": 32},
    "train": {"time_budget_s": 3.0, "teacher_steps": 30, "n_pairs": 300, "batch_size": 64, "ode_method": "rk4"},
    "evaluate": {"n_samples": 200, "teacher_samples": 100, "teacher_nll_frames": 40, "teacher_ode_steps": 2},
    "mc": {"n_iterations": 6, "md_steps_per_iteration": 20, "plain_md_iterations": 12, "adapt_iterations": 4,
           "adapt_segments": 2, "finetune_steps": 3,
           "finetune_proposals": 64, "acceptance_samples": 200,
           "tempering_replicas": 2, "tempering_iterations": 2, "tempering_max_K": 400.0},
    "free_energy": {"n_samples": 300, "tfep_n_train": 50, "tfep_n_eval": 50, "tfep_steps": 5, "tfep_layers": 2,
                    "tfep_hidden": 8},
    "export": {"md_steps": 20},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    report = run_pipeline(validate(TINY), out, progress=False)
    return out, report


def test_report_holds_this_runs_numbers(finished_run):
    out, report = finished_run
    text = report.read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    stages = metrics["stages"]
    assert set(stages) == {"md", "reference", "teacher", "evaluate_teacher", "train_regflow", "train_baseline",
                           "evaluate", "plain_md", "mc", "mc_adaptive", "mc_tempering", "free_energy", "export"}
    # the teacher CNF is a stage of its own, reused (not retrained) by the student, and evaluated like a flow
    assert stages["teacher"]["teacher_train_s"] > 0 and "teacher_train_s" not in stages["train_regflow"]
    teacher = stages["evaluate_teacher"]["metrics"]
    assert teacher["n_samples"] == 100 and teacher["n_nll_frames"] == 40 and 0 < teacher["ess"] <= 1
    assert "| teacher (CNF) | " in text and "RegFlow student / teacher E-W1: " in text
    assert "regflow" in stages["evaluate"]["metrics"] and "teacher (CNF)" not in stages["evaluate"]["metrics"]
    assert stages["md"]["n_frames"] == 500
    # the held-out reference ran in the background and is what the flows were evaluated against
    assert stages["reference"]["reference_summary"]["n_frames"] == 300
    assert stages["evaluate"]["reference"] == "independent none run" and stages["evaluate"]["n_test_frames"] == 300
    assert "md_reference" in stages["free_energy"]
    tfep = stages["free_energy"]["tfep"]  # 50 ps of plain MD stays in phi < 0: TFEP says why it has no estimate
    if "error" in tfep:
        assert "state B 'phi1 > 0' selects no frame of the training data" in tfep["error"]
        assert f"| TFEP (RegFlow map) | - | - | not computed: {tfep['error']} |" in text
    else:
        assert tfep["train"]["n_energy_calls"] == 0 and "TFEP (RegFlow map, energy-free training)" in text
    from regflow_mm.systems.platforms import openmm_seed

    assert f"(seed 0, OpenMM random seed {openmm_seed(0)})" in text  # the seeds actually used, data and reference
    assert f"(seed 1, OpenMM random seed {openmm_seed(1)})" in text
    for name in ("regflow", "mle"):
        assert f"| {name} | " in text
        assert {"ess", "e_w1", "t_w2", "nll", "d_fraction", "basins_missing"} <= set(stages["evaluate"]["metrics"][name])
    mc, plain = stages["mc"], stages["plain_md"]  # crossings of the hybrid chain and of plain MD, every chain state
    assert len(mc["phi1_chain_sign_changes"]) == 2 and mc["chain_cpu_s"] > 0 and mc["n_chain_states"] == 6 * 2 * 2
    assert plain["n_iterations"] == 12 and plain["n_chain_states"] == 24 and plain["ps"] == pytest.approx(12 * 2 * 0.02)
    assert all(h >= f for h, f in zip(mc["phi1_chain_sign_changes"], mc["phi1_sign_changes"]))
    assert (f"changes the sign of phi1 **{sum(mc['phi1_chain_sign_changes'])} times in {mc['chain_cpu_s']:.1f} CPU-s"
            in text and "plain MD of the same walkers, start and MD segment" in text)
    adaptive = stages["mc_adaptive"]  # the adaptive chain: two segments, one fine-tuning between them
    assert [seg["flow_version"] for seg in adaptive["segments"]] == [0, 1] and adaptive["n_versions"] == 2
    assert [seg["stop"] for seg in adaptive["segments"]] == [2, 4]  # adapt_iterations, not n_iterations
    assert f"acceptance **{adaptive['acceptance_first_quarter']:.2%} in the first quarter" in text
    assert adaptive["finetune_proposals"] == 64 and 1 <= adaptive["proposal_ess"][0] <= 64
    va = adaptive["version_acceptance"]  # the proposals v0 and v1 on paired samples
    assert (va["first_version"], va["last_version"], va["n_samples"]) == (0, 1, 200)
    assert 0.0 <= va["acceptance_a"] <= 1.0 and 0.0 <= va["acceptance_b"] <= 1.0 and va["change_se"] >= 0.0
    assert f"{va['acceptance_a']:.2%} +- {va['acceptance_a_se']:.2%} -> {va['acceptance_b']:.2%}" in text
    assert abs(adaptive["acceptance_rise"] - (adaptive["acceptance_last_quarter"]
                                              - adaptive["acceptance_first_quarter"])) < 1e-12
    assert "and on 64 of its own samples weighted by exp(-u - log q)" in text
    tempering = stages["mc_tempering"]  # flow moves inside parallel tempering, 300 and 400 K
    assert tempering["n_iterations"] == 2 and [round(t) for t in tempering["temperatures_K"]] == [300, 400]
    assert all(f["n_proposed"] == 2 * 1 for f in tempering["flow"]) and "Parallel tempering with flow moves" in text
    assert "Ramachandran basins" in text and "| 1 | beta |" in text
    assert stages["evaluate"]["training_data_t_w2"] > 0 and "T-W2 of the training data" in text
    assert stages["export"]["max_rel_energy_error"] < 1e-4  # exported TorchForce == BoltzmannFlow.energy
    rank = {name: (m["basins_missing"], -m["ess_p05"], m["e_w1"]) for name, m in stages["evaluate"]["metrics"].items()}
    down = stages["evaluate"]["downstream"]
    assert down["method"] == min(rank, key=rank.get) and down["flow"].endswith("flow.pt")
    assert f"use the **{down['method']}** flow" in text
    for figure in ("md_ramachandran.png", "evaluate_regflow_ramachandran.png", "evaluate_mle_energy_histogram.png",
                   "mc_mc_trace.png",
                   "free_energy_free_energy.png", "train_regflow_training_curves.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
        assert f"figures/{figure}" in text


def test_second_run_does_no_work(finished_run, monkeypatch):
    out, _ = finished_run
    for stage in ("_md", "_reference_md", "_teacher", "_evaluate_teacher", "_train", "_evaluate", "_plain_md", "_mc",
                  "_adaptive_mc", "_flow_tempering", "_free_energy", "_export"):
        monkeypatch.setattr(pipeline_run, stage, lambda *a, **k: pytest.fail("a cached stage ran again"))
    run_pipeline(validate(TINY), out, progress=False)
    assert "| md | " in (out / "report.md").read_text() and "| yes |" in (out / "report.md").read_text()


def test_interrupted_run_continues(tmp_path, monkeypatch):
    real = pipeline_run._export
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_run, "_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(validate(TINY), tmp_path, progress=False)
    done = {p.parent.name for p in tmp_path.glob("*/stage.json")}  # mc_adaptive ran beside, stopped with it
    assert done - {"mc_adaptive"} == {"md", "reference", "teacher", "evaluate_teacher", "train_regflow",
                                      "train_baseline", "evaluate", "plain_md", "mc", "free_energy", "mc_tempering"}

    monkeypatch.setattr(pipeline_run, "_export", real)
    for stage in ("_md", "_teacher", "_evaluate_teacher", "_train", "_evaluate", "_plain_md", "_mc", "_free_energy",
                  "_flow_tempering"):
        monkeypatch.setattr(pipeline_run, stage, lambda *a, **k: pytest.fail("a finished stage ran again"))
    run_pipeline(validate(TINY), tmp_path, progress=False)
    assert (tmp_path / "report.md").is_file() and len(calls) == 1


def test_config_errors_are_one_line(tmp_path, capsys):
    from regflow_mm.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochz = 3\n")
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'epochz' in [train]" in err
    bad.write_text('[mc]\nn_walkers = "two"\n')
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "[mc].n_walkers must be an integer, got 'two'" in capsys.readouterr().err
    bad.write_text("[mc]\nn_iterations = 10\nadapt_segments = 3\n")
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "[mc].adapt_iterations (or n_iterations) = 10 must be a multiple of [mc].adapt_segments = 3" in (
        capsys.readouterr().err)
    bad.write_text('[free_energy]\ntfep_moved = "bonds"\n')
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "[free_energy].tfep_moved must be 'circular' or 'all', got 'bonds'" in capsys.readouterr().err
    bad.write_text("[mc]\ntempering_replicas = 1\n")
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "[mc].tempering_replicas must be 0 (off) or >= 2, got 1" in capsys.readouterr().err
    bad.write_text('[system]\nname = "al5"\n')
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown system 'al5'" in capsys.readouterr().err
    bad.write_text('[train]\nmethod = "mle"\n')
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "[baseline].method 'mle' is [train].method too" in capsys.readouterr().err
    assert not (tmp_path / "run" / "md").exists()  # refused before any stage ran
    bad.write_text('[train]\nmethod = "regflow"\ndata_weight_power = 2.0\n')
    assert main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "data_weight_power must be in [0, 1]" in capsys.readouterr().err


def test_demo_md_stage_reproduces_its_metadynamics_frames(tmp_path):
    # `make demo` trains on metadynamics data: two runs of its MD stage with the default seed agree bit for bit
    import numpy as np

    from regflow_mm.data import load_dataset
    from regflow_mm.systems.platforms import openmm_seed

    md = validate({**TINY, "md": {**TINY["md"], "ns": 0.01, "enhanced": "metadynamics"}})["md"]
    runs = [pipeline_run._md(tmp_path / f"run{k}", "aldp", md, 0, False) for k in range(2)]
    a, b = (load_dataset(r["dataset"]) for r in runs)
    assert a.weighted and len(a) == 100
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.log_weights, b.log_weights)
    assert runs[0]["dataset_summary"]["openmm_seed"] == openmm_seed(0)


def test_regflow_route_in_the_pipeline(finished_run, tmp_path):
    # the same data (md, reference and teacher stages are reused: same keys), the student trained by RegFlow for half
    # the budget and fine-tuned by MLE for the other half; both flows are evaluated beside the MLE baseline
    out, _ = finished_run
    import shutil

    for stage in ("md", "reference", "teacher", "evaluate_teacher", "train_baseline"):
        shutil.copytree(out / stage, tmp_path / stage)
    config = validate({**TINY, "train": {**TINY["train"], "mle_finetune_fraction": 0.5},
                       "mc": {**TINY["mc"], "adapt_segments": 0, "tempering_replicas": 0},
                       "free_energy": {**TINY["free_energy"], "tfep": False}})
    report = run_pipeline(config, tmp_path, progress=False)
    stages = json.loads((tmp_path / "metrics.json").read_text())["stages"]
    train = stages["train_regflow"]
    assert train["method"] == "regflow+mle" and train["flow"].endswith("mle_finetune/flow.pt")
    assert train["student_flow"] == str(tmp_path / "train_regflow" / "flow.pt")
    assert train["student_train"]["cpu_time_s"] >= 1.5 and train["train"]["cpu_time_s"] >= 1.5
    assert set(stages["evaluate"]["metrics"]) == {"regflow", "regflow+mle", "mle"}
    text = report.read_text()
    assert "| regflow+mle | " in text and "train_regflow_student_training_curves.png" in text
    with pytest.raises(ValueError, match=r"\[train\].mle_finetune_fraction must be in \[0, 1\)"):
        validate({"train": {"mle_finetune_fraction": 1.0}})


def test_smooth_flow_as_the_baseline_and_downstream_flow(finished_run, tmp_path):
    # [baseline] method "smooth": the [smooth] section's flow trains beside the main flow, is evaluated with it and
    # can be the downstream flow (Monte Carlo, free energy, export); the smooth dynamics stage runs that same flow
    out, _ = finished_run
    import shutil

    for stage in ("md", "reference", "teacher", "evaluate_teacher", "train_regflow"):
        shutil.copytree(out / stage, tmp_path / stage)
    config = validate({**TINY, "baseline": {"method": "smooth"}, "evaluate": {**TINY["evaluate"],
                                                                              "downstream_flow": "baseline"},
                       "mc": {**TINY["mc"], "adapt_segments": 0, "tempering_replicas": 0, "plain_md_iterations": 0},
                       "free_energy": {**TINY["free_energy"], "tfep": False},
                       "smooth": {"enabled": True, "time_budget_s": 2.0, "layers": 2, "components": 4, "hidden": 16,
                                  "nve_equilibrate_ps": 0.02, "nve_ps": 0.02, "langevin_ps": 0.02, "bias_ps": 0.0,
                                  "n_test_frames": 5, "n_samples": 0, "langevin_walkers": 1}})
    report = run_pipeline(config, tmp_path, progress=False)
    stages = json.loads((tmp_path / "metrics.json").read_text())["stages"]
    assert stages["train_baseline"]["method"] == "nll+fm" and stages["train_baseline"]["train"]["cpu_time_s"] >= 1.5
    assert set(stages["evaluate"]["metrics"]) == {"regflow", "smooth"}
    assert stages["evaluate"]["downstream"]["method"] == "smooth"
    assert stages["evaluate"]["downstream"]["flow"] == stages["train_baseline"]["flow"]
    assert stages["mc"]["n_iterations"] == TINY["mc"]["n_iterations"] and stages["export"]["md_steps"] > 0
    assert stages["smooth"]["flow"] == stages["train_baseline"]["flow"]  # not trained a second time
    assert not (tmp_path / "smooth" / "train").exists() and set(stages["smooth"]["force_rmse"]) == {"smooth", "regflow"}
    assert "| smooth | " in report.read_text()


def test_best_downstream_flow_goes_by_basins_then_conservative_ess_then_e_w1():
    """'best': a flow missing a basin loses whatever its ESS; then the higher ESS 5th percentile wins even against a
    lower E-W1 (al4: the spline's E-W1 was lower at 0.6x the ESS); equal ESS falls back to E-W1; NaN ESS ranks last."""
    from regflow_mm.pipeline.run import best_flow

    metrics = {"mle": {"basins_missing": 0, "ess": 0.0058, "ess_p05": 0.0046, "e_w1": 0.63},
               "smooth": {"basins_missing": 0, "ess": 0.0095, "ess_p05": 0.0057, "e_w1": 0.96},
               "regflow": {"basins_missing": 1, "ess": 0.30, "ess_p05": 0.25, "e_w1": 0.10}}
    assert best_flow(metrics) == "smooth"
    assert best_flow({**metrics, "smooth": {**metrics["smooth"], "ess_p05": 0.0046}}) == "mle"
    assert best_flow({**metrics, "smooth": {**metrics["smooth"], "ess_p05": float("nan")}}) == "mle"
    assert best_flow({"a": {"ess": 0.2, "e_w1": 1.0}, "b": {"ess": 0.1, "e_w1": 0.1}}) == "a"  # no interval, no basins


def test_report_calls_a_chain_population_far_from_the_estimates_not_converged():
    """al4's hybrid chain put 0.31 +- 0.09 at phi > 0 against ~0.02 from the reweighted flow and the weighted data:
    the report says it is not converged; a chain within 3 sigma gets no verdict."""
    from regflow_mm.pipeline.report import _crossing_lines

    fe = {"flow": {"p_a": 0.98, "p_b": 0.02, "ddelta_f": 0.2}, "md": {"p_a": 0.975, "p_b": 0.025, "ddelta_f": 0.1}}
    far = {"phi1_chain_positive_fraction": 0.31, "phi1_chain_positive_fraction_err": 0.09, "n_chain_states": 3400}
    text = "\n".join(_crossing_lines(far, None, fe, "phi1"))
    assert "NOT CONVERGED: more than 3 sigma from the flow, reweighted and the MD training data, weighted" in text
    near = {**far, "phi1_chain_positive_fraction": 0.03, "phi1_chain_positive_fraction_err": 0.01}
    assert "NOT CONVERGED" not in "\n".join(_crossing_lines(near, None, fe, "phi1"))
