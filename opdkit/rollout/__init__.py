"""Student rollouts: the `RolloutBatch` value, swappable samplers and a KV-cached HF generation loop."""

from opdkit.rollout.batch import RolloutBatch, left_pad, position_ids_from_mask
from opdkit.rollout.hf import generate
from opdkit.rollout.sampler import (
    SAMPLERS,
    Sampler,
    filter_logits,
    greedy_sample,
    inverse_cdf_sample,
    multinomial_sample,
)

__all__ = [
    "SAMPLERS",
    "RolloutBatch",
    "Sampler",
    "filter_logits",
    "generate",
    "greedy_sample",
    "inverse_cdf_sample",
    "left_pad",
    "multinomial_sample",
    "position_ids_from_mask",
]
