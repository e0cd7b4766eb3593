"""Sampled-token OPD: rewards, transforms, credit assignment and the policy-gradient loss.

The student sampled y_t ~ p(.|c_t); the teacher gave log q(y_t|c_t). Everything here works on [B, T] tensors;
rewards and advantages carry no gradient (they multiply grad log p, REINFORCE / PPO style).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.divergences import LOGPROB_FLOOR, Divergence

_EPS = 1e-8
# exp(logp - logp_old) is computed from a difference clamped here: a ratio of e^20 is already fully clipped by PPO.
_MAX_LOG_IMPORTANCE = 20.0


def log_ratio(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor, bound: float) -> Tensor:
    """log u = log q(y) - log p(y), detached, float64, with both log-probs floored and |log u| <= bound."""
    lp = student_logprobs_BT.detach().double().clamp(min=LOGPROB_FLOOR)
    lq = teacher_logprobs_BT.detach().double().clamp(min=LOGPROB_FLOOR)
    return (lq - lp).clamp(-bound, bound)


def token_rewards(cfg: ObjectiveConfig, div: Divergence, student_logprobs_BT: Tensor,
                  teacher_logprobs_BT: Tensor) -> Tensor:
    """The per-token reward before transforms, float64, detached.

    divergence: the advantage of D_f for the chosen gradient form (stopgrad: -f(u); corrected: u f'(u) - f(u));
                for reverse KL + stopgrad this is the vanilla OPD log-ratio log q - log p.
    power:      PowerOPD eq. 4, q^a - p^a in [-1, 1] (sign-consistent with the log-ratio; (q^a - p^a)/a -> log u
                as a -> 0)."""
    if cfg.reward == "power":
        a = cfg.power_a
        lp = student_logprobs_BT.detach().double().clamp(min=LOGPROB_FLOOR)
        lq = teacher_logprobs_BT.detach().double().clamp(min=LOGPROB_FLOOR)
        return torch.exp(a * lq) - torch.exp(a * lp)
    return div.advantage(log_ratio(student_logprobs_BT, teacher_logprobs_BT, cfg.log_ratio_bound), cfg.gradient)


def _masked_mean_std(x_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    n = mask_BT.sum().clamp(min=1)
    mean = (x_BT * mask_BT).sum() / n
    var = (((x_BT - mean) * mask_BT) ** 2).sum() / n
    return mean, var.sqrt()


def sign_max_abs(reward_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """PowerOPD's sign_max_abs normalisation (the authors' `_normalize_reward_full`): over the valid tokens,
    positive rewards are divided by the largest positive reward and negative ones by the largest |negative|
    reward, each scale clamped below at 1e-8; zeros stay zero. [0.4, 0.1, -0.2] -> [1, 0.25, -1]. A sign with no
    valid reward has nothing to scale."""
    m = mask_BT.bool()
    zero = reward_BT.new_zeros(())
    pos = torch.where(m & (reward_BT > 0), reward_BT, zero).amax() if reward_BT.numel() else zero
    neg = torch.where(m & (reward_BT < 0), -reward_BT, zero).amax() if reward_BT.numel() else zero
    return torch.where(reward_BT > 0, reward_BT / pos.clamp(min=_EPS),
                       torch.where(reward_BT < 0, reward_BT / neg.clamp(min=_EPS), reward_BT))


def transform_rewards(cfg: ObjectiveConfig, reward_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Post-hoc transforms (PowerOPD section 3.2 / Table 1 baselines), over the valid tokens of the batch.

    tanh: tanh(r / tanh_tau) (the authors' `log_reward_tanh_temperature`, 5 in their code); signmaxabs: per sign
    (`sign_max_abs`)."""
    m = mask_BT.to(reward_BT.dtype)
    if cfg.transform == "none":
        out = reward_BT
    elif cfg.transform == "clip":
        out = reward_BT.clamp(cfg.clip_low, cfg.clip_high)
    elif cfg.transform == "tanh":
        out = torch.tanh(reward_BT / cfg.tanh_tau)
    elif cfg.transform == "zscore":
        mean, std = _masked_mean_std(reward_BT, m)
        out = (reward_BT - mean) / (std + _EPS)
    elif cfg.transform == "signmaxabs":
        out = sign_max_abs(reward_BT, mask_BT)
    else:  # unreachable: validated in ObjectiveConfig
        raise ValueError(f"objective.transform={cfg.transform!r}")
    return out * m


