"""evaluate() on a tiny model + task; model loading (HF dir, checkpoint dir); `opdkit eval` CLI and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from opdkit.eval.run import EvalConfig, evaluate, load_eval_model, main, resolve_model_spec
from opdkit.tasks import build_char_tokenizer, get_task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama + char tokenizer saved as an HF dir (and as a checkpoint of a run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdkit.checkpoint import save_checkpoint, save_model_dir

    task = get_task("addition", digits=2)
    tok = build_char_tokenizer([task.alphabet])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("tiny")
    save_model_dir(model, tok, root / "run" / "final")
    ck = save_checkpoint(root / "run", 3, model.state_dict())
    return model, tok, task, root / "run" / "final", ck


def test_evaluate_fields(tiny):
    model, tok, task, *_ = tiny
    exs = task.sample("heldout", 6, seed=0, unique=True)
    res = evaluate(model, tok, exs, task, k=2, n_samples=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=1)
    for key in ("n", "k", "avg@k", "pass@k", "accuracy", "mean_response_tokens", "per_task", "records", "truncated"):
        assert key in res
    assert res["n"] == 6 and res["k"] == 2 and res["n_samples"] == 3
    assert 1 <= res["mean_response_tokens"] <= 8 and list(res["per_task"]) == ["addition"]
    assert len(res["records"]) == 6 and all(len(r["responses"]) == 3 for r in res["records"])
    again = evaluate(model, tok, exs, task, k=2, n_samples=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=1)
    assert [r["responses"] for r in again["records"]] == [r["responses"] for r in res["records"]]


def test_evaluate_checker_paths(tiny):
    model, tok, task, *_ = tiny
    exs = task.sample("heldout", 3, seed=0, unique=True)
    # a callable checker that accepts everything; greedy k=3 generates once and copies
    res = evaluate(model, tok, exs, lambda text, answer: 1.0, k=3, temperature=0.0, max_new_tokens=4)
    assert res["avg@k"] == 1.0 and res["pass@k"] == 1.0
    assert all(len(set(r["responses"])) == 1 for r in res["records"])
    res = evaluate(model, tok, exs, "marker:=>", k=1, max_new_tokens=4)  # a random model never writes '=> answer'
    assert res["accuracy"] == 0.0 and res["truncated"] >= 0.0


def test_load_hf_dir_and_checkpoint(tiny):
    model, _, _, final, ck = tiny
    m1, t1 = load_eval_model(final)
    m2, t2 = load_eval_model(ck)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.allclose(m1(ids).logits, ref) and torch.allclose(m2(ids).logits, ref)
    assert t1.get_vocab() == t2.get_vocab()


def test_cli_writes_json(tiny, tmp_path, capsys):
    *_, final, ck = tiny
    out = tmp_path / "e.json"
    assert main([f"model={ck}", "task=addition", "task_args={digits: 2}", "n=4", "k=2", "temperature=1.0",
                 "max_new_tokens=6", f"out={out}", "progress=false"]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["k"] == 2 and res["config"]["model"] == str(ck)
    assert "avg@2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["task=nope"], "unknown task 'nope'"),
    (["model=/nonexistent/model", "task=addition"], "does not exist"),
    (["model=NOTMODEL", "task=addition"], "no config.json"),
    (["model=FINAL", "data=NOANSWER"], "missing field 'answer'"),
    (["model=FINAL", "k=0"], "eval.k=0"),
    (["model=FINAL", "task=addition", "data=NOANSWER"], "exclude each other"),
    (["model=embedded:nobody"], "unknown embedded model"),
])
def test_cli_bad_input(tiny, tmp_path, capsys, args, message):
    *_, final, _ = tiny
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Q: 1+1\nA: "}) + "\n")
    subs = {"NOTMODEL": str(tmp_path / "notmodel"), "FINAL": str(final), "NOANSWER": str(tmp_path / "d.jsonl")}
    argv = [a.split("=")[0] + "=" + subs.get(a.split("=", 1)[1], a.split("=", 1)[1]) for a in args]
    if not any(a.startswith("model=") for a in argv):
        argv.append(f"model={final}")
    argv.append(f"out={tmp_path / 'o.json'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdkit: error: ") and "\n" not in err and message in err
    assert not (tmp_path / "o.json").exists()


def test_resolve_model_spec_passthrough():
    assert resolve_model_spec("some/dir") == "some/dir"
    assert EvalConfig().model == "embedded:student"


def test_checker_that_matches_nothing_is_a_warning_not_a_silent_zero(tiny, tmp_path, capsys):
    """Issue #15: `checker=marker:=> k=4` unquoted left `marker:=` (bash redirected the rest), and a 91% teacher
    scored 0.0% without a word. Now: a checker that scores no reference completion is named before the model runs,
    and an eval in which every response scores 0 ends with a warning line; `checker=marker` needs no quoting."""
    from opdkit.eval.run import main

    _, _, task, final, _ = tiny
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": ex.prompt, "completion": ex.completion, "answer": ex.answer}) + "\n"
                            for ex in task.sample("heldout", 6, seed=0)))
    capsys.readouterr()
    assert main([f"model={final}", f"data={data}", "checker=marker:=", "max_new_tokens=4", "show=0",
                 "progress=false", f"out={tmp_path / 'e.json'}"]) == 0
    err = capsys.readouterr().err
    assert "checker=marker:= scores 0 on every one of the 6 reference completions" in err
    assert "every one of the 6 responses scored 0 with checker=marker:=" in err
    res = json.loads((tmp_path / "e.json").read_text())
    assert len(res["warnings"]) == 2 and res["avg@k"] == 0.0
    assert main([f"model={final}", f"data={data}", "checker=marker", "max_new_tokens=4", "show=0",
                 "progress=false", f"out={tmp_path / 'ok.json'}"]) == 0
    err = capsys.readouterr().err
    assert "reference completions" not in err  # marker (= marker:=>) credits the references...
    assert json.loads((tmp_path / "ok.json").read_text())["avg@k"] == 0.0  # ...so a 0% is the random model's,
    assert "scored 0" not in err  # not a checker problem: no warning
    bare = tmp_path / "no_completions.jsonl"  # nothing to check the checker on: the all-zero eval is a warning
    bare.write_text("".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n"
                            for ex in task.sample("heldout", 6, seed=0)))
    assert main([f"model={final}", f"data={bare}", "checker=marker", "max_new_tokens=4", "show=0",
                 "progress=false"]) == 0
    assert "every one of the 6 responses scored 0 with checker=marker" in capsys.readouterr().err
    # a task (not a checker) scoring 0 is no checker problem: no warning
    res = evaluate(*tiny[:2], task.sample("heldout", 3, seed=0), task, max_new_tokens=2, keep_records=False)
    assert "warnings" not in res
