"""`opdkit compare` on a tiny grid: runs, resumability, table, CSV, plots and HTML."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from opdkit.compare import main, mean_ci
from tests.train.tiny_run import base_overrides, make_pair


def test_mean_ci():
    m, ci = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and ci == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_ci([0.3]) == (0.3, 0.0)


def _grid(tmp_path, methods: list[dict]):
    """A 2-step, 2-seed grid file over a tiny teacher/student pair."""
    pair = make_pair(tmp_path / "pair")
    base = [o for o in base_overrides(pair, tmp_path / "unused", steps=2) if not o.startswith(("run_dir=", "progress="))]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "seeds": 2, "methods": methods}))
    return grid


def test_tiny_grid_end_to_end(tmp_path):
    grid = _grid(tmp_path, [
        {"name": "vanilla", "overrides": []},
        {"name": "full_rkl", "overrides": ["objective.estimator=full"]},
        {"name": "sft_teacher_samples", "kind": "sft", "match": "vanilla"},
        {"name": "sft_init", "kind": "none"},
    ])
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


def test_swept_baseline_is_chosen_on_validation_problems_not_the_test_problems(tmp_path):
    grid = _grid(tmp_path, [
        {"name": "vanilla", "overrides": []},
        {"name": "sft_teacher_samples", "kind": "sft", "match": "vanilla", "sweep": {"optim.lr": [1e-2, 1e-4]}},
    ])
    out = tmp_path / "cmp"
    assert main([str(grid), f"out_dir={out}", "eval_n=4", "eval_k=2", "parallel=2"]) == 0
    sweep = out / "runs" / "sft_teacher_samples" / "sweep"
    choice = json.loads((sweep / "chosen.json").read_text())
    scores = choice["validation_avg@k"]
    assert set(scores) == {"0.01", "0.0001"}
    assert choice["value"] == max([1e-2, 1e-4], key=lambda v: (scores[str(v)], -[1e-2, 1e-4].index(v)))
    chosen = sweep / f"optim.lr={choice['value']}"
    other = sweep / f"optim.lr={1e-4 if choice['value'] == 1e-2 else 1e-2}"
    # seed 0 ran for both values (scored on validation), seed 1 only for the chosen one; the table uses the chosen
    assert (chosen / "seed0" / "validation.json").is_file() and (other / "seed0" / "validation.json").is_file()
    assert (chosen / "seed1" / "final").is_dir() and not (other / "seed1").exists()
    assert yaml.safe_load((chosen / "seed1" / "config.yaml").read_text())["optim"]["lr"] == choice["value"]
    rows = [r for r in csv.DictReader(open(out / "results.csv")) if r["method"] == "sft_teacher_samples"]
    assert {r["run_dir"] for r in rows} == {str(chosen / "seed0"), str(chosen / "seed1")}
    md = (out / "results.md").read_text()
    assert f"sft_teacher_samples (optim.lr={choice['value']})" in md and "validation avg@2" in md


def test_validation_problems_are_disjoint_from_the_test_problems():
    from opdkit.compare_sweep import TEST_SEED, validation_examples
    from opdkit.specs import resolve_task, task_examples

    task, _ = resolve_task("addition")
    val = validation_examples(task, 50)
    test = task_examples(task, "heldout", 50, seed=TEST_SEED)
    assert len(val) == 50 and not {e.prompt for e in val} & {e.prompt for e in test}
    assert all(e.meta["split"] == "heldout" for e in val)
    assert [e.prompt for e in validation_examples(task, 50)] == [e.prompt for e in val]


@pytest.mark.parametrize("sweep,msg", [({"optim.lr": [1e-3]}, "at least 2 distinct"),
                                       ({"optim.lr": [1e-3, 1e-4], "steps": [1, 2]}, "one knob"),
                                       ({"optim.lr": ["a/b", "c"]}, "directory names")])
def test_bad_sweep_is_one_line_exit_2(tmp_path, capsys, sweep, msg):
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump({"methods": [{"name": "a", "sweep": sweep}]}))
    assert main([str(bad), f"out_dir={tmp_path / 'o'}"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.strip()]
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "o").exists()


def test_runs_without_a_final_model_are_listed_with_the_error_their_log_ended_on(tmp_path):
    """A run the failure detector stopped (or any failed run) is not silently a 'nan' row: results.md names it and
    the error its log ended on; a run with no log says so."""
    from opdkit.compare import Method, missing_runs

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "sg_seed1.log").write_text(
        "[step 40] backoff: responses still run away\nopdkit: error: backoff: responses still run away after 3 "
        "learning-rate backoffs; stopping with a checkpoint\n")
    methods = [Method("sg"), Method("sft_init", kind="none")]
    lines = missing_runs(tmp_path, methods, 3, {"sg": {0: {}}})
    assert lines == ["- sg seed 1: backoff: responses still run away after 3 learning-rate backoffs; stopping with "
                     "a checkpoint (logs/sg_seed1.log)", "- sg seed 2: no error line in its log"]