def discounted_returns(reward_BT: Tensor, mask_BT: Tensor, gamma: float, at_mask: str = "carry") -> Tensor:
    """A_t = sum_{k >= t} gamma^(k - t) r_k over valid tokens. gamma = 0: token-level (A_t = r_t); gamma = 1:
    sequence-level reward-to-go. At a masked position inside a sequence:

    carry:   it gives 0 reward but still counts as a step (the return runs through it, discounted);
    restart: the return is cut there, A_t sums r_k over t <= k < the next masked position only. This is Revisiting
             OPD's `compute_opd_advantage` (core_algos.py), which multiplies its running return by the response
             mask after each step ("Reset after EOS"), so it restarts at every hole of the mask.
    skip:    it is not a step at all: the return passes it unchanged, so A_t = sum over the VALID k >= t of
             gamma^(number of valid tokens in (t, k]) r_k: the credit of a multi-turn episode over the policy's
             tokens only (the environment's tokens are masked holes; docs/agents.md).

    The two agree when each sequence's valid tokens are contiguous (a response up to EOS)."""
    m = mask_BT.to(reward_BT.dtype)
    r = reward_BT * m
    if gamma == 0.0:
        return r
    out = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        if at_mask == "skip":
            running = torch.where(m[:, t] > 0, r[:, t] + gamma * running, running)
        else:
            running = r[:, t] + gamma * running
        out[:, t] = running
        if at_mask == "restart":
            running = running * m[:, t]
    return out * m


def select_by_entropy(entropy_BT: Tensor, mask_BT: Tensor, keep_fraction: float, scope: str = "batch") -> Tensor:
    """Keep the valid tokens with the highest entropy (ties at the threshold kept).

    batch:  the ceil(keep_fraction * n_valid) highest of all the batch's valid tokens.
    sample: in each sequence b, the max(1, floor(keep_fraction * n_b)) highest of its n_b valid tokens: Revisiting
            OPD's `_compute_entropy_top_mask` (ray_trainer_multitask.py, `entropy_top_ratio`), which is per sample
            and takes num_keep = clamp(long(n_b * ratio), min=1). Rows are independent, so this selection does not
            depend on how a batch is split into micro-batches."""
    mask = mask_BT.bool()
    if keep_fraction >= 1.0:
        return mask
    ent = entropy_BT.detach()
    if scope == "sample":
        if mask.numel() == 0:
            return mask
        n_b = mask.sum(-1)
        keep_b = (n_b.double() * keep_fraction).floor().long().clamp(min=1)
        ranked = torch.where(mask, ent, torch.full_like(ent, -math.inf)).sort(-1, descending=True).values
        threshold_b = ranked.gather(-1, (keep_b.clamp(max=mask.shape[-1]) - 1)[:, None])
        return mask & (ent >= threshold_b)
    n_valid = int(mask.sum())
    if n_valid == 0:
        return mask
    k = max(1, int(-(-keep_fraction * n_valid // 1)))
    threshold = torch.topk(ent[mask], k).values[-1]
    return mask & (ent >= threshold)


def pg_token_loss(cfg: ObjectiveConfig, logprobs_BT: Tensor, advantages_BT: Tensor,
                  old_logprobs_BT: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-token policy-gradient loss and a [B, T] bool tensor of tokens where PPO's clip is active.

    reinforce: -A * log p                    (on-policy, one update per rollout)
    ppo:       -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A),  rho = p / p_old
    At rho = 1 both have gradient -A grad log p."""
    adv = advantages_BT.detach().to(logprobs_BT.dtype)
    if cfg.pg == "reinforce":
        return -adv * logprobs_BT, torch.zeros_like(logprobs_BT, dtype=torch.bool)
    if old_logprobs_BT is None:
        old_logprobs_BT = logprobs_BT.detach()
    diff = (logprobs_BT - old_logprobs_BT.detach().to(logprobs_BT.dtype)).clamp(-_MAX_LOG_IMPORTANCE,
                                                                                _MAX_LOG_IMPORTANCE)
    ratio = torch.exp(diff)
    unclipped = ratio * adv
    # ratio <= e^20, so an upper clip above that is no clip; capping it keeps 1 + eps_high representable (float32).
    hi = min(1.0 + cfg.eps_high, math.exp(_MAX_LOG_IMPORTANCE))
    clipped = ratio.clamp(1.0 - cfg.eps_low, hi) * adv
    use_clipped = clipped < unclipped
    return -torch.where(use_clipped, clipped, unclipped), use_clipped
