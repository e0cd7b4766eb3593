"""Bad configuration / shapes raise a ValueError naming the field; extreme inputs give no NaN/Inf (fuzzed)."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opdkit.objectives import FullSignal, ObjectiveConfig, SampledSignal, TopKSignal, compute_advantages, opd_loss
from opdkit.objectives.config import DIVERGENCES, TRANSFORMS
from tests.objectives.helpers import DT, random_problem, signal_for


@pytest.mark.parametrize("kw,field", [
    ({"power_a": 0.0, "reward": "power"}, "power_a"), ({"power_a": -1.0}, "power_a"),
    ({"beta": 1.5}, "beta"), ({"beta": -0.1}, "beta"), ({"top_k": 0}, "top_k"), ({"gamma": 1.1}, "gamma"),
    ({"gamma": -0.5}, "gamma"), ({"divergence": "kl"}, "divergence"), ({"estimator": "dense"}, "estimator"),
    ({"gradient": "none"}, "gradient"), ({"transform": "log"}, "transform"), ({"pg": "grpo"}, "pg"),
    ({"aggregation": "mean"}, "aggregation"), ({"eps_low": 1.0}, "eps_low"), ({"chunk_size": 0}, "chunk_size"),
    ({"entropy_keep_fraction": 0.0}, "entropy_keep_fraction"), ({"clip_low": 2.0, "clip_high": 1.0}, "clip_low"),
    ({"reward": "power", "divergence": "forward_kl"}, "reward"),
    ({"entropy_source": "teacher", "entropy_keep_fraction": 0.5}, "entropy_source"),
    ({"beta": float("nan")}, "beta"),
    # numeric ranges narrowed to what is finite / meaningful (the message says why)
    ({"alpha": 1e-9}, "alpha"), ({"alpha": 1 + 1e-9}, "alpha"), ({"alpha": -5e-4}, "alpha"),
    ({"tanh_tau": 0.0}, "tanh_tau"), ({"task_reward_coef": 1e4}, "task_reward_coef"),
    ({"clip_low": -1e7}, "clip_low"), ({"clip_high": 1e300}, "clip_high"), ({"log_ratio_bound": 701.0}, "log_ratio_bound"),
    ({"entropy_scope": "token"}, "entropy_scope"), ({"returns_at_mask": "reset"}, "returns_at_mask"),
    # knobs the estimator would ignore are refused, not ignored
    ({"estimator": "full", "gamma": 1.0}, "gamma"), ({"estimator": "topk", "gamma": 0.5}, "gamma"),
    ({"estimator": "full", "pg": "ppo"}, "pg"), ({"estimator": "topk", "gradient": "corrected"}, "gradient"),
    ({"estimator": "full", "reward": "power"}, "reward"), ({"estimator": "full", "transform": "tanh"}, "transform"),
    ({"estimator": "full", "returns_at_mask": "restart"}, "returns_at_mask"),
    ({"topk_tail": True}, "topk_tail"), ({"estimator": "full", "topk_include_sampled": True}, "topk_include_sampled"),
])
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"objective\.{field}"):
        ObjectiveConfig(**kw)


def test_ignored_knob_message_names_the_fix():
    with pytest.raises(ValueError, match=r"objective\.gamma=1\.0 applies to the sampled estimator only.*"
                                         r"add objective\.estimator=sampled"):
        ObjectiveConfig(estimator="full", gamma=1.0)
    # the parameters of a method stay settable (inert until it is on), and every default is accepted
    ObjectiveConfig(estimator="full", power_a=2.0, tanh_tau=5.0, eps_high=0.3, log_ratio_bound=20.0, top_k=32)
    for est in ("sampled", "topk", "full"):
        ObjectiveConfig(estimator=est)


def test_unknown_name_lists_allowed_values():
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd, tv, alpha"):
        ObjectiveConfig(divergence="kld")


def _call(cfg, **over):
    logits, teacher, tokens, mask = random_problem(B=2, T=4, V=6)
    kw = dict(tokens_BT=tokens, mask_BT=mask, logits_BTV=logits)
    kw.update(over)
    if "teacher" not in kw:
        kw["teacher"] = signal_for(cfg, teacher, tokens)
    return opd_loss(cfg, **kw)


@pytest.mark.parametrize("over,msg", [
    (dict(tokens_BT=torch.zeros(2, 5, dtype=torch.long)), "tokens_BT"),
    (dict(mask_BT=torch.ones(3, 4, dtype=torch.bool)), "mask_BT"),
    (dict(tokens_BT=torch.full((2, 4), 6)), "tokens_BT"),
    (dict(tokens_BT=torch.zeros(2, 4)), "tokens_BT"),
    (dict(teacher=SampledSignal(torch.zeros(2, 3))), "teacher signal"),
    (dict(teacher=FullSignal(torch.zeros(2, 4, 6))), "teacher signal is 'full'"),
    (dict(old_logprobs_BT=torch.zeros(2, 3)), "old_logprobs_BT"),
    (dict(task_rewards_B=torch.zeros(3)), "task_rewards_B"),
    (dict(logits_BTV=torch.zeros(2, 4)), "logits_BTV"),
])
def test_shape_mismatches_raise_before_compute(over, msg):
    with pytest.raises(ValueError, match=msg):
        _call(ObjectiveConfig(), **over)


def _sig_inputs(B=2, T=4, V=6, seed=0):
    logits, teacher, tokens, mask = random_problem(B=B, T=T, V=V, seed=seed)
    return logits, teacher, tokens, mask


@pytest.mark.parametrize("case,msg", [
    ("int_logits", r"logits_BTV must be a floating-point tensor, got torch\.int64"),
    ("int_hidden", r"hidden_BTH must be a floating-point tensor"),
    ("nan_logits", r"logits_BTV at valid position \(b=1, t=2\)"),
    ("inf_logits", r"logits_BTV at valid position"),
    ("nan_hidden", r"hidden_BTH @ lm_head_weight_VH"),
    ("sampled_pos", r"SampledSignal\.logprobs_BT holds values up to 0\.5 > 0"),
    ("sampled_nan", r"SampledSignal\.logprobs_BT holds NaN"),
    ("sampled_inf", r"SampledSignal\.logprobs_BT holds values up to inf"),
    ("sampled_int", r"SampledSignal\.logprobs_BT must be a floating-point tensor"),
    ("topk_float_ids", r"TopKSignal\.ids_BTK must be an integer tensor"),
    ("topk_dup_ids", r"TopKSignal\.ids_BTK repeats an id"),
    ("topk_logits", r"TopKSignal\.logprobs_BTK (holds values up to|puts more than probability 1)"),
    ("topk_mass", r"TopKSignal\.logprobs_BTK puts more than probability 1"),
    ("topk_sampled_nan", r"TopKSignal\.sampled_logprobs_BT holds NaN"),
    ("full_unnormalised", r"FullSignal\.logprobs_BTV is not normalised"),
    ("full_nan", r"FullSignal\.logprobs_BTV holds NaN"),
    ("full_hidden_nan", r"FullSignal\.hidden_BTH holds NaN or inf"),
    ("old_nan", r"old_logprobs_BT holds NaN"),
    ("old_pos", r"old_logprobs_BT holds values up to"),
    ("adv_inf", r"advantages_BT holds NaN or inf"),
    ("task_nan", r"task_rewards_B holds NaN or inf"),
    ("temperature", r"temperature=0"),
])
def test_bad_input_values_raise_naming_the_argument(case, msg):
    logits, teacher, tokens, mask = _sig_inputs()
    kw = dict(tokens_BT=tokens, mask_BT=mask, logits_BTV=logits)
    cfg = ObjectiveConfig()
    lq = teacher.gather(-1, tokens[..., None]).squeeze(-1)
    sig = SampledSignal(lq.clone())
    if case == "int_logits":
        kw["logits_BTV"] = logits.long()
    elif case == "int_hidden":
        del kw["logits_BTV"]
        kw.update(hidden_BTH=torch.ones(2, 4, 3, dtype=torch.long), lm_head_weight_VH=torch.ones(6, 3))
    elif case in ("nan_logits", "inf_logits"):
        kw["logits_BTV"] = logits.clone()
        kw["logits_BTV"][1, 2, 0] = float("nan") if case == "nan_logits" else float("inf")
    elif case == "nan_hidden":
        del kw["logits_BTV"]
        h = torch.randn(2, 4, 3, dtype=DT)
        h[0, 0, 1] = float("nan")
        kw.update(hidden_BTH=h, lm_head_weight_VH=torch.randn(6, 3, dtype=DT))
    elif case == "sampled_pos":
        sig.logprobs_BT[0, 1] = 0.5
    elif case == "sampled_nan":
        sig.logprobs_BT[0, 0] = float("nan")
    elif case == "sampled_inf":
        sig.logprobs_BT[1, 3] = float("inf")
    elif case == "sampled_int":
        sig = SampledSignal(torch.zeros(2, 4, dtype=torch.long))
    elif case.startswith("topk"):
        cfg = ObjectiveConfig(estimator="topk", top_k=3, topk_tail=case == "topk_dup_ids",
                              topk_include_sampled=case == "topk_sampled_nan")
        vals, ids = teacher.topk(3, -1)
        sampled = lq.clone()
        if case == "topk_float_ids":
            ids = ids.double()
        elif case == "topk_dup_ids":
            ids[0, 0, 2] = ids[0, 0, 0]
        elif case == "topk_logits":
            vals = logits.topk(3, -1).values
        elif case == "topk_mass":
            vals = torch.full_like(vals, -0.5)  # 3 x e^-0.5 = 1.8 > 1
        elif case == "topk_sampled_nan":
            sampled[0, 0] = float("nan")
        sig = TopKSignal(vals, ids, sampled)
    elif case.startswith("full"):
        cfg = ObjectiveConfig(estimator="full")
        if case == "full_unnormalised":
            sig = FullSignal(teacher - 0.7)
        elif case == "full_nan":
            t = teacher.clone()
            t[1, 1, 1] = float("nan")
            sig = FullSignal(t)
        else:
            h = torch.randn(2, 4, 3, dtype=DT)
            h[1, 0, 0] = float("nan")
            sig = FullSignal(hidden_BTH=h, head_weight_VH=torch.randn(6, 3, dtype=DT))
    elif case in ("old_nan", "old_pos"):
        cfg = ObjectiveConfig(pg="ppo")
        old = lq.clone()
        old[0, 0] = float("nan") if case == "old_nan" else 0.3
        kw["old_logprobs_BT"] = old
    elif case == "adv_inf":
        kw["advantages_BT"] = torch.full((2, 4), float("inf"), dtype=DT)
    elif case == "task_nan":
        kw["task_rewards_B"] = torch.tensor([0.0, float("nan")], dtype=DT)
    elif case == "temperature":
        kw["temperature"] = 0.0
    with pytest.raises(ValueError, match=msg):
        opd_loss(cfg, teacher=sig, **kw)


def test_duplicate_topk_ids_no_longer_give_a_wrong_loss():
    """Issue #14: duplicated top-K ids with topk_tail gave 16685 instead of 3.006, silently."""
    logits, teacher, tokens, mask = _sig_inputs()
    vals, ids = teacher.topk(3, -1)
    ids[:, :, 1], vals[:, :, 1] = ids[:, :, 0], vals[:, :, 0]
    with pytest.raises(ValueError, match="ids_BTK repeats an id"):
        opd_loss(ObjectiveConfig(estimator="topk", top_k=3, topk_tail=True), tokens_BT=tokens, mask_BT=mask,
                 teacher=TopKSignal(vals, ids), logits_BTV=logits)


