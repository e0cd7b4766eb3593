"""Cross-tokenizer OPD (`opdkit.teacher.cross_tokenizer`): the character-span chunk alignment on hand-made strings
(multi-byte characters, merges that straddle token boundaries), the mapping of teacher log-probs back to student
tokens, identical tokenizers => exactly the plain teacher's signal, skipped rows (masked and counted), and
`opdkit train` with a teacher of another tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opdkit.data.prompts import PromptRecord, prompt_to_ids
from opdkit.models import tiny_llama
from opdkit.objectives.signals import SampledSignal
from opdkit.rollout import generate
from opdkit.rollout.batch import RolloutBatch, left_pad
from opdkit.tasks import Addition, build_char_tokenizer
from opdkit.tasks.bpe_tokenizer import build_bpe_tokenizer
from opdkit.tasks.tokenizer import SPECIAL_TOKENS
from opdkit.teacher import HFTeacher, TeacherRequest
from opdkit.teacher.cross_tokenizer import (Chunk, CrossTokenizerTeacher, align_chunks, drop_unaligned,
                                            map_chunk_logprobs, merge_unsafe, token_ends, vocab_prefixes)
from opdkit.train import loop
from opdkit.checkpoint import save_model_dir
from tests.train.tiny_run import base_overrides, make_pair

SAMPLED = TeacherRequest("sampled")


def bpe(chars: str, merges: list[tuple[str, str]]):
    """A hand-made BPE tokenizer: the special tokens, `chars`, then one id per merge (applied in order)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=False))
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def byte_level():
    """A byte-level tokenizer without merges (GPT-2's byte alphabet): one token per UTF-8 byte, so a multi-byte
    character is several tokens, each of which decodes alone to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def ids_of(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chunk_texts(text, chunks, s_tok, s_ids, t_tok, t_ids):
    return [(text[c.c0:c.c1], s_tok.decode(s_ids[c.s0:c.s1]), t_tok.decode(t_ids[c.t0:c.t1])) for c in chunks]


# ------------------------------------------------------------------------------------------------ alignment
def test_char_student_vs_bpe_teacher_merges_straddling_fields():
    char = build_char_tokenizer([Addition.alphabet])
    teacher = bpe(Addition.alphabet, [("+", "0"), ("+0", "="), ("+0=", "1"), (" ", "1")])
    text = "5+6+0=11 1\n"
    s_ids, t_ids = ids_of(char, text), ids_of(teacher, text)
    assert teacher.convert_ids_to_tokens(t_ids) == ["5", "+", "6", "+0=1", "1", " 1", "\n"]
    s_text, s_ends = token_ends(char, s_ids)
    t_text, t_ends = token_ends(teacher, t_ids)
    assert s_text == t_text == text and s_ends == list(range(1, 12)) and t_ends == [1, 2, 3, 7, 8, 10, 11]
    chunks = align_chunks(s_ends, t_ends, len(text))
    # '+0=1' straddles the operator, the carry, '=' and the first digit of the sum: one chunk of 4 student tokens
    assert [(c.s1 - c.s0, c.t1 - c.t0) for c in chunks] == [(1, 1), (1, 1), (1, 1), (4, 1), (1, 1), (2, 1), (1, 1)]
    assert [t for t, _, _ in chunk_texts(text, chunks, char, s_ids, teacher, t_ids)] == \
        ["5", "+", "6", "+0=1", "1", " 1", "\n"]


def test_merges_on_both_sides_make_a_chunk_of_several_tokens_each():
    student = bpe("abcd", [("a", "b")])    # "abcd" -> ab | c | d
    teacher = bpe("abcd", [("b", "c")])    # "abcd" -> a | bc | d
    text = "abcd"
    s_ids, t_ids = ids_of(student, text), ids_of(teacher, text)
    chunks = align_chunks(token_ends(student, s_ids)[1], token_ends(teacher, t_ids)[1], len(text))
    assert chunks == [Chunk(0, 2, 0, 2, 0, 3), Chunk(2, 3, 2, 3, 3, 4)]
    assert chunk_texts(text, chunks, student, s_ids, teacher, t_ids) == [("abc", "abc", "abc"), ("d", "d", "d")]


def test_multibyte_characters_char_student_byte_level_teacher():
    char = build_char_tokenizer(["aé€x"])
    teacher = byte_level()
    text = "aé€x"
    s_ids, t_ids = ids_of(char, text), ids_of(teacher, text)
    assert len(s_ids) == 4 and len(t_ids) == 1 + 2 + 3 + 1  # UTF-8 bytes
    t_text, t_ends = token_ends(teacher, t_ids)
    assert t_text == text
    assert t_ends == [1, None, 2, None, None, 3, 4]  # a byte in the middle of a character has no end of its own
    chunks = align_chunks(token_ends(char, s_ids)[1], t_ends, len(text))
    assert [(c.s1 - c.s0, c.t1 - c.t0) for c in chunks] == [(1, 1), (1, 2), (1, 3), (1, 1)]
    # the teacher's log-prob of 'é' is the sum over its two bytes (the chain rule)
    t_lp = [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7]
    got = map_chunk_logprobs(chunks, t_lp, [-1.0] * 4, 4)
    assert got == pytest.approx([-0.1, -0.5, -1.5, -0.7])


def test_multibyte_characters_byte_level_student_char_teacher():
    """The other way round: the student's bytes of one character are glued into one chunk."""
    student, teacher = byte_level(), build_char_tokenizer(["é€"])
    text = "é€"
    s_ids, t_ids = ids_of(student, text), ids_of(teacher, text)
    s_text, s_ends = token_ends(student, s_ids)
    assert s_text == text and s_ends == [None, 1, None, None, 2]
    chunks = align_chunks(s_ends, token_ends(teacher, t_ids)[1], len(text))
    assert [(c.s0, c.s1, c.t0, c.t1) for c in chunks] == [(0, 2, 0, 1), (2, 5, 1, 2)]
    # several student tokens share the chunk's teacher log-prob in proportion to their own log-probs
    got = map_chunk_logprobs(chunks, [-0.6, -3.0], [-0.1, -0.2, -1.0, 0.0, -1.0], 5)
    assert got == pytest.approx([-0.2, -0.4, -1.5, 0.0, -1.5])
    assert sum(got[:2]) == pytest.approx(-0.6) and sum(got[2:]) == pytest.approx(-3.0)
    # each token's log-ratio has the sign of its chunk's: teacher -0.6 > student -0.3 in chunk 1? no: -0.6 < -0.3
    s = [-0.1, -0.2, -1.0, 0.0, -1.0]
    assert all(g - v <= 0 for g, v in zip(got[:2], s[:2])) and all(g - v <= 0 for g, v in zip(got[2:], s[2:]))


