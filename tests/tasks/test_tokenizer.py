"""Char-level tokenizer: exact round trip, special ids, save/load through AutoTokenizer."""

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from opdkit.tasks import SPECIAL_TOKENS, Addition, ArithChain, build_char_tokenizer

ALPHABET = ArithChain.alphabet + Addition.alphabet + "abc\t"
TOK = build_char_tokenizer([ALPHABET])


def test_ids_and_vocab():
    assert [TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.unk_token_id] == [0, 1, 2, 3]
    assert TOK.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert len(TOK) == 4 + len(set(ALPHABET))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=80))
def test_roundtrip_exact(s):
    ids = TOK.encode(s)
    assert len(ids) == len(s)  # one token per character, nothing added
    assert TOK.decode(ids) == s


def test_task_text_roundtrip_and_reload(tmp_path):
    task = ArithChain()
    texts = [e.prompt + e.completion for e in task.sample("train", 20, seed=0)]
    tok = build_char_tokenizer([task.alphabet], save_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in texts + ["  1  2\n\n", " ", ""]:
        ids = tok.encode(s)
        assert loaded.encode(s) == ids and len(ids) == len(s)
        assert loaded.decode(ids) == s
    assert loaded.decode(loaded.encode("x 1")) == "<unk> 1"
    s = texts[0]
    assert loaded.decode([1, *loaded.encode(s), 2], skip_special_tokens=True) == s
    assert loaded.decode([1, *loaded.encode(s), 2]) == "<bos>" + s + "<eos>"
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
    batch = loaded(["12", "3+4*5"], padding=True)
    assert batch["input_ids"][0][2:] == [0, 0, 0] and batch["attention_mask"][0] == [1, 1, 0, 0, 0]


def test_out_of_alphabet_is_unk_and_specials_in_text():
    tok = build_char_tokenizer(["ab<"])
    assert tok.encode("abz") == [tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"), 3]
    assert tok.decode(tok.encode("a<b")) == "a<b"
    assert tok.encode("<eos>") == [2]