def test_padding_as_the_teacher_fills_it_is_accepted():
    """opdkit's teacher leaves masked positions at id 0 / log-prob 0 (duplicates, mass K): only valid positions
    are checked for distinct ids, mass <= 1 and normalisation; -inf (probability 0) is a valid log-prob."""
    logits, teacher, tokens, mask = _sig_inputs()
    vals, ids = teacher.topk(3, -1)
    vals[~mask], ids[~mask] = 0.0, 0
    vals[0, 0, 2] = float("-inf")
    loss, _ = opd_loss(ObjectiveConfig(estimator="topk", top_k=3), tokens_BT=tokens, mask_BT=mask,
                       teacher=TopKSignal(vals, ids), logits_BTV=logits)
    assert torch.isfinite(loss)
    full = teacher.clone()
    full[~mask] = 0.0  # zero-filled padding is not normalised, and need not be
    loss, _ = opd_loss(ObjectiveConfig(estimator="full"), tokens_BT=tokens, mask_BT=mask, teacher=FullSignal(full),
                       logits_BTV=logits)
    assert torch.isfinite(loss)
    masked_nan = logits.clone()
    masked_nan[~mask] = float("nan")  # masked positions are never computed
    loss, _ = opd_loss(ObjectiveConfig(), tokens_BT=tokens, mask_BT=mask, teacher=SampledSignal(
        teacher.gather(-1, tokens[..., None]).squeeze(-1)), logits_BTV=masked_nan)
    assert torch.isfinite(loss)