def test_align_chunks_rejects_inconsistent_ends():
    assert align_chunks([1, 2], [1, 3], 3) is None          # the student's text is shorter
    assert align_chunks([2, 1, 3], [3], 3) is None          # decreasing ends
    assert align_chunks([], [1], 1) is None
    assert align_chunks([], [], 0) == []
    # zero-width tokens join the chunk that holds the next boundary
    assert align_chunks([1, 1, 2], [1, 2], 2) == [Chunk(0, 2, 0, 1, 0, 1), Chunk(2, 3, 1, 2, 1, 2)]


def test_safe_chunks_join_cuts_the_teachers_tokenization_makes_informative():
    """Teacher tokens '\n0' and '+0=' exist: its token '\n' alone says the next character is not '0', and '+0'
    alone that the next is not '='. Those cuts are joined; a cut after a digit or '=' (no token starts with
    '1', '=1', ...) is kept."""
    char = build_char_tokenizer([Addition.alphabet])
    teacher = bpe(Addition.alphabet, [("\n", "0"), ("+", "0"), ("+0", "=")])
    prefixes, longest = vocab_prefixes(teacher)
    assert {"\n", "+", "+0"} <= prefixes and "1" not in prefixes and longest == 3
    text = "1+0\n1+0=1\n"
    s_ids, t_ids = ids_of(char, text), ids_of(teacher, text)
    assert teacher.convert_ids_to_tokens(t_ids) == ["1", "+0", "\n", "1", "+0=", "1", "\n"]
    minimal = align_chunks(token_ends(char, s_ids)[1], token_ends(teacher, t_ids)[1], len(text))
    assert [text[c.c0:c.c1] for c in minimal] == ["1", "+0", "\n", "1", "+0=", "1", "\n"]
    safe = merge_unsafe(minimal, text, [0] * len(minimal), prefixes, longest)
    # '+0' | '\n' is unsafe ('+0' could have been '+0='), '\n' | '1' too ('\n0'); after '+0=' or a digit: safe
    assert [text[c.c0:c.c1] for c in safe] == ["1", "+0\n1", "+0=", "1", "\n"]
    assert safe[1] == Chunk(1, 5, 1, 4, 1, 5)
    # a zero-width chunk (EOS) after text: the cut before it is checked, the one after it is always safe
    eos = Chunk(len(s_ids), len(s_ids) + 1, len(t_ids), len(t_ids) + 1, len(text), len(text))
    with_eos = merge_unsafe(minimal + [eos], text, [0] * (len(minimal) + 1), prefixes, longest)
    assert with_eos[:-1] == safe[:-1] and with_eos[-1] == Chunk(9, 11, 6, 8, 9, 10)  # '\n' + EOS ('\n0' exists)


