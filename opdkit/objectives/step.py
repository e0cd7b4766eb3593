"""Objective semantics at the level of one training step's whole batch (pure tensor code, no models).

A trainer computes the batch-level terms once per step (`batch_terms`), then the per-token loss micro-batch by
micro-batch (`opd_per_token_loss`), so batch statistics (z-score, sign-max-abs) do not depend on the split:

- sampled estimators: advantages for the whole batch from the sampler's log-probs (pi_old) and the teacher's, the
  task reward folded into them (OPD-RL hybrid, GRPO-style broadcast), and the raw reward before transforms (what the
  reward-distribution plots show, PowerOPD fig. 2);
- dense estimators (topk / full): no advantages; the task reward goes to the per-token loss as a REINFORCE term,
  and the per-token "reward" shown in plots is minus the divergence (`dense_reward`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.loss import PerTokenLoss, compute_advantages, divergence_of
from opdkit.objectives.sampled import token_rewards
from opdkit.objectives.signals import SampledSignal, TeacherSignal


@dataclass
class BatchTerms:
    advantages_BT: Tensor | None   # sampled: advantages of the whole batch (float64, detached); dense: None
    raw_reward_BT: Tensor | None   # sampled: the reward before transforms; dense: None (see dense_reward)
    task_rewards_B: Tensor | None  # what the per-token loss takes: dense estimators only (sampled: in the advantages)
    metrics: dict


def batch_terms(cfg: ObjectiveConfig, teacher: TeacherSignal, old_logprobs_BT: Tensor, mask_BT: Tensor,
                task_rewards_B: Tensor | None = None) -> BatchTerms:
    """The batch-level terms of a step (see the module docstring)."""
    if isinstance(teacher, SampledSignal):
        adv_BT, metrics = compute_advantages(cfg, old_logprobs_BT, teacher.logprobs_BT, mask_BT, task_rewards_B)
        raw = token_rewards(cfg, divergence_of(cfg), old_logprobs_BT, teacher.logprobs_BT)
        return BatchTerms(adv_BT, raw, None, metrics)
    return BatchTerms(None, None, task_rewards_B, {})


def dense_reward(per: PerTokenLoss) -> Tensor:
    """The per-token reward of a dense estimator, for metrics and plots: minus its per-token loss (float64)."""
    return -per.loss_BT.detach().double()
