"""pass@k (unbiased, Chen et al. 2021) against brute-force enumeration of k-subsets; avg@k."""

import itertools
import math

import pytest

from opdkit.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows floats; the product form does not
    v = pass_at_k(1000, 3, 500)
    assert v == pytest.approx(1 - math.comb(997, 500) / math.comb(1000, 500), rel=1e-9)
    assert pass_at_k(1000, 0, 10) == 0.0 and pass_at_k(1000, 1000, 10) == 1.0
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 4), (3, 1, 0), (-1, 0, 1), (2.0, 1, 1), (True, 1, 1)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k_and_mean():
    assert avg_at_k([1, 0, 1, 1]) == 0.75 and math.isnan(avg_at_k([]))
    assert mean_pass_at_k([(4, 0), (4, 4)], 2) == 0.5
