"""Conventions exact to the seeds' code, each against values computed by hand from the authors' formulas.

PowerOPD (seeds/004; EIT-NLP/PowerOPD opd_dynamics/trainer.py): tanh(r / tau) with tau = 5 by default, and
sign_max_abs normalisation per sign. Revisiting OPD (seeds/003, 001; hhh675597/revisiting_opd): teacher top-K on
the union of the top-K and the sampled token ("tail sampling" with norm_to_one_for_kl), K = 32, entropy selection
per sample (ray_trainer_multitask._compute_entropy_top_mask), and a discounted return that restarts at masked
positions (core_algos.compute_opd_advantage). The docs' method -> configuration table is checked to parse into
accepted configurations naming these.
"""

import math
import re
from pathlib import Path

import pytest
import torch

from opdkit.objectives import ObjectiveConfig, TopKSignal, opd_loss, opd_per_token_loss
from opdkit.objectives.sampled import discounted_returns, select_by_entropy, transform_rewards

DT = torch.float64
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------- PowerOPD: tanh tau
def test_tanh_transform_divides_by_tau():
    r = torch.tensor([[-8.0, -1.0, 0.5, 3.0]], dtype=DT)
    m = torch.tensor([[True, True, True, False]])
    got = transform_rewards(ObjectiveConfig(transform="tanh", tanh_tau=5.0), r, m)
    # tanh(-8/5), tanh(-1/5), tanh(0.5/5); the masked token is 0
    want = torch.tensor([[-0.9216685544064713, -0.197375320224904, 0.09966799462495582, 0.0]], dtype=DT)
    assert torch.allclose(got, want, atol=1e-15, rtol=0)
    # the default tau = 1 is opdkit's earlier tanh(r): tanh(-8), tanh(-1), tanh(0.5)
    old = transform_rewards(ObjectiveConfig(transform="tanh"), r, m)
    assert torch.allclose(old, torch.tensor([[-0.9999997749296758, -0.7615941559557649, 0.46211715726000974, 0.0]],
                                            dtype=DT), atol=1e-15, rtol=0)
    assert ObjectiveConfig.__dataclass_fields__["tanh_tau"].default == 1.0


@pytest.mark.parametrize("tau", [0.0, -5.0, float("inf"), float("nan")])
def test_tanh_tau_must_be_positive_and_finite(tau):
    with pytest.raises(ValueError, match=r"objective\.tanh_tau"):
        ObjectiveConfig(transform="tanh", tanh_tau=tau)


# ------------------------------------------------------------------------------------------- PowerOPD: sign max abs
def test_signmaxabs_scales_each_sign_separately():
    def tf(vals, mask=None):
        r = torch.tensor([vals], dtype=DT)
        m = torch.ones_like(r, dtype=torch.bool) if mask is None else torch.tensor([mask])
        return transform_rewards(ObjectiveConfig(transform="signmaxabs"), r, m)[0].tolist()

    assert tf([0.4, 0.1, -0.2]) == pytest.approx([1.0, 0.25, -1.0], abs=1e-15)  # one max |r| would give -0.5
    assert tf([0.4, 0.1, 0.0]) == pytest.approx([1.0, 0.25, 0.0], abs=1e-15)    # no negatives: left as they are
    assert tf([-0.4, -0.1]) == pytest.approx([-1.0, -0.25], abs=1e-15)
    assert tf([0.4, 9.0, -0.2, -7.0], [True, False, True, False]) == pytest.approx([1.0, 0.0, -1.0, 0.0])
    assert tf([5e-9, -1.0]) == pytest.approx([0.5, -1.0])  # scales clamped below at 1e-8, as the authors' code


# ------------------------------------------------------------------------ Revisiting OPD: top-K support and K
def _one_position(tok):
    """p = [0.5, 0.3, 0.2] (student), q = [0.6, 0.1, 0.3] (teacher), teacher top-1 = {0}, sampled token tok."""
    logits = torch.tensor([0.5, 0.3, 0.2], dtype=DT).log().view(1, 1, 3)
    q = torch.tensor([0.6, 0.1, 0.3], dtype=DT).log()
    sig = TopKSignal(q[:1].view(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long), q[tok].view(1, 1))
    return dict(tokens_BT=torch.tensor([[tok]]), mask_BT=torch.ones(1, 1, dtype=torch.bool), teacher=sig,
                logits_BTV=logits)


