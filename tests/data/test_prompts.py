"""opdkit.data.prompts: encoding with / without chat template, over-long prompts, privileged teacher prompts."""

import pytest

from opdkit.data import PromptRecord, encode_prompts, teacher_prompt_text, teacher_records
from opdkit.errors import UserError
from opdkit.models import TINY_ALPHABET, tiny_tokenizer

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return tiny_tokenizer(TINY_ALPHABET + ":", extra_special=["<|im_start|>", "<|im_end|>"], chat_template=CHAT)


def test_plain_text_gets_bos(tok):
    ids, rep = encode_prompts([PromptRecord("ab c"), "d"], tok, max_prompt_tokens=10)
    bos = tok.bos_token_id
    assert ids == [[bos] + tok("ab c", add_special_tokens=False).input_ids, [bos, tok.convert_tokens_to_ids("d")]]
    assert rep["n_kept"] == 2 and rep["n_too_long"] == 0 and rep["kept_indices"] == [0, 1]


def test_chat_template_used_unless_disabled(chat_tok):
    start = chat_tok.convert_tokens_to_ids("<|im_start|>")
    ids, _ = encode_prompts([PromptRecord("ab")], chat_tok, max_prompt_tokens=100, system_prompt="be")
    text = chat_tok.decode(ids[0])
    assert ids[0].count(start) == 3  # system, user, generation prompt
    assert text.startswith("<|im_start|>system: be<|im_end|>") and text.endswith("<|im_start|>assistant: ")
    assert "user: ab" in text
    plain, _ = encode_prompts([PromptRecord("ab")], chat_tok, max_prompt_tokens=100, use_chat_template=False)
    assert start not in plain[0] and plain[0][0] == chat_tok.bos_token_id


def test_chat_template_required_but_missing(tok):
    with pytest.raises(UserError, match="no chat template"):
        encode_prompts(["a"], tok, max_prompt_tokens=5, use_chat_template=True)


def test_too_long_skip_and_truncate(tok):
    recs = [PromptRecord("abcdefgh"), PromptRecord("ab"), PromptRecord("abcdefghij")]
    ids, rep = encode_prompts(recs, tok, max_prompt_tokens=5, on_too_long="skip")
    assert len(ids) == 1 and rep["kept_indices"] == [1]
    assert (rep["n_too_long"], rep["n_skipped"], rep["n_truncated"], rep["max_len"]) == (2, 2, 0, 11)
    ids, rep = encode_prompts(recs, tok, max_prompt_tokens=5, on_too_long="truncate")
    assert [len(x) for x in ids] == [5, 3, 5] and rep["n_truncated"] == 2 and rep["n_skipped"] == 0
    assert tok.decode(ids[0]) == "defgh"  # left-truncated: the end is kept


def test_all_skipped_and_bad_args(tok):
    with pytest.raises(UserError, match="all 1 prompts exceed max_prompt_tokens=2"):
        encode_prompts(["abcdef"], tok, max_prompt_tokens=2)
    with pytest.raises(UserError, match="on_too_long"):
        encode_prompts(["a"], tok, max_prompt_tokens=2, on_too_long="drop")
    with pytest.raises(UserError, match="max_prompt_tokens"):
        encode_prompts(["a"], tok, max_prompt_tokens=0)
    with pytest.raises(UserError, match="no prompts"):
        encode_prompts([], tok, max_prompt_tokens=3)


def test_teacher_prompt_text():
    r = PromptRecord("what is {x}?", answer="4", privileged="x = 2+2 = 4 {prompt}")
    text = teacher_prompt_text(r, "{prompt}\n\nReference solution: {privileged}\n\\boxed{}")
    assert text == "what is {x}?\n\nReference solution: x = 2+2 = 4 {prompt}\n\\boxed{}"
    assert teacher_prompt_text(r).startswith("what is {x}?") and "x = 2+2" in teacher_prompt_text(r)
    assert r.prompt_text == "what is {x}?"  # the student's prompt never holds the privileged text
    with pytest.raises(UserError, match="lacks {privileged}"):
        teacher_prompt_text(r, "{prompt} only")
    with pytest.raises(UserError, match="privileged"):
        teacher_prompt_text(PromptRecord("q"))
    tr = teacher_records([r])
    assert tr[0].answer == "4" and "x = 2+2" in tr[0].prompt_text
