"""docs/own_task.md, executed: its bash blocks (sft teacher -> sft student -> OPD with a checker -> eval) run as
written on a small generated file, with tiny models appended as overrides; no command holds an unquoted shell
character (issue #15: `checker=marker:=>` unquoted became a redirect and a 0.0% score)."""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

import pytest

from opdkit.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "own_task.md"
SHELL_CHARS = {">", ">>", "<", "|", "||", "&", "&&", ";", "(", ")"}


def write_jsonl(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
            answer = "".join(sorted(digits))
            fh.write(json.dumps({"prompt": f"sort {digits}\n", "completion": f"{answer} => {answer}\n",
                                 "answer": answer}) + "\n")


def doc_commands(path: Path = DOC) -> list[list[str]]:
    """Every `opdkit ...` command of the page's bash blocks, split as bash splits it."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip().startswith("opdkit "):
                lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                out.append(list(lexer))
    return out


@pytest.mark.parametrize("doc", sorted((DOC.parent).glob("*.md")), ids=lambda p: p.name)
def test_doc_commands_hold_no_unquoted_shell_characters(doc):
    for argv in doc_commands(doc):
        bad = [t for t in argv if t in SHELL_CHARS]
        assert not bad, f"{doc.name}: {' '.join(argv)!r} holds {bad} that bash reads as a redirect or operator"


def test_own_task_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl("train.jsonl", 200, 0)
    write_jsonl("test.jsonl", 20, 1)
    cmds = doc_commands()
    assert [c[1] for c in cmds] == ["sft", "sft", "train", "eval"]
    tiny = ["model.hidden_size=32", "model.num_layers=1", "model.intermediate_size=64", "progress=false"]
    extra = {  # appended: later overrides win, so the documented commands run with tiny models and few steps
        0: [*tiny, "steps=20", "data.batch_size=16", "data.eval_prompts=5"],
        1: [*tiny, "steps=3", "data.batch_size=8", "data.eval_prompts=5"],
        2: ["steps=2", "rollout.prompts_per_step=4", "data.eval_prompts=8", "progress=false",
            "rollout.max_new_tokens=24"],
        3: ["max_new_tokens=24", "show=0", "progress=false"],
    }
    for i, argv in enumerate(cmds):
        assert argv[0] == "opdkit"
        assert main(argv[1:] + extra[i]) == 0, argv
    res = json.loads(Path("eval.json").read_text())
    assert res["n"] == 20 and res["k"] == 4 and 0.0 <= res["avg@k"] <= 1.0  # n=0: every row of test.jsonl
    recs = [json.loads(x) for x in Path("runs/opd/metrics.jsonl").read_text().splitlines()]
    assert "eval/truncated" in recs[0] and "eval/accuracy" in recs[-1]
    for run in ("runs/teacher", "runs/student", "runs/opd"):
        assert (Path(run) / "plots" / "loss.png").is_file() or (Path(run) / "plots" / "accuracy.png").is_file()
    err = capsys.readouterr().err
    assert "scores 0 on every" not in err  # data.checker=marker credits the reference completions
    # the documented extras: opdkit plot, and the rerun that config.yaml suggests
    assert main(["plot", "runs/opd"]) == 0
    header = Path("runs/opd/config.yaml").read_text().splitlines()[1]
    suggested = shlex.split(header.split("`")[1])
    assert suggested[:2] == ["opdkit", "train"] and suggested[-1] == "resume=true"
    assert main(suggested[1:] + ["steps=3", "progress=false"]) == 0  # continues the run to step 3
    # bad input on the way: a dataset without the answer field
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "sort 12\n"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "model=runs/opd/final", f"data={bad}"]) == 2
    assert main(["train", "model.student=runs/student/final", "model.teacher=runs/teacher/final",
                 f"data.prompts={bad}", f"run_dir={tmp_path}/never", "data.answer_field=solution"]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("opdkit")]
    assert len(err) == 2
    assert not (tmp_path / "never").exists()
