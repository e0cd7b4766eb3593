"""Shared builders for the objective tests (float64 everywhere)."""

from __future__ import annotations

import torch

from opdkit.objectives import FullSignal, ObjectiveConfig, SampledSignal, TopKSignal

DT = torch.float64


def signal_for(cfg: ObjectiveConfig, teacher_logprobs_BTV: torch.Tensor, tokens_BT: torch.Tensor):
    """The teacher signal cfg declares, cut from full teacher log-probs."""
    if cfg.teacher_signal == "sampled":
        return SampledSignal(teacher_logprobs_BTV.gather(-1, tokens_BT[..., None]).squeeze(-1))
    if cfg.teacher_signal == "topk":
        vals, ids = teacher_logprobs_BTV.topk(cfg.top_k, dim=-1)
        sampled = teacher_logprobs_BTV.gather(-1, tokens_BT[..., None]).squeeze(-1)
        return TopKSignal(vals, ids, sampled if cfg.topk_include_sampled else None)
    return FullSignal(logprobs_BTV=teacher_logprobs_BTV)


def random_problem(B=3, T=6, V=11, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    teacher = torch.log_softmax(2 * torch.randn(B, T, V, generator=g, dtype=dtype), -1)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - 2:] = False
    mask[-1, 1] = False
    return logits, teacher, tokens, mask
