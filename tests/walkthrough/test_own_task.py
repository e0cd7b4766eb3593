"""docs/own_task.md, executed: a user's task from JSONL -> sft teacher -> sft student -> OPD with a checker -> eval."""

from __future__ import annotations

import json
import random

from opdkit.cli import main


def write_jsonl(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
            answer = "".join(sorted(digits))
            fh.write(json.dumps({"prompt": f"sort {digits}\n", "completion": f"{answer} => {answer}\n",
                                 "answer": answer}) + "\n")


def test_own_task_end_to_end(tmp_path, capsys):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    write_jsonl(train, 200, 0)
    write_jsonl(test, 20, 1)
    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64", "progress=false"]
    # 1. a teacher from scratch (char tokenizer built from the data)
    assert main(["sft", f"run_dir={tmp_path}/teacher", f"data.jsonl={train}", "model.tokenizer=char", "steps=20",
                 "data.batch_size=16", "data.eval_prompts=0", *tiny]) == 0
    # 2. a weaker student sharing the teacher's tokenizer
    assert main(["sft", f"run_dir={tmp_path}/student", f"data.jsonl={train}",
                 f"model.tokenizer={tmp_path}/teacher/final", "steps=3", "data.batch_size=8",
                 "data.eval_prompts=0", *tiny]) == 0
    # 3. OPD with the user's answer checker (text after the last '=>')
    assert main(["train", f"model.student={tmp_path}/student/final", f"model.teacher={tmp_path}/teacher/final",
                 f"data.prompts={train}", "data.checker=marker:=>", "data.eval_prompts=8", "steps=2",
                 "rollout.prompts_per_step=4", "rollout.max_new_tokens=16", f"run_dir={tmp_path}/opd",
                 "progress=false"]) == 0
    # 4. evaluate the distilled student
    out = tmp_path / "eval.json"
    assert main(["eval", f"model={tmp_path}/opd/final", f"data={test}", "checker=marker:=>", "max_new_tokens=16",
                 f"out={out}"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 20 and 0.0 <= res["avg@k"] <= 1.0
    # bad input on the way: a dataset without the answer field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "sort 12\n"}) + "\n")
    capsys.readouterr()
    assert main(["eval", f"model={tmp_path}/opd/final", f"data={bad}"]) == 2
    assert main(["train", f"model.student={tmp_path}/student/final", f"model.teacher={tmp_path}/teacher/final",
                 f"data.prompts={bad}", f"run_dir={tmp_path}/never", "data.answer_field=solution"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("opdkit")]
    assert len(err) == 2
    assert not (tmp_path / "never").exists()