def test_topk_include_sampled_is_the_authors_union_support():
    cfg = ObjectiveConfig(estimator="topk", top_k=1, topk_include_sampled=True, aggregation="sum")
    # y = 2 outside the top-1: both renormalised on {0, 2}: p^ = [5/7, 2/7], q^ = [2/3, 1/3];
    # KL = 5/7 ln(15/14) + 2/7 ln(6/7) (compute_memory_efficient_kl: L1 + L2 with norm_to_one_for_kl)
    loss, _ = opd_loss(cfg, **_one_position(2))
    assert loss.item() == pytest.approx(5 / 7 * math.log(15 / 14) + 2 / 7 * math.log(6 / 7), abs=1e-14)
    assert loss.item() == pytest.approx(0.005237571111462919, abs=1e-14)
    loss_in, _ = opd_loss(cfg, **_one_position(0))  # y already in the top-1: support {0}, KL 0
    assert loss_in.item() == pytest.approx(0.0, abs=1e-15)
    # opdkit's topk_tail (no equivalent in the authors' code) is another objective: {0, rest} with raw mass,
    # 0.5 ln(0.5/0.6) + 0.5 ln(0.5/0.4)
    tail, _ = opd_loss(ObjectiveConfig(estimator="topk", top_k=1, topk_tail=True, aggregation="sum"),
                       **_one_position(2))
    assert tail.item() == pytest.approx(0.020410997260127586, abs=1e-14)


# ------------------------------------------------------------------------ Revisiting OPD: entropy per sample
def test_entropy_selection_per_sample_by_hand():
    ent = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.0]])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    # per sample: row 0 keeps floor(0.5 * 4) = 2 (0.9, 0.7); row 1 keeps max(1, floor(0.5 * 3)) = 1 (0.8)
    want = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_by_entropy(ent, m, 0.5, "sample"), want)
    # per batch (opdkit's default scope): ceil(0.5 * 7) = 4 of all 7: 0.9, 0.8, 0.7, 0.5
    want_b = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_by_entropy(ent, m, 0.5, "batch"), want_b)
    # at least one per sequence; ties at the threshold kept (entropys >= threshold); empty rows keep nothing
    ent2 = torch.tensor([[0.4, 0.6, 0.2, 0.1], [0.5, 0.5, 0.1, 0.3], [1.0, 2.0, 3.0, 4.0]])
    m2 = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    want2 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(select_by_entropy(ent2, m2, 0.2, "sample"), want2)


def test_entropy_scope_sample_in_the_loss_and_split_invariance():
    g = torch.Generator().manual_seed(0)
    B, T, V = 4, 10, 7
    logits = torch.randn(B, T, V, generator=g, dtype=DT) * torch.linspace(0.2, 3, T, dtype=DT)[None, :, None]
    teacher = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=DT), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3, :] = False
    cfg = ObjectiveConfig(estimator="topk", top_k=3, entropy_keep_fraction=0.2, entropy_scope="sample")
    vals, ids = teacher.topk(3, -1)
    per, _ = opd_per_token_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=TopKSignal(vals, ids),
                                logits_BTV=logits)
    # kept per sequence: max(1, floor(0.2 * n_b)) for n_b = 10, 6, 10, 0 -> 2, 1, 2, 0
    assert per.mask_BT.sum(-1).tolist() == [2, 1, 2, 0]
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    for b in (0, 2):  # the kept tokens are that sequence's two highest-entropy ones
        assert set(per.mask_BT[b].nonzero().flatten().tolist()) == set(ent[b].topk(2).indices.tolist())
    # rows are independent: one sequence at a time gives the same selection
    for b in range(B):
        one, _ = opd_per_token_loss(cfg, tokens_BT=tokens[b:b + 1], mask_BT=mask[b:b + 1],
                                    teacher=TopKSignal(vals[b:b + 1], ids[b:b + 1]), logits_BTV=logits[b:b + 1])
        assert torch.equal(one.mask_BT[0], per.mask_BT[b])


