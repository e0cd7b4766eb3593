"""top-K and full estimators, chunking, rewards, transforms, credit assignment, selection and aggregation."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opdkit.objectives import (FullSignal, ObjectiveConfig, SampledSignal, TopKSignal, aggregate,
                               compute_advantages, make_divergence, opd_loss, opd_per_token_loss)
from opdkit.objectives.sampled import discounted_returns, select_by_entropy, transform_rewards
from tests.objectives.helpers import DT, random_problem, signal_for


def _loss_and_grad(cfg, logits, teacher_lp, tokens, mask, **kw):
    lg = logits.clone().requires_grad_(True)
    loss, m = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=signal_for(cfg, teacher_lp, tokens),
                       logits_BTV=lg, **kw)
    return loss, torch.autograd.grad(loss, lg)[0], m


# --------------------------------------------------------------------------------------- top-K
@pytest.mark.parametrize("div", ["reverse_kl", "forward_kl", "jsd"])
def test_topk_with_k_equal_v_equals_full(div):
    logits, teacher, tokens, mask = random_problem(V=9)
    l_full, g_full, _ = _loss_and_grad(ObjectiveConfig(estimator="full", divergence=div), logits, teacher, tokens, mask)
    l_topk, g_topk, _ = _loss_and_grad(ObjectiveConfig(estimator="topk", top_k=9, divergence=div), logits, teacher,
                                       tokens, mask)
    assert torch.allclose(l_full, l_topk, atol=1e-12) and torch.allclose(g_full, g_topk, atol=1e-12)


def test_topk_renormalisation_and_tail_by_hand():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=DT)
    q = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=DT)
    tok = torch.tensor([[3]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    # teacher top-2 = ids {1, 2}
    sig = TopKSignal(torch.tensor([[[q[1].log(), q[2].log()]]]), torch.tensor([[[1, 2]]]),
                     torch.tensor([[q[3].log()]]))
    logits = p.log().view(1, 1, 4)

    def loss(**kw):
        cfg = ObjectiveConfig(estimator="topk", top_k=2, aggregation="sum", **kw)
        return opd_loss(cfg, tokens_BT=tok, mask_BT=mask, teacher=sig, logits_BTV=logits)[0].item()

    ps, qs = p[[1, 2]] / p[[1, 2]].sum(), q[[1, 2]] / q[[1, 2]].sum()
    assert math.isclose(loss(), (ps * (ps / qs).log()).sum().item(), rel_tol=1e-12)
    # tail bucket: categories {1, 2, rest} with raw masses
    pt = torch.stack([p[1], p[2], 1 - p[1] - p[2]])
    qt = torch.stack([q[1], q[2], 1 - q[1] - q[2]])
    assert math.isclose(loss(topk_tail=True), (pt * (pt / qt).log()).sum().item(), rel_tol=1e-12)
    # sampled token 3 added to the support, then renormalised on {1, 2, 3}
    idx = [1, 2, 3]
    ps3, qs3 = p[idx] / p[idx].sum(), q[idx] / q[idx].sum()
    assert math.isclose(loss(topk_include_sampled=True), (ps3 * (ps3 / qs3).log()).sum().item(), rel_tol=1e-12)
    # sampled token already in the support: nothing is added
    tok_in = torch.tensor([[1]])
    cfg = ObjectiveConfig(estimator="topk", top_k=2, aggregation="sum", topk_include_sampled=True)
    got = opd_loss(cfg, tokens_BT=tok_in, mask_BT=mask, teacher=sig, logits_BTV=logits)[0].item()
    assert math.isclose(got, (ps * (ps / qs).log()).sum().item(), rel_tol=1e-12)


# --------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("est", ["sampled", "topk", "full"])
def test_chunked_equals_unchunked_and_hidden_path_equals_logits_path(est):
    torch.manual_seed(0)
    B, T, H, V = 3, 7, 6, 13
    hidden = torch.randn(B, T, H, dtype=DT)
    W = torch.randn(V, H, dtype=DT)
    _, teacher, tokens, mask = random_problem(B, T, V, seed=3)
    results = []
    for chunk, use_hidden in ((10_000, False), (4, False), (1, True), (5, True)):
        cfg = ObjectiveConfig(estimator=est, top_k=4, divergence="jsd", chunk_size=chunk,
                              gradient="corrected" if est == "sampled" else "stopgrad")
        h, w = hidden.clone().requires_grad_(True), W.clone().requires_grad_(True)
        kw = dict(hidden_BTH=h, lm_head_weight_VH=w) if use_hidden else dict(logits_BTV=h @ w.T)
        loss, m = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=signal_for(cfg, teacher, tokens), **kw)
        results.append((loss, *torch.autograd.grad(loss, (h, w)), m["entropy/student"]))
    ref = results[0]
    for r in results[1:]:
        assert torch.allclose(r[0], ref[0], atol=1e-6, rtol=0)
        assert torch.allclose(r[1], ref[1], atol=1e-6, rtol=0) and torch.allclose(r[2], ref[2], atol=1e-6, rtol=0)
        assert abs(r[3] - ref[3]) < 1e-6


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces, forward and backward (a peak-memory probe)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("est", ["full", "topk", "sampled"])
def test_hidden_state_path_never_materialises_BTV(est):
    """Peak extra memory is O(chunk x V): no op, forward or backward, makes a tensor of B*T*V elements."""
    B, T, H, V, chunk = 4, 16, 8, 64, 8
    hidden = torch.randn(B, T, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    sizes = {}
    for c in (chunk, B * T):
        cfg = ObjectiveConfig(estimator=est, chunk_size=c, top_k=4)
        if est == "full":
            sig = FullSignal(hidden_BTH=torch.randn(B, T, H), head_weight_VH=torch.randn(V, H))
        elif est == "topk":
            sig = TopKSignal(*torch.log_softmax(torch.randn(B, T, V), -1).topk(4, -1))
        else:
            sig = SampledSignal(torch.randn(B, T).clamp(max=0))
        probe = _MaxNumel()
        with probe:
            loss, _ = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=sig, hidden_BTH=hidden,
                               lm_head_weight_VH=W)
            loss.backward()
        sizes[c] = probe.max_numel
    assert sizes[chunk] <= chunk * V < B * T * V
    assert sizes[B * T] >= B * T * V  # the probe does see a [B*T, V] tensor when one chunk holds everything


# --------------------------------------------------------------------------------------- rewards
def test_power_reward_bounded_sign_consistent_and_log_ratio_limit():
    lp = torch.log(torch.tensor([[1e-12, 0.01, 0.2, 0.5, 0.9, 1.0]], dtype=DT))
    lq = torch.log(torch.tensor([[0.7, 1e-9, 0.2, 0.9, 0.1, 1e-30]], dtype=DT))
    mask = torch.ones_like(lp, dtype=torch.bool)
    for a in (0.1, 1.0, 5.0):
        r, _ = compute_advantages(ObjectiveConfig(reward="power", power_a=a), lp, lq, mask)
        assert r.abs().max() <= 1.0
        assert torch.equal(torch.sign(r), torch.sign(lq - lp))
    a = 1e-6
    r, _ = compute_advantages(ObjectiveConfig(reward="power", power_a=a), lp, lq, mask)
    assert torch.allclose(r / a, lq - lp, rtol=1e-3)


def test_transforms_by_hand():
    r = torch.tensor([[-8.0, -1.0, 0.5, 3.0]], dtype=DT)
    m = torch.tensor([[True, True, True, False]])

    def tf(**kw):
        return transform_rewards(ObjectiveConfig(**kw), r, m)

    assert torch.equal(tf(transform="clip", clip_low=-1, clip_high=1), torch.tensor([[-1, -1, 0.5, 0]], dtype=DT))
    assert torch.allclose(tf(transform="tanh"), torch.tanh(r) * m)
    v = r[0, :3]
    assert torch.allclose(tf(transform="zscore")[0, :3], (v - v.mean()) / v.std(unbiased=False), atol=1e-6)
    # per sign, over the valid tokens (the masked 3.0 sets no scale): positives / 0.5, negatives / 8
    assert torch.allclose(tf(transform="signmaxabs"), torch.tensor([[-1.0, -0.125, 1.0, 0.0]], dtype=DT))
    assert tf(transform="zscore")[0, 3] == 0


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=DT)
    m = torch.tensor([[True, False, True, True]])
    assert torch.equal(discounted_returns(r, m, 0.0), torch.tensor([[1.0, 0, 4, 8]], dtype=DT))
    assert torch.equal(discounted_returns(r, m, 1.0), torch.tensor([[13.0, 0, 12, 8]], dtype=DT))
    assert torch.allclose(discounted_returns(r, m, 0.5), torch.tensor([[1 + 0.25 * 4 + 0.125 * 8, 0, 8, 8]],
                                                                      dtype=DT))


def test_discounted_returns_skip_counts_valid_tokens_only():
    """skip: a masked hole (a multi-turn episode's environment tokens) is no step: the returns of a row with holes
    equal those of the same row with the holes removed."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 9, generator=g, dtype=DT)
    m = torch.rand(3, 9, generator=g) < 0.6
    out = discounted_returns(r, m, 0.7, "skip")
    for b in range(3):
        dense = discounted_returns(r[b, m[b]][None], torch.ones(1, int(m[b].sum()), dtype=torch.bool), 0.7)
        torch.testing.assert_close(out[b, m[b]], dense[0])
        assert bool((out[b, ~m[b]] == 0).all())
    assert torch.allclose(discounted_returns(r[:1, :4], torch.tensor([[True, False, True, True]]), 0.5, "skip")[0, 0],
                          r[0, 0] + 0.5 * r[0, 2] + 0.25 * r[0, 3])
    assert not torch.allclose(out, discounted_returns(r, m, 0.7, "carry"))


def test_entropy_selection_keeps_top_fraction():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    keep = select_by_entropy(ent, m, 0.5)  # 7 valid -> keep 4 highest: 0.9, 0.8, 0.7, 0.5
    assert keep.sum() == 4 and keep[0, 1] and keep[1, 2] and keep[0, 3] and keep[0, 2] and not keep[1, 3]
    logits, teacher, tokens, mask = random_problem()
    cfg = ObjectiveConfig(estimator="full", entropy_keep_fraction=0.5, entropy_source="teacher")
    per, met = opd_per_token_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=FullSignal(teacher), logits_BTV=logits)
    assert per.mask_BT.sum() == math.ceil(0.5 * mask.sum().item())
    assert torch.all(per.loss_BT[~per.mask_BT] == 0)


