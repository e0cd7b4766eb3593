"""Checkpoints: exact resume (weights, AdamW, LambdaLR, RNG), tied weights, atomicity, pruning, HF model dirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from opdkit.errors import UserError
from opdkit.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_model_dir,
    split_shared,
)


def tiny_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True, attention_dropout=0.1,
    )


def make(seed: int = 0):
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(tiny_config())
    # Tie explicitly (the behaviour under test is saving shared tensors once, not the constructor).
    model.lm_head.weight = model.model.embed_tokens.weight
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(model, opt, sched, n: int) -> None:
    for _ in range(n):
        ids = torch.randint(0, 32, (2, 6))
        noise = torch.randn(()) * 0.01 + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = model(input_ids=ids, labels=ids).loss + noise  # attention dropout consumes the RNG too
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exact_resume(tmp_path: Path) -> None:
    model, opt, sched = make()
    train(model, opt, sched, 2)
    ck = save_checkpoint(tmp_path, 2, model.state_dict(), opt, sched, extra={"tokens": 24}, keep_last=3)
    assert ck.name == "step_000002"
    files = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "manifest.json"}
    assert {p.name for p in ck.iterdir()} == files
    train(model, opt, sched, 4)
    expected = weights(model)

    torch.manual_seed(123)  # scramble the RNG: the checkpoint must restore it
    random.seed(5)
    np.random.seed(5)
    model2, opt2, sched2 = make(seed=7)
    state = load_checkpoint(latest_checkpoint(tmp_path), model2, opt2, sched2)
    assert state["step"] == 2 and state["extra"] == {"tokens": 24}
    assert sched2.last_epoch == 2
    train(model2, opt2, sched2, 4)
    got = weights(model2)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied


def test_tied_weights_in_a_clean_process():
    """Runs the tied-weights test in its own interpreter: in the full suite an earlier test leaves a meta-device
    context behind (a known leak, see the closing note), which makes freshly built models meta tensors."""
    import os
    import subprocess
    import sys

    if os.environ.get("OPDKIT_ISOLATED"):
        pytest.skip("already isolated")
    env = dict(os.environ, OPDKIT_ISOLATED="1")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings",
                          f"{__file__}::test_tied_weights_stored_once_and_untied_model_loads"], env=env)
    assert rc == 0


@pytest.mark.skipif(not __import__("os").environ.get("OPDKIT_ISOLATED"), reason="run by test_tied_weights_in_a_clean_process")
def test_tied_weights_stored_once_and_untied_model_loads(tmp_path: Path) -> None:
    model, opt, sched = make()
    tensors, aliases = split_shared(model.state_dict())
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in tensors
    ck = save_checkpoint(tmp_path, 1, model.state_dict())
    # a model with untied embeddings still gets the tied values
    cfg = tiny_config()
    cfg.tie_word_embeddings = False
    with torch.device("cpu"):
        untied = transformers.LlamaForCausalLM(cfg)
    load_checkpoint(ck, untied, restore_rng=False)
    assert torch.equal(untied.lm_head.weight, model.lm_head.weight)
    # partially overlapping views of one storage are cloned
    base = torch.arange(12.0)
    t, a = split_shared({"x": base[:6], "y": base[3:9], "z": base})
    assert a == {} and torch.equal(t["y"], base[3:9])


def test_mismatch_and_not_a_checkpoint(tmp_path: Path) -> None:
    model, _, _ = make()
    ck = save_checkpoint(tmp_path, 1, {k: v for k, v in model.state_dict().items() if "mlp" not in k})
    with pytest.raises(UserError, match="missing keys .*mlp"):
        load_checkpoint(ck, make()[0])
    with pytest.raises(UserError, match=r"not an opdkit checkpoint \(no model.safetensors/state.json\): .*nothing"):
        load_checkpoint(tmp_path / "nothing", model)
    with pytest.raises(UserError, match="no optimizer.pt"):
        full = save_checkpoint(tmp_path, 2, model.state_dict())
        load_checkpoint(full, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_pruning_and_temp_dirs(tmp_path: Path) -> None:
    state = {"w": torch.ones(3)}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, state, extra={"s": step}, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    # an incomplete write (crash before the rename) is ignored, then cleaned up by the next save
    tmp = tmp_path / "checkpoints" / ".tmp-step_000009-abc"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"x")
    (tmp / "state.json").write_text(json.dumps({"step": 9}))
    incomplete = tmp_path / "checkpoints" / "step_000008"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"x")  # no state.json: not complete
    assert latest_checkpoint(tmp_path).name == "step_000004"
    save_checkpoint(tmp_path, 5, state, keep_last=1)
    assert not tmp.exists()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert latest_checkpoint(tmp_path / "elsewhere") is None
    # re-saving a step replaces it
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(3)}, extra={"again": True})
    assert json.loads((tmp_path / "checkpoints" / "step_000005" / "state.json").read_text())["extra"] == {"again": True}


def test_save_model_dir(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(31)} | {"<unk>": 31}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    model, _, _ = make()
    out = save_model_dir(model, tok, tmp_path / "student")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert transformers.AutoTokenizer.from_pretrained(out)("t1 t2")["input_ids"] == [1, 2]
    save_model_dir(model, None, out)  # replacing a model dir is allowed
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a model directory"):
        save_model_dir(model, tok, other)
    assert (other / "a.txt").read_text() == "keep me"
