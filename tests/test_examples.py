"""The example scripts in examples/ run as documented and print the numbers they promise.

Each script runs in this process (runpy, run_name="__main__") on a small untrained aldp flow; the
printed figures are checked against the same quantities computed here.
"""
from __future__ import annotations

import math
import re
import runpy
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from regflow_mm.energy import EnergyEvaluator
from regflow_mm.flows import build_flow
from regflow_mm.sampling.free_energy import state_delta_f
from regflow_mm.sampling.reweighting import draw_weighted_samples, weighted_mean

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NUMBER = r"([-+0-9.eE]+|nan|inf|-inf)"


@pytest.fixture(scope="module")
def flow_path(aldp, tmp_path_factory):
    """An untrained but valid aldp flow fitted to a few MD-like structures (minimum + 0.01 nm noise)."""
    rng = np.random.default_rng(0)
    fit_to = aldp.positions[None] + 0.01 * rng.standard_normal((5, aldp.n_atoms, 3))
    flow = build_flow(aldp, "cartesian", "resnvp", layers=2, hidden=16, fit_to=fit_to, seed=0)
    path = tmp_path_factory.mktemp("flow") / "flow.pt"
    flow.save(path)
    return path


def run_example(script: str, argv: list[str], monkeypatch, capsys) -> str:
    monkeypatch.setattr("sys.argv", [str(EXAMPLES / script), *map(str, argv)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


def numbers(pattern: str, text: str) -> list[float]:
    match = re.search(pattern.replace("{N}", NUMBER), text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return [float(g) for g in match.groups()]


def test_free_energy_example_reports_reweighted_estimates(aldp, flow_path, monkeypatch, capsys):
    n = 400
    out = run_example("free_energy_with_saved_flow.py", [flow_path, "-n", n, "--workers", 1], monkeypatch, capsys)
    assert "T = 300.0 K, kT = 2.4943 kJ/mol" in out
    n_d, n_zero = numbers(r"weight 0: {N} with D-chirality, {N} in all", out)
    ess, ess_count = numbers(r"Kish ESS: {N} of N = {N} samples", out)
    p, dp = numbers(r"P\(phi1 > 0\) = {N} \+- {N} \(reweighted population, probability\)", out)
    df, ddf, df_kj, ddf_kj = numbers(r"Delta F\(phi1<0 -> phi1>0\) = {N} \+- {N} kT = {N} \+- {N} kJ/mol", out)
    assert all(math.isfinite(v) for v in (ess, p, dp, df, ddf, df_kj, ddf_kj))
    assert 0 < n_d <= n_zero < n and 0 < ess <= 1 and 0 <= p <= 1 and dp >= 0 and ddf >= 0
    assert df_kj == pytest.approx(df * aldp.kT, rel=1e-3, abs=2e-3)

    # The same estimates computed here: D samples (and failed ones) carry zero weight.
    from regflow_mm.flows import load_flow

    with EnergyEvaluator(aldp, n_workers=0) as evaluator:
        samples = draw_weighted_samples(load_flow(flow_path), evaluator, n, seed=0, molecular_system=aldp,
                                        progress=False)
    log_w = np.where(samples.is_l, samples.log_w, -np.inf)
    assert n_d == np.sum(~samples.is_l) and n_zero == np.sum(~np.isfinite(log_w))
    phi1 = np.nan_to_num(samples.torsions["phi1"])
    p_ref, dp_ref = weighted_mean((phi1 > 0).astype(float), log_w)
    ref = state_delta_f(log_w, phi1 < 0, phi1 > 0)
    assert p == pytest.approx(float(p_ref), abs=1e-4) and dp == pytest.approx(float(dp_ref), abs=1e-4)
    assert df == pytest.approx(ref["delta_f"], abs=1e-3) and ddf == pytest.approx(ref["ddelta_f"], abs=1e-3)


def test_free_energy_example_rejects_a_flow_of_another_system(flow_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="trained for system hash"):
        run_example("free_energy_with_saved_flow.py", [flow_path, "--system", "al4", "-n", 10], monkeypatch, capsys)


def force_field_energy(aldp) -> float:
    platform = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(aldp.system, openmm.VerletIntegrator(0.001), platform)
    context.setPositions(aldp.positions * unit.nanometer)
    return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


@pytest.mark.parametrize("backend", ["torch", "python"])
def test_export_example_runs_flow_only_and_biased_md(aldp, flow_path, backend, tmp_path, monkeypatch, capsys):
    from regflow_mm.flows import load_flow

    model = tmp_path / "model.pt"
    argv = [flow_path, "--backend", backend, "--steps", 200]
    argv += ["--out", model] if backend == "torch" else ["--monitor-only"]
    out = run_example("export_flow_force_md.py", argv, monkeypatch, capsys)
    assert "non-finite" not in out and "MD failed" not in out
    part_a, part_b = out.split("(b) force field (group 0) + U_flow (group 1)")
    assert f"(a) Langevin MD on U_flow alone, 300.0 K, {backend} backend" in part_a
    flow_only = [float(v) for v in re.findall(rf"U_flow = +{NUMBER} kJ/mol", part_a)]
    ff = [float(v) for v in re.findall(rf"U_ff = +{NUMBER} kJ/mol", part_b)]
    biased_flow = [float(v) for v in re.findall(rf"U_flow = +{NUMBER} kJ/mol", part_b)]
    assert len(flow_only) == len(ff) == len(biased_flow) == 3  # steps 0, 100, 200
    assert all(math.isfinite(v) for v in flow_only + ff + biased_flow)

    # Step 0 is the system's structure: U_flow = -kT log q there, U_ff the force field's energy.
    u_flow = float(load_flow(flow_path).energy(torch.as_tensor(aldp.positions[None], dtype=torch.float32))[0].detach())
    assert flow_only[0] == pytest.approx(u_flow, abs=1e-3) and biased_flow[0] == pytest.approx(u_flow, abs=1e-3)
    assert ff[0] == pytest.approx(force_field_energy(aldp), abs=1e-3)
    assert len(set(flow_only)) == 3 and len(set(ff)) == 3  # the dynamics moved
    if backend == "torch":
        scripted = torch.jit.load(str(model))
        energy = scripted(torch.as_tensor(aldp.positions, dtype=torch.float32)).detach()
        assert float(energy) == pytest.approx(u_flow, abs=1e-3)


def test_export_example_refuses_out_without_torch_backend(flow_path, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_example("export_flow_force_md.py", [flow_path, "--backend", "python", "--out", tmp_path / "m.pt"],
                    monkeypatch, capsys)
    assert exit_info.value.code == 2 and "--out saves the TorchScript model" in capsys.readouterr().err


def test_export_example_stops_at_a_non_finite_energy(capsys):
    module = runpy.run_path(str(EXAMPLES / "export_flow_force_md.py"), run_name="export_example")
    system = openmm.System()
    system.addParticle(1.0)
    force = openmm.CustomExternalForce("sqrt(x)")  # NaN for x < 0, like a flow energy outside its support
    force.addParticle(0, [])
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions([openmm.Vec3(-1.0, 0.0, 0.0)] * unit.nanometer)
    module["run_md"](context, 300, {"U": {0}})
    out = capsys.readouterr().out
    assert "energy became non-finite at step 0" in out and "step    100" not in out


def test_hybrid_mc_recipe_runs(flow_path, monkeypatch, capsys):
    out = run_example("hybrid_mc_recipe.py", [flow_path, "--iterations", 3, "--md-steps", 10], monkeypatch, capsys)
    (acceptance,) = numbers(r"acceptance {N}", out)
    (fraction,) = numbers(r"phi1 > 0 in {N} of 3 frames", out)
    assert "'n_proposed': 3" in out and 0 <= acceptance <= 1 and 0 <= fraction <= 1


def test_free_energy_between_states_example_matches_the_api(aldp, flow_path, monkeypatch, capsys):
    from regflow_mm.flows import load_flow
    from regflow_mm.sampling.thermodynamic import delta_f_between

    out = run_example("free_energy_between_states.py", [flow_path, "-n", 300, "--to-temperature", 350],
                      monkeypatch, capsys)
    assert "state B: amber99sbildn.xml + amber99_obc.xml at 350.0 K" in out
    df, ddf = numbers(r"Delta f\(A -> B\) = {N} \+- {N} kT", out)
    ref = delta_f_between(aldp.system, aldp.system, temperature_a=300.0, temperature_b=350.0,
                          flow=load_flow(flow_path), n_flow_samples=300, seed=0, is_l=aldp.is_l,
                          topologies=[aldp.topology, aldp.topology])
    assert df == pytest.approx(ref["delta_f"], abs=1e-3) and ddf == pytest.approx(ref["ddelta_f"], abs=1e-3)
    assert ("UNRELIABLE" in out) == (not ref["reliable"])
