"""RolloutBatch.rows / cat and the signals' rows / cat: what routers and caches split and join."""

from __future__ import annotations

import torch

from opdkit.models import tiny_llama
from opdkit.objectives import FullSignal, SampledSignal, TopKSignal
from opdkit.rollout import RolloutBatch, generate
from opdkit.teacher import score_rollout


def _batch(prompts, seed=0, T=6):
    model = tiny_llama(24, seed=3)
    return model, generate(model, prompts, n_samples=2, max_new_tokens=T, eos_token_ids=2, pad_token_id=0,
                           generator=torch.Generator().manual_seed(seed))


def test_rows_then_cat_round_trips_and_scores_the_same():
    model, b = _batch([[1, 5, 6], [1, 7], [1, 8, 9, 10]])
    b = b.with_records(["a", "b", "c"])
    assert b.records_B == ["a", "a", "b", "b", "c", "c"]
    odd, even = b.rows([1, 3, 5]), b.rows(torch.tensor([True, False, True, False, True, False]))
    assert odd.records_B == ["a", "b", "c"] and even.prompt_index_B.tolist() == [0, 1, 2]
    joined = RolloutBatch.cat([even, odd])
    order = [0, 2, 4, 1, 3, 5]
    for name in ("input_ids_BL", "attention_mask_BL", "response_ids_BT", "response_mask_BT", "model_logprobs_BT"):
        assert torch.equal(getattr(joined, name), getattr(b, name)[order]), name
    for kind, kw in (("sampled", {}), ("topk", {"top_k": 3, "need_sampled": True}), ("full", {})):
        whole = score_rollout(model, b, signal=kind, **kw)
        parts = [score_rollout(model, x, signal=kind, **kw) for x in (even, odd)]
        cat = type(whole).cat(parts)
        ref = whole.rows(order)
        if kind == "full":
            assert torch.allclose(cat.dense_logprobs(), ref.dense_logprobs(), atol=1e-6)
        else:
            for f in ("logprobs_BT", "logprobs_BTK", "ids_BTK", "sampled_logprobs_BT"):
                if hasattr(ref, f) and getattr(ref, f) is not None:
                    assert torch.allclose(getattr(cat, f).float(), getattr(ref, f).float(), atol=1e-6), f


def test_cat_pads_prompts_left_and_responses_right():
    model, short = _batch([[1, 5]], T=2)
    _, long = _batch([[1, 5, 6, 7, 8]], T=5)
    joined = RolloutBatch.cat([short, long], pad_token_id=0)
    assert joined.prompt_len == long.prompt_len and joined.response_len == max(short.response_len, long.response_len)
    # the short rows' tokens sit at the same positions relative to the prompt end: same teacher log-probs
    a = score_rollout(model, short, signal="sampled").logprobs_BT
    j = score_rollout(model, joined, signal="sampled").logprobs_BT
    assert torch.allclose(j[: short.batch_size, : short.response_len], a, atol=1e-5)
    assert (j[: short.batch_size, short.response_len:] == 0).all()


def test_signal_cat_pads_T_with_zeros_and_refuses_mixed_kinds():
    a = SampledSignal(torch.full((2, 3), -1.0))
    b = SampledSignal(torch.full((1, 5), -2.0))
    c = SampledSignal.cat([a, b])
    assert c.logprobs_BT.shape == (3, 5) and (c.logprobs_BT[:2, 3:] == 0).all()
    k = TopKSignal(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    try:
        SampledSignal.cat([a, k])
    except ValueError as e:
        assert "different kinds" in str(e)
    else:
        raise AssertionError("mixed kinds joined")
    # full signals of two different heads are materialised as log-probs
    W1, W2 = torch.randn(7, 4), torch.randn(7, 4)
    f1 = FullSignal(hidden_BTH=torch.randn(1, 2, 4), head_weight_VH=W1)
    f2 = FullSignal(hidden_BTH=torch.randn(2, 2, 4), head_weight_VH=W2)
    f = FullSignal.cat([f1, f2])
    assert f.logprobs_BTV is not None and f.logprobs_BTV.shape == (3, 2, 7)
    assert torch.allclose(f.logprobs_BTV[:1], f1.dense_logprobs())
    same = FullSignal.cat([f1, FullSignal(hidden_BTH=torch.randn(1, 2, 4), head_weight_VH=W1)])
    assert same.hidden_BTH is not None and same.hidden_BTH.shape == (2, 2, 4)