def test_uniform_split_when_the_student_was_certain():
    assert map_chunk_logprobs([Chunk(0, 2, 0, 1, 0, 2)], [-1.0], [0.0, 0.0], 2) == [-0.5, -0.5]


# ------------------------------------------------------------------------------------------------ the teacher
class FakeTeacher:
    """An inner teacher in its own ids: log-prob -(k + 1) / 10 for the k-th response token of each row; it
    records the batch it was given."""

    kinds = frozenset({"sampled", "topk", "full"})

    def __init__(self):
        self.seen = None

    def score(self, batch, request):
        self.seen = batch
        T = batch.response_len
        lp = -torch.arange(1, T + 1, dtype=torch.float32).repeat(batch.batch_size, 1) / 10
        return SampledSignal(lp * batch.response_mask_BT)

    def identity(self):
        return "fake"

    def describe(self):
        return "fake"

    def close(self):
        pass

    def stats(self):
        return {}


def hand_batch(tok, prompts, responses, finished, student_lp):
    """A RolloutBatch of `responses` (id lists, EOS included where finished) with the given student log-probs."""
    B = len(responses)
    p_ids = [prompt_to_ids(p, tok) for p in prompts]
    ids_BP, mask_BP = left_pad(p_ids, tok.pad_token_id)
    T = max(len(r) for r in responses)
    resp = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    m = torch.zeros(B, T, dtype=torch.long)
    lp = torch.zeros(B, T)
    for b, r in enumerate(responses):
        resp[b, :len(r)] = torch.tensor(r)
        m[b, :len(r)] = 1
        lp[b, :len(r)] = torch.tensor(student_lp[b])
    return RolloutBatch(
        input_ids_BL=torch.cat([ids_BP, resp], 1), attention_mask_BL=torch.cat([mask_BP, m], 1),
        prompt_len=ids_BP.shape[1], response_ids_BT=resp, response_mask_BT=m.clone(), eos_mask_BT=m.clone(),
        sampler_logprobs_BT=lp.clone(), model_logprobs_BT=lp, prompt_index_B=torch.arange(B),
        response_lengths_B=m.sum(1), finished_B=torch.tensor(finished),
        records_B=[PromptRecord(p) for p in prompts])


