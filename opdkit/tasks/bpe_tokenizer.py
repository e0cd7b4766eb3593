"""A small BPE tokenizer trained in-process on task text (the `tokenizers` library), in Hugging Face format.

It exists so that a teacher with ANOTHER tokenizer than the embedded character-level one can be built and tested
at embedded scale (cross-tokenizer OPD, docs/cross_tokenizer.md): its merges ('+0=1', '\\nA: ', ' 5', ...) straddle
the boundaries of the character tokenizer's tokens and of the task's own fields.
"""

from __future__ import annotations

import os
from typing import Iterable

from opdkit.tasks.tokenizer import SPECIAL_TOKENS, _pin_config

__all__ = ["build_bpe_tokenizer"]


def build_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike | None = None,
    *,
    alphabet: str = "",
    model_max_length: int = 4096,
):
    """A ``PreTrainedTokenizerFast`` with a BPE model of ``vocab_size`` ids trained on ``texts``.

    The special tokens and their ids are those of the character tokenizer (``<pad>``=0, ``<bos>``=1, ``<eos>``=2,
    ``<unk>``=3), then the characters of ``alphabet`` and of ``texts``, then the merges. No normalizer and no
    pre-tokenizer (merges may cross spaces and newlines), a ``Fuse`` decoder and
    ``clean_up_tokenization_spaces=False``, so ``decode(encode(s)) == s`` for text in the alphabet; other characters
    become ``<unk>`` (and do not round-trip). Deterministic for the same texts. ``save_dir``: saved with
    ``save_pretrained`` (``AutoTokenizer.from_pretrained(save_dir)`` loads it back).
    """
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [texts] if isinstance(texts, str) else list(texts)
    if not any(texts):
        raise ValueError("build_bpe_tokenizer: texts are empty")
    chars = sorted(set(alphabet).union(*map(set, texts)))
    if vocab_size < len(SPECIAL_TOKENS) + len(chars):
        raise ValueError(f"build_bpe_tokenizer: vocab_size={vocab_size} is below the {len(SPECIAL_TOKENS)} special "
                         f"tokens + {len(chars)} characters")
    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=False))
    backend.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=chars,
                                  show_progress=False, min_frequency=2)
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
        _pin_config(os.fspath(save_dir))
    return tok
