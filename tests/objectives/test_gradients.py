"""Gradient proofs by exact enumeration (float64).

One position: E_{y~p}[grad loss(y)] = sum_y p(y) grad loss(y) is compared with the gradient of the full divergence.
Two positions: a tabular policy over a 3-token vocabulary, enumerating all 9 sequences.
"""

import pytest
import torch

from opdkit.objectives import ObjectiveConfig, SampledSignal, make_divergence, opd_loss

DT = torch.float64
V = 5


def _position(seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=DT)
    lq = torch.log_softmax(1.7 * torch.randn(V, generator=g, dtype=DT), -1)
    return theta, lq


def expected_sampled_grad(cfg, theta, lq):
    """sum_y p(y) * grad_theta loss(theta | y) for a single-token response y."""
    p = torch.softmax(theta, -1).detach()
    total = torch.zeros_like(theta)
    for y in range(V):
        th = theta.clone().requires_grad_(True)
        tok = torch.tensor([[y]])
        loss, _ = opd_loss(cfg, tokens_BT=tok, mask_BT=torch.ones(1, 1, dtype=torch.bool),
                           teacher=SampledSignal(lq[y].view(1, 1)), logits_BTV=th.view(1, 1, V))
        (g,) = torch.autograd.grad(loss, th)
        total += p[y] * g
    return total


def true_grad(cfg, theta, lq):
    th = theta.clone().requires_grad_(True)
    div = make_divergence(cfg.divergence, beta=cfg.beta, alpha=cfg.alpha)
    d = div.term(torch.log_softmax(th, -1), lq).sum()
    (g,) = torch.autograd.grad(d, th)
    return g


ALL_F = [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}),
         ("tv", {}), ("alpha", {"alpha": 0.5}), ("alpha", {"alpha": 2.0}), ("alpha", {"alpha": -0.5})]


@pytest.mark.parametrize("name,kw", ALL_F)
@pytest.mark.parametrize("seed", [0, 1])
def test_corrected_is_unbiased_for_every_f(name, kw, seed):
    theta, lq = _position(seed)
    cfg = ObjectiveConfig(divergence=name, gradient="corrected", aggregation="sum", **kw)
    assert torch.allclose(expected_sampled_grad(cfg, theta, lq), true_grad(cfg, theta, lq), atol=1e-10)


def test_stopgrad_is_unbiased_for_reverse_kl():
    theta, lq = _position(3)
    cfg = ObjectiveConfig(divergence="reverse_kl", gradient="stopgrad", aggregation="sum")
    assert torch.allclose(expected_sampled_grad(cfg, theta, lq), true_grad(cfg, theta, lq), atol=1e-10)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2})])
def test_stopgrad_is_biased_for_fkl_and_jsd_by_the_predicted_amount(name, kw):
    """OPD+ section 3.2: the stop-gradient estimator misses the direct reward-gradient term, so
    E[stopgrad] - grad D_f = sum_y p(y) u f'(u) grad log p(y) = sum_y q(y) f'(u(y)) grad log p(y)."""
    theta, lq = _position(4)
    cfg = ObjectiveConfig(divergence=name, gradient="stopgrad", aggregation="sum", **kw)
    est, tru = expected_sampled_grad(cfg, theta, lq), true_grad(cfg, theta, lq)
    div = make_divergence(name, **kw)
    p = torch.softmax(theta, -1)
    u = lq.exp() / p
    jac = torch.eye(V, dtype=DT) - p[None, :]  # d log p(y) / d theta, row y
    predicted_bias = (lq.exp() * div.fprime(u)) @ jac
    assert (est - tru).norm() > 1e-2 * tru.norm()
    assert torch.allclose(est - tru, predicted_bias, atol=1e-10)


# --------------------------------------------------------------------------------------- sequence level
def _tabular(seed=0):
    g = torch.Generator().manual_seed(seed)
    th1 = torch.randn(3, generator=g, dtype=DT)
    th2 = torch.randn(3, 3, generator=g, dtype=DT)  # row: first token
    q1 = torch.log_softmax(torch.randn(3, generator=g, dtype=DT), -1)
    q2 = torch.log_softmax(torch.randn(3, 3, generator=g, dtype=DT), -1)
    return th1, th2, q1, q2


def _seq_expected_grad(cfg, th1, th2, q1, q2):
    p1 = torch.softmax(th1, -1).detach()
    p2 = torch.softmax(th2, -1).detach()
    g1, g2 = torch.zeros_like(th1), torch.zeros_like(th2)
    for a in range(3):
        for b in range(3):
            t1, t2 = th1.clone().requires_grad_(True), th2.clone().requires_grad_(True)
            logits = torch.stack([t1, t2[a]]).view(1, 2, 3)
            tok = torch.tensor([[a, b]])
            sig = SampledSignal(torch.stack([q1[a], q2[a, b]]).view(1, 2))
            loss, _ = opd_loss(cfg, tokens_BT=tok, mask_BT=torch.ones(1, 2, dtype=torch.bool), teacher=sig,
                               logits_BTV=logits)
            d1, d2 = torch.autograd.grad(loss, (t1, t2))
            w = p1[a] * p2[a, b]
            g1 += w * d1
            g2 += w * d2
    return g1, g2


