"""opdkit.objectives: every OPD objective as pure tensor functions (no models, no torch.distributed).

See docs/objectives.md for the axes and the seed-method -> configuration table."""

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.divergences import (
    Divergence,
    alpha_divergence,
    forward_kl,
    jsd,
    make_divergence,
    reverse_kl,
    total_variation,
)
from opdkit.objectives.loss import PerTokenLoss, aggregate, compute_advantages, opd_loss, opd_per_token_loss
from opdkit.objectives.signals import FullSignal, SampledSignal, TeacherSignal, TopKSignal

__all__ = [
    "ObjectiveConfig", "Divergence", "reverse_kl", "forward_kl", "jsd", "total_variation", "alpha_divergence",
    "make_divergence", "PerTokenLoss", "aggregate", "compute_advantages", "opd_loss", "opd_per_token_loss",
    "FullSignal", "SampledSignal", "TopKSignal", "TeacherSignal",
]
