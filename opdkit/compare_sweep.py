"""`opdkit compare` method sweeps: a baseline (or any method) tuned on a validation split before the grid's seeds run.

A grid method may carry `sweep: {<knob>: [v1, v2, ...]}` (one knob). Seed 0 is run once per value, each final model
is scored on VALIDATION problems (held-out problems that are not the test problems: drawn with another seed, the
test list removed), the value with the best validation avg@k is chosen, and the method's remaining seeds run with
it. The test split is used only for the final table, so the chosen value is not fitted to it. The choice and every
candidate's validation score are written to <out_dir>/runs/<method>/sweep/chosen.json and shown in results.md.

Why: at the OPD learning rate the off-policy SFT baseline fell far below its own start (42.4 -> 13.1 avg@4,
docs/results.md); a baseline is only fair with its own small learning-rate sweep (issue #15).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opdkit.errors import UserError

TEST_SEED = 12_345        # the test problems: task_examples(task, "heldout", eval_n, seed=TEST_SEED)
VALIDATION_SEED = 54_321  # validation problems: drawn with this seed, the test problems removed


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple

    def label(self, value) -> str:
        return f"{self.key}={value}"


def parse_sweep(raw, where: str) -> Sweep | None:
    """`{knob: [values]}` -> Sweep; None when absent; one-line UserError naming the grid entry otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) != 1:
        raise UserError(f"{where}.sweep must map one knob to a list of values, e.g. {{optim.lr: [1e-3, 3e-4]}}")
    (key, values), = raw.items()
    ok = isinstance(values, list) and len(values) >= 2 and all(isinstance(v, (int, float, str)) and
                                                              not isinstance(v, bool) for v in values)
    if not ok or len(set(map(str, values))) != len(values):
        raise UserError(f"{where}.sweep.{key} must be a list of at least 2 distinct numbers or strings, got {values!r}")
    if any("/" in str(v) or str(v).startswith(".") for v in values):
        raise UserError(f"{where}.sweep.{key}: values become directory names; {values!r} holds '/' or a leading '.'")
    return Sweep(str(key), tuple(values))


def validation_examples(task, n: int) -> list:
    """`n` held-out problems disjoint from the `n` test problems (the same arguments give the same list)."""
    from opdkit.specs import task_examples

    test = {ex.prompt for ex in task_examples(task, "heldout", n, seed=TEST_SEED)}
    for extra in (n, 4 * n):
        pool = [ex for ex in task_examples(task, "heldout", n + extra, seed=VALIDATION_SEED) if ex.prompt not in test]
        if len(pool) >= n:
            return pool[:n]
    raise UserError(f"task {task.name!r}: its held-out split has too few problems for {n} validation problems "
                    f"beside {n} test problems; lower eval_n")


def sweep_dir(out: Path, method: str) -> Path:
    return out / "runs" / method / "sweep"


def candidate_dir(out: Path, method: str, sweep: Sweep, value, seed: int) -> Path:
    return sweep_dir(out, method) / sweep.label(value) / f"seed{seed}"


def read_choice(out: Path, method: str) -> dict | None:
    p = sweep_dir(out, method) / "chosen.json"
    return json.loads(p.read_text()) if p.is_file() else None


def choose(out: Path, method: str, sweep: Sweep, scores: dict) -> dict:
    """Pick the value with the best validation avg@k (ties: the earlier value in the list); write chosen.json."""
    if not scores:
        raise UserError(f"compare: every sweep run of {method!r} failed; see {out}/logs/")
    best = max(sweep.values, key=lambda v: (scores.get(str(v), float("-inf")), -sweep.values.index(v)))
    choice = {"key": sweep.key, "value": best, "validation_avg@k": {str(v): scores.get(str(v)) for v in sweep.values}}
    p = sweep_dir(out, method) / "chosen.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(choice, indent=1))
    return choice


def describe(choice: dict | None, k: int) -> str:
    """One cell for results.md: `optim.lr=0.0003 (val avg@4: 1e-3 31.0, 3e-4 44.2, 1e-4 40.1)`."""
    if not choice:
        return "-"
    scores = ", ".join(f"{v} {'-' if s is None else f'{100 * s:.1f}'}" for v, s in choice["validation_avg@k"].items())
    return f"{choice['key']}={choice['value']} (validation avg@{k}: {scores})"
