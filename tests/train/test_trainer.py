"""The OPD trainer end to end on tiny models (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opdkit.config import load_config
from opdkit.train import loop
from opdkit.train.config import TrainConfig
from tests.train.tiny_run import base_overrides, make_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def _run(pair, run_dir, *extra, steps=3):
    cfg = load_config(TrainConfig, None, base_overrides(pair, run_dir, steps) + list(extra))
    return loop.train(cfg)


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", [
    ["objective.estimator=sampled", "objective.gradient=stopgrad"],
    ["objective.estimator=sampled", "objective.gradient=corrected", "objective.divergence=forward_kl"],
    ["objective.estimator=topk", "objective.top_k=4"],
    ["objective.estimator=full", "objective.divergence=jsd"],
    ["objective.estimator=sampled", "objective.reward=power", "objective.pg=ppo", "optim.ppo_epochs=2"],
    ["objective.estimator=full", "model.teacher_dtype=bfloat16"],
])
def test_three_steps_per_estimator_family(pair, tmp_path, objective):
    summary = _run(pair, tmp_path / "run", *objective)
    assert summary["teacher_dtype"] == ("bfloat16" if "model.teacher_dtype=bfloat16" in objective else "float32")
    rows = [r for r in _metrics(tmp_path / "run") if "loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert isinstance(r["loss"], float) and abs(r["loss"]) < 1e6
        assert r["grad_norm"] > 0 and r["teacher_tokens"] > 0
        assert "time/generate" in r and "tokens_per_s/update" in r and "reward/p05" in r
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(pair["student"]).state_dict()
    after = _weights(tmp_path / "run")
    assert any(not torch.equal(start[k], after[k]) for k in after)
    assert (tmp_path / "run" / "tb").is_dir() and (tmp_path / "run" / "config.yaml").is_file()


def test_masked_tokens_do_not_contribute_to_the_gradient(pair, tmp_path):
    """Changing the teacher's scores at masked positions must leave the gradient unchanged."""
    cfg = load_config(TrainConfig, None, base_overrides(pair, tmp_path / "r", 1) + ["rollout.masked_tokens=['+']",
                                                                                   "objective.estimator=full"])
    from opdkit.train import setup

    from opdkit.teacher import TeacherRequest

    student, tok = setup.load_student(cfg.model, 0)
    from opdkit.rollout.base import stop_ids

    eos, pad, masked = stop_ids(student, tok, cfg.rollout.masked_tokens)
    backend = setup.build_teacher(cfg, student, tok, pad_token_id=pad)
    teacher = backend.model
    m = loop.Models(student, tok, backend, eos, pad, masked)
    recs = setup.prompt_source(cfg.data, 0).draw(__import__("random").Random(0), 4)
    from opdkit.data.prompts import encode_prompts
    from opdkit.rollout import generate

    ids, _ = encode_prompts(recs, tok, max_prompt_tokens=64)
    batch = generate(student, ids, n_samples=2, max_new_tokens=12, eos_token_ids=eos, pad_token_id=pad,
                     masked_token_ids=masked, generator=torch.Generator().manual_seed(0))
    # make sure some response tokens are masked ('+' is in the alphabet; force one)
    batch.response_mask_BT[0, 0] = 0
    signal = backend.score(batch.with_records(recs), TeacherRequest.for_objective(cfg.objective))
    full_lp = torch.log_softmax(teacher(batch.input_ids_BL).logits[:, batch.prompt_len - 1:-1].float(), -1).detach()

    def grad_with(lp):
        from opdkit.objectives import FullSignal

        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        loop.update(cfg, m, opt, sched, batch, FullSignal(logprobs_BTV=lp), None)
        return torch.cat([p.grad.flatten() for p in student.parameters()])

    g1 = grad_with(full_lp)
    scrambled = full_lp.clone()
    masked_pos = ~batch.response_mask_BT.bool()
    scrambled[masked_pos] = torch.log_softmax(torch.randn_like(scrambled[masked_pos]), -1)
    g2 = grad_with(scrambled)
    assert torch.allclose(g1, g2, atol=1e-7)
    scrambled[0, 1] = torch.log_softmax(torch.randn_like(scrambled[0, 1]), -1)  # an unmasked position does matter
    assert not torch.allclose(g1, grad_with(scrambled), atol=1e-7)
    assert signal.kind == "full"