def test_wrapper_maps_back_skips_and_masks():
    char = build_char_tokenizer([Addition.alphabet])
    teacher_tok = bpe("0123456789+= \nQA:>", [("+", "0"), ("+0", "="), ("\n", "A"), ("\nA", ":")])  # no '9' merge
    teacher_tok_no9 = bpe("012345678+= \nQA:>", [("+", "0"), ("+0", "=")])
    eos = char.eos_token_id
    good = ids_of(char, "1+0=1") + [eos]                   # teacher: 1 | +0= | 1 | <eos>
    cut = ids_of(char, "2+0=")                               # not finished (cut at the length limit)
    slp = [[-0.5, -0.2, -0.1, -0.3, -0.4, -0.05], [-1.0, -0.25, -0.25, -0.5]]
    batch = hand_batch(char, ["Q: 1+0\nA: ", "Q: 2+0\nA: "], [good, cut], [True, False], slp)
    inner = FakeTeacher()
    xt = CrossTokenizerTeacher(inner, char, teacher_tok)
    sig = xt.score(batch, SAMPLED)
    # what the inner teacher saw: its own prompt format (BOS + its tokens) and the response in its tokens + its EOS
    seen = inner.seen
    assert seen.prompt_len == max(len(prompt_to_ids(p, teacher_tok)) for p in ("Q: 1+0\nA: ", "Q: 2+0\nA: "))
    r0 = seen.response_ids_BT[0, :int(seen.eos_mask_BT[0].sum())].tolist()
    assert teacher_tok.convert_ids_to_tokens(r0) == ["1", "+0=", "1", "<eos>"]
    assert teacher_tok.convert_ids_to_tokens(seen.response_ids_BT[1, :int(seen.eos_mask_BT[1].sum())].tolist()) == \
        ["2", "+0="]
    # row 0: '1' <- -0.1; '+0=' (-0.2) split over '+','0','=' by -0.2:-0.1:-0.3; '1' <- -0.3; EOS <- -0.4
    expect0 = [-0.1, -0.2 * (0.2 / 0.6), -0.2 * (0.1 / 0.6), -0.2 * (0.3 / 0.6), -0.3, -0.4]
    assert sig.logprobs_BT[0].tolist() == pytest.approx(expect0, abs=1e-6)
    expect1 = [-0.1, -0.2 * 0.25, -0.2 * 0.25, -0.2 * 0.5]
    assert sig.logprobs_BT[1].tolist() == pytest.approx(expect1 + [0.0, 0.0], abs=1e-6)  # pads: 0
    assert sig.scored_B.tolist() == [True, True]
    st = xt.stats()
    assert st["xtok/rows"] == 2 and st["xtok/skipped_rows"] == 0 and st["xtok/student_tokens"] == 10
    assert st["xtok/teacher_tokens"] == 6
    # a teacher that does not know '9': the row holding one is skipped, masked out of the loss, counted
    nine = ids_of(char, "9+0=9") + [eos]
    batch2 = hand_batch(char, ["Q: 9+0\nA: ", "Q: 2+0\nA: "], [nine, cut], [True, False],
                        [[-0.5] * 6, slp[1]])
    lines = []
    xt2 = CrossTokenizerTeacher(FakeTeacher(), char, teacher_tok_no9, notice=lines.append)
    sig2 = xt2.score(batch2, SAMPLED)
    assert sig2.scored_B.tolist() == [False, True]
    assert torch.equal(sig2.logprobs_BT[0], batch2.model_logprobs_BT[0])  # log-ratio 0 if the mask were ignored
    st2 = xt2.stats()
    assert st2["xtok/skipped_rows"] == 1 and st2["xtok/skipped/round_trip"] == 1 and st2["xtok/rows"] == 2
    assert len(lines) == 1 and "xtok/skipped_rows" in lines[0] and "round-trip" in lines[0]
    xt2.score(batch2, SAMPLED)
    assert len(lines) == 1  # once per reason
    masked, plain = drop_unaligned(batch2, sig2)
    assert type(plain) is SampledSignal and torch.equal(plain.logprobs_BT, sig2.logprobs_BT)
    assert masked.response_mask_BT[0].sum() == 0 and torch.equal(masked.response_mask_BT[1], batch2.response_mask_BT[1])
    assert torch.equal(masked.eos_mask_BT, batch2.eos_mask_BT)  # still generated tokens (teacher_tokens, lengths)
    # a signal of any other teacher passes through
    other = SampledSignal(torch.zeros(2, 6))
    assert drop_unaligned(batch2, other) == (batch2, other)


