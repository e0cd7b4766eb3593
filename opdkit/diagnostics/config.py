"""The failure-mode detector's knobs (`diagnostics.*`), its warning codes and the warning record it emits
(`opdkit/diagnostics/detector.py` runs the checks; docs/diagnostics.md lists them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from opdkit.config import h

CODES = ("non_finite", "heavy_negative_tail", "early_position_extremes", "grad_norm_spike", "length_runaway",
         "length_collapse", "accuracy_collapse", "reward_collapse")


# ----------------------------------------------------------------------------------------------------------- config


@dataclass
class DetectorConfig:
    """Thresholds of the failure-mode detector (docs/diagnostics.md)."""

    enabled: bool = h("run the failure-mode detector on every step's metrics (warnings go to the log and to "
                      "metrics.jsonl)", default=True)
    rearm_steps: int = h("after a warning fires, its code stays silent until the condition has been clear for "
                         "this many consecutive steps", default=10)
    smooth_steps: int = h("steps averaged for the length / finished-fraction checks", default=3)
    tail_gap: float = h("heavy_negative_tail: reward p50 - p05 at least this (reward units: nats for the "
                        "log-ratio)", default=5.0)
    tail_asymmetry: float = h("heavy_negative_tail: and p50 - p05 at least this many times p95 - p50",
                              default=3.0)
    early_positions: int = h("early_position_extremes: the first this many response positions are 'early'",
                             default=4)
    early_ratio: float = h("early_position_extremes: max |reward| at early positions at least this many times "
                           "the median over later positions of the per-position max |reward|", default=3.0)
    early_magnitude: float = h("early_position_extremes: and at least this large (reward units)", default=5.0)
    early_min_count: int = h("early_position_extremes: positions with fewer valid tokens than this are ignored",
                             default=4)
    grad_window: int = h("grad_norm_spike: the running median is over this many previous steps", default=20)
    grad_warmup: int = h("grad_norm_spike: steps of history needed before spikes are judged", default=5)
    grad_spike_ratio: float = h("grad_norm_spike: grad_norm above this many times the running median",
                                default=10.0)
    finished_floor: float = h("length_runaway: fires when the mean finished fraction (responses ending with EOS) "
                              "falls below this ...", default=0.5)
    finished_drop: float = h("length_runaway: ... and at least this far below its start (median of the first "
                             "length_ref_steps steps)", default=0.25)
    length_cap_frac: float = h("length_runaway: fires when the mean response length reaches this fraction of "
                               "max_new_tokens (when the detector knows it) from below it over the first "
                               "smooth_steps steps", default=0.95)
    length_window: int = h("length_runaway: window (steps) of the growth check", default=10)
    length_growth: float = h("length_runaway: fires when the mean length over the last window exceeds the "
                             "previous window's by this fraction", default=0.5)
    length_ref_steps: int = h("length_collapse: the start length is the median of the first this many steps",
                              default=5)
    length_collapse: float = h("length_collapse: fires when the mean length falls below this fraction of the "
                               "start length", default=0.25)
    acc_window: int = h("accuracy_collapse: train/accuracy is averaged over this many steps", default=10)
    acc_drop: float = h("accuracy_collapse: fires when accuracy falls to (1 - acc_drop) x its running best or "
                        "below", default=0.5)
    acc_drop_abs: float = h("accuracy_collapse: and at least this far (absolute) below the best", default=0.15)
    reward_window: int = h("reward_collapse: reward/mean is averaged over this many steps", default=10)
    reward_drop: float = h("reward_collapse: fires when the averaged reward mean falls below its running best by "
                           "this many median token-level reward std", default=0.5)
    backoff_factor: float = h("length_runaway: multiply the learning rate by this when it fires (1 = warn "
                              "only; docs/diagnostics.md)", default=0.5)
    max_backoffs: int = h("after this many lr backoffs, the next length_runaway stops the run with a checkpoint "
                          "(exit code 3)", default=3)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in (bool, "bool"):
                if not isinstance(v, bool):
                    raise ValueError(f"diagnostics.{f.name}={v!r} must be true or false")
            elif f.type in (int, "int"):
                lo = 0 if f.name in ("rearm_steps", "grad_warmup") else 1
                if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                    raise ValueError(f"diagnostics.{f.name}={v!r} must be an integer >= {lo}")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                    raise ValueError(f"diagnostics.{f.name}={v!r} must be a number >= 0 (inf disables a check)")
        for name in ("finished_floor", "finished_drop", "length_cap_frac", "length_collapse", "acc_drop"):
            if getattr(self, name) > 1:
                raise ValueError(f"diagnostics.{name}={getattr(self, name)!r} must be in [0, 1]")
        if not 0 < self.backoff_factor <= 1:
            raise ValueError(f"diagnostics.backoff_factor={self.backoff_factor!r} must be in (0, 1] (1: warn only)")
        for name in ("grad_spike_ratio", "tail_asymmetry", "early_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"diagnostics.{name}={getattr(self, name)!r} must be >= 1 (a ratio)")
        if self.grad_warmup > self.grad_window:
            raise ValueError(f"diagnostics.grad_warmup={self.grad_warmup} must be <= "
                             f"diagnostics.grad_window={self.grad_window}")


# ----------------------------------------------------------------------------------------------------------- warning


@dataclass
class Warning:  # noqa: A001 - the detector's own warning record (alias: DetectorWarning)
    """One detected failure mode at one step. `figure` is the number the message leads with."""

    step: int
    code: str
    message: str
    figure: float
    advice: str

    def line(self) -> str:
        """One log line: `[step 12] heavy_negative_tail: reward p05 = -14.2 vs median -0.3 — try ...`."""
        return f"[step {self.step}] {self.code}: {self.message} — {self.advice}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not math.isfinite(d["figure"]):
            d["figure"] = "nan" if math.isnan(d["figure"]) else ("inf" if d["figure"] > 0 else "-inf")
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Warning:
        fig = d.get("figure", math.nan)
        return cls(int(d["step"]), str(d["code"]), str(d["message"]), float(fig), str(d.get("advice", "")))


DetectorWarning = Warning
