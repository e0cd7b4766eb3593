"""Built-in synthetic tasks: determinism, split disjointness, verification, perturbed-prefix completions."""

import random

import pytest

from opdkit.tasks import Addition, ArithChain, Example, extract_answer, get_task, split_of
from opdkit.tasks.arith_chain import _parse, _render, _value

TASKS = [Addition(), Addition(digits=5, min_digits=3), ArithChain(), ArithChain(ops=5, min_ops=1, max_value=999)]
IDS = ["addition", "addition5", "arith_chain", "arith_chain5"]


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_determinism_per_seed(task):
    a = task.sample("train", 50, seed=7)
    assert a == task.sample("train", 50, seed=7)
    assert [e.meta["problem"] for e in a] != [e.meta["problem"] for e in task.sample("train", 50, seed=8)]
    assert task.sample("heldout", 20, seed=3) == task.sample("heldout", 20, seed=3)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_splits_never_overlap(task):
    train = {e.meta["problem"] for s in (0, 1) for e in task.sample("train", 2000, seed=s)}
    held = {e.meta["problem"] for s in (0, 1) for e in task.sample("heldout", 1000, seed=s)}
    assert train and held and not train & held
    assert all(split_of(p, task.name) == "train" for p in train)
    assert all(split_of(p, task.name) == "heldout" for p in held)


def test_split_is_about_a_tenth_and_independent_of_difficulty():
    problems = [f"{a}+{b}" for a in range(100) for b in range(100)]
    frac = sum(split_of(p, "addition") == "heldout" for p in problems) / len(problems)
    assert 0.08 < frac < 0.12
    ex = Addition(digits=2).make_example("12+34")
    assert ex.meta["split"] == Addition(digits=6).make_example("12+34").meta["split"] == split_of("12+34", "addition")


def test_unique_sampling_and_exhaustion():
    ex = Addition(digits=1).sample("heldout", 5, seed=0, unique=True)
    assert len({e.meta["problem"] for e in ex}) == 5
    tiny = Addition(digits=1)
    tiny.max_tries = 2000
    with pytest.raises(ValueError, match="too small"):
        tiny.sample("heldout", 101, seed=0, unique=True)  # only 100 one-digit problems in all


def test_bad_split_and_args():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        Addition().sample("test", 1)
    with pytest.raises(ValueError, match="min_digits"):
        Addition(digits=2, min_digits=3)
    with pytest.raises(ValueError, match="known tasks are addition, arith_chain"):
        get_task("foo")
    with pytest.raises(TypeError, match="digits, min_digits"):
        get_task("addition", ops=3)
    assert isinstance(get_task("arith_chain", ops=2), ArithChain)


def test_addition_format():
    ex = Addition().make_example("357+468")
    assert ex.prompt == "Q: 357+468\nA: "
    assert ex.completion == "7+8+0=15 5\n5+6+1=12 25\n3+4+1=8 825\n=> 825\n"
    assert ex.answer == "825"
    assert Addition().make_example("999+1").completion.endswith("0+0+1=1 1000\n=> 1000\n")
    for bad in ("12+", "1+2+3", "012+3", "a+b", "12-3"):
        with pytest.raises(ValueError):
            Addition().make_example(bad)


def test_arith_chain_format():
    ex = ArithChain().make_example("(3+4)*5-6")
    assert ex.prompt == "Q: (3+4)*5-6\nA: "
    assert ex.completion == "7*5-6\n35-6\n29\n=> 29\n"
    assert ArithChain().make_example("3+4*5").completion == "3+20\n23\n=> 23\n"
    assert ArithChain().make_example("7-(5-1)").completion == "7-4\n3\n=> 3\n"
    for bad in ("3", "3+", "(3+4", "3/4", "1-5"):
        with pytest.raises(ValueError):
            ArithChain().make_example(bad)


