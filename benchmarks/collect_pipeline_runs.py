"""Markdown table of finished pipeline runs (their metrics.json), for BENCHMARKS.md.

    .venv/bin/python benchmarks/collect_pipeline_runs.py demo-output runs/al3_cpu runs/al4_cpu
"""
import json
import sys
from pathlib import Path


def fmt(value, digits=3):
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def main(folders):
    print("| run | system | MD (ns) | pipeline wall time (s) | method | ESS | E-W1 (kT) | T-W2 (rad) | NLL | D fraction "
          "| MC acceptance | dF flow (kT) | exported force = flow |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        m = json.loads((Path(folder) / "metrics.json").read_text())
        st, cfg = m["stages"], m["config"]
        total = sum(m["seconds"].values())
        fe = st["free_energy"]["flow"]
        dF = f"{fmt(fe['delta_f'])} +- {fmt(fe['ddelta_f'])} (ESS in B {fmt(fe['ess_b'])})" if "delta_f" in fe else "n/a"
        for method, met in st["evaluate"]["metrics"].items():
            used = st["evaluate"].get("downstream", {}).get("method") == method
            print(f"| {folder} | {cfg['system']['name']} | {fmt(st['md']['ns'])} | {total:.0f} | {method}"
                  f"{' (downstream)' if used else ''} | {fmt(met.get('ess'))} | {fmt(met.get('e_w1'))} | "
                  f"{fmt(met.get('t_w2'))} | {fmt(met.get('nll'))} | {fmt(met.get('d_fraction'))} | "
                  f"{fmt(st['mc']['acceptance']) if used else ''} | {dF if used else ''} | "
                  f"{fmt(st['export']['max_rel_energy_error']) if used else ''} |")


if __name__ == "__main__":
    main(sys.argv[1:])
