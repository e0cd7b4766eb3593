"""A character-level tokenizer (one token per character) in standard Hugging Face format."""

from __future__ import annotations

import json
import os
from typing import Iterable

__all__ = ["SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3


def build_char_tokenizer(
    texts: Iterable[str],
    save_dir: str | os.PathLike | None = None,
    model_max_length: int = 4096,
):
    """A ``transformers.PreTrainedTokenizerFast`` with one token per distinct character of ``texts``.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the characters in sorted order.  No normalizer,
    no pre-tokenizer and no merges (a BPE model with an empty merge list), a ``Fuse`` decoder and
    ``clean_up_tokenization_spaces=False``, so ``decode(encode(s)) == s`` exactly for text in the alphabet,
    spaces and newlines included; other characters become ``<unk>``.  Special tokens are never added
    automatically (like GPT-2): prepend ``bos_token_id`` / append ``eos_token_id`` yourself.

    With ``save_dir`` the tokenizer is saved there with ``save_pretrained`` (``tokenizer.json`` and
    ``tokenizer_config.json``) and ``AutoTokenizer.from_pretrained(save_dir)`` loads it back.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    texts = [texts] if isinstance(texts, str) else list(texts)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(_chars(texts)):
        vocab.setdefault(ch, len(vocab))
    if len(vocab) == len(SPECIAL_TOKENS):
        raise ValueError("build_char_tokenizer: texts contain no characters")

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=False))
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.decoder = decoders.Fuse()

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
        _pin_config(os.fspath(save_dir))
    return tok


def _chars(texts: list[str]) -> set[str]:
    """The characters of ``texts``, not counting occurrences of the special-token strings themselves."""
    seen: set[str] = set()
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"build_char_tokenizer: texts must be strings, got {type(text).__name__}")
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "")
        seen |= set(text)
    return seen


def _pin_config(save_dir: str) -> None:
    """Make sure the saved config names the fast tokenizer class and keeps exact decoding on reload."""
    path = os.path.join(save_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
