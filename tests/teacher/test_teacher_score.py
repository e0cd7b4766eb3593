"""opdkit.teacher.hf.score: each signal's shape and values equal the model's own log-softmax at the right
positions; chunking never builds [B, T, V]; soft-capped heads fall back; OPSD teacher inputs align."""

import pytest
import torch
from transformers import LlamaForCausalLM

from opdkit.data import PromptRecord, encode_prompts, teacher_prompt_text
from opdkit.models import apply_lora, tiny_llama, tiny_tokenizer
from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.signals import FullSignal, SampledSignal, TopKSignal
from opdkit.rollout import generate, inverse_cdf_sample
from opdkit.teacher import (TeacherRequest, build_teacher_inputs, frozen_copy, head_matches_logits, score,
                            score_rollout)

TOK = tiny_tokenizer()
V = len(TOK)
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
PROMPTS = [[1, 10, 11, 12, 13, 14], [1, 20], [1, 30, 31]]


def _sampler_with_early_eos(probs_BV, g, _state={"step": 0}):
    ids = inverse_cdf_sample(probs_BV, g)
    ids[ids == EOS] = 5
    if probs_BV.shape[0] > 1 and _state["step"] % 7 == 2:
        ids[1] = EOS
    _state["step"] += 1
    return ids


@pytest.fixture(scope="module")
def student():
    return tiny_llama(V, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(V, seed=1)


@pytest.fixture(scope="module")
def rollout(student):
    rb = generate(student, PROMPTS, n_samples=2, max_new_tokens=7, eos_token_ids=EOS, pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(0), sampler=_sampler_with_early_eos)
    assert rb.response_mask_BT.sum() < rb.response_mask_BT.numel()  # some masked positions
    return rb


def _ref_logprobs(model, ids_BL, mask_BL, P, T, temperature=1.0, capped=None):
    pos = (mask_BL.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids_BL, attention_mask=mask_BL, position_ids=pos).logits[:, P - 1:P - 1 + T]
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def test_sampled(teacher, rollout):
    rb = rollout
    sig = score_rollout(teacher, rb, signal="sampled")
    assert isinstance(sig, SampledSignal) and sig.logprobs_BT.shape == rb.response_ids_BT.shape
    ref = _ref_logprobs(teacher, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len, rb.response_len)
    ref_BT = ref.gather(-1, rb.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    m = rb.response_mask_BT.bool()
    assert torch.allclose(sig.logprobs_BT[m], ref_BT[m], atol=1e-5)
    assert (sig.logprobs_BT[~m] == 0).all()


@pytest.mark.parametrize("need_sampled", [False, True])
def test_topk(teacher, rollout, need_sampled):
    rb, K = rollout, 5
    sig = score_rollout(teacher, rb, signal="topk", top_k=K, need_sampled=need_sampled, temperature=1.5)
    B, T = rb.response_ids_BT.shape
    assert isinstance(sig, TopKSignal) and sig.logprobs_BTK.shape == (B, T, K) and sig.ids_BTK.shape == (B, T, K)
    ref = _ref_logprobs(teacher, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len, T, temperature=1.5)
    vals, idx = ref.topk(K, dim=-1)
    m = rb.response_mask_BT.bool()
    assert torch.allclose(sig.logprobs_BTK[m], vals[m], atol=1e-5) and torch.equal(sig.ids_BTK[m], idx[m])
    assert torch.allclose(ref.gather(-1, sig.ids_BTK)[m], sig.logprobs_BTK[m], atol=1e-5)
    if need_sampled:
        ref_BT = ref.gather(-1, rb.response_ids_BT.unsqueeze(-1)).squeeze(-1)
        assert sig.sampled_logprobs_BT.shape == (B, T)
        assert torch.allclose(sig.sampled_logprobs_BT[m], ref_BT[m], atol=1e-5)
    else:
        assert sig.sampled_logprobs_BT is None
    with pytest.raises(ValueError, match="top_k"):
        score_rollout(teacher, rb, signal="topk", top_k=V + 1)


def test_full_via_hidden_states(teacher, rollout):
    rb = rollout
    sig = score_rollout(teacher, rb, signal="full", temperature=0.8)
    B, T = rb.response_ids_BT.shape
    assert isinstance(sig, FullSignal) and sig.logprobs_BTV is None
    assert sig.hidden_BTH.shape == (B, T, 32) and sig.head_weight_VH.shape == (V, 32) and sig.vocab_size() == V
    ref = _ref_logprobs(teacher, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len, T, temperature=0.8)
    b, t = rb.response_mask_BT.bool().nonzero(as_tuple=True)
    assert torch.allclose(sig.logprobs_chunk(b, t), ref[b, t], atol=1e-5)
    assert head_matches_logits(teacher, rb.input_ids_BL, rb.attention_mask_BL)


@pytest.mark.parametrize("signal", ["sampled", "topk"])
def test_chunked_never_builds_BTV(teacher, rollout, signal, monkeypatch):
    rb, chunk = rollout, 3
    score_rollout(teacher, rb, signal=signal, top_k=4)  # the one-off head probe runs here
    rows, full_calls, lsm_shapes = [], [], []
    h1 = teacher.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape))
    h2 = teacher.register_forward_hook(lambda mod, inp, out: full_calls.append(1))
    real_lsm = torch.log_softmax
    def counting_lsm(x, *a, **k):
        lsm_shapes.append(tuple(x.shape))
        return real_lsm(x, *a, **k)

    monkeypatch.setattr(torch, "log_softmax", counting_lsm)
    try:
        score_rollout(teacher, rb, signal=signal, top_k=4, need_sampled=True, chunk_size=chunk)
    finally:
        h1.remove()
        h2.remove()
    n_valid = int(rb.response_mask_BT.sum())
    assert not full_calls  # the model's own forward (all-position logits) was never called
    assert all(len(s) == 2 and s[0] <= chunk for s in rows) and sum(s[0] for s in rows) == n_valid
    assert lsm_shapes and all(len(s) == 2 and s[0] <= chunk for s in lsm_shapes)


