"""The pipeline's report: ``report.md`` + ``metrics.json`` + figures, readable without running anything.

Every number comes from the stage results of this run; the published figures (RegFlow paper,
see ``shared/REFERENCE.md``) are shown beside ours and labelled as a different budget.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..sampling.free_energy import MIN_STATE_ESS

# RegFlow paper, NSF, Cartesian, GPU, up to 10.4M reflow pairs (E-W1 in kT, T-W2 in rad).
PUBLISHED = {
    "aldp": {"regflow": {"e_w1": 0.501, "t_w2": 0.951}, "mle": {"e_w1": 13.797, "t_w2": 1.243}},
    "al3": {"regflow": {"e_w1": 0.853}, "mle": {"e_w1": 17.596}},
    "al4": {"regflow": {"e_w1": 3.277}, "mle": {"e_w1": 20.886}},
}




def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _basin_lines(metrics: dict) -> list[str]:
    """Ramachandran basin populations per residue: reference (weighted) and each flow (reweighted)."""
    flows = {name: m["basins"] for name, m in metrics.items() if "basins" in m}
    if not flows:
        return []
    first = next(iter(flows.values()))
    lines = ["", f"Ramachandran basins (populations; a flow misses a basin holding >= {first['min_population']:.1%} "
             f"of the reference when fewer than {first['min_flow_samples']} of its raw samples fall in it):", "",
             "| residue | basin | reference | " + " | ".join(f"{n} reweighted (raw samples)" for n in flows) + " |",
             "|---|---|---|" + "---|" * len(flows)]
    for residue, basins in first["residues"].items():
        for basin, pops in basins.items():
            cells = [f"{_fmt(f['residues'][residue][basin]['flow_reweighted'])} "
                     f"({f['residues'][residue][basin]['flow_raw_count']})" for f in flows.values()]
            lines.append(f"| {residue} | {basin} | {_fmt(pops['ref'])} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Basins missed: " + ", ".join(f"{n} {f['n_missing']}" for n, f in flows.items()) + ".")
    return lines


def write_report(out: Path, config: dict, records: dict) -> Path:
    """Write ``out/report.md`` and ``out/metrics.json`` from the stage records; copy figures to ``out/figures``."""
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    res = {name: rec.results for name, rec in records.items()}
    seconds = {name: rec.seconds for name, rec in records.items()}
    system = config["system"]["name"]

    def figure(stage: str, name: str) -> str:
        src = out / stage / name
        if src.is_file():
            shutil.copyfile(src, figures / f"{stage}_{name}")
            return f"figures/{stage}_{name}"
        return ""

    md, ev, mc, fe, ex = res["md"], res["evaluate"], res["mc"], res["free_energy"], res["export"]
    lines = [f"# regflow-mm report: {system}", "",
             f"Config: `{out / 'config.json'}` (seed {config['run']['seed']}). Flow: {config['flow']['architecture']} "
             f"in {config['flow']['representation']} coordinates, {config['flow']['layers']} layers x "
             f"{config['flow']['hidden']} hidden.", "",
             "## Stages", "", "| stage | wall time (s) | cached in this run |", "|---|---|---|"]
    lines += [f"| {name} | {seconds[name]:.1f} | {'yes' if rec.cached else 'no'} |" for name, rec in records.items()]

    lines += ["", "## MD data", ""]
    runs = {"dataset": md.get("dataset_summary"), "reference": res.get("reference", {}).get("reference_summary")}
    for name, label in (("dataset", "Training run"), ("reference", "Reference run (held out, independent seed)")):
        run = runs[name]
        if run is None:
            continue
        weighted = run["enhanced"] == "metadynamics"
        kind = {"metadynamics": "well-tempered metadynamics",
                "tempering": "parallel tempering (the system-temperature replica)"}.get(run["enhanced"], "plain MD")
        lines.append(f"- {label}: {run['n_frames']} frames over {run['ns']:.2f} ns of "
                     f"{kind}" + (f" (seed {run['seed']}, OpenMM random seed {run['openmm_seed']})"
                                  if run.get("openmm_seed") else "") +
                     f"; {run.get('phi_name', md['phi_name'])} > 0 in "
                     f"{run['phi_positive_fraction']:.2%} of frames" +
                     (f", {run['phi_positive_reweighted']:.2%} after reweighting to the unbiased ensemble "
                      f"(weight ESS {run['weight_ess']:.0f} frames)" if weighted else "") +
                     f"; {run['phi_sign_changes']} sign changes of {run.get('phi_name', md['phi_name'])}.")
    if md.get("figure"):
        lines += ["", f"![training data Ramachandran]({figure('md', md['figure'])})"]
    if "dataset_summary" not in md:  # a run cached before reference runs existed
        lines.append(f"{md['n_frames']} frames over {md['ns']:.2f} ns (splits {md['splits']}); "
                     f"{md['phi_name']} > 0 in {md['phi_positive_fraction']:.2%} of frames.")
    lines.append("")

    lines += [f"## Flows (against the {ev.get('reference', 'test split')}"
              f"{', with its frame weights' if ev.get('reference_weighted') else ''})", "",
              "| method | ESS (fraction) [5%, 95%] | samples | E-W1 (kT) | T-W2 (rad) | above max ref. energy | NLL | "
              "D-chirality fraction | published E-W1 / T-W2 |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = dict(ev["metrics"])
    teacher = res.get("evaluate_teacher")
    if teacher is not None:  # the reflow teacher CNF as a generator, against the same reference
        rows = {"teacher (CNF)": teacher["metrics"], **rows}
    for name, m in rows.items():
        pub = {} if name == "teacher (CNF)" else PUBLISHED.get(system, {}).get("mle" if name == "mle" else "regflow", {})
        published = " / ".join(_fmt(pub.get(k)) for k in ("e_w1", "t_w2")) if pub else "-"
        interval = f" [{_fmt(m['ess_p05'])}, {_fmt(m['ess_p95'])}]" if "ess_p05" in m else ""
        lines.append(f"| {name} | {_fmt(m.get('ess'))}{interval} | {m.get('n_samples')} | {_fmt(m.get('e_w1'))} | "
                     f"{_fmt(m.get('t_w2'))} | {_fmt(m.get('above_max_fraction'))} | {_fmt(m.get('nll'))} | "
                     f"{_fmt(m.get('d_fraction'))} | {published} |")
    if ev.get("training_data_t_w2") is not None:
        lines += ["", f"T-W2 of the training data (with its weights) against the same reference: "
                      f"{_fmt(ev['training_data_t_w2'])} rad: how far two MD estimates of this ensemble differ at "
                      f"these run lengths (basin populations that differ by a few percent move mass by ~2.5 rad)."]
    if teacher is not None:
        t = res["teacher"]
        lines += ["", f"The teacher CNF (the reflow target of the RegFlow student) is evaluated with its exact likelihood "
                      f"({teacher['ode_solver']}, exact divergence; NLL on {teacher['metrics']['n_nll_frames']} reference "
                      f"frames) in {teacher['cpu_s']:.0f} CPU-s. Its cost to the RegFlow route: teacher training "
                      f"{_fmt(t.get('teacher_train_s'))} s + reflow pairs {_fmt(t.get('pairs_s'))} s (wall, one thread), "
                      f"on top of the student's budget."]
        student = ev["metrics"].get(config["train"]["method"], {})
        if student.get("e_w1") is not None and teacher["metrics"].get("e_w1"):
            lines.append(f"RegFlow student / teacher E-W1: {student['e_w1'] / teacher['metrics']['e_w1']:.2f}.")
    lines += _basin_lines(rows)
    lines += ["", "Published values: RegFlow paper, NSF in Cartesian coordinates, GPU training with up to 10.4M "
              "reflow pairs. Ours: the budget of this config on this machine. **Different budgets: compare the "
              "methods within a row set, not our numbers with the paper's.** E-W1 and T-W2 use weight-resampled "
              "flow samples, no energy clipping and no weight filtering.", ""]
    figure_sets = [(name, "evaluate", figs) for name, figs in ev["figures"].items()]
    if teacher is not None:
        figure_sets.insert(0, ("teacher (CNF)", "evaluate_teacher", teacher["figures"]))
    for name, stage, figs in figure_sets:
        lines += [f"**{name}**: Ramachandran (reference frames{' | reference reweighted' if ev.get('reference_weighted') else ''}"
                  f" | flow raw | flow reweighted) and reduced-energy histograms", "",
                  f"![{name} Ramachandran]({figure(stage, figs['ramachandran'])})",
                  f"![{name} energies]({figure(stage, figs['energy'])})", ""]
    curves = [(stage, res[stage]["method"], Path(res[stage]["curves"])) for stage in ("train_regflow", "train_baseline")
              if stage in res and "curves" in res[stage]]
    if "student_curves" in res.get("train_regflow", {}):  # the RegFlow route: the student, then its MLE fine-tuning
        curves.insert(0, ("train_regflow_student", "regflow", Path(res["train_regflow"]["student_curves"])))
    for name, method, curve in curves:
        if curve.is_file():
            shutil.copyfile(curve, figures / f"{name}_training_curves.png")
        t = res["train_regflow"] if name.startswith("train_regflow") else {}
        detail = f", {t['target']} target, {t['n_pairs']} pairs" if method == "regflow" else ""
        lines += [f"Training curves, {name} ({method}{detail}):", "", f"![{name}](figures/{name}_training_curves.png)", ""]

    down = ev.get("downstream", {"method": "regflow", "rule": "regflow"})
    lines += [f"Monte Carlo, free energy and export below use the **{down['method']}** flow "
              f"(rule `{down['rule']}`: 'best' takes the fewest basins missed, then the highest ESS 5th percentile, then "
              f"the lowest E-W1 on held-out data).", ""]
    lines += ["## Hybrid MD / flow Monte Carlo", "",
              f"{mc['n_walkers']} walkers x {mc['n_iterations']} iterations of {config['mc']['md_steps_per_iteration']} "
              f"Langevin steps + {config['mc']['flow_moves_per_iteration']} flow independence move(s); "
              f"acceptance {mc['acceptance']:.2%}; "
              f"{md['phi_name']} > 0 population {_fmt(mc.get(md['phi_name'] + '_positive_fraction'))} "
              f"+- {_fmt(mc.get(md['phi_name'] + '_positive_fraction_err'))} (block error); sign changes between "
              f"stored frames per walker {mc.get(md['phi_name'] + '_sign_changes')}; {mc['cpu_s']:.0f} CPU-s in all.",
              "", f"![MC]({figure('mc', mc['figure'])})", ""]
    lines += _crossing_lines(mc, res.get("plain_md"), fe, md["phi_name"])
    ad = res.get("mc_adaptive") or mc.get("adaptive")  # a stage of its own (older runs: inside mc)
    if ad:
        phi = md["phi_name"]
        proposals = (f" and on {ad['finetune_proposals']} of its own samples weighted by exp(-u - log q) (Kish ESS "
                     + ", ".join(f"{e:.0f}" for e in ad["proposal_ess"]) + " of them at the updates)"
                     if ad.get("finetune_proposals") else "")
        lines += [f"Adaptive flow MC (the same chain, its flow fine-tuned on the chain's frames and the weighted "
                  f"training data{proposals} between {len(ad['segments'])} segments; each segment is an exact chain "
                  f"with a frozen flow): acceptance **{ad['acceptance_first_quarter']:.2%} in the first quarter, "
                  f"{ad['acceptance_last_quarter']:.2%} in the last**{_rise(ad)} (per segment: "
                  + ", ".join(f"{s['acceptance']:.2%}" for s in ad["segments"]) +
                  f"); {phi} > 0 population {_fmt(ad.get(phi + '_positive_fraction'))} "
                  f"+- {_fmt(ad.get(phi + '_positive_fraction_err'))}; sign changes per walker "
                  f"{ad.get(phi + '_sign_changes')}; CPU s in MD / flow moves / fine-tuning "
                  f"{ad['md_cpu_s']:.0f} / {ad['flow_cpu_s']:.0f} / {ad['finetune_cpu_s']:.0f}.", ""]
        va = ad.get("version_acceptance")
        if va:
            lines += [f"Stationary acceptance of the proposal, flow v{va['first_version']} -> v{va['last_version']} "
                      f"({va['n_samples']} samples of each on the same latent draws, bootstrap errors): "
                      f"**{va['acceptance_a']:.2%} +- {va['acceptance_a_se']:.2%} -> {va['acceptance_b']:.2%} +- "
                      f"{va['acceptance_b_se']:.2%}**, a paired change of {100 * va['change']:+.2f} +- "
                      f"{100 * va['change_se']:.2f} points{_in_brackets(_sigmas(va['change'], va['change_se']))}.", ""]
    pt = res.get("mc_tempering") or mc.get("tempering")  # a stage of its own (older runs: inside mc)
    if pt:
        phi = md["phi_name"]
        per_t = ", ".join(f"{t:.0f} K {f['acceptance']:.1%}" for t, f in zip(pt["temperatures_K"], pt["flow"]))
        lines += [f"Parallel tempering with flow moves (openmmtools, {len(pt['temperatures_K'])} replicas "
                  f"{pt['temperatures_K'][0]:.0f}-{pt['temperatures_K'][-1]:.0f} K, {pt['n_iterations']} exchange "
                  f"iterations of the same MD segment + flow moves per replica, {pt['cpu_s']:.0f} CPU-s): swap "
                  f"acceptance {pt['swap_acceptance']:.1%}; flow acceptance {per_t}; at "
                  f"{pt['temperatures_K'][0]:.0f} K {phi} > 0 in {_fmt(pt.get(phi + '_positive_fraction'))} of "
                  f"{pt['n_frames']} frames, {(pt.get(phi + '_sign_changes') or [0])[0]} sign changes.", ""]

    flow_fe = fe["flow"]

    def note(est: dict, what: str) -> str:
        if "error" in est:
            return est["error"]
        low = min(est.get("ess_a", 0), est.get("ess_b", 0))
        text = f"{what}; Kish ESS inside the states {_fmt(est.get('ess_a'))} / {_fmt(est.get('ess_b'))}"
        return text + (f" - UNRELIABLE: fewer than {MIN_STATE_ESS:.0f} effective samples in a state"
                       if low < MIN_STATE_ESS else "")

    rows = [("flow, reweighted", flow_fe, note(flow_fe, "delta-method error"))]
    for key, label in (("md", "MD training run"), ("md_reference", "MD reference run")):
        if key in fe:
            est = fe[key]
            rows.append((label + (" (reweighted)" if est.get("weighted") else " (counting)"), est,
                         note(est, "20-block bootstrap error")))
    tfep = fe.get("tfep")
    if tfep is not None:
        if "error" in tfep:
            rows.append(("TFEP (RegFlow map)", tfep, f"not computed: {tfep['error']}"))
        else:
            f, r, t = tfep["forward"], tfep["reverse"], tfep["train"]
            text = (f"{tfep['method']} of both directions on {f['n']} + {r['n']} weight-resampled frames of the "
                    f"{'reference run' if tfep['eval_data'] == 'independent data' else 'training run'}; work ESS "
                    f"{f['work_ess']:.2%} forward, {r['work_ess']:.2%} reverse; map moves {tfep['n_moved']} of "
                    f"{tfep['dim']} coordinates, trained in {t['cpu_s']:.0f} CPU-s with {t['n_energy_calls']} energy calls")
            if not tfep["reliable"]:
                text += f" - UNRELIABLE: fewer than {MIN_STATE_ESS:.0f} effective samples"
            rows.append(("TFEP (RegFlow map, energy-free training)", tfep, text))
    lines += ["## Free energy", "",
              f"dF({fe['torsion']} < 0 -> {fe['torsion']} > 0) from {fe['n_samples']} reweighted flow samples "
              f"(ESS {_fmt(fe['ess'])}, {fe['n_zero_weight']} with zero weight):", "",
              "| estimate | dF (kT) | error (kT) | note |", "|---|---|---|---|",
              *[f"| {label} | {_fmt(est.get('delta_f'))} | {_fmt(est.get('ddelta_f'))} | {text} |"
                for label, est, text in rows], "",
              *(["Reference: plain MD of aldp at 300 K puts about 2% in phi > 0 (dF about 3.9 kT).", ""]
                if system == "aldp" else []),
              f"![free energy]({figure('free_energy', fe['figure'])})", ""]

    lines += ["## Exported OpenMM force", "",
              f"Backend `{ex['backend']}`" + (f", model `{ex['model']}`" if ex["model"] else "") +
              f": energies of the OpenMM force vs `BoltzmannFlow.energy` on test frames agree to "
              f"{_fmt(ex['max_rel_energy_error'])} (max relative). {ex['md_steps']} Langevin steps on the flow potential "
              f"alone: {'finite throughout' if ex['md_finite'] else 'stopped at step %s: %s' % (ex.get('first_nonfinite_step', '?'), ex.get('md_failure') or 'non-finite energy (internal-coordinate flows with box support: the run left the flow support)')}, "
              f"flow energy {_fmt(ex['flow_energy_mean'])} +- {_fmt(ex['flow_energy_std'])} kJ/mol over the finite frames, "
              f"{_fmt(ex['ns_per_day'])} ns/day.", ""]

    if "smooth" in res:
        lines += _smooth_lines(res["smooth"], config["smooth"], figure)

    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "metrics.json").write_text(json.dumps({"config": config, "stages": res, "seconds": seconds},
                                                 indent=2, default=str))
    return report


def _rise(ad: dict) -> str:
    """', a change of x +- se points' of an adaptive chain's quarter acceptance (batch means), or '' (older results)."""
    if ad.get("acceptance_rise_se") is None:
        return ""
    sigmas = _sigmas(ad["acceptance_rise"], ad["acceptance_rise_se"])
    return (f", a change of {100 * ad['acceptance_rise']:+.2f} +- {100 * ad['acceptance_rise_se']:.2f} points "
            f"(batch-means standard error{'; ' if sigmas else ''}{sigmas})")