# ------------------------------------------------------------------------ Revisiting OPD: returns at masks
def test_discounted_returns_restart_or_carry_at_masked_positions():
    r = torch.tensor([[1.0, 2.0, 4.0, 8.0]], dtype=DT)
    m = torch.tensor([[True, False, True, True]])
    # carry (opdkit's default): 1 + 4 + 8, 0, 4 + 8, 8. restart (compute_opd_advantage: running *= mask): the
    # masked position cuts the return, so position 0 keeps only its own reward.
    assert discounted_returns(r, m, 1.0, "carry").tolist() == [[13.0, 0.0, 12.0, 8.0]]
    assert discounted_returns(r, m, 1.0, "restart").tolist() == [[1.0, 0.0, 12.0, 8.0]]
    # gamma = 0.5: carry 1 + 0.25 * 4 + 0.125 * 8 = 3 at position 0; restart 1
    assert discounted_returns(r, m, 0.5, "carry").tolist() == [[3.0, 0.0, 8.0, 8.0]]
    assert discounted_returns(r, m, 0.5, "restart").tolist() == [[1.0, 0.0, 8.0, 8.0]]
    # a contiguous response (mask up to EOS): the two agree
    m_eos = torch.tensor([[True, True, True, False]])
    assert discounted_returns(r, m_eos, 0.5, "restart").tolist() == discounted_returns(r, m_eos, 0.5).tolist() \
        == [[1 + 1 + 1.0, 2 + 2.0, 4.0, 0.0]]


def test_returns_at_mask_is_sampled_only_and_validated():
    with pytest.raises(ValueError, match=r"objective\.returns_at_mask"):
        ObjectiveConfig(returns_at_mask="reset")
    with pytest.raises(ValueError, match=r"objective\.returns_at_mask.*sampled estimator only"):
        ObjectiveConfig(estimator="full", returns_at_mask="restart")
    with pytest.raises(ValueError, match=r"objective\.entropy_scope"):
        ObjectiveConfig(entropy_scope="sequence")


# ------------------------------------------------------------------------ docs: method -> configuration table
def _table_rows():
    text = (ROOT / "docs" / "objectives.md").read_text()
    section = text.split("## Seed methods → configuration", 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| method") and not line.startswith("|--"):
            method, conf = [c.strip() for c in line.strip().strip("|").split("|")[:2]]
            rows[method] = conf
    return rows


def _configs_in(cell: str) -> list[dict]:
    """Every opdkit `key=value ...` code span of a table cell, parsed ('defaults +' cells start from the defaults).
    Spans whose first key is neither an ObjectiveConfig field nor rollout.* quote the authors' own flags."""
    out = []
    fields = ObjectiveConfig.__dataclass_fields__
    for span in re.findall(r"`([^`]*=[^`]*)`", cell):
        first = span.split()[0].split("=", 1)[0]
        if first not in fields and not first.startswith("rollout."):
            continue
        kw = {}
        for tok in span.split():
            k, v = tok.split("=", 1)
            kw[k] = {"true": True, "false": False}.get(v, v)
            for cast in (int, float):
                try:
                    kw[k] = cast(v)
                    break
                except ValueError:
                    pass
        out.append(kw)
    return out


def test_every_table_configuration_is_accepted():
    rows = _table_rows()
    assert len(rows) >= 10
    n = 0
    for method, cell in rows.items():
        for kw in _configs_in(cell):
            objective = {k: v for k, v in kw.items() if not k.startswith("rollout.")}
            ObjectiveConfig(**objective)  # raises on a knob the estimator would ignore, or a bad value
            n += 1
    assert n >= 12


def test_table_matches_the_authors_code():
    rows = _table_rows()
    (topk,) = [c for m, c in rows.items() if "top-K local support" in m]
    recipe, tail = [k for k in _configs_in(topk) if k.get("estimator") == "topk"]
    assert recipe["top_k"] == 32 and recipe["divergence"] == "reverse_kl" and "topk_tail" not in recipe
    assert recipe["entropy_keep_fraction"] == 0.2 and recipe["entropy_scope"] == "sample"
    assert tail["top_k"] == 32 and tail["topk_include_sampled"] is True  # their tail-sampling option
    assert "rollout.top_p=0.9" in topk
    (seq,) = [c for m, c in rows.items() if m.startswith("Sequence-level OPD")]
    assert "gamma=1" in seq and "returns_at_mask=restart" in seq
    (post,) = [c for m, c in rows.items() if "Post-hoc baselines of PowerOPD" in m]
    assert "transform=tanh tanh_tau=5" in post and "transform=signmaxabs" in post
