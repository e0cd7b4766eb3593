"""Sampling metrics: the unbiased pass@k estimator (Chen et al. 2021) and avg@k.

With `n` samples per problem of which `c` are correct:

- `pass_at_k(n, c, k)` = 1 - C(n - c, k) / C(n, k): the probability that at least one of `k` samples drawn without
  replacement from the `n` is correct. Computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the
  (huge) binomial coefficients.
- `avg_at_k(scores)`: the mean score of the samples (for 0/1 scores c / n), i.e. the expected accuracy of one sample.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["pass_at_k", "avg_at_k", "mean_pass_at_k"]


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be an integer >= 0")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct: 1 - C(n-c, k) / C(n, k) (needs 1 <= k <= n, 0 <= c <= n)."""
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if c > n:
        raise ValueError(f"c={c} correct samples > n={n} samples")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float] | Iterable[float]) -> float:
    """Mean score over the samples of one problem (avg@k with k = len(scores)); an empty list -> nan."""
    xs = [float(s) for s in scores]
    return sum(xs) / len(xs) if xs else math.nan


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of pass_at_k(n, c, k) over problems given as (n, c) pairs; no problems -> nan."""
    vals = [pass_at_k(n, c, k) for n, c in counts]
    return sum(vals) / len(vals) if vals else math.nan