def _crossing_lines(mc: dict, plain: dict | None, fe: dict, phi: str) -> list[str]:
    """Phi sign changes per CPU s of the hybrid chain against plain MD (both counted between consecutive chain
    states), and the hybrid chain's phi > 0 population beside the reweighted flow's and the weighted data's."""
    lines = []
    hybrid = mc.get(f"{phi}_chain_sign_changes")
    if hybrid is not None and mc.get("chain_cpu_s"):
        rate = sum(hybrid) / mc["chain_cpu_s"]
        text = (f"Basin crossings, counted between consecutive chain states (after every MD segment and every flow "
                f"move): the hybrid chain changes the sign of {phi} **{sum(hybrid)} times in {mc['chain_cpu_s']:.1f} "
                f"CPU-s ({rate:.3g} per CPU-s)**")
        if plain is not None and plain.get(f"{phi}_chain_sign_changes") is not None:
            n_plain, cpu = sum(plain[f"{phi}_chain_sign_changes"]), plain["chain_cpu_s"]
            if n_plain:
                ratio = f"**{rate / (n_plain / cpu):.0f}x** plain MD's rate"
            else:  # no crossing: the ratio to a rate of one crossing in plain MD's CPU time, a lower bound
                ratio = f"**more than {rate * cpu:.0f}x** plain MD's rate (the ratio to one crossing in its CPU time)"
            text += (f"; plain MD of the same walkers, start and MD segment ({plain['ps']:.0f} ps in {cpu:.1f} CPU-s): "
                     f"{n_plain} ({n_plain / cpu:.3g} per CPU-s), i.e. {ratio}")
        lines += [text + ".", ""]
    every_state = f"{phi}_chain_positive_fraction" in mc  # over every chain state (older runs: stored frames)
    key = f"{phi}_chain_positive_fraction" if every_state else f"{phi}_positive_fraction"
    p, err = mc.get(key), mc.get(key + "_err")
    rows = []
    for label, est in (("flow, reweighted", fe.get("flow", {})), ("MD training data, weighted", fe.get("md", {}))):
        if "p_b" in est and est.get("ddelta_f") is not None:
            # dF = -ln(p_b / p_a), p_a + p_b = 1: d p_b = p_a p_b d(dF)
            rows.append((label, est["p_b"], est["p_a"] * est["p_b"] * est["ddelta_f"]))
    if p is not None and err is not None and math.isfinite(err) and rows:
        cells = "; ".join(f"{label} {q:.4f} +- {e:.4f} ({_sigmas(p - q, math.hypot(err, e)) or 'no error'})"
                          for label, q, e in rows)
        off = [label for label, q, e in rows if math.hypot(err, e) > 0 and abs(p - q) > 3 * math.hypot(err, e)]
        verdict = (f" - NOT CONVERGED: more than 3 sigma from the {' and the '.join(off)} estimate; the chain's "
                   "population is unreliable (run more iterations or walkers)") if off else ""
        lines += [f"{phi} > 0 population of the hybrid chain {p:.4f} +- {err:.4f} (over "
                  f"{'its ' + str(mc['n_chain_states']) + ' chain states' if every_state else 'its frames'}, block error) "
                  f"against {cells} (difference over combined error){verdict}.", ""]
    return lines


