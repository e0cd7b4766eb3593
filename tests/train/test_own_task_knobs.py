"""Issue #15 (own-task walkthrough stumbles) for `opdkit train`: max_seconds, data.eval_jsonl, the max_new_tokens
notice and eval/truncated, the checker that scores no reference completion (tiny models, CPU, seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opdkit.cli import main
from opdkit.config import load_config
from opdkit.errors import UserError
from opdkit.tasks import Addition
from opdkit.train import loop, setup
from opdkit.train.config import TrainConfig
from tests.train.tiny_run import base_overrides, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def write_jsonl(path: Path, n: int, seed: int) -> list[dict]:
    rows = [{"prompt": ex.prompt, "completion": ex.completion, "answer": ex.answer}
            for ex in Addition().sample("train", n=n, seed=seed)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_max_seconds_stops_with_final_eval_and_a_resumable_checkpoint(pair, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(TrainConfig, None, base_overrides(pair, run, steps=50) + ["max_seconds=1e-6"])
    summary = loop.train(cfg)
    assert summary["stopped"].startswith("max_seconds=1e-06 reached after step 1")
    assert "max_seconds=1e-06 reached" in capsys.readouterr().err  # progress=false: notices go to stderr
    recs = _metrics(run)
    assert [r["step"] for r in recs] == [0, 1]
    assert "eval/accuracy" in recs[-1] and recs[-1]["train_seconds"] > 0  # the final eval is in the last record
    assert summary["final"]["eval/accuracy"] == recs[-1]["eval/accuracy"]
    assert (run / "checkpoints" / "step_000001").is_dir() and (run / "final" / "model.safetensors").is_file()
    assert (run / "plots" / "accuracy.png").is_file()
    # resumable: the same run (max_seconds may change), continued to its steps
    cfg = load_config(TrainConfig, None, base_overrides(pair, run, steps=3) + ["resume=true"])
    summary = loop.train(cfg)
    assert "stopped" not in summary and [r["step"] for r in _metrics(run)] == [0, 1, 2, 3]
    with pytest.raises(Exception, match="max_seconds"):
        load_config(TrainConfig, None, ["max_seconds=-1"])


def test_eval_jsonl_is_the_held_out_set_and_all_of_data_prompts_trains(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    rows = write_jsonl(train, 60, 0)
    test_rows = write_jsonl(test, 7, 1)
    cfg = load_config(TrainConfig, None, [f"data.prompts={train}", f"data.eval_jsonl={test}"])
    src = setup.prompt_source(cfg.data, 0)
    assert [r.prompt_text for r in src.eval_records] == [r["prompt"] for r in test_rows]
    assert len(src.train_records) == len(rows)  # no hash split
    cfg = load_config(TrainConfig, None, [f"data.prompts={train}", f"data.eval_jsonl={test}", "data.eval_prompts=3"])
    assert len(setup.prompt_source(cfg.data, 0).eval_records) == 3
    held = setup.prompt_source(load_config(TrainConfig, None, [f"data.prompts={train}"]).data, 0)
    assert len(held.train_records) < len(rows)  # without it: the hash split of data.prompts


def test_eval_jsonl_run_truncation_metrics_and_notices(pair, tmp_path, capsys):
    """A run evaluating on a separate file; completions longer than rollout.max_new_tokens are announced and the
    cut responses counted (eval/truncated, finished_frac)."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, 40, 0)
    write_jsonl(test, 5, 1)
    run = tmp_path / "run"
    args = ["train", *base_overrides(pair, run, steps=2), f"data.prompts={train}", f"data.eval_jsonl={test}",
            "data.checker=marker", "rollout.max_new_tokens=3"]
    assert main(args) == 0
    out = capsys.readouterr().err  # progress=false: notices go to stderr
    note = [line for line in out.splitlines() if "longest reference completion" in line]
    assert len(note) == 1 and "rollout.max_new_tokens=3" in note[0] and "fix: rollout.max_new_tokens=" in note[0]
    longest = max(len(json.loads(x)["completion"]) for x in train.read_text().splitlines()) + 1  # char tokenizer
    assert note[0].rstrip().endswith(f"rollout.max_new_tokens={longest}")
    recs = _metrics(run)
    assert recs[0]["eval/truncated"] == 1.0 and recs[-1]["eval/truncated"] == 1.0  # 3 tokens: every answer cut
    assert all(0.0 <= r["finished_frac"] < 1.0 for r in recs[1:])  # rollouts cut at 3 tokens, counted
    assert "scores 0 on every" not in out  # marker (= marker:=>) gives the references credit


def test_checker_that_scores_no_reference_is_reported_before_any_compute(pair, tmp_path, capsys):
    """What bash left of an unquoted `data.checker=marker:=>`: `marker:=`, which scores every reference 0."""
    train = tmp_path / "train.jsonl"
    write_jsonl(train, 40, 0)
    cfg = load_config(TrainConfig, None, base_overrides(pair, tmp_path / "r") + [f"data.prompts={train}",
                                                                                  "data.checker=marker:="])
    src = setup.prompt_source(cfg.data, 0)
    _, tok = setup.load_student(cfg.model, 0)
    notes = setup.check_prompts(cfg, src, tok, 0)
    warn = [n for n in notes if "scores 0 on every one of the" in n]
    assert len(warn) == 1 and warn[0].startswith("opdkit: warning: data.checker=marker:= ")
    assert "quote the argument" in warn[0]
    cfg = load_config(TrainConfig, None, base_overrides(pair, tmp_path / "r") + [f"data.prompts={train}"])
    assert not [n for n in setup.check_prompts(cfg, setup.prompt_source(cfg.data, 0), tok, 0) if "scores 0" in n]