def test_task_reward_mixing():
    logits, teacher, tokens, mask = random_problem()
    R = torch.tensor([1.0, 0.0, -2.0], dtype=DT)
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    tq = teacher.gather(-1, tokens[..., None]).squeeze(-1)
    a0, _ = compute_advantages(ObjectiveConfig(), lp, tq, mask)
    a1, met = compute_advantages(ObjectiveConfig(task_reward_coef=0.5), lp, tq, mask, task_rewards_B=R)
    assert torch.allclose(a1 - a0, 0.5 * R[:, None] * mask)
    assert met["task_reward/mean"] == pytest.approx(R.mean().item())
    # dense estimators: REINFORCE term -coef * R * log p(y)
    cfg0, cfg1 = ObjectiveConfig(estimator="full"), ObjectiveConfig(estimator="full", task_reward_coef=0.5)
    p0, _ = opd_per_token_loss(cfg0, tokens_BT=tokens, mask_BT=mask, teacher=FullSignal(teacher), logits_BTV=logits)
    p1, _ = opd_per_token_loss(cfg1, tokens_BT=tokens, mask_BT=mask, teacher=FullSignal(teacher), logits_BTV=logits,
                               task_rewards_B=R)
    assert torch.allclose(p1.loss_BT - p0.loss_BT, -0.5 * R[:, None] * lp * mask)


