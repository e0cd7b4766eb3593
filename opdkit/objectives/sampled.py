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


def transform_rewards(cfg: ObjectiveConfig, reward_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Post-hoc transforms (PowerOPD section 3.2 / Table 1 baselines), over the valid tokens of the batch."""
    m = mask_BT.to(reward_BT.dtype)
    if cfg.transform == "none":
        out = reward_BT
    elif cfg.transform == "clip":
        out = reward_BT.clamp(cfg.clip_low, cfg.clip_high)
    elif cfg.transform == "tanh":
        out = torch.tanh(reward_BT)
    elif cfg.transform == "zscore":
        mean, std = _masked_mean_std(reward_BT, m)
        out = (reward_BT - mean) / (std + _EPS)
    elif cfg.transform == "signmaxabs":
        scale = (reward_BT.abs() * m).amax() if reward_BT.numel() else reward_BT.new_zeros(())
        out = reward_BT / (scale + _EPS)
    else:  # unreachable: validated in ObjectiveConfig
        raise ValueError(f"objective.transform={cfg.transform!r}")
    return out * m


def discounted_returns(reward_BT: Tensor, mask_BT: Tensor, gamma: float) -> Tensor:
    """A_t = sum_{k >= t} gamma^(k - t) r_k over valid tokens (masked tokens give 0 reward but still count as a
    step). gamma = 0: token-level (A_t = r_t); gamma = 1: sequence-level reward-to-go."""
    r = reward_BT * mask_BT.to(reward_BT.dtype)
    if gamma == 0.0:
        return r
    out = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * mask_BT.to(r.dtype)


def select_by_entropy(entropy_BT: Tensor, mask_BT: Tensor, keep_fraction: float) -> Tensor:
    """Keep the ceil(keep_fraction * n_valid) valid tokens with the highest entropy (ties kept)."""
    mask = mask_BT.bool()
    if keep_fraction >= 1.0:
        return mask
    n_valid = int(mask.sum())
    if n_valid == 0:
        return mask
    k = max(1, int(-(-keep_fraction * n_valid // 1)))
    threshold = torch.topk(entropy_BT[mask].detach(), k).values[-1]
    return mask & (entropy_BT.detach() >= threshold)


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