def test_integer_task_rewards_are_accepted():
    logits, teacher, tokens, mask = _sig_inputs()
    sig = SampledSignal(teacher.gather(-1, tokens[..., None]).squeeze(-1))
    for R in (torch.tensor([1, 0]), torch.tensor([True, False])):
        loss, m = opd_loss(ObjectiveConfig(task_reward_coef=0.5), tokens_BT=tokens, mask_BT=mask, teacher=sig,
                           logits_BTV=logits, task_rewards_B=R)
        assert torch.isfinite(loss) and m["task_reward/mean"] == 0.5


def test_compute_advantages_validates_its_log_probs():
    lp = torch.log(torch.tensor([[0.5, 0.2]], dtype=DT))
    m = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_logprobs_BT holds values up to 0.7"):
        compute_advantages(ObjectiveConfig(), lp, torch.tensor([[0.7, -1.0]], dtype=DT), m)
    with pytest.raises(ValueError, match="student_logprobs_BT holds NaN"):
        compute_advantages(ObjectiveConfig(), torch.tensor([[float("nan"), -1.0]], dtype=DT), lp, m)
    with pytest.raises(ValueError, match="task_rewards_B has shape"):
        compute_advantages(ObjectiveConfig(), lp, lp, m, task_rewards_B=torch.zeros(2))


