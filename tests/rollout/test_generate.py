"""opdkit.rollout.hf.generate: left-padded batched KV-cached sampling matches per-prompt runs and a teacher-forced
forward; EOS / masked tokens; determinism."""

import pytest
import torch

from opdkit.models import tiny_llama, tiny_tokenizer
from opdkit.rollout import RolloutBatch, filter_logits, generate, inverse_cdf_sample

TOK = tiny_tokenizer(extra_special=["<think>"])
EOS, PAD, THINK = TOK.eos_token_id, TOK.pad_token_id, TOK.convert_tokens_to_ids("<think>")
PROMPTS = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32]]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_llama(len(TOK), attn_implementation=request.param)


class Recorder:
    """A sampler that records each step's probs [B, V] and returns the argmax (or forced ids)."""

    def __init__(self, forced=None):
        self.probs, self.step, self.forced = [], 0, forced or {}

    def __call__(self, probs_BV, generator):
        self.probs.append(probs_BV.clone())
        ids = probs_BV.argmax(-1)
        for (row, step), tok in self.forced.items():
            if step == self.step:
                ids[row] = tok
        self.step += 1
        return ids


def _gen(model, prompts, **kw):
    base = dict(n_samples=1, max_new_tokens=6, eos_token_ids=EOS, pad_token_id=PAD, temperature=1.0)
    base.update(kw)
    return generate(model, prompts, **base)


def test_batched_left_padded_equals_alone(model):
    rec = Recorder()
    rb = _gen(model, PROMPTS, sampler=rec)
    assert rb.prompt_len == 7 and rb.input_ids_BL.shape == (3, 7 + rb.response_len)
    for b, p in enumerate(PROMPTS):
        rec1 = Recorder()
        rb1 = _gen(model, [p], sampler=rec1)
        assert rb1.prompt_len == len(p)
        T1 = rb1.response_len
        assert torch.equal(rb.response_ids_BT[b, :T1], rb1.response_ids_BT[0])
        for t in range(T1):
            assert torch.allclose(rec.probs[t][b].log(), rec1.probs[t][0].log(), atol=1e-5)
        assert torch.allclose(rb.model_logprobs_BT[b, :T1], rb1.model_logprobs_BT[0], atol=1e-5)


def _teacher_forced_logits(model, rb: RolloutBatch):
    with torch.no_grad():
        out = model(input_ids=rb.input_ids_BL, attention_mask=rb.attention_mask_BL, position_ids=rb.position_ids_BL())
    P, T = rb.prompt_len, rb.response_len
    return out.logits[:, P - 1:P - 1 + T].float()


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, None), (0.7, 0.9, 5)])
def test_logprobs_match_teacher_forced_forward(model, temperature, top_p, top_k):
    g = torch.Generator().manual_seed(0)
    rb = _gen(model, PROMPTS, n_samples=2, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k,
              generator=g)
    assert rb.prompt_index_B.tolist() == [0, 0, 1, 1, 2, 2]
    logits_BTV = _teacher_forced_logits(model, rb)
    tok_BT1 = rb.response_ids_BT.unsqueeze(-1)
    m = rb.eos_mask_BT.bool()
    raw_BT = logits_BTV.log_softmax(-1).gather(-1, tok_BT1).squeeze(-1)
    assert torch.allclose(raw_BT.where(m, 0.0), rb.model_logprobs_BT, atol=1e-5)  # pi_old needs no recompute
    B, T, V = logits_BTV.shape
    filt = filter_logits(logits_BTV.reshape(B * T, V), temperature, top_p, top_k).reshape(B, T, V)
    samp_BT = filt.log_softmax(-1).gather(-1, tok_BT1).squeeze(-1)
    assert torch.allclose(samp_BT.where(m, 0.0), rb.sampler_logprobs_BT, atol=1e-5)
    assert torch.isfinite(rb.sampler_logprobs_BT).all()


def test_eos_stops_and_masks(model):
    # row 0 emits EOS at step 1, row 2 a <think> at step 0 and EOS at step 3; row 1 never: cut at max_new_tokens
    rec = Recorder(forced={(0, 1): EOS, (2, 0): THINK, (2, 3): EOS, (1, 0): 5, (1, 1): 6, (1, 2): 7, (1, 3): 8})
    rb = _gen(model, PROMPTS, sampler=rec, max_new_tokens=4, masked_token_ids=[THINK])
    assert rb.response_len == 4
    assert rb.eos_mask_BT.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert rb.response_mask_BT.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert rb.response_ids_BT[0, 1] == EOS and (rb.response_ids_BT[0, 2:] == PAD).all()
    assert rb.response_lengths_B.tolist() == [2, 4, 4] and rb.finished_B.tolist() == [True, False, True]
    assert (rb.model_logprobs_BT[0, 2:] == 0).all() and (rb.sampler_logprobs_BT[0, 2:] == 0).all()
    assert rb.attention_mask_BL[:, rb.prompt_len:].tolist() == rb.eos_mask_BT.tolist()

    # the loop stops as soon as every row has emitted EOS
    rec = Recorder(forced={(0, 0): EOS, (1, 2): EOS, (2, 1): EOS})
    rb = _gen(model, PROMPTS, sampler=rec, max_new_tokens=50)
    assert rb.response_len == 3 and rec.step == 3 and rb.finished_B.all()


def test_batch_size_chunks_match(model):
    full = _gen(model, PROMPTS, n_samples=2, temperature=0.0)
    chunked = _gen(model, PROMPTS, n_samples=2, temperature=0.0, batch_size=4)
    for f in ("input_ids_BL", "attention_mask_BL", "response_mask_BT", "model_logprobs_BT"):
        a, b = getattr(full, f), getattr(chunked, f)
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5), f


def test_seeded_deterministic_and_mode_restored(model):
    model.train()
    try:
        runs = [_gen(model, PROMPTS, n_samples=2, max_new_tokens=8, generator=torch.Generator().manual_seed(s),
                     sampler=inverse_cdf_sample) for s in (7, 7, 8)]
        assert model.training  # restored
    finally:
        model.eval()
    assert torch.equal(runs[0].input_ids_BL, runs[1].input_ids_BL)
    assert torch.equal(runs[0].model_logprobs_BT, runs[1].model_logprobs_BT)
    assert not torch.equal(runs[0].response_ids_BT, runs[2].response_ids_BT)


def test_bad_args(model):
    with pytest.raises(ValueError, match="n_samples"):
        _gen(model, PROMPTS, n_samples=0)
    with pytest.raises(ValueError, match="empty prompt"):
        _gen(model, [[1], []])