def test_student_special_tokens_map_by_role_or_skip_and_teacher_context():
    char = build_char_tokenizer([Addition.alphabet])
    teacher_tok = bpe(Addition.alphabet, [("+", "1")])
    pad = ids_of(char, "1+1") + [char.pad_token_id] + ids_of(char, "+1") + [char.eos_token_id]
    ok = ids_of(char, "1+1") + [char.eos_token_id]
    batch = hand_batch(char, ["Q: 1+1\nA: "] * 2, [pad, ok], [True, True], [[-0.1] * 7, [-0.1] * 4])
    inner = FakeTeacher()
    xt = CrossTokenizerTeacher(inner, char, teacher_tok, notice=lambda line: None)
    sig = xt.score(batch, SAMPLED)
    assert sig.scored_B.tolist() == [True, True]
    # the text on each side of the student's <pad> is re-tokenized on its own; <pad> -> the teacher's <pad>
    seen = inner.seen.response_ids_BT[0, :int(inner.seen.eos_mask_BT[0].sum())].tolist()
    assert teacher_tok.convert_ids_to_tokens(seen) == ["1", "+1", "<pad>", "+1", "<eos>"]
    assert sig.logprobs_BT[0].tolist() == pytest.approx([-0.1, -0.1, -0.1, -0.3, -0.2, -0.2, -0.5])
    # a teacher tokenizer without a <pad>: nothing to map the student's <pad> to -> the row is skipped
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=teacher_tok.backend_tokenizer, bos_token="<bos>",
                                     eos_token="<eos>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    assert no_pad.pad_token_id is None
    xt2 = CrossTokenizerTeacher(FakeTeacher(), char, no_pad, notice=lambda line: None)
    assert xt2.score(batch, SAMPLED).scored_B.tolist() == [False, True]
    assert xt2.stats()["xtok/skipped/student_special"] == 1
    short = CrossTokenizerTeacher(FakeTeacher(), char, char, max_len=16, notice=lambda line: None)  # prompt: 11
    assert short.score(batch, SAMPLED).scored_B.tolist() == [False, True]  # 11 + 7 > 16 >= 11 + 4
    assert short.stats()["xtok/skipped/teacher_context"] == 1


def test_dense_requests_are_refused():
    char = build_char_tokenizer([Addition.alphabet])
    xt = CrossTokenizerTeacher(FakeTeacher(), char, char)
    assert xt.kinds == frozenset({"sampled"})
    from opdkit.errors import UserError
    from opdkit.teacher import check_serves

    with pytest.raises(UserError, match="cannot serve objective.estimator=full: it serves sampled"):
        check_serves(xt, TeacherRequest("full"))


@pytest.fixture(scope="module")
def embedded_batch():
    """The embedded student's own samples (temperature 1) and the embedded teacher: one character tokenizer."""
    from opdkit.models import load_causal_lm
    from opdkit.specs import resolve_model_spec, resolve_task

    student, tok = load_causal_lm(resolve_model_spec("embedded:student"))
    teacher, _ = load_causal_lm(resolve_model_spec("embedded:teacher"))
    task, max_new = resolve_task("embedded")
    texts = [ex.prompt for ex in task.sample("train", n=6, seed=3)]
    batch = generate(student, [prompt_to_ids(t, tok) for t in texts], n_samples=2, max_new_tokens=max_new,
                     eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     generator=torch.Generator().manual_seed(0))
    return tok, teacher, batch.with_records([PromptRecord(t) for t in texts])


def test_identical_tokenizers_give_exactly_the_plain_teachers_signal(embedded_batch):
    tok, teacher, batch = embedded_batch
    plain = HFTeacher(teacher).score(batch, SAMPLED)
    xt = CrossTokenizerTeacher(HFTeacher(teacher), tok, tok)
    sig = xt.score(batch, SAMPLED)
    assert sig.scored_B.all()
    assert torch.equal(sig.logprobs_BT, plain.logprobs_BT)  # bit for bit: same ids, same layout, 1:1 chunks
    st = xt.stats()
    assert st["xtok/one_to_one_frac"] == 1.0 and st["xtok/skipped_rows"] == 0
    assert st["xtok/student_tokens"] == st["xtok/teacher_tokens"] == int(batch.eos_mask_BT.sum())


