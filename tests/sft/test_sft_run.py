"""opdkit sft: a tiny run trains and writes a loadable HF dir; exact resume; teacher samples; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdkit.metrics_log import read_metrics
from opdkit.train.sft import SFTConfig, main, run_sft
from opdkit.config import load_config

TINY = ["model.hidden_size=16", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=32",
        "model.max_position_embeddings=128", "data.task=addition", "data.task_args={digits: 2}", "data.batch_size=8",
        "data.eval_prompts=4", "progress=false", "optim.lr=0.01"]


def cfg(tmp: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [*TINY, f"run_dir={tmp}", *extra])


def test_tiny_run_learns_and_writes_hf_dir(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = run_sft(cfg(tmp_path / "run", "steps=25", "data.perturbed_fraction=0.5"))
    recs = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(recs) == 25 and res["steps"] == 25
    first = sum(r["loss"] for r in recs[:3]) / 3
    last = sum(r["loss"] for r in recs[-3:]) / 3
    assert last < 0.8 * first
    assert any(r["perturbed"] > 0 for r in recs)
    assert "eval/accuracy" in res["eval"] and 0.0 <= res["eval"]["eval/accuracy"] <= 1.0
    final = Path(res["final_dir"])
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tok) and tok.decode(tok("Q: 1+2")["input_ids"]) == "Q: 1+2"
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_sft(cfg(a, "steps=6", "save_every=3", "optim.warmup_steps=2"))
    run_sft(cfg(b, "steps=3", "optim.warmup_steps=2"))
    res = run_sft(cfg(b, "steps=6", "optim.warmup_steps=2", "resume=true"))
    assert res["steps"] == 6
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [r["loss"] for r in read_metrics(a) if "loss" in r]
    lb = [r["loss"] for r in read_metrics(b) if "loss" in r]
    assert la == lb and len(la) == 6


def test_samples_from_teacher_counts_teacher_tokens(tmp_path):
    teacher = run_sft(cfg(tmp_path / "t", "steps=2"))["final_dir"]
    res = run_sft(cfg(tmp_path / "s", "steps=2", f"data.samples_from={teacher}", "data.max_new_tokens=12",
                      "data.eval_prompts=0"))
    recs = [r for r in read_metrics(tmp_path / "s") if "loss" in r]
    assert 0 < recs[0]["teacher_tokens"] < recs[1]["teacher_tokens"] == res["teacher_tokens"] <= 2 * 8 * 12
    # max_teacher_tokens stops at the first step that reaches the budget (equal teacher compute in `opdkit compare`)
    budget = recs[0]["teacher_tokens"] + 1
    capped = run_sft(cfg(tmp_path / "c", "steps=50", f"data.samples_from={teacher}", "data.max_new_tokens=12",
                         "data.eval_prompts=0", f"max_teacher_tokens={budget}"))
    assert capped["steps"] == 2 and capped["teacher_tokens"] == res["teacher_tokens"] >= budget


def test_jsonl_data(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA: ", "completion": f"=> {i + 1}\n"}) + "\n"
                         for i in range(5)))
    res = run_sft(load_config(SFTConfig, None, [*TINY[:5], "data.batch_size=4", "progress=false", "steps=3",
                                                f"data.jsonl={f}", f"run_dir={tmp_path / 'r'}"]))
    assert res["steps"] == 3 and res["eval"] == {}


@pytest.mark.parametrize("args, message", [
    (["model.hidden_size=0"], "model.hidden_size=0 must be an integer >= 1"),
    (["steps=0"], "sft.steps=0"),
    (["data.perturbed_fraction=2"], "data.perturbed_fraction=2"),
    (["model.hiden_size=8"], "did you mean 'model.hidden_size'"),
    (["data.task=nope"], "unknown task 'nope'"),
    (["data.samples_from=/nonexistent/teacher"], "does not exist"),
    (["data.task=null", "data.jsonl=BAD"], "line 1: missing field 'completion'"),
    (["model.tokenizer=/nonexistent/tok"], "does not exist"),
    (["stray"], "unexpected argument"),
    (["max_teacher_tokens=100"], "max_teacher_tokens needs data.samples_from"),
    (["max_teacher_tokens=-1"], "sft.max_teacher_tokens=-1"),
])
def test_bad_input_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    run_dir = tmp_path / "run"
    argv = [*TINY, f"run_dir={run_dir}", *[a.replace("BAD", str(bad)) for a in args]]
    if args == ["stray"]:
        argv = ["cfg.yaml", "stray", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdkit: error: ") and "\n" not in err and message in err
    assert not run_dir.exists()


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "data.samples_from" in out and "model.hidden_size" in out


def test_perturbed_span_is_masked():
    from opdkit.tasks import build_char_tokenizer, get_task
    from opdkit.train.sft_data import encode_pairs

    task = get_task("addition", digits=3)
    tok = build_char_tokenizer([task.alphabet])
    ex = task.make_example("357+468")
    pert = task.perturb(ex, 1)
    (seq,) = encode_pairs(tok, [[1, 5]], [pert.completion], [(pert.error_start, pert.error_end)])
    body, mask = seq.ids[2:-1], seq.mask[2:-1]
    assert tok.decode(body) == pert.completion and seq.ids[-1] == tok.eos_token_id and seq.mask[-1] == 1
    masked = "".join(ch for ch, m in zip(pert.completion, mask) if not m)
    assert masked == pert.completion[pert.error_start:pert.error_end] and seq.mask[:2] == [0, 0]


def test_sft_writes_plots_and_excludes_evals_from_the_eta(tmp_path, capsys):
    """Issue #15: `opdkit sft` drew no plots (nor did a killed run: `opdkit plot <run_dir>` redraws them)."""
    res = run_sft(cfg(tmp_path / "run", "steps=4", "eval_every=2"))
    names = {Path(p).name for p in res["plots"]}
    assert {"accuracy.png", "loss.png", "grad_norm.png"} <= names
    assert all(Path(p).parent == tmp_path / "run" / "plots" for p in res["plots"])


def test_sft_eval_jsonl_checker_scoring_no_reference_is_named(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA: ", "completion": f"=> {i + 1}\n", "answer": str(i + 1)})
                         + "\n" for i in range(5)))
    capsys.readouterr()
    run_sft(load_config(SFTConfig, None, [*TINY[:5], "data.batch_size=4", "progress=false", "steps=2",
                                          f"data.prompts={f}", f"data.eval_jsonl={f}", "data.checker=marker:=",
                                          f"run_dir={tmp_path / 'r'}"]))
    err = capsys.readouterr().err
    assert "data.checker=marker:= scores 0 on every one of the 5 reference completions" in err
    assert "every one of the 5 responses scored 0 with data.checker=marker:=" in err


def test_train_spelling_of_the_data_path(tmp_path, capsys):
    """data.prompts (opdkit train's name) is data.jsonl here; its task:<name> form names the sft knob to use."""
    assert load_config(SFTConfig, None, ["data.prompts=x.jsonl"]).data.jsonl == "x.jsonl"
    assert main(["data.prompts=task:addition", f"run_dir={tmp_path / 'never'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdkit: error:") and "data.task=addition" in err and "\n" not in err
    assert not (tmp_path / "never").exists()
