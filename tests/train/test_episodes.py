"""`opdkit train` on a multi-turn tool task (task:calc): episodes through the trainer, the single-turn special case
bit for bit, and bad input (an env that raises, an observation over the budget, knobs a tool task refuses)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opdkit.checkpoint import save_model_dir
from opdkit.config import load_config
from opdkit.errors import UserError
from opdkit.models import tiny_llama
from opdkit.tasks import Calc, build_char_tokenizer
from opdkit.tasks.env import EnvStep, SingleTurnEnv
from opdkit.train import loop, setup
from opdkit.train.config import TrainConfig
from tests.train.tiny_run import base_overrides, make_pair


@pytest.fixture(scope="module")
def calc_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("calc_pair")
    tok = build_char_tokenizer([Calc.alphabet])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return {name: str(save_model_dir(tiny_llama(len(tok), seed=seed, **ids), tok, root / name))
            for name, seed in (("student", 0), ("teacher", 1))}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def calc_overrides(p, run_dir, *extra, steps=2):
    return [f"model.student={p['student']}", f"model.teacher={p['teacher']}", "data.prompts=task:calc",
            "data.eval_prompts=4", "rollout.prompts_per_step=3", "rollout.n_samples=2", "rollout.max_new_tokens=40",
            "optim.micro_batch_size=4", f"steps={steps}", f"run_dir={run_dir}", "progress=false", "save_every=0",
            "model.teacher_dtype=float32", *extra]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Chatty:
    """Answers any digit with an observation longer than the whole episode budget."""

    name = "chatty"
    stop = tuple("0123456789")

    def reset(self, record):
        return None

    def step(self, text):
        return EnvStep("=" * 200, done=False)

    def reward(self):
        return 0.0


class Broken(Chatty):
    name = "broken"

    def step(self, text):
        raise RuntimeError("tool crashed")


def test_train_on_calc_runs_episodes(calc_pair, tmp_path):
    s = loop.train(load_config(TrainConfig, None, calc_overrides(calc_pair, tmp_path / "run",
                                                                 "objective.estimator=sampled", "objective.gamma=1")))
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 2 and all(r["rollout/turns_mean"] >= 1 and r["teacher_tokens"] > 0 for r in rows)
    assert all(abs(r["loss"]) < 1e6 and r["grad_norm"] > 0 for r in rows)
    assert "eval/accuracy" in s["final"]


def test_observation_over_budget_is_counted_in_training(calc_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(Calc, "make_env", lambda self, ex: Chatty())
    loop.train(load_config(TrainConfig, None, calc_overrides(calc_pair, tmp_path / "run", steps=1)))
    (row,) = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert row["rollout/env_overflow"] > 0 and row["finished_frac"] < 1.0 and row["rollout/env_token_frac"] == 0.0


def test_env_that_raises_stops_the_cli_with_one_line(calc_pair, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Calc, "make_env", lambda self, ex: Broken())
    rc = loop.main(calc_overrides(calc_pair, tmp_path / "run", steps=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "env 'broken' raised in step on row" in err[0] and "RuntimeError: tool crashed" in err[0]
    assert "(prompt 'Q: " in err[0]


def test_knobs_a_tool_task_refuses(calc_pair, pair, tmp_path):
    with pytest.raises(UserError, match="rollout.max_turns=3 applies to multi-turn tasks"):
        loop.train(load_config(TrainConfig, None, base_overrides(pair, tmp_path / "a", 1) + ["rollout.max_turns=3"]))
    with pytest.raises(UserError, match="gkd_lambda < 1 .* not supported on a multi-turn task"):
        loop.train(load_config(TrainConfig, None, calc_overrides(calc_pair, tmp_path / "b", "rollout.gkd_lambda=0.5")))
    with pytest.raises(UserError, match="rollout.max_turns=0 must be an integer >= 1"):
        load_config(TrainConfig, None, calc_overrides(calc_pair, tmp_path / "c", "rollout.max_turns=0"))
    # a student whose tokenizer lacks the tool call's stop token (the addition pair on task:calc)
    with pytest.raises(UserError, match="stop string '\\]' is not in the policy's vocabulary"):
        loop.train(load_config(TrainConfig, None, calc_overrides(pair, tmp_path / "d")))
    assert not any((tmp_path / d).exists() for d in "abd")


@pytest.mark.parametrize("objective", [["objective.estimator=full"],
                                       ["objective.estimator=sampled", "objective.gamma=0.9"]])
def test_single_turn_through_the_episode_path_is_bit_identical(pair, tmp_path, monkeypatch, objective):
    """A single-turn task run as one-turn episodes (a SingleTurnEnv per row) gives the same losses, metrics and
    weights as the plain single-turn run, bit for bit."""
    extra = [*objective, "rollout.seed_per_prompt=true"]
    plain = tmp_path / "plain"
    loop.train(load_config(TrainConfig, None, base_overrides(pair, plain, 3) + extra))
    real = setup.prompt_source

    def as_episodes(dcfg, seed):
        src = real(dcfg, seed)
        src.env_for = lambda r: SingleTurnEnv(lambda text, r=r: src.score(text, r))
        src.max_turns = 2
        return src

    monkeypatch.setattr(setup, "prompt_source", as_episodes)
    episodic = tmp_path / "episodic"
    loop.train(load_config(TrainConfig, None, base_overrides(pair, episodic, 3) + extra))
    skip = ("time/", "tokens_per_s/", "rollout/", "train_seconds")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]  # noqa: E731
    a, b = strip(metrics(plain)), strip(metrics(episodic))
    assert len(a) == 4 and a == b
    wa, wb = load_file(str(plain / "final" / "model.safetensors")), load_file(str(episodic / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(r["rollout/turns_mean"] == 1 for r in metrics(episodic) if "loss" in r)


def test_compare_grid_on_the_tool_task(calc_pair, tmp_path, monkeypatch):
    """`opdkit compare` on task:calc: OPD runs, the SFT-on-teacher-episodes baseline at equal teacher tokens, and
    the evaluation rolled out through the calculator (episode rewards), end to end."""
    import csv

    import yaml

    from opdkit.compare import main as compare_main

    base = [o for o in calc_overrides(calc_pair, tmp_path / "unused") if not o.startswith(("run_dir=", "progress="))]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "seeds": 1, "methods": [
        {"name": "full_rkl", "overrides": ["objective.estimator=full"]},
        {"name": "sft_teacher_episodes", "kind": "sft", "match": "full_rkl"},
        {"name": "sft_init", "kind": "none"},
    ]}))
    from opdkit.rollout import multiturn

    calls, real = [], multiturn.MultiTurnRollout.sample
    monkeypatch.setattr(multiturn.MultiTurnRollout, "sample", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    out = tmp_path / "cmp"
    assert compare_main([str(grid), f"out_dir={out}", "eval_n=3", "eval_k=2", "parallel=1"]) == 0
    assert len(calls) == 3  # compare's own evaluations (in this process) rolled out episodes: one per model
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert set(rows) == {"full_rkl", "sft_teacher_episodes", "sft_init"}
    opd = [r for r in metrics(out / "runs" / "full_rkl" / "seed0") if "teacher_tokens" in r]
    assert opd and "rollout/turns_mean" in opd[-1]  # the OPD run sampled episodes
    sft_log = (out / "logs" / "sft_teacher_episodes_seed0.log").read_text()
    assert "data.task=calc" in sft_log and float(rows["sft_teacher_episodes"]["teacher_tokens"]) > 0
