"""Loading from several threads at once (as `opdkit compare` evaluates runs) must not break weight tying.

transformers' `from_pretrained` swaps `PreTrainedModel.tie_weights` for a no-op while it builds the model; two
unsynchronised loads can leave the no-op installed, after which every tied model loads with a meta `lm_head`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_concurrent_loads_keep_tie_weights(tmp_path: Path) -> None:
    # A fresh interpreter: the failure is a process-global monkeypatch, so it must not depend on (or poison) the
    # state of the test session.
    code = textwrap.dedent(f"""
        import torch, transformers
        from concurrent.futures import ThreadPoolExecutor
        from opdkit.models import load_causal_lm, tiny_tokenizer
        torch.set_num_threads(1)
        original = transformers.PreTrainedModel.tie_weights
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
        m = transformers.LlamaForCausalLM(cfg)
        m.save_pretrained({str(tmp_path / "m")!r})
        tiny_tokenizer().save_pretrained({str(tmp_path / "m")!r})
        def load(_):
            model, _ = load_causal_lm({str(tmp_path / "m")!r})
            return model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.device.type == "cpu"
        with ThreadPoolExecutor(8) as pool:
            ok = list(pool.map(load, range(32)))
        assert all(ok), ok
        assert transformers.PreTrainedModel.tie_weights is original
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]