@pytest.mark.parametrize("extra,pattern", [
    (["data.eval_jsonl={test}"], "data.eval_jsonl is for datasets"),  # with data.prompts=task:addition
    (["data.prompts={train}", "data.eval_jsonl={tmp}/missing.jsonl"], "data.eval_jsonl: .*missing.jsonl"),
    (["data.prompts={train}", "data.eval_jsonl={test}", "data.answer_field=solution"], "missing field 'solution'"),
    (["max_seconds=abc"], "max_seconds"),
    (["data.jsonl={train}", "data.prompts={train}"], None),  # the alias and its knob: the later one wins
])
def test_bad_input_one_line_exit_2_nothing_written(pair, tmp_path, capsys, extra, pattern):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, 30, 0)
    write_jsonl(test, 3, 1)
    run = tmp_path / "never"
    extra = [e.format(train=train, test=test, tmp=tmp_path) for e in extra]
    if pattern is None:  # not bad: an override alias replaces the earlier value
        assert load_config(TrainConfig, None, extra).data.prompts == str(train)
        return
    capsys.readouterr()
    assert main(["train", *base_overrides(pair, run), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("opdkit: error:")
    assert re.search(pattern, err[0]), err[0]
    assert not run.exists()



def test_held_out_evals_are_left_out_of_the_progress_eta(pair, tmp_path, capsys, monkeypatch):
    """Issue #15: the first progress line folded an evaluation into s/step (`29.6 s/step | eta 5h34m`)."""
    import time

    real = loop.evaluate_greedy

    def slow_eval(*a, **kw):
        time.sleep(2.0)
        return real(*a, **kw)

    monkeypatch.setattr(loop, "evaluate_greedy", slow_eval)
    over = [o for o in base_overrides(pair, tmp_path / "run", steps=3) if o != "progress=false"]
    capsys.readouterr()
    loop.train(load_config(TrainConfig, None, over + ["eval_every=1", "progress=true"]))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("opd step")]
    rates = [float(re.search(r"\| ([0-9.e+-]+) s/step", x).group(1)) for x in lines]
    assert len(rates) == 3 and max(rates) < 1.5, lines  # 4 evals x 2 s would make every rate > 2 s/step


def test_length_runaway_backs_off_the_lr_then_stops_with_a_checkpoint(pair, tmp_path, capsys, monkeypatch):
    """Issue #15: the detector backs off a run whose responses run away (lr x backoff_factor when length_runaway
    fires, again every diagnostics.length_window steps while it goes on; after max_backoffs the next one stops the
    run, exit code 3, with a checkpoint). The detector is made to see a runaway at every step: this tests the
    loop's response, tests/diagnostics/test_detector.py the detection."""
    from opdkit.diagnostics.detector import FailureDetector

    monkeypatch.setattr(FailureDetector, "_length_runaway", lambda self, m: (True, "forced runaway", 1.0))
    fire = ["diagnostics.length_window=3", "optim.schedule=constant",
            "optim.warmup_steps=0"]
    run = tmp_path / "run"
    cfg = load_config(TrainConfig, None, base_overrides(pair, run, steps=9) + fire + ["diagnostics.max_backoffs=9"])
    loop.train(cfg)
    recs = _metrics(run)
    backoffs = {r["step"]: r["lr_backoffs"] for r in recs if "lr_backoffs" in r}
    first = min(backoffs)
    assert backoffs == {first: 1, first + 3: 2, first + 6: 3}  # then every length_window steps it goes on
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    for s in range(1, 10):  # the lr logged at step s is halved by each backoff of an earlier step
        assert lrs[s] == pytest.approx(1e-3 * 0.5 ** sum(b < s for b in backoffs)), (s, lrs)
    assert "backoff: learning rate x0.5 (backoff 1 of 9" in capsys.readouterr().err
    # max_backoffs=1: the second backoff stops the run with a checkpoint, exit code 3, and says what to change
    run2 = tmp_path / "run2"
    assert loop.main(base_overrides(pair, run2, steps=9) + fire + ["diagnostics.max_backoffs=1"]) == 3
    err = capsys.readouterr().err
    assert "still run away after 1 learning-rate backoffs" in err and "lower optim.lr" in err
    stopped = max(r["step"] for r in _metrics(run2))
    assert stopped == first + 3 and (run2 / "checkpoints" / f"step_{stopped:06d}").is_dir()
    # off: backoff_factor=1 only warns
    run3 = tmp_path / "run3"
    loop.train(load_config(TrainConfig, None, base_overrides(pair, run3, steps=4) + fire
                           + ["diagnostics.backoff_factor=1"]))
    assert all("lr_backoffs" not in r for r in _metrics(run3))
    assert {r["lr"] for r in _metrics(run3) if "lr" in r} == {1e-3}
    with pytest.raises(UserError, match="backoff_factor"):
        load_config(TrainConfig, None, base_overrides(pair, run3) + ["diagnostics.backoff_factor=0"])
