"""The calc tool task and its env: solutions, env spans, the calculator's answers, the reward, the SFT loss mask
over a reference transcript (environment outputs are context, not targets)."""

import pytest

from opdkit.tasks import Calc, build_char_tokenizer, get_task
from opdkit.tasks.env import Env, EnvStep, SingleTurnEnv


def test_reference_transcript_spans_and_split():
    t = get_task("calc")
    ex = t.make_example("347*86+512")
    assert ex.prompt == "Q: 347*86+512\nA: " and ex.answer == "30354"
    assert ex.completion == "[347*86]=29842\n[29842+512]=30354\n=> 30354\n"
    assert [ex.completion[a:b] for a, b in ex.meta["env_spans"]] == ["=29842\n", "=30354\n"]
    assert t.verify(ex.completion, ex) and len(ex.completion) <= t.max_completion_chars()
    held = {e.meta["problem"] for e in t.sample("heldout", 200, seed=0)}
    assert held and not held & {e.meta["problem"] for e in t.sample("train", 2000, seed=0)}
    assert set("".join(e.prompt + e.completion for e in t.sample("train", 200))) <= set(t.alphabet)


def test_tool_fraction_gives_direct_answers_deterministically():
    t = Calc(tool_fraction=0.3)
    exs = t.sample("train", 1000, seed=1)
    direct = [e for e in exs if not e.meta["uses_tool"]]
    assert 0.62 < len(direct) / len(exs) < 0.78
    assert all(e.completion == f"=> {e.answer}\n" and e.meta["env_spans"] == [] for e in direct)
    assert Calc(tool_fraction=0.0).sample("train", 50) == [
        e for e in Calc(tool_fraction=0.0).sample("train", 50)]
    assert all(e.meta["uses_tool"] for e in Calc(tool_fraction=1.0).sample("train", 50))
    for bad in ({"tool_fraction": 1.5}, {"digits_a": 0}, {"digits_b": 7}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Calc(**bad)
    with pytest.raises(ValueError, match="perturbed completions are not defined"):
        t.perturb(exs[0])


def test_env_answers_calls_and_rewards_the_final_answer():
    t = get_task("calc")
    ex = t.make_example("12*34+5")
    env = t.make_env(ex)
    assert isinstance(env, Env) and env.stop == ("]",)
    assert env.reset(None) is None
    assert env.step("[12*34]") == EnvStep("=408\n", False)
    assert env.step("[12 * 34]") == EnvStep("=?\n", False)  # malformed: said so, never guessed
    assert env.step("[408+5]") == EnvStep("=413\n", False)
    assert env.reward() == 0.0  # no final answer yet
    assert env.step("=> 413\n") == EnvStep(None, True)
    assert env.reward() == 1.0 and env.calls == 3
    env.reset(None)
    env.step("=> 412\n")
    assert env.reward() == 0.0
    with pytest.raises(ValueError, match="needs a non-empty observation"):
        EnvStep("", done=False)


def test_single_turn_env_scores_its_one_turn():
    ex = get_task("addition").make_example("12+34")
    env = SingleTurnEnv(lambda text: get_task("addition").score(text, ex))
    assert env.step("4+2+0=6 6\n1+3+0=4 46\n=> 46\n") == EnvStep(None, True) and env.reward() == 1.0


def test_sft_masks_the_environment_outputs():
    from opdkit.train.sft_data import StepData

    t = get_task("calc")
    tok = build_char_tokenizer([t.alphabet])
    data = StepData(tokenizer=tok, batch_size=4, seed=0, task=t)
    seqs, _ = data.batch(0)
    exs, prompts = data.step_examples(0)
    for s, ex, p in zip(seqs, exs, prompts):
        comp = s.ids[len(p):-1]
        targets = "".join(tok.decode([i]) for i, m in zip(comp, s.mask[len(p):-1]) if m)
        context = "".join(tok.decode([i]) for i, m in zip(comp, s.mask[len(p):-1]) if not m)
        assert context == "".join(ex.completion[a:b] for a, b in ex.meta["env_spans"])
        assert targets == "[{a}*{b}][{p}+{c}]=> {r}\n".format(p=ex.meta["a"] * ex.meta["b"], r=ex.answer, **ex.meta)
        assert s.mask[-1] == 1  # EOS is a target


def test_sft_on_teacher_episodes_masks_the_environment_outputs():
    from opdkit.models import tiny_llama
    from opdkit.train.sft_data import StepData

    t = get_task("calc")
    tok = build_char_tokenizer([t.alphabet])
    teacher = tiny_llama(len(tok), seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    data = StepData(tokenizer=tok, batch_size=8, seed=0, task=t, teacher=teacher, max_new_tokens=40)
    seqs, info = data.batch(0)
    exs, prompts = data.step_examples(0)
    n_env = 0
    for s, ex, p in zip(seqs, exs, prompts):
        env, runs = t.make_env(ex), []  # (is_target, text) runs of the response
        for i, m in zip(s.ids[len(p):], s.mask[len(p):]):
            if runs and runs[-1][0] == m:
                runs[-1][1] += tok.decode([i])
            else:
                runs.append([m, tok.decode([i])])
        for k, (m, text) in enumerate(runs):
            if not m:  # every non-target run is exactly the calculator's answer to the policy turn before it
                assert k > 0 and env.step(runs[k - 1][1]).observation == text
                n_env += 1
    assert n_env > 0 and info["teacher_tokens"] == sum(len(s.ids) - len(p) for s, p in zip(seqs, prompts))


def test_shipped_calc_teacher_uses_the_tool_and_the_student_does_not():
    """embedded:calc_teacher / embedded:calc_student (scripts/make_tool_task.py --ship): greedy episodes through the
    calculator on held-out problems (docs/agents.md measured 100% / 0% on 200)."""
    import torch

    from opdkit.eval.run import evaluate, load_eval_model
    from opdkit.specs import resolve_model_spec, resolve_task, task_examples

    torch.set_num_threads(1)
    task, _ = resolve_task("calc")
    examples = task_examples(task, "heldout", 24, seed=7)
    acc = {}
    for name in ("calc_teacher", "calc_student"):
        model, tok = load_eval_model(resolve_model_spec(f"embedded:{name}"))
        acc[name] = evaluate(model, tok, examples, task, k=1, temperature=0.0, max_new_tokens=48, seed=0,
                             keep_records=False)["avg@k"]
    assert acc["calc_teacher"] >= 0.9 and acc["calc_student"] <= 0.2, acc
