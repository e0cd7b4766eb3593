"""The fused full-vocabulary path (objectives/fused.py) against the generic autograd path, in float64: values,
metrics and gradients with respect to hidden states, lm_head weight and bias, to 1e-10."""

import pytest
import torch

from opdkit.objectives import ObjectiveConfig
from opdkit.objectives.fused import chunk_rows, fused_supported
from opdkit.objectives.loss import aggregate, opd_per_token_loss
from opdkit.objectives.signals import FullSignal

torch.set_num_threads(1)
B, T, H, V = 3, 7, 5, 11


def _case(seed: int, bias: bool, teacher_hidden: bool):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 3] = False  # a gap inside a sequence
    t_logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t_logits[1, :, 4] = -1e9  # teacher probability 0 on one token (floored as in the generic path)
    if teacher_hidden:
        th = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        tW = torch.randn(V, H, generator=g, dtype=torch.float64)
        sig = FullSignal(hidden_BTH=th, head_weight_VH=tW)
    else:
        sig = FullSignal(logprobs_BTV=torch.log_softmax(t_logits, -1))
    return h, W, b, tok, mask, sig


def _run(cfg, fused, h, W, b, tok, mask, sig, temperature, aggregation):
    h, W = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    kw = dict(tokens_BT=tok, mask_BT=mask, teacher=sig, temperature=temperature)
    if fused:
        per, m = opd_per_token_loss(cfg, hidden_BTH=h, lm_head_weight_VH=W, lm_head_bias_V=b, fused=True, **kw)
    else:
        logits = torch.nn.functional.linear(h, W, b)
        per, m = opd_per_token_loss(cfg, logits_BTV=logits, **kw)
    loss = aggregate(per.loss_BT, per.mask_BT, aggregation)
    loss.backward()
    grads = [h.grad, W.grad] + ([] if b is None else [b.grad])
    return loss.detach(), per.loss_BT.detach(), m, grads


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1),
                                             ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_equals_generic_float64(divergence, beta, temperature):
    for seed, bias, teacher_hidden, agg in [(0, False, False, "token_mean"), (1, True, True, "seq_mean_token_mean"),
                                            (2, True, False, "sum")]:
        cfg = ObjectiveConfig(estimator="full", divergence=divergence, beta=beta, chunk_size=4)
        args = _case(seed, bias, teacher_hidden)
        lf, per_f, mf, gf = _run(cfg, True, *args, temperature, agg)
        lg, per_g, mg, gg = _run(cfg, False, *args, temperature, agg)
        assert abs(lf.item() - lg.item()) < 1e-10
        assert torch.allclose(per_f, per_g, atol=1e-10, rtol=0)
        for k in ("kl", "divergence", "entropy/teacher", "entropy/student", "reward/mean"):
            assert abs(mf[k] - mg[k]) < 1e-10, k
        for a, c in zip(gf, gg, strict=True):
            assert torch.allclose(a, c, atol=1e-10, rtol=0)


def test_fused_task_reward_hybrid_gradient_through_the_token_logprob():
    """The OPD-RL hybrid adds -coef * R * log p(y_t): the fused backward's onehot - s term."""
    cfg = ObjectiveConfig(estimator="full", divergence="jsd", beta=0.3, task_reward_coef=0.5, chunk_size=5)
    h, W, b, tok, mask, sig = _case(3, True, False)
    R = torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    out = []
    for fused in (True, False):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        kw = dict(tokens_BT=tok, mask_BT=mask, teacher=sig, task_rewards_B=R)
        if fused:
            per, _ = opd_per_token_loss(cfg, hidden_BTH=hh, lm_head_weight_VH=WW, fused=True, **kw)
        else:
            per, _ = opd_per_token_loss(cfg, logits_BTV=hh @ WW.T, **kw)
        aggregate(per.loss_BT, per.mask_BT).backward()
        out.append((hh.grad, WW.grad))
    for a, c in zip(out[0], out[1], strict=True):
        assert torch.allclose(a, c, atol=1e-10, rtol=0)