def test_arith_chain_render_parse_roundtrip_and_values():
    task = ArithChain(ops=6, min_ops=1, max_value=999)
    for ex in task.sample("train", 500, seed=4):
        tree = _parse(ex.meta["problem"])
        assert _render(tree) == ex.meta["problem"]
        assert str(_value(tree)) == ex.answer == str(eval(ex.meta["problem"]))
        steps = ex.completion.splitlines()[:-1]
        assert len(steps) == ex.meta["ops"]
        for line in steps:  # every step line is a valid expression with a non-negative value <= max_value
            assert 0 <= eval(line) <= 999 and eval(line) == int(ex.answer)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_verify(task):
    for ex in task.sample("train", 200, seed=1):
        assert ex.completion.endswith("\n") and ex.prompt.endswith("A: ")
        assert set(ex.prompt + ex.completion) <= set(task.alphabet)
        assert len(ex.completion) <= task.max_completion_chars()
        assert task.verify(ex.completion, ex)
        wrong = str(int(ex.answer) + 1)
        assert not task.verify(ex.completion.replace(f"=> {ex.answer}", f"=> {wrong}"), ex)
        assert task.verify(f"junk => 1\n=> {ex.answer}  \nmore junk", ex)  # last marker, stripped, to end of line
    ex = task.sample("train", 1)[0]
    for garbage in ("", "=>", "=> ", "no marker", "\x00\xff=>=>", None, 123, b"=> 1", ["=> 1"], "=>\n" + ex.answer):
        assert task.verify(garbage, ex) is False


def test_extract_answer():
    assert extract_answer("a => 12 \n=> 34\nx") == "34"
    assert extract_answer("#### 72", "####") == "72"
    assert extract_answer("nothing") is None and extract_answer(None) is None and extract_answer("x", "") is None


@pytest.mark.parametrize("task", TASKS, ids=IDS)
@pytest.mark.parametrize("recovery", ["resume", "redo"])
def test_perturbed_completions(task, recovery):
    rng = random.Random(0)
    kinds = set()
    for ex in task.sample("train", 300, seed=2):
        p = task.perturb(ex, rng, recovery=recovery)
        kinds.add(p.kind)
        clean = ex.completion.splitlines(keepends=True)
        lines = p.completion.splitlines(keepends=True)
        assert p.completion != ex.completion and p.completion.endswith("\n")
        assert task.verify(p.completion, ex)  # recovers to the correct final answer
        assert set(p.completion) <= set(task.alphabet)
        assert len(p.completion) <= task.max_completion_chars()
        # the error span is exactly one (wrong) line placed at the chosen step
        assert p.completion[: p.error_start] == "".join(clean[: p.step])
        bad = p.completion[p.error_start : p.error_end]
        assert bad.endswith("\n") and bad.count("\n") == 1 and bad != clean[p.step]
        rest = clean[p.step + 1 :] if recovery == "resume" else clean[p.step :]
        assert p.completion[p.error_end :] == "".join(rest)
        assert len(lines) == len(clean) + (recovery == "redo")
    assert len(kinds) >= 2


def test_perturbed_completion_is_seeded_and_errors_are_wrong():
    task = Addition(digits=4)
    ex = task.make_example("4567+5678")
    assert task.perturbed_completion(ex, 3) == task.perturbed_completion(ex, random.Random(3))
    rng = random.Random(1)
    clean = ex.completion.splitlines()
    for _ in range(200):
        p = task.perturb(ex, rng)
        bad = p.completion[p.error_start : p.error_end - 1]
        lhs, rhs = bad.split("=")
        x, y, c = map(int, lhs.split("+"))
        s, partial = rhs.split()
        # the line is consistent with its own mistake except for a wrong sum; its partial uses its own digit
        assert (x + y + c == int(s)) == (p.kind != "sum")
        assert partial == s[-1] + clean[p.step].split()[1][1:]
        assert bad != clean[p.step]
    ac = ArithChain()
    ex = ac.make_example("3+4*5")
    seen = {ac.perturb(ex, random.Random(i)).completion for i in range(60)}
    assert "7*5\n23\n=> 23\n" in seen  # a precedence mistake, then recovery
    ex = ac.make_example("9*3-2*(7+5)")
    for i in range(100):  # reducing (7+5) first is a valid order, not a mistake: every error changes the value
        p = ac.perturb(ex, random.Random(i))
        assert eval(p.completion[p.error_start : p.error_end]) != 3


def test_perturb_rejects_bad_input():
    task = Addition()
    with pytest.raises(ValueError, match="recovery"):
        task.perturb(task.make_example("1+2"), 0, recovery="nope")
    with pytest.raises(ValueError, match="meta"):
        task.perturb(Example("Q: 1+2\nA: ", "3", None, {}), 0)
