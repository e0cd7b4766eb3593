"""Backing off a run whose responses run away (issue #15): when the detector's `length_runaway` fires, the learning
rate is multiplied by `diagnostics.backoff_factor` (the schedule keeps its shape: every later lr is scaled), and
again every `diagnostics.length_window` steps while the responses still run away; after `diagnostics.max_backoffs`
of them, the next one stops the run with a checkpoint (exit code 3).

Why the lr: in issue #15's walkthrough an SFT-initialised student ran to the length limit within a few steps at the
full lr and never came back; a run that is already wrecked gains nothing from more steps at the same lr."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opdkit.diagnostics.detector import Warning

BACKOFF_CODES = ("length_runaway",)


class LrBackoff:
    """`react(...)` after each detector update. `count`: backoffs so far (a resumed run passes the count from its
    checkpoint; the scheduler's state holds the scaled base lrs)."""

    def __init__(self, factor: float, max_backoffs: int, patience: int, count: int = 0):
        self.factor, self.max_backoffs, self.patience = float(factor), int(max_backoffs), int(patience)
        self.count = int(count)
        self._since = 0  # steps since the last backoff while the runaway went on

    def wants(self, found: Sequence[Warning], ongoing: Mapping[str, bool]) -> bool:
        """A backoff warning fired now, or the runaway has gone on for `patience` steps since the last backoff."""
        if any(w.code in BACKOFF_CODES for w in found):
            return True
        return any(ongoing.get(c, False) for c in BACKOFF_CODES) and self._since + 1 >= self.patience

    def react(self, hit: bool, still: bool, scheduler, step: int) -> tuple[str | None, bool]:
        """(a line to print or None, stop the run?). `hit`: back off now (agreed by every rank; see `wants`);
        `still`: the runaway goes on (counts the steps towards the next backoff)."""
        if self.factor >= 1.0:
            return None, False
        self._since = self._since + 1 if still and not hit else 0
        if not hit:
            return None, False
        if self.count >= self.max_backoffs:
            return (f"[step {step}] backoff: responses still run away after {self.count} learning-rate backoffs "
                    f"(x{self.factor:g} each); stopping with a checkpoint — lower optim.lr, set "
                    f"optim.warmup_steps, or check rollout.max_new_tokens"), True
        scheduler.base_lrs = [lr * self.factor for lr in scheduler.base_lrs]
        self.count += 1
        return (f"[step {step}] backoff: learning rate x{self.factor:g} (backoff {self.count} of "
                f"{self.max_backoffs}; diagnostics.backoff_factor=1 turns this off)"), False