def test_sequence_level_gamma_one_is_unbiased_for_sequence_kl_and_gamma_zero_is_token_level():
    th1, th2, q1, q2 = _tabular()
    t1, t2 = th1.clone().requires_grad_(True), th2.clone().requires_grad_(True)
    lp1, lp2 = torch.log_softmax(t1, -1), torch.log_softmax(t2, -1)
    # Sequence-level reverse KL over all 9 sequences.
    seq_kl = sum(lp1[a].exp() * lp2[a, b].exp() * (lp1[a] + lp2[a, b] - q1[a] - q2[a, b])
                 for a in range(3) for b in range(3))
    s1, s2 = torch.autograd.grad(seq_kl, (t1, t2))
    # Token-level objective: per-position KL with the prefix distribution held fixed (no gradient through it).
    t1b, t2b = th1.clone().requires_grad_(True), th2.clone().requires_grad_(True)
    lp1b, lp2b = torch.log_softmax(t1b, -1), torch.log_softmax(t2b, -1)
    pa = torch.softmax(th1, -1)
    tok_kl = (lp1b.exp() * (lp1b - q1)).sum() + sum(pa[a] * (lp2b[a].exp() * (lp2b[a] - q2[a])).sum() for a in range(3))
    k1, k2 = torch.autograd.grad(tok_kl, (t1b, t2b))

    cfg1 = ObjectiveConfig(gamma=1.0, aggregation="sum")
    e1, e2 = _seq_expected_grad(cfg1, th1, th2, q1, q2)
    assert torch.allclose(e1, s1, atol=1e-10) and torch.allclose(e2, s2, atol=1e-10)

    cfg0 = ObjectiveConfig(gamma=0.0, aggregation="sum")
    z1, z2 = _seq_expected_grad(cfg0, th1, th2, q1, q2)
    assert torch.allclose(z1, k1, atol=1e-10) and torch.allclose(z2, k2, atol=1e-10)
    assert (z1 - s1).norm() > 1e-3  # gamma = 0 misses the effect of the first token on the second's KL
    assert torch.allclose(z2, s2, atol=1e-10)  # the last position has no future either way

    # gamma in between interpolates the first-position gradient linearly.
    h1, _ = _seq_expected_grad(ObjectiveConfig(gamma=0.5, aggregation="sum"), th1, th2, q1, q2)
    assert torch.allclose(h1, 0.5 * (z1 + e1), atol=1e-10)


# --------------------------------------------------------------------------------------- PPO
def _ppo_case():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, V, generator=g, dtype=DT)
    tokens = torch.randint(0, V, (2, 4), generator=g)
    tq = torch.log_softmax(torch.randn(2, 4, V, generator=g, dtype=DT), -1).gather(-1, tokens[..., None]).squeeze(-1)
    return logits, tokens, tq


@pytest.mark.parametrize("gradient", ["stopgrad", "corrected"])
def test_ppo_at_ratio_one_equals_reinforce(gradient):
    logits, tokens, tq = _ppo_case()
    mask = torch.ones(2, 4, dtype=torch.bool)
    grads = []
    for pg in ("reinforce", "ppo"):
        lg = logits.clone().requires_grad_(True)
        old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        cfg = ObjectiveConfig(pg=pg, gradient=gradient, divergence="forward_kl")
        loss, m = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=SampledSignal(tq), logits_BTV=lg,
                           old_logprobs_BT=old)
        grads.append(torch.autograd.grad(loss, lg)[0])
        assert m["clip_frac"] == 0.0
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_ppo_clipping_engages_where_it_should():
    logits, tokens, _ = _ppo_case()
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    # Advantages: +1 everywhere on row 0, -1 on row 1. Old log-probs put ratio at e^0.5 ~ 1.65 on columns 0-1
    # (outside 1 + 0.2) and e^-0.5 ~ 0.61 on columns 2-3 (outside 1 - 0.2).
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4], dtype=DT)
    shift = torch.tensor([0.5, 0.5, -0.5, -0.5], dtype=DT)
    old = lp - shift
    lg = logits.clone().requires_grad_(True)
    cfg = ObjectiveConfig(pg="ppo", eps_low=0.2, eps_high=0.2, aggregation="sum")
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss, m = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=SampledSignal(lp), logits_BTV=lg,
                       old_logprobs_BT=old, advantages_BT=adv)
    g = torch.autograd.grad(loss, lg)[0].norm(dim=-1)
    # Clipped (zero gradient): ratio high with A > 0 (row 0 cols 0-1); ratio low with A < 0 (row 1 cols 2-3).
    clipped = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.all(g[clipped] == 0) and torch.all(g[~clipped] > 0)
    assert m["clip_frac"] == 0.5