# ------------------------------------------------------------------------------------------------ opdkit train
@pytest.fixture(scope="module")
def bpe_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    paths = make_pair(root)  # student + same-tokenizer teacher (character tokenizer)
    task = Addition(digits=3)
    tok = build_bpe_tokenizer([ex.prompt + ex.completion for ex in task.sample("train", n=300, seed=0)], 34,
                              alphabet=Addition.alphabet)
    assert len(tok) == 34
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    paths["bpe_teacher"] = str(save_model_dir(tiny_llama(len(tok), seed=5, **ids), tok, root / "bpe_teacher"))
    return paths


def _bpe_overrides(paths, run, steps=3):
    """The embedded student (it writes real addition text, so the teacher's merges occur) and a random BPE teacher."""
    drop = ("model.teacher=", "model.student=", "data.prompts=", "rollout.max_new_tokens=")
    return [a for a in base_overrides(paths, run, steps) if not a.startswith(drop)] + [
        "model.student=embedded:student", "data.prompts=task:embedded", "rollout.max_new_tokens=40",
        f"teacher.model={paths['bpe_teacher']}"]


def test_opdkit_train_with_a_teacher_of_another_tokenizer(bpe_pair, tmp_path, capsys):
    run = tmp_path / "run"
    assert loop.main(_bpe_overrides(bpe_pair, run) + ["teacher.cross_tokenizer=true",
                                                      "objective.estimator=sampled"]) == 0
    err = capsys.readouterr().err
    assert "teacher.cross_tokenizer=true: teacher and student tokenizers differ" in err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert math.isfinite(r["loss"]) and r["xtok/rows"] == 6
        assert 0 <= r["xtok/skipped_rows"] <= 6
        assert r["xtok/skipped_rows"] == sum(v for k, v in r.items() if k.startswith("xtok/skipped/"))
    assert sum(r["xtok/student_tokens"] for r in steps) > sum(r["xtok/teacher_tokens"] for r in steps) > 0
    assert all(r["xtok/one_to_one_frac"] < 1.0 for r in steps)  # the teacher's merges made multi-token chunks
    assert (run / "final" / "model.safetensors").is_file()


def test_mismatch_refused_unless_cross_tokenizer_and_dense_estimators_refused(bpe_pair, tmp_path, capsys):
    run = tmp_path / "run"
    assert loop.main(_bpe_overrides(bpe_pair, run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mismatch" in err[0] and "teacher.cross_tokenizer=true" in err[0]
    for est in ("full", "topk"):
        assert loop.main(_bpe_overrides(bpe_pair, run) + ["teacher.cross_tokenizer=true",
                                                          f"objective.estimator={est}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "serves objective.estimator=sampled only" in err[0]
    assert loop.main(base_overrides(bpe_pair, run) + ["teacher.cross_tokenizer=true", "teacher.backend=self",
                                                      "objective.estimator=sampled"]) == 2
    assert "teacher.cross_tokenizer=true works with one local teacher" in capsys.readouterr().err
    assert not run.exists()


def test_config_validates_cross_tokenizer():
    from opdkit.train.config import ServerConfig, TeacherConfig

    assert TeacherConfig().cross_tokenizer is False
    with pytest.raises(ValueError, match="not teacher.routes"):
        TeacherConfig(cross_tokenizer=True, routes={"*": "embedded:teacher"})
    with pytest.raises(ValueError, match="not teacher.backend=server"):
        TeacherConfig(cross_tokenizer=True, backend="server", server=ServerConfig(url="http://127.0.0.1:1"))
    with pytest.raises(ValueError, match="must be true or false"):
        TeacherConfig(cross_tokenizer="yes")
    with pytest.raises(ValueError, match="cross_tokenizer_chunks='tiny' is not one of safe, minimal"):
        TeacherConfig(cross_tokenizer=True, cross_tokenizer_chunks="tiny")