def test_fused_float32_close_to_float64_and_empty_selection():
    cfg = ObjectiveConfig(estimator="full", divergence="reverse_kl")
    h, W, b, tok, mask, sig = _case(4, False, False)
    l64 = _run(cfg, True, h, W, b, tok, mask, sig, 1.0, "token_mean")[0]
    sig32 = FullSignal(logprobs_BTV=sig.logprobs_BTV.float())
    l32 = _run(cfg, True, h.float(), W.float(), None, tok, mask, sig32, 1.0, "token_mean")[0]
    assert abs(l32.item() - l64.item()) < 1e-5
    none = torch.zeros_like(mask)
    loss, _, _, grads = _run(cfg, True, h, W, b, tok, none, sig, 1.0, "token_mean")
    assert loss.item() == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_fused_refuses_what_it_does_not_compute():
    h, W, b, tok, mask, sig = _case(5, False, False)
    assert not fused_supported(ObjectiveConfig(estimator="sampled"))
    assert not fused_supported(ObjectiveConfig(estimator="topk"))
    cfg = ObjectiveConfig(estimator="full", divergence="tv")
    assert not fused_supported(cfg)
    with pytest.raises(ValueError, match="fused update computes objective.estimator=full"):
        opd_per_token_loss(cfg, tokens_BT=tok, mask_BT=mask, teacher=sig, hidden_BTH=h, lm_head_weight_VH=W, fused=True)
    with pytest.raises(ValueError, match="fused=True needs hidden_BTH"):
        opd_per_token_loss(ObjectiveConfig(estimator="full"), tokens_BT=tok, mask_BT=mask, teacher=sig,
                           logits_BTV=h @ W.T, fused=True)


def test_chunk_rows_caps_the_work_buffers():
    assert chunk_rows(1024, 512) == 1024
    assert chunk_rows(1024, 32000) == (1 << 22) // 32000 == 131
    assert chunk_rows(4, 10**9) == 1


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "sum"])
def test_fused_gradient_in_forward_takes_no_recompute(monkeypatch, agg):
    """A loss that is the divergence alone, aggregated as cfg.aggregation: the gradient is formed during forward
    and backward never recomputes a chunk (the recompute is made to fail); values and gradients still equal the
    generic path."""
    import opdkit.objectives.fused as F
    for divergence, beta in [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)]:
        cfg = ObjectiveConfig(estimator="full", divergence=divergence, beta=beta, chunk_size=4, aggregation=agg)
        args = _case(6, True, True)
        lg, _, _, gg = _run(cfg, False, *args, 0.7, agg)
        with monkeypatch.context() as m:
            m.setattr(F, "_recompute", lambda *a: pytest.fail("recomputed although the weights were announced"))
            lf, _, _, gf = _run(cfg, True, *args, 0.7, agg)
        assert abs(lf.item() - lg.item()) < 1e-10
        for a, c in zip(gf, gg, strict=True):
            assert torch.allclose(a, c, atol=1e-10, rtol=0)


def test_fused_other_loss_weights_fall_back_to_the_recompute(monkeypatch):
    """The announced weights (a token mean) are not what the loss applies (random per-token weights): backward
    notices and recomputes; the gradients equal the generic path's for the loss actually taken."""
    import opdkit.objectives.fused as F
    cfg = ObjectiveConfig(estimator="full", divergence="jsd", beta=0.5, chunk_size=4)
    h, W, b, tok, mask, sig = _case(7, True, False)
    w_BT = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    calls = []
    real = F._recompute
    monkeypatch.setattr(F, "_recompute", lambda *a: calls.append(1) or real(*a))
    out = []
    for fused in (True, False):
        hh, WW = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        kw = dict(tokens_BT=tok, mask_BT=mask, teacher=sig)
        if fused:
            per, _ = opd_per_token_loss(cfg, hidden_BTH=hh, lm_head_weight_VH=WW, lm_head_bias_V=b, fused=True, **kw)
        else:
            per, _ = opd_per_token_loss(cfg, logits_BTV=torch.nn.functional.linear(hh, WW, b), **kw)
        (per.loss_BT * w_BT).sum().backward()
        out.append((hh.grad, WW.grad))
    assert calls == [1]
    for a, c in zip(out[0], out[1], strict=True):
        assert torch.allclose(a, c, atol=1e-10, rtol=0)
