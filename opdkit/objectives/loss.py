"""The public entry points: per-token OPD loss + metrics, advantages, and aggregation.

    per_token, metrics = opd_per_token_loss(cfg, tokens_BT=..., mask_BT=..., teacher=signal, logits_BTV=...)
    loss = aggregate(per_token.loss_BT, per_token.mask_BT, cfg.aggregation, num_tokens=global_count)

or `opd_loss(...)` for both at once. For several micro-batches or processes, compute advantages once on the whole
rollout batch with `compute_advantages` (batch statistics such as z-score and entropy selection then do not depend
on the split) and pass them as `advantages_BT`; aggregate every micro-batch with the global token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opdkit.objectives import sampled as S
from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.dense import StudentSource, chunked_positions
from opdkit.objectives.divergences import Divergence, make_divergence
from opdkit.objectives.fused import fused_full_positions
from opdkit.objectives.signals import FullSignal, SampledSignal, TeacherSignal, TopKSignal


@dataclass
class PerTokenLoss:
    loss_BT: Tensor          # per-token loss (zero where mask_BT is False)
    mask_BT: Tensor          # tokens that count: caller's mask & entropy selection
    advantages_BT: Tensor | None  # sampled estimators: the (detached) advantages used


def divergence_of(cfg: ObjectiveConfig) -> Divergence:
    return make_divergence(cfg.divergence, beta=cfg.beta, alpha=cfg.alpha)


# ----------------------------------------------------------------------------------------------- validation
# Log-probabilities may exceed 0 by this much (rounding in other frameworks' kernels) before they are refused.
_LOGPROB_TOL = 1e-4
_INT_DTYPES = (torch.int64, torch.int32)


def _norm_tol(dtype: torch.dtype) -> float:
    """|logsumexp| allowed for log-probs that should be normalised: bf16/fp16 round each log-prob by ~2^-8."""
    return 0.05 if dtype in (torch.float16, torch.bfloat16) else 0.01


def _floating(name: str, t: Tensor) -> None:
    if not torch.is_floating_point(t):
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _finite(name: str, t: Tensor) -> None:
    """No NaN / +-inf anywhere (one reduction pass, no [B, T, V]-sized temporary)."""
    _floating(name, t)
    if t.numel():
        lo, hi = torch.aminmax(t.detach())
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise ValueError(f"{name} holds NaN or inf values (min {lo.item()}, max {hi.item()}); it must be finite")


def _task_rewards(t: Tensor) -> None:
    """Per-sequence task rewards: finite numbers; integer / bool tensors (0/1 correctness) are fine as they are."""
    if t.is_complex():
        raise ValueError(f"task_rewards_B must hold real numbers, got {t.dtype}")
    if torch.is_floating_point(t):
        _finite("task_rewards_B", t)


def _logprobs(name: str, t: Tensor) -> None:
    """Log-probabilities: floating point, no NaN, <= 0 (-inf = probability 0 is allowed), at every position
    (masked ones included: fill padding with 0 or -inf)."""
    _floating(name, t)
    if t.numel():
        lo, hi = torch.aminmax(t.detach())
        if math.isnan(lo.item()) or math.isnan(hi.item()):
            raise ValueError(f"{name} holds NaN values; log-probabilities must be <= 0 (-inf for probability 0)")
        if hi.item() > _LOGPROB_TOL:
            raise ValueError(f"{name} holds values up to {hi.item():.4g} > 0: these must be log-probabilities "
                             f"(log_softmax output, <= 0; -inf for probability 0), not logits or probabilities")


def _ids(name: str, t: Tensor, V: int) -> None:
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= V):
        raise ValueError(f"{name} has ids outside [0, {V}) (vocab size of the student)")


def _check_inputs(cfg: ObjectiveConfig, src: StudentSource, tokens_BT: Tensor, mask_BT: Tensor,
                  teacher: TeacherSignal, old_logprobs_BT, task_rewards_B, advantages_BT) -> None:
    """Shapes, dtypes and values of every input, before any compute; a ValueError names the argument.

    Cheap by construction: [B, T] and [B, T, K] tensors are checked whole; a [B, T, V] tensor (full teacher
    log-probs) in one reduction pass plus a logsumexp over the valid positions in chunks of `chunk_size`. The
    student's logits are checked on the rows the loss computes anyway (`_check_student_rows`)."""
    if src.logits_BTV is None and (src.hidden_BTH is None or src.head_weight_VH is None):
        raise ValueError("student: give logits_BTV, or hidden_BTH together with lm_head_weight_VH")
    if src.logits_BTV is not None and src.logits_BTV.dim() != 3:
        raise ValueError(f"logits_BTV must be [B, T, V], got shape {tuple(src.logits_BTV.shape)}")
    if src.logits_BTV is None:
        if src.hidden_BTH.dim() != 3 or src.head_weight_VH.dim() != 2 or \
                src.hidden_BTH.shape[-1] != src.head_weight_VH.shape[1]:
            raise ValueError(f"hidden_BTH [B, T, H] {tuple(src.hidden_BTH.shape)} and lm_head_weight_VH [V, H] "
                             f"{tuple(src.head_weight_VH.shape)} do not fit")
        _floating("hidden_BTH", src.hidden_BTH)
        _floating("lm_head_weight_VH", src.head_weight_VH)
        if src.head_bias_V is not None:
            _floating("lm_head_bias_V", src.head_bias_V)
    else:
        _floating("logits_BTV", src.logits_BTV)
    if not (isinstance(src.temperature, (int, float)) and math.isfinite(src.temperature) and src.temperature > 0):
        raise ValueError(f"temperature={src.temperature!r} must be a finite number > 0")
    B, T = src.shape_BT
    V = src.vocab_size
    for name, t in (("tokens_BT", tokens_BT), ("mask_BT", mask_BT)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, T] = {(B, T)} from the student")
    _ids("tokens_BT", tokens_BT, V)
    if teacher.kind != cfg.teacher_signal:
        raise ValueError(f"teacher signal is {teacher.kind!r} but objective.estimator={cfg.estimator!r} needs "
                         f"{cfg.teacher_signal!r}")
    if tuple(teacher.shape_BT()) != (B, T):
        raise ValueError(f"teacher signal has [B, T] = {tuple(teacher.shape_BT())}, expected {(B, T)}")
    valid = mask_BT.bool()
    if isinstance(teacher, SampledSignal):
        _logprobs("SampledSignal.logprobs_BT", teacher.logprobs_BT)
    if isinstance(teacher, TopKSignal):
        if cfg.top_k > V:
            raise ValueError(f"objective.top_k={cfg.top_k} must be <= the vocabulary size {V}")
        if tuple(teacher.logprobs_BTK.shape) != (B, T, cfg.top_k) or tuple(teacher.ids_BTK.shape) != (B, T, cfg.top_k):
            raise ValueError(f"top-K signal must be [B, T, K] = {(B, T, cfg.top_k)} (objective.top_k), got "
                             f"logprobs {tuple(teacher.logprobs_BTK.shape)} ids {tuple(teacher.ids_BTK.shape)}")
        if cfg.topk_include_sampled and (teacher.sampled_logprobs_BT is None or
                                         tuple(teacher.sampled_logprobs_BT.shape) != (B, T)):
            raise ValueError("objective.topk_include_sampled=true needs TopKSignal.sampled_logprobs_BT of shape [B, T]")
        if teacher.ids_BTK.dtype not in _INT_DTYPES:
            raise ValueError(f"TopKSignal.ids_BTK must be an integer tensor (int64 or int32), got "
                             f"{teacher.ids_BTK.dtype}")
        if teacher.ids_BTK.numel() and (int(teacher.ids_BTK.min()) < 0 or int(teacher.ids_BTK.max()) >= V):
            raise ValueError(f"top-K ids outside [0, {V})")
        _logprobs("TopKSignal.logprobs_BTK", teacher.logprobs_BTK)
        ids_NK, lp_NK = teacher.ids_BTK[valid], teacher.logprobs_BTK[valid]
        if ids_NK.shape[-1] > 1 and bool((ids_NK.sort(-1).values.diff(dim=-1) == 0).any()):
            raise ValueError("TopKSignal.ids_BTK repeats an id within a position's K ids (at a valid position): "
                             "the support must be K distinct tokens (e.g. torch.topk's indices)")
        tol = _norm_tol(lp_NK.dtype)
        if lp_NK.numel() and float(torch.logsumexp(lp_NK.double(), -1).max()) > tol:
            raise ValueError(f"TopKSignal.logprobs_BTK puts more than probability 1 on the top-K support at a valid "
                             f"position (logsumexp > {tol}): give log-probs under the teacher's full distribution "
                             f"(log_softmax over the vocabulary, then top-K), not logits")
        if cfg.topk_include_sampled:
            _logprobs("TopKSignal.sampled_logprobs_BT", teacher.sampled_logprobs_BT)
    if isinstance(teacher, FullSignal):
        if teacher.vocab_size() != V:
            raise ValueError(f"full teacher signal has vocab {teacher.vocab_size()}, student has {V}")
        if not (isinstance(teacher.temperature, (int, float)) and math.isfinite(teacher.temperature)
                and teacher.temperature > 0):
            raise ValueError(f"FullSignal.temperature={teacher.temperature!r} must be a finite number > 0")
        if teacher.logprobs_BTV is not None:
            _logprobs("FullSignal.logprobs_BTV", teacher.logprobs_BTV)
            b_idx, t_idx = valid.nonzero(as_tuple=True)
            tol = _norm_tol(teacher.logprobs_BTV.dtype)
            for s in range(0, b_idx.numel(), cfg.chunk_size):
                rows = teacher.logprobs_BTV[b_idx[s:s + cfg.chunk_size], t_idx[s:s + cfg.chunk_size]]
                # float32 is exact enough for a 0.01 tolerance; a float64 copy of [chunk, V] cost 5% of a fused update
                lse = torch.logsumexp(rows.detach().to(torch.promote_types(rows.dtype, torch.float32)), -1).abs().max()
                if not float(lse) <= tol:
                    raise ValueError(f"FullSignal.logprobs_BTV is not normalised at a valid position (|logsumexp "
                                     f"over the vocabulary| = {float(lse):.4g} > {tol}): give log_softmax output, "
                                     f"not logits")
        else:
            _finite("FullSignal.hidden_BTH", teacher.hidden_BTH)
            _finite("FullSignal.head_weight_VH", teacher.head_weight_VH)
            if teacher.head_bias_V is not None:
                _finite("FullSignal.head_bias_V", teacher.head_bias_V)
    for name, t, shape in (("old_logprobs_BT", old_logprobs_BT, (B, T)), ("advantages_BT", advantages_BT, (B, T)),
                           ("task_rewards_B", task_rewards_B, (B,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if old_logprobs_BT is not None:
        _logprobs("old_logprobs_BT", old_logprobs_BT)
    if advantages_BT is not None:
        _finite("advantages_BT", advantages_BT)
    if task_rewards_B is not None:
        _task_rewards(task_rewards_B)
    if advantages_BT is not None and cfg.estimator != "sampled":
        raise ValueError("advantages_BT applies to objective.estimator=sampled only")


def _check_student_rows(src: StudentSource, logp_BT: Tensor, ent_BT: Tensor, mask_BT: Tensor) -> None:
    """NaN / +inf student logits at a valid position make that row's entropy NaN, and a sampled token whose logit
    is -inf has log-prob -inf: both are read off the [B, T] results of the pass the loss makes anyway (no extra
    pass over [B, T, V]). Masked positions are never computed, so they are not checked."""
    m = mask_BT.bool()
    bad = m & ~(torch.isfinite(ent_BT.detach()) & torch.isfinite(logp_BT.detach()))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        name = "logits_BTV" if src.logits_BTV is not None else "hidden_BTH @ lm_head_weight_VH (the logits)"
        raise ValueError(f"{name} at valid position (b={b}, t={t}) gives no finite distribution for the sampled "
                         f"token (NaN or +inf logits, or the sampled token's logit is -inf); logits must be finite")


# ----------------------------------------------------------------------------------------------- metrics
def token_stats(prefix: str, x_BT: Tensor, mask_BT: Tensor, by_position: bool = False) -> dict:
    m = mask_BT.bool()
    vals = x_BT.detach()[m].double()
    if vals.numel() == 0:
        out = {f"{prefix}/{k}": 0.0 for k in ("mean", "std", "min", "max", "p05", "p50", "p95")}
    else:
        q = torch.quantile(vals, torch.tensor([0.05, 0.5, 0.95], dtype=vals.dtype)) if vals.numel() < 2**24 \
            else vals.new_zeros(3)
        out = {f"{prefix}/mean": vals.mean().item(), f"{prefix}/std": vals.std(unbiased=False).item(),
               f"{prefix}/min": vals.min().item(), f"{prefix}/max": vals.max().item(),
               f"{prefix}/p05": q[0].item(), f"{prefix}/p50": q[1].item(), f"{prefix}/p95": q[2].item()}
    if by_position:
        x = x_BT.detach().double()
        cnt = m.sum(0)
        big = torch.finfo(torch.float64).max
        out[f"{prefix}_by_position/count"] = cnt.tolist()
        out[f"{prefix}_by_position/mean"] = ((x * m).sum(0) / cnt.clamp(min=1)).tolist()
        if x.shape[0] == 0:
            zeros = [0.0] * x.shape[1]
            out[f"{prefix}_by_position/min"], out[f"{prefix}_by_position/max"] = zeros, list(zeros)
        else:
            out[f"{prefix}_by_position/min"] = torch.where(cnt > 0, x.masked_fill(~m, big).amin(0), 0.0).tolist()
            out[f"{prefix}_by_position/max"] = torch.where(cnt > 0, x.masked_fill(~m, -big).amax(0), 0.0).tolist()
    return out


def _masked_mean(x_BT: Tensor, mask_BT: Tensor) -> float:
    m = mask_BT.bool()
    return x_BT.detach()[m].double().mean().item() if m.any() else 0.0


# ----------------------------------------------------------------------------------------------- advantages
def compute_advantages(cfg: ObjectiveConfig, student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor,
                       mask_BT: Tensor, task_rewards_B: Tensor | None = None,
                       divergence: Divergence | None = None) -> tuple[Tensor, dict]:
    """Sampled-token advantages [B, T] (float64, detached, zero where masked) and reward metrics.

    reward (divergence advantage or PowerOPD) -> transform -> discounted reward-to-go (gamma) -> + coef * task
    reward on every valid token (an outcome reward with gamma = 1, GRPO-style broadcast)."""
    div = divergence or divergence_of(cfg)
    for name, t in (("student_logprobs_BT", student_logprobs_BT), ("teacher_logprobs_BT", teacher_logprobs_BT)):
        if tuple(t.shape) != tuple(mask_BT.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected mask_BT's {tuple(mask_BT.shape)}")
        _logprobs(name, t)
    if task_rewards_B is not None:
        if tuple(task_rewards_B.shape) != tuple(mask_BT.shape[:1]):
            raise ValueError(f"task_rewards_B has shape {tuple(task_rewards_B.shape)}, expected "
                             f"{tuple(mask_BT.shape[:1])}")
        _task_rewards(task_rewards_B)
    m = mask_BT.bool()
    reward = S.token_rewards(cfg, div, student_logprobs_BT, teacher_logprobs_BT)
    transformed = S.transform_rewards(cfg, reward, m)
    adv = S.discounted_returns(transformed, m, cfg.gamma, cfg.returns_at_mask)
    if task_rewards_B is not None and cfg.task_reward_coef != 0.0:
        adv = adv + cfg.task_reward_coef * task_rewards_B.detach().double()[:, None] * m
    lr = S.log_ratio(student_logprobs_BT, teacher_logprobs_BT, cfg.log_ratio_bound)
    metrics = {
        **token_stats("reward", reward, m, by_position=True),
        **token_stats("log_ratio", lr, m),
        "advantage/mean": _masked_mean(adv, m),
        "advantage/abs_max": adv.abs().max().item() if adv.numel() else 0.0,
        # k1 and k3 estimators of the per-token reverse KL (Schulman, "Approximating KL divergence").
        "kl": _masked_mean(-lr, m),
        "kl_k3": _masked_mean(torch.expm1(lr.clamp(max=30.0)) - lr, m),
    }
    if task_rewards_B is not None and task_rewards_B.numel():
        metrics["task_reward/mean"] = task_rewards_B.double().mean().item()
    return adv, metrics


def _keep_before_pass(cfg: ObjectiveConfig, mask_BT: Tensor, selected_BT: Tensor | None) -> Tensor | None:
    """The tokens the loss keeps when that is known before the forward pass (the caller's selection, or no entropy
    selection); None when entropy selection will decide them from this pass's entropies."""
    if selected_BT is not None:
        return mask_BT & selected_BT.bool()
    return mask_BT if cfg.entropy_keep_fraction >= 1.0 else None


def _divergence_weights(cfg: ObjectiveConfig, keep_BT: Tensor) -> Tensor:
    """What `aggregate(cfg.aggregation)` will multiply each kept token's divergence by, up to one constant, when the
    loss is the divergence alone. (The fused path uses it to compute the gradient in forward.)"""
    w = keep_BT.double()
    if cfg.aggregation == "seq_mean_token_mean":
        w = w / w.sum(-1, keepdim=True).clamp(min=1.0)
    return w


# ----------------------------------------------------------------------------------------------- main entry
def opd_per_token_loss(cfg: ObjectiveConfig, *, tokens_BT: Tensor, mask_BT: Tensor, teacher: TeacherSignal,
                       logits_BTV: Tensor | None = None, hidden_BTH: Tensor | None = None,
                       lm_head_weight_VH: Tensor | None = None, lm_head_bias_V: Tensor | None = None,
                       temperature: float = 1.0, old_logprobs_BT: Tensor | None = None,
                       advantages_BT: Tensor | None = None, task_rewards_B: Tensor | None = None,
                       divergence: Divergence | None = None, behaviour_logprobs_BT: Tensor | None = None,
                       is_truncation: float = 2.0, selected_BT: Tensor | None = None,
                       fused: bool = False) -> tuple[PerTokenLoss, dict]:
    """Per-token OPD loss for any objective configuration, plus metrics.

    Student: `logits_BTV` [B, T, V], or `hidden_BTH` [B, T, H] + `lm_head_weight_VH` [V, H] (chunked: no [B, T, V]).
    Position t is the distribution that produced `tokens_BT[:, t]`. `mask_BT`: tokens that may count (response
    tokens up to EOS, special tokens already masked by the caller). `teacher`: the signal `cfg.teacher_signal`
    names. `old_logprobs_BT`: sampler log-probs for PPO (default: current, detached). `advantages_BT`: precomputed
    by `compute_advantages` (sampled only). `task_rewards_B`: per-sequence task reward (OPD-RL hybrid).
    `divergence`: a custom `Divergence` overriding `cfg.divergence`. `behaviour_logprobs_BT`: for rows sampled by an
    older policy (asynchronous OPD), the behaviour policy's log-probs of the tokens (NaN where a row is on-policy):
    each such token's loss is weighted by the truncated importance weight min(pi_theta / pi_behaviour,
    is_truncation), detached (truncated IS: Espeholt et al. 2018, IMPALA; Yao et al. 2025 for the same correction
    between a vLLM sampler and the trainer). `selected_BT`: the tokens entropy selection keeps, decided by the caller
    on the whole batch (`token_entropies` + `select_by_entropy`), instead of on these rows alone. `fused`: compute the
    full-vocabulary divergence with its closed-form gradient chunk by chunk from `hidden_BTH` + `lm_head_weight_VH`
    (`objectives.fused`; the same values and gradients as the generic path, fewer passes over V)."""
    src = StudentSource(logits_BTV, hidden_BTH, lm_head_weight_VH, lm_head_bias_V, temperature)
    _check_inputs(cfg, src, tokens_BT, mask_BT, teacher, old_logprobs_BT, task_rewards_B, advantages_BT)
    div = divergence or divergence_of(cfg)
    mask = mask_BT.bool()
    select_teacher = cfg.entropy_keep_fraction < 1.0 and cfg.entropy_source == "teacher"
    need_ent_s = True  # student entropy is always reported; it is cheap next to the log-softmax itself
    dense_teacher = teacher if isinstance(teacher, (FullSignal, TopKSignal)) else None
    keep_known = _keep_before_pass(cfg, mask, selected_BT)
    if fused:
        if divergence is not None or hidden_BTH is None or lm_head_weight_VH is None or not isinstance(teacher, FullSignal):
            raise ValueError("fused=True needs hidden_BTH + lm_head_weight_VH, a FullSignal teacher and no custom "
                             "divergence")
        hybrid = task_rewards_B is not None and cfg.task_reward_coef != 0.0
        weights = (None if hybrid or behaviour_logprobs_BT is not None or keep_known is None
                   else _divergence_weights(cfg, keep_known))
        cols = fused_full_positions(cfg, hidden_BTH, lm_head_weight_VH, lm_head_bias_V, temperature, tokens_BT, mask,
                                    teacher, weights)
    else:
        cols = chunked_positions(cfg, div, src, tokens_BT, mask, dense_teacher, need_ent_s)
    logp = cols["logp"]
    _check_student_rows(src, logp, cols["ent_s"], mask)

    if keep_known is not None:
        keep = keep_known
    else:
        keep = S.select_by_entropy(cols["ent_t"] if select_teacher else cols["ent_s"], mask, cfg.entropy_keep_fraction,
                                   cfg.entropy_scope)
    metrics: dict = {"masked_frac": 1.0 - (mask.sum().item() / max(mask.numel(), 1)),
                     "selected_frac": keep.sum().item() / max(mask.sum().item(), 1),
                     "num_tokens": int(keep.sum().item()),
                     "entropy/student": _masked_mean(cols["ent_s"], mask)}
    adv = None
    if isinstance(teacher, SampledSignal):
        if advantages_BT is None:
            base = old_logprobs_BT if old_logprobs_BT is not None else logp
            adv, m_adv = compute_advantages(cfg, base, teacher.logprobs_BT, keep, task_rewards_B, div)
            metrics.update(m_adv)
        else:
            adv = advantages_BT.detach() * keep
        loss, clipped = S.pg_token_loss(cfg, logp, adv, old_logprobs_BT)
        metrics["clip_frac"] = clipped[keep].double().mean().item() if keep.any() else 0.0
    else:
        loss = cols["div"]
        metrics.update(token_stats("reward", -cols["div"], keep, by_position=True))
        metrics["kl"] = _masked_mean(cols["kl"], keep)
        metrics["divergence"] = _masked_mean(cols["div"], keep)
        metrics["entropy/teacher"] = _masked_mean(cols["ent_t"], keep)
        if task_rewards_B is not None and cfg.task_reward_coef != 0.0:
            # OPD-RL hybrid for dense estimators: REINFORCE on the task reward, -coef * R * log p(y_t).
            loss = loss - cfg.task_reward_coef * task_rewards_B.detach().to(logp.dtype)[:, None] * logp
            metrics["task_reward/mean"] = task_rewards_B.double().mean().item() if task_rewards_B.numel() else 0.0
        metrics["clip_frac"] = 0.0
    if behaviour_logprobs_BT is not None:
        if tuple(behaviour_logprobs_BT.shape) != tuple(tokens_BT.shape):
            raise ValueError(f"behaviour_logprobs_BT has shape {tuple(behaviour_logprobs_BT.shape)}, expected "
                             f"{tuple(tokens_BT.shape)}")
        stale = keep & ~torch.isnan(behaviour_logprobs_BT)
        log_w = (logp.detach() - behaviour_logprobs_BT.to(logp.dtype).nan_to_num(0.0)).clamp(max=math.log(is_truncation))
        w = torch.where(stale, log_w.exp(), torch.ones_like(log_w))
        loss = loss * w
        if stale.any():
            metrics["is_weight/mean"] = w[stale].double().mean().item()
            metrics["is_weight/truncated_frac"] = (log_w[stale] >= math.log(is_truncation) - 1e-12).double().mean().item()
    loss = loss * keep.to(loss.dtype)
    return PerTokenLoss(loss, keep, adv), metrics


@torch.no_grad()
def token_entropies(cfg: ObjectiveConfig, *, tokens_BT: Tensor, mask_BT: Tensor, teacher: TeacherSignal,
                    logits_BTV: Tensor | None = None, hidden_BTH: Tensor | None = None,
                    lm_head_weight_VH: Tensor | None = None, lm_head_bias_V: Tensor | None = None,
                    temperature: float = 1.0) -> Tensor:
    """The per-token entropy that entropy selection ranks by (objective.entropy_source: the student's, or the
    teacher's — exact for full, on the renormalised support for topk), [B, T], zero where masked. A caller that
    splits a batch (micro-batches, ranks) computes it for every part, selects once on the whole batch, and passes
    the result as `opd_per_token_loss(selected_BT=...)`."""
    src = StudentSource(logits_BTV, hidden_BTH, lm_head_weight_VH, lm_head_bias_V, temperature)
    dense_teacher = teacher if isinstance(teacher, (FullSignal, TopKSignal)) else None
    cols = chunked_positions(cfg, divergence_of(cfg), src, tokens_BT, mask_BT.bool(), dense_teacher, True)
    return (cols["ent_t"] if cfg.entropy_source == "teacher" else cols["ent_s"]).detach()


def aggregate(loss_BT: Tensor, mask_BT: Tensor, mode: str = "token_mean", *, num_tokens: float | None = None,
              num_sequences: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar, separately from computing it.

    token_mean:          sum(loss) / num_tokens; pass the GLOBAL token count (all micro-batches and processes) so
                         the gradient does not depend on how the batch is split. Default: this batch's count.
    seq_mean_token_mean: sum over sequences of (per-sequence token mean) / num_sequences (global count).
    sum:                 sum(loss)."""
    m = mask_BT.to(loss_BT.dtype)
    if mode == "token_mean":
        n = float(m.sum().item()) if num_tokens is None else float(num_tokens)
        return (loss_BT * m).sum() / max(n, 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (loss_BT * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        n = float((m.sum(-1) > 0).sum().item()) if num_sequences is None else float(num_sequences)
        return per_seq.sum() / max(n, 1.0)
    if mode == "sum":
        return (loss_BT * m).sum()
    raise ValueError(f"objective.aggregation={mode!r} is not one of token_mean, seq_mean_token_mean, sum")


def opd_loss(cfg: ObjectiveConfig, *, num_tokens: float | None = None, num_sequences: float | None = None,
             **kwargs) -> tuple[Tensor, dict]:
    """`opd_per_token_loss` followed by `aggregate(cfg.aggregation)`; returns (scalar loss, metrics)."""
    per_token, metrics = opd_per_token_loss(cfg, **kwargs)
    loss = aggregate(per_token.loss_BT, per_token.mask_BT, cfg.aggregation, num_tokens=num_tokens,
                     num_sequences=num_sequences)
    metrics["loss"] = loss.item()
    return loss, metrics
