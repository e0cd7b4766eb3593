"""The embedded teacher/student (opdkit/assets/embedded, built by scripts/make_embedded.py): size and consistency."""

from __future__ import annotations

import json

import pytest

from opdkit.eval.run import EMBEDDED_DIR, evaluate, load_eval_model, resolve_model_spec, resolve_task, task_examples

pytestmark = pytest.mark.skipif(not (EMBEDDED_DIR / "task.json").is_file(), reason="embedded assets not built")


def test_size_at_most_20_mb():
    weights = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*.safetensors"))
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert weights <= 20 * 2**20 and total <= 21 * 2**20


def test_task_json_is_consistent():
    info = json.loads((EMBEDDED_DIR / "task.json").read_text())
    for key in ("task", "task_args", "max_new_tokens", "teacher_heldout_acc", "student_heldout_acc"):
        assert key in info
    task, max_new = resolve_task("embedded")
    assert task.name == info["task"] and max_new == info["max_new_tokens"]
    assert 0.9 <= info["teacher_heldout_acc"] <= 1.0
    assert 0.2 <= info["student_heldout_acc"] <= 0.5 < info["teacher_heldout_acc"]
    longest = max(len(ex.completion) for ex in task.sample("train", 2000, seed=0))
    assert max_new >= longest + 1  # char tokenizer: one token per character, plus EOS


def test_models_share_the_tokenizer_and_teacher_solves_problems():
    from opdkit.models import check_compatible

    teacher, t_tok = load_eval_model("embedded:teacher")
    student, s_tok = load_eval_model("embedded:student")
    check_compatible(s_tok, t_tok, student, teacher)
    assert resolve_model_spec("embedded:student") == str(EMBEDDED_DIR / "student")
    task, max_new = resolve_task("embedded")
    res = evaluate(teacher, t_tok, task_examples(task, "heldout", 8), task, max_new_tokens=max_new)
    assert res["accuracy"] >= 0.6