def _sigmas(value: float, se: float) -> str:
    """'+x.x sigma' where the error is a positive number, else ''."""
    return f"{value / se:+.1f} sigma" if se is not None and math.isfinite(se) and se > 0 else ""


def _in_brackets(text: str) -> str:
    return f" ({text})" if text else ""


def _walker_line(lang: dict) -> str:
    """Each walker of a pooled Langevin result: finite or its failure, T-W2 (rad) and kinetic temperature (K)."""
    parts = []
    for k, w in enumerate(lang.get("walkers", [])):
        state = "finite" if w["finite"] else f"stopped at step {w['failure']['step']}: {w['failure']['reason']}"
        parts.append(f"{k}: {state}, T-W2 {_fmt(w.get('t_w2'))}, {_fmt(w.get('mean_temperature_K'))} K")
    return "; ".join(parts)


def _smooth_lines(sm: dict, settings: dict, figure) -> list[str]:
    """The [smooth] stage: force RMSE of each flow, NVE beside the force field, Langevin T-W2, bias run."""
    dyn = sm["dynamics"]
    lines = ["## Smooth flow potential (dynamics)", "",
             f"C-infinity smooth flow, internal coordinates with open support (no hard walls; bonds, angles and "
             f"narrow torsions by {settings['interval']} maps), trained {_fmt(sm['cpu_s'])} CPU-s by "
             f"{settings['w_nll']} x NLL + {settings['w_fm']} x force matching; "
             f"exported as an OpenMM force (`{settings['backend']}` backend).", "",
             f"Force RMSE against held-out MD forces ({sm['n_test_frames']} test frames):", "",
             "| flow | training CPU-s | force RMSE (kJ/mol/nm) | RMS of MD forces | frames outside support |",
             "|---|---|---|---|---|"]
    for name, r in sm["force_rmse"].items():
        lines.append(f"| {name} | {_fmt(r.get('cpu_s'))} | {_fmt(r['rmse'])} | {_fmt(r['reference_rms'])} | "
                     f"{r['n_outside']} |")
    lines += ["", f"NVE ({settings['nve_equilibrate_ps']} ps Langevin, then {settings['nve_ps']} ps Verlet at 1 fs, same start, steps and timestep):",
              "", "| potential | finite | std E_tot / DOF (kJ/mol) | ms per step | failure |", "|---|---|---|---|---|"]
    for label, key in (("smooth flow alone", "nve_flow"), ("force field", "nve_forcefield")):
        r = dyn[key]
        fail = r["failure"]
        lines.append(f"| {label} | {r['finite']} | {_fmt(r.get('energy_fluctuation_per_dof'))} | "
                     f"{_fmt(r['ms_per_step'])} | {'-' if not fail else 'step %s: %s' % (fail['step'], fail['reason'])} |")
    lines += ["", f"Flow / force-field fluctuation: {_fmt(dyn.get('nve_ratio'))} (smooth-flows paper: 8e-4 vs 6e-4 "
                  f"kJ/mol per DOF, GPU-trained on 1 us).", ""]
    lang = dyn.get("langevin")
    if lang:
        ff = dyn.get("langevin_forcefield") or {}
        fail = lang["failure"]
        h = settings["hydrogen_mass_amu"]
        masses = f"hydrogens of {h} amu" if h else "the force field's masses"
        state = "all finite throughout" if lang["finite"] else \
            f"walker {fail['walker']} stopped at step {fail['step']}: {fail['reason']}" if fail else "not all finite"
        per_context = lang.get("walkers_per_context", 1)
        batched = f", up to {per_context} per OpenMM Context (one batched flow evaluation per step)" \
            if per_context > 1 else ""
        lines += [f"Langevin on the flow potential alone: {lang['n_walkers']} walkers from equilibrium starts (frames "
                  f"drawn by their weights{batched}) x {settings['langevin_ps']} ps at "
                  f"{settings['langevin_timestep_fs']} fs ({masses}, 300 K): {state}, "
                  f"{_fmt(lang['ps'])} ps in all, {_fmt(lang['ms_per_step'])} ms per walker and step, mean kinetic "
                  f"temperature {_fmt(lang.get('mean_temperature_K'))} K. Pooled (phi, psi) T-W2 against the MD "
                  f"frames **{_fmt(lang.get('t_w2'))} rad**; the force field's walkers from the same starts, length "
                  f"and masses: {_fmt(ff.get('t_w2'))} rad ({_fmt(ff.get('mean_temperature_K'))} K; one trajectory "
                  f"of this length samples the basins' populations only roughly).", "",
                  f"Per walker, flow: {_walker_line(lang)}. Force field: {_walker_line(ff)}.", ""]
        if lang.get("figure"):
            lines += [f"![smooth flow Langevin Ramachandran]({figure('smooth', lang['figure'])})", ""]
    bias = dyn.get("bias")
    if bias:
        lines += [f"Bias: force field + flow force in its own force group, {_fmt(bias['ps'])} ps of Langevin: "
                  f"{'finite' if bias['finite'] else 'stopped: %s' % bias['failure']}, flow energy "
                  f"{_fmt(bias.get('flow_energy_mean'))} kJ/mol on average.", ""]
    ens = sm.get("ensemble")
    if ens:
        lines += [f"The flow potential's own ensemble q (dynamics on -kT log q samples q) against the {ens['reference']}, "
                  f"{ens['n_samples']} samples: Kish ESS (fraction) {_fmt(ens['ess'])} [{_fmt(ens.get('ess_p05'))}, "
                  f"{_fmt(ens.get('ess_p95'))}], fraction of raw samples above the reference's highest energy "
                  f"{_fmt(ens['above_max_fraction'])}, raw (phi, psi) T-W2 {_fmt(ens['t_w2_raw'])} rad, reweighted "
                  f"E-W1 {_fmt(ens['e_w1'])} kT.", ""]
    return lines