# --------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("est,agg,transform", [("sampled", "token_mean", "zscore"), ("full", "token_mean", "none"),
                                               ("topk", "seq_mean_token_mean", "none"), ("sampled", "sum", "none")])
def test_microbatch_split_with_global_counts_gives_the_same_gradient(est, agg, transform):
    logits, teacher, tokens, mask = random_problem(B=4, T=5, V=8, seed=11)
    cfg = ObjectiveConfig(estimator=est, top_k=3, aggregation=agg, transform=transform, divergence="forward_kl",
                          gradient="corrected" if est == "sampled" else "stopgrad")
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    sig = signal_for(cfg, teacher, tokens)
    adv = compute_advantages(cfg, lp, sig.logprobs_BT, mask)[0] if est == "sampled" else None

    lg = logits.clone().requires_grad_(True)
    loss, _ = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=sig, logits_BTV=lg, advantages_BT=adv)
    full_grad = torch.autograd.grad(loss, lg)[0]

    n_tok, n_seq = mask.sum().item(), (mask.sum(-1) > 0).sum().item()
    lg2 = logits.clone().requires_grad_(True)
    total = 0
    for rows in (slice(0, 1), slice(1, 4)):
        sub = signal_for(cfg, teacher[rows], tokens[rows])
        l_mb, _ = opd_loss(cfg, tokens_BT=tokens[rows], mask_BT=mask[rows], teacher=sub, logits_BTV=lg2[rows],
                           advantages_BT=None if adv is None else adv[rows], num_tokens=n_tok, num_sequences=n_seq)
        total = total + l_mb
    split_grad = torch.autograd.grad(total, lg2)[0]
    assert torch.allclose(full_grad, split_grad, atol=1e-12)


def test_aggregate_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(loss, m, "token_mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, m, "token_mean", num_tokens=8).item() == pytest.approx(10 / 8)
    assert aggregate(loss, m, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(loss, m, "sum").item() == pytest.approx(10)


def test_metrics_contents():
    logits, teacher, tokens, mask = random_problem()
    cfg = ObjectiveConfig(pg="ppo")
    _, m = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=signal_for(cfg, teacher, tokens), logits_BTV=logits)
    for k in ("reward/mean", "reward/std", "reward/min", "reward/max", "reward/p05", "reward/p95", "kl",
              "entropy/student", "clip_frac", "masked_frac", "reward_by_position/mean", "reward_by_position/min",
              "reward_by_position/max", "loss"):
        assert k in m, k
    assert len(m["reward_by_position/mean"]) == tokens.shape[1]
    assert m["masked_frac"] == pytest.approx(1 - mask.float().mean().item())
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    tq = teacher.gather(-1, tokens[..., None]).squeeze(-1)
    assert m["kl"] == pytest.approx((lp - tq)[mask].mean().item())
    assert m["reward/min"] == pytest.approx((tq - lp)[mask].min().item())
    full_cfg = ObjectiveConfig(estimator="full")
    _, mf = opd_loss(full_cfg, tokens_BT=tokens, mask_BT=mask, teacher=FullSignal(teacher), logits_BTV=logits)
    exact = (torch.softmax(logits, -1) * (torch.log_softmax(logits, -1) - teacher)).sum(-1)[mask].mean()
    assert mf["kl"] == pytest.approx(exact.item()) and "entropy/teacher" in mf
    assert make_divergence("reverse_kl").name == "reverse_kl"
