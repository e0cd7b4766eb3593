"""`opdkit compare` on a tiny grid: runs, resumability, table, CSV, plots and HTML."""

from __future__ import annotations

import csv

import pytest
import yaml

from opdkit.compare import main, mean_ci
from tests.train.tiny_run import base_overrides, make_pair


def test_mean_ci():
    m, ci = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and ci == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_ci([0.3]) == (0.3, 0.0)


def test_tiny_grid_end_to_end(tmp_path):
    pair = make_pair(tmp_path / "pair")
    base = [o for o in base_overrides(pair, tmp_path / "unused", steps=2) if not o.startswith(("run_dir=", "progress="))]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "seeds": 2, "methods": [
        {"name": "vanilla", "overrides": []},
        {"name": "full_rkl", "overrides": ["objective.estimator=full"]},
        {"name": "sft_teacher_samples", "kind": "sft", "match": "vanilla"},
        {"name": "sft_init", "kind": "none"},
    ]}))
    out = tmp_path / "cmp"
    args = [str(grid), f"out_dir={out}", "eval_n=4", "eval_k=2", "parallel=2"]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"vanilla", "full_rkl", "sft_teacher_samples", "sft_init"}
    assert len(rows) == 8
    # the off-policy SFT baseline stopped at the teacher tokens its matched OPD run scored (within one batch)
    from opdkit.metrics_log import read_metrics

    for seed in (0, 1):
        opd = [r for r in read_metrics(out / "runs" / "vanilla" / f"seed{seed}") if "teacher_tokens" in r]
        sft = [r for r in read_metrics(out / "runs" / "sft_teacher_samples" / f"seed{seed}") if "loss" in r]
        budget = opd[-1]["teacher_tokens"]
        assert sft[-1]["teacher_tokens"] >= budget and (len(sft) == 1 or sft[-2]["teacher_tokens"] < budget)
    md = (out / "results.md").read_text()
    assert "avg@2" in md and "pass@2" in md and "vanilla" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "full_rkl" in html
    assert any((out / "plots").glob("*.png"))
    # resumable: a second call reuses finished runs and cached evals (no new log lines)
    log = (out / "logs" / "vanilla_seed0.log").read_text()
    assert main(args) == 0
    assert (out / "logs" / "vanilla_seed0.log").read_text() == log


def test_bad_grid_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"methods": [{"name": "a", "kind": "weird"}]}))
    assert main([str(bad), f"out_dir={tmp_path / 'o'}"]) == 2
    assert main([str(tmp_path / "missing.yaml")]) == 2
    bad.write_text(yaml.safe_dump({"methods": [{"name": "a", "overrides": ["objective.divergence=nope"]}]}))
    assert main([str(bad), f"out_dir={tmp_path / 'o'}"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.strip()]
    assert len(err) == 3 and all(e.startswith("opdkit: error:") for e in err)
    assert not (tmp_path / "o").exists()
