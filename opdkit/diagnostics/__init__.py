"""Failure-mode diagnostics for OPD runs: `FailureDetector` names known pathologies (heavy negative reward tail,
early-position extremes, gradient-norm spikes, response-length runaway / collapse, accuracy / reward collapse) from
the per-step metrics and gives concrete advice drawn from the literature. See docs/diagnostics.md."""

from opdkit.diagnostics.config import CODES, DetectorConfig, DetectorWarning, Warning
from opdkit.diagnostics.detector import FailureDetector, detect

__all__ = ["CODES", "DetectorConfig", "DetectorWarning", "FailureDetector", "Warning", "detect"]