def test_resume_after_a_kill_gives_identical_weights(pair, tmp_path, monkeypatch):
    _run(pair, tmp_path / "straight", "save_every=3", steps=6)
    real_update = loop.update
    calls = {"n": 0}

    def dying_update(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # step 4: after the step-3 checkpoint was written
            raise KeyboardInterrupt
        return real_update(*a, **k)

    monkeypatch.setattr(loop, "update", dying_update)
    with pytest.raises(KeyboardInterrupt):
        _run(pair, tmp_path / "killed", "save_every=3", steps=6)
    monkeypatch.setattr(loop, "update", real_update)
    assert not (tmp_path / "killed" / "final").exists()
    _run(pair, tmp_path / "killed", "save_every=3", "resume=true", steps=6)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _metrics(tmp_path / "killed") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed step 4 was not logged twice


def test_opsd_teacher_sees_privileged_context_and_student_does_not(pair, tmp_path, monkeypatch):
    seen = {}
    from opdkit.teacher import hf as teacher_hf

    real_score = teacher_hf.score

    def spy(model, ids, att, P, *a, **k):
        seen["teacher_prompt"] = ids[:, :P]
        return real_score(model, ids, att, P, *a, **k)

    from opdkit.rollout import hf as rollout_hf

    real_generate = rollout_hf.generate

    def spy_gen(model, prompt_ids, **k):
        seen["student_prompts"] = prompt_ids
        return real_generate(model, prompt_ids, **k)

    monkeypatch.setattr(teacher_hf, "score", spy)
    monkeypatch.setattr(rollout_hf, "generate", spy_gen)
    _run(pair, tmp_path / "opsd", "model.teacher=self", "teacher.privileged_template='{prompt} SOLUTION {privileged}'",
         steps=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair["student"])
    t_text = tok.decode(seen["teacher_prompt"][0].tolist(), skip_special_tokens=True)
    s_text = tok.decode(seen["student_prompts"][0], skip_special_tokens=True)
    # the char tokenizer has no letters S,O,L,...: they map to <unk>, so check via the privileged answer instead
    assert "=>" in t_text and "=>" not in s_text
    assert len(seen["teacher_prompt"][0]) > len(seen["student_prompts"][0])


def test_gkd_lambda_zero_uses_reference_responses(pair, tmp_path):
    _run(pair, tmp_path / "gkd", "rollout.gkd_lambda=0.0", "objective.estimator=full", "rollout.max_new_tokens=64",
         steps=2)
    rows = [r for r in _metrics(tmp_path / "gkd") if "loss" in r]
    assert all(r["on_policy"] == 0.0 for r in rows)
    assert all(r["train/accuracy"] == 1.0 for r in rows)  # reference solutions are correct


def test_lora_student(pair, tmp_path):
    _run(pair, tmp_path / "lora", "model.lora_r=4", "model.lora_target_modules=[q_proj,v_proj]", steps=2)
    w = _weights(tmp_path / "lora")
    assert not any("lora" in k for k in w)  # merged into a plain HF model


def test_cli_help_bad_input_and_compat(pair, tmp_path, capsys):
    assert loop.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "objective.divergence" in out and "rollout.top_p" in out and "optim.lr" in out
    run = tmp_path / "bad"
    assert loop.main(base_overrides(pair, run) + ["objective.beta=3"]) == 2
    assert loop.main(base_overrides(pair, run) + ["optim.lrr=1"]) == 2
    assert loop.main(base_overrides(pair, run) + ["data.prompts=task:nope"]) == 2
    assert loop.main(base_overrides(pair, run) + ["data.prompts=/no/such.jsonl"]) == 2
    assert loop.main(base_overrides(pair, run) + ["rollout.masked_tokens=['<think>']"]) == 2
    # a sampled-only knob on the default (full) estimator is refused, not silently ignored
    assert loop.main(base_overrides(pair, run) + ["objective.reward=power"]) == 2
    err = [e for e in capsys.readouterr().err.strip().splitlines() if e.strip()]
    assert len(err) == 6 and all(e.startswith("opdkit: error: ") for e in err)
    assert "add objective.estimator=sampled" in err[-1]
    assert not run.exists()


def test_compatibility_check_fires_before_anything_is_written(tmp_path, capsys):
    bigger = make_pair(tmp_path / "v", teacher_vocab_extra=3)
    run = tmp_path / "run"
    assert loop.main(base_overrides(bigger, run)) == 2
    assert "mismatch" in capsys.readouterr().err
    assert not run.exists()
    # special-token mismatch: same vocab, different eos id
    from transformers import AutoTokenizer

    other = make_pair(tmp_path / "e")
    tok = AutoTokenizer.from_pretrained(other["teacher"])
    tok.eos_token = "<unk>"
    tok.save_pretrained(other["teacher"])
    assert loop.main(base_overrides(other, run)) == 2
    assert "eos" in capsys.readouterr().err
    assert not run.exists()


def test_run_dir_holding_another_run_is_refused(pair, tmp_path, capsys):
    run = tmp_path / "run"
    _run(pair, run, steps=1)
    assert loop.main(base_overrides(pair, run, 1) + ["objective.divergence=tv"]) == 2
    assert "different run" in capsys.readouterr().err
    assert loop.main(base_overrides(pair, run, 1) + ["objective.divergence=tv", "overwrite=true"]) == 0


def test_cli_trains_a_student_built_from_a_config_file(pair, tmp_path):
    """`opdkit train` with a model config file (random init) from the command line: JSONL, TB, final model."""
    import yaml

    from opdkit.cli import main as cli_main

    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump(dict(model_type="llama", vocab_size=len(__import__("transformers").AutoTokenizer
                                                                            .from_pretrained(pair["tokenizer"])),
                                        hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)))
    run = tmp_path / "run"
    args = base_overrides(pair, run, 2) + [f"model.student={conf}", f"model.tokenizer={pair['tokenizer']}",
                                           "progress=true"]
    assert cli_main(["train", *args]) == 0
    # one record per step: the initial eval (step 0), then steps 1 and 2 (the final eval inside step 2's record)
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2] and "eval/accuracy" in _metrics(run)[-1]
    assert any((run / "tb").iterdir())
    assert (run / "final" / "config.json").is_file()