class SoftcapLlama(LlamaForCausalLM):
    """logits = 3 * tanh(lm_head(h) / 3): not a plain linear head (like Gemma-2)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_softcapped_head_falls_back(rollout):
    base = tiny_llama(V, seed=2)
    capped = SoftcapLlama(base.config).eval()
    capped.load_state_dict(base.state_dict())
    rb = rollout
    assert not head_matches_logits(capped, rb.input_ids_BL, rb.attention_mask_BL)
    ref = _ref_logprobs(capped, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len, rb.response_len)
    m = rb.response_mask_BT.bool()
    sig = score_rollout(capped, rb, signal="sampled", chunk_size=2)
    ref_BT = ref.gather(-1, rb.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sig.logprobs_BT[m], ref_BT[m], atol=1e-5)
    full = score_rollout(capped, rb, signal="full")
    assert full.hidden_BTH is None and torch.allclose(full.logprobs_BTV[m], ref[m], atol=1e-5)


def test_padded_head_vocab_size(rollout):
    padded = tiny_llama(V + 8, seed=3)
    rb = rollout
    P, T = rb.prompt_len, rb.response_len
    pos = (rb.attention_mask_BL.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = padded(input_ids=rb.input_ids_BL, attention_mask=rb.attention_mask_BL, position_ids=pos).logits
    ref = logits[:, P - 1:P - 1 + T, :V].log_softmax(-1)
    m = rb.response_mask_BT.bool()
    sig = score_rollout(padded, rb, signal="topk", top_k=3, vocab_size=V)
    assert torch.allclose(sig.logprobs_BTK[m], ref.topk(3, -1).values[m], atol=1e-5) and (sig.ids_BTK < V).all()
    full = score_rollout(padded, rb, signal="full", vocab_size=V)
    assert full.vocab_size() == V


def test_lora_teacher_and_mode_restored(rollout):
    lora = apply_lora(tiny_llama(V, seed=4), r=2, alpha=4, dropout=0.1, target_modules=["q_proj"])
    torch.nn.init.normal_(lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    lora.train()
    sig = score_rollout(lora, rollout, signal="sampled")
    assert lora.training
    lora.eval()
    ref = _ref_logprobs(lora, rollout.input_ids_BL, rollout.attention_mask_BL, rollout.prompt_len, rollout.response_len)
    m = rollout.response_mask_BT.bool()
    ref_BT = ref.gather(-1, rollout.response_ids_BT.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sig.logprobs_BT[m], ref_BT[m], atol=1e-5)


def test_misaligned_inputs_rejected(teacher, rollout):
    rb = rollout
    with pytest.raises(ValueError, match="misaligned"):
        score(teacher, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len - 1, rb.response_ids_BT,
              rb.response_mask_BT, signal="sampled")
    with pytest.raises(ValueError, match="signal"):
        score_rollout(teacher, rb, signal="dense")


def test_teacher_request_for_objective():
    req = TeacherRequest.for_objective(ObjectiveConfig())
    assert (req.kind, req.top_k, req.need_sampled) == ("sampled", None, False)
    assert req.score_kwargs() == {"signal": "sampled", "need_sampled": False, "chunk_size": 1024, "temperature": 1.0,
                                  "vocab_size": None}
    req = TeacherRequest.for_objective(ObjectiveConfig(estimator="topk", top_k=8, topk_include_sampled=True),
                                       chunk_size=64)
    kw = req.score_kwargs()
    assert kw["signal"] == "topk" and kw["top_k"] == 8 and kw["need_sampled"] is True and kw["chunk_size"] == 64
    assert TeacherRequest.for_objective(ObjectiveConfig(estimator="full")).kind == "full"
    with pytest.raises(ValueError, match="top_k"):
        TeacherRequest("topk")


def test_opsd_privileged_teacher_inputs(student):
    tok = tiny_tokenizer()
    records = [PromptRecord("what is 2+2?", answer="4", privileged="2+2 = 4"),
               PromptRecord("7-3?", answer="4", privileged="seven minus three is four")]
    template = "{prompt} ref: {privileged} ."
    s_ids, _ = encode_prompts(records, tok, max_prompt_tokens=64)
    t_ids, _ = encode_prompts([PromptRecord(teacher_prompt_text(r, template)) for r in records], tok,
                              max_prompt_tokens=64)
    rb = generate(student, s_ids, n_samples=2, max_new_tokens=5, eos_token_ids=EOS, pad_token_id=PAD,
                  generator=torch.Generator().manual_seed(1), sampler=_sampler_with_early_eos)
    ti = build_teacher_inputs(t_ids, rb.response_ids_BT, rb.eos_mask_BT, pad_token_id=PAD,
                              prompt_index_B=rb.prompt_index_B)
    assert ti.prompt_len == max(len(x) for x in t_ids) and ti.input_ids_BL.shape[1] == ti.prompt_len + rb.response_len

    def has(seq, sub):
        return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))

    for b in range(rb.batch_size):
        r = records[int(rb.prompt_index_B[b])]
        priv = tok(r.privileged, add_special_tokens=False).input_ids
        assert has(ti.input_ids_BL[b, :ti.prompt_len].tolist(), priv)
        assert not has(rb.input_ids_BL[b, :rb.prompt_len].tolist(), priv)  # the student never sees it
        assert torch.equal(ti.input_ids_BL[b, ti.prompt_len:], rb.response_ids_BT[b])

    teacher = frozen_copy(student)  # frozen copy of the student's initial weights
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(p.requires_grad for p in student.parameters())
    sig = score(teacher, ti.input_ids_BL, ti.attention_mask_BL, ti.prompt_len, rb.response_ids_BT,
                rb.response_mask_BT, signal="sampled")
    live = score(student, ti.input_ids_BL, ti.attention_mask_BL, ti.prompt_len, rb.response_ids_BT,
                 rb.response_mask_BT, signal="sampled")  # the live student as its own teacher
    assert torch.allclose(sig.logprobs_BT, live.logprobs_BT, atol=1e-6)
    for b in range(rb.batch_size):  # each row equals the teacher on [privileged prompt + response] alone
        n = int(rb.eos_mask_BT[b].sum())
        seq = torch.tensor([t_ids[int(rb.prompt_index_B[b])] + rb.response_ids_BT[b, :n].tolist()])
        P = seq.shape[1] - n
        with torch.no_grad():
            lp = teacher(seq).logits[0, P - 1:P - 1 + n].log_softmax(-1)
        ref = lp.gather(-1, rb.response_ids_BT[b, :n, None]).squeeze(-1)
        m = rb.response_mask_BT[b, :n].bool()
        assert torch.allclose(sig.logprobs_BT[b, :n][m], ref[m], atol=1e-5)
