"""benchmarks/bench_crossings.py: its statistics on exact series, and one end-to-end run on aldp."""
from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_crossings.py"


def test_block_error_and_sign_changes_on_exact_series():
    from regflow_mm.sampling.crossings import block_mean_error, sign_changes, walkers_mean_error

    x = np.repeat([0.0, 1.0, 0.0, 1.0], 5).astype(float)  # 4 blocks of 5: block means 0, 1, 0, 1
    mean, err = block_mean_error(x, 4)
    assert mean == 0.5 and err == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2)
    mean_w, _ = block_mean_error(x, 4, log_w=np.where(x > 0, np.log(3.0), 0.0))
    assert mean_w == pytest.approx(0.75)  # weight 3 on the ones
    assert sign_changes(np.array([-1.0, -0.5, 0.2, 0.3, -2.0, 1.0])) == 3
    assert math.isnan(block_mean_error(np.ones(3), 2, log_w=np.array([0.0, -np.inf, -np.inf]))[1])
    # two walkers: means 0.5 and 1.0; errors sqrt(1/12) and 0 -> combined sqrt(1/12) / 2
    mean2, err2 = walkers_mean_error(np.stack([x, np.ones_like(x)], axis=1), 4)
    assert mean2 == 0.75 and err2 == pytest.approx(np.std([0, 1, 0, 1], ddof=1) / 2 / 2)


def test_bench_runs_end_to_end_on_aldp(aldp, tmp_path, capsys):
    from regflow_mm.data import load_dataset
    from regflow_mm.data.simulate import simulate
    from regflow_mm.flows import build_flow

    data = simulate(aldp, tmp_path / "md.h5", 0.002, save_interval_ps=0.05, platform="Reference",
                    equilibration_ps=0.5, progress=False)
    build_flow(aldp, "internal", "nsf", layers=2, hidden=16, fit_to=load_dataset(data).split("train"),
               seed=0).save(tmp_path / "flow.pt")
    out_md = tmp_path / "bench.md"
    text = runpy.run_path(str(BENCH))["main"](
        ["--flow", str(tmp_path / "flow.pt"), "--dataset", str(data), "--cpu-budget", "0.3", "--walkers", "2",
         "--md-steps", "10", "--flow-moves", "1,3", "--flow-samples", "100", "--blocks", "2",
         "--out-md", str(out_md)])
    assert out_md.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| plain MD") or line.startswith("| hybrid")]
    assert len(rows) == 3 and "| hybrid, 3 flow moves / MD segment |" in text
    assert "| reweighted flow, 100 samples" in text and "| MD dataset (block error) |" in text
    assert "crossings per CPU s" in text
