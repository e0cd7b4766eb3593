"""Backing off a run whose responses run away (issue #15): when the detector's `length_runaway` fires, the learning
rate is multiplied by `diagnostics.backoff_factor` (the schedule keeps its shape: every later lr is scaled), and
again every `diagnostics.length_window` steps while the responses still run away; after `diagnostics.max_backoffs`
of them, the next one stops the run with a checkpoint (exit code 3).

Why the lr: in issue #15's walkthrough an SFT-initialised student ran to the length limit within a few steps at the
full lr and never came back; a run that is already wrecked gains nothing from more steps at the same lr."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opdkit.diagnostics.config import Warning

BACKOFF_CODES = ("length_runaway",)


def runaway_signals(found: Sequence[Warning], ongoing: Mapping[str, bool]) -> tuple[bool, bool]:
    """(a backoff warning fired this step, the runaway condition holds now) from one detector update."""
    return (any(w.code in BACKOFF_CODES for w in found), any(ongoing.get(c, False) for c in BACKOFF_CODES))


class LrBackoff:
    """`react(fired, ongoing, scheduler)` once per step, with the same inputs on every rank. `count`: backoffs so far
    (a resumed run passes the count from its checkpoint; the scheduler's state holds the scaled base lrs)."""

    def __init__(self, factor: float, max_backoffs: int, patience: int, count: int = 0):
        self.factor, self.max_backoffs, self.patience = float(factor), int(max_backoffs), int(patience)
        self.count = int(count)
        self._since = 0  # steps since the last backoff while the runaway went on

    @property
    def enabled(self) -> bool:
        return self.factor < 1.0

    def react(self, fired: bool, ongoing: bool, scheduler) -> tuple[str | None, bool]:
        """(what was done, or None; stop the run?). Backs off when a warning fired, or when the runaway has gone on
        for `patience` steps since the last backoff."""
        if not self.enabled:
            return None, False
        hit = fired or (ongoing and self._since + 1 >= self.patience)
        self._since = self._since + 1 if ongoing and not hit else 0
        if not hit:
            return None, False
        if self.count >= self.max_backoffs:
            return (f"backoff: responses still run away after {self.count} learning-rate backoffs "
                    f"(x{self.factor:g} each); stopping with a checkpoint — lower optim.lr, set "
                    f"optim.warmup_steps, or check rollout.max_new_tokens"), True
        scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        self.count += 1
        return (f"backoff: learning rate x{self.factor:g} (backoff {self.count} of {self.max_backoffs}; "
                "diagnostics.backoff_factor=1 turns this off)"), False