def test_topk_shape_and_range_errors():
    with pytest.raises(ValueError, match="top_k"):
        _call(ObjectiveConfig(estimator="topk", top_k=7),  # V = 6
              teacher=TopKSignal(torch.zeros(2, 4, 7), torch.zeros(2, 4, 7, dtype=torch.long)))
    cfg = ObjectiveConfig(estimator="topk", top_k=3)
    with pytest.raises(ValueError, match=r"\[B, T, K\]"):
        _call(cfg, teacher=TopKSignal(torch.zeros(2, 4, 2), torch.zeros(2, 4, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="sampled_logprobs_BT"):
        _call(ObjectiveConfig(estimator="topk", top_k=3, topk_include_sampled=True),
              teacher=TopKSignal(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match="full teacher signal has vocab"):
        _call(ObjectiveConfig(estimator="full"), teacher=FullSignal(torch.zeros(2, 4, 5)))


# ------------------------------------------------------------------------------------------------ numerics
def _all_configs():
    out = []
    for div, est, grad in itertools.product(DIVERGENCES, ("sampled", "topk", "full"), ("stopgrad", "corrected")):
        if est != "sampled" and grad == "corrected":
            continue
        out.append(dict(divergence=div, estimator=est, gradient=grad))
    for tr in TRANSFORMS:
        out.append(dict(transform=tr, pg="ppo", gamma=0.9))
    out.append(dict(reward="power", power_a=0.5, transform="tanh"))
    out.append(dict(estimator="topk", topk_tail=True, topk_include_sampled=True, divergence="forward_kl"))
    out.append(dict(estimator="full", entropy_keep_fraction=0.5, entropy_source="teacher", divergence="alpha",
                    alpha=2.0))
    out.append(dict(estimator="sampled", entropy_keep_fraction=0.3, aggregation="seq_mean_token_mean",
                    task_reward_coef=0.5))
    # Issue #14's extremes: alpha |alpha| >= 2 (inf in float32) and >= 100 (float64), log_ratio_bound up to 700,
    # z-score + PPO; and the ends of every other accepted range.
    for a, grad in itertools.product((-1e6, -100.0, -2.0, 2.0, 100.0, 1e6), ("stopgrad", "corrected")):
        out.append(dict(divergence="alpha", alpha=a, gradient=grad, log_ratio_bound=700.0))
    for div, grad in itertools.product(("forward_kl", "jsd", "tv", "reverse_kl"), ("stopgrad", "corrected")):
        out.append(dict(divergence=div, gradient=grad, log_ratio_bound=700.0, gamma=1.0))
    out.append(dict(divergence="forward_kl", log_ratio_bound=700.0, transform="zscore", pg="ppo", eps_high=1e300))
    out.append(dict(divergence="jsd", beta=1e-300, log_ratio_bound=700.0, transform="zscore", pg="ppo"))
    out.append(dict(transform="tanh", tanh_tau=1e-300, gamma=1.0, returns_at_mask="restart"))
    out.append(dict(transform="signmaxabs", divergence="forward_kl", log_ratio_bound=700.0, gamma=0.99))
    out.append(dict(transform="clip", clip_low=-1e6, clip_high=-1e5, pg="ppo", task_reward_coef=-1e3))
    out.append(dict(reward="power", power_a=1e300, transform="zscore"))
    out.append(dict(reward="power", power_a=1e-300, transform="signmaxabs"))
    out.append(dict(estimator="topk", entropy_keep_fraction=0.2, entropy_scope="sample", topk_include_sampled=True))
    for a in (-1e6, 1e-3, 1.001, 1e6):
        out.append(dict(estimator="full", divergence="alpha", alpha=a, task_reward_coef=1e3))
        out.append(dict(estimator="topk", divergence="alpha", alpha=a, topk_tail=True))
    return out


CONFIGS = _all_configs()


def _finite_everything(cfg_kw, logits, teacher, tokens, mask, old=None, dtype=torch.float32):
    cfg = ObjectiveConfig(top_k=min(3, logits.shape[-1]), **cfg_kw)
    lg = logits.to(dtype).clone().requires_grad_(True)
    sig = signal_for(cfg, teacher.to(dtype), tokens)
    R = torch.linspace(-1, 1, logits.shape[0]) if logits.shape[0] else torch.zeros(0)
    loss, metrics = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=sig, logits_BTV=lg, old_logprobs_BT=old,
                             task_rewards_B=R)
    loss.backward()
    assert torch.isfinite(loss), (cfg_kw, loss)
    assert torch.isfinite(lg.grad).all(), cfg_kw
    for k, v in metrics.items():
        vals = v if isinstance(v, list) else [v]
        assert all(abs(x) != float("inf") and x == x for x in vals), (cfg_kw, k, v)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg_i=st.integers(0, len(CONFIGS) - 1),
    B=st.integers(0, 3), T=st.integers(1, 5), V=st.integers(3, 7),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    teacher_zero=st.booleans(), all_masked_row=st.booleans(), seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_fuzz_no_nan_or_inf(cfg_i, B, T, V, scale, teacher_zero, all_masked_row, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, T, V, generator=g)
    teacher = torch.log_softmax(scale * torch.randn(B, T, V, generator=g), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    if teacher_zero and B:
        # probability exactly 0 for the sampled token (and for half the vocab at one position), renormalised (V >= 3
        # leaves a token with mass)
        teacher[0].scatter_(-1, tokens[0][:, None], float("-inf"))
        teacher[0, 0, : V // 2] = float("-inf")
        teacher = torch.log_softmax(teacher, -1)
    mask = torch.rand(B, T, generator=g) > 0.3
    if all_masked_row and B:
        mask[0] = False
    old = torch.log_softmax(scale * torch.randn(B, T, V, generator=g), -1).gather(-1, tokens[..., None]).squeeze(-1)
    _finite_everything(CONFIGS[cfg_i], logits, teacher, tokens, mask, old, dtype)


@pytest.mark.parametrize("cfg_kw", CONFIGS)
def test_every_combination_on_extreme_inputs(cfg_kw):
    """Deterministic sweep of every combination over the hard cases (the fuzz above samples them randomly)."""
    B, T, V = 2, 4, 5
    logits = torch.tensor([1e4, -1e4, 0.0, 3.0, -3.0]).repeat(B, T, 1)
    teacher = torch.log_softmax(torch.tensor([0.0, 0.0, -1e4, 2.0, -2.0]).repeat(B, T, 1), -1)
    teacher[..., 2] = float("-inf")
    tokens = torch.tensor([[2, 1, 0, 2], [1, 2, 3, 4]])
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    for dtype in (torch.float32, torch.float64):
        _finite_everything(cfg_kw, logits, teacher, tokens, mask, dtype=dtype)
        _finite_everything(cfg_kw, logits[:0], teacher[:0], tokens[:0], mask[:0], dtype=dtype)  # empty batch
        _finite_everything(cfg_kw, logits, teacher, tokens, torch.zeros_like(mask), dtype=dtype)  # nothing valid
