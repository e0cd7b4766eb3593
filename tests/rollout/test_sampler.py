"""opdkit.rollout.sampler: samplers draw from the given distribution; filter_logits keeps the right support."""

import math

import pytest
import torch

from opdkit.rollout.sampler import filter_logits, greedy_sample, inverse_cdf_sample, multinomial_sample


@pytest.mark.parametrize("sampler", [inverse_cdf_sample, multinomial_sample])
def test_sampler_frequencies(sampler):
    probs_V = torch.tensor([0.1, 0.0, 0.5, 0.15, 0.25, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 40000
    ids = sampler(probs_V.expand(n, -1) * 3.0, g)  # unnormalised rows are fine
    assert ids.shape == (n,) and ids.dtype == torch.long
    freq = torch.bincount(ids, minlength=6).float() / n
    assert freq[1] == 0 and freq[5] == 0  # zero-probability ids never drawn
    assert torch.allclose(freq, probs_V, atol=4 * math.sqrt(0.25 / n))


def test_inverse_cdf_edge_rows():
    one_hot = torch.zeros(3, 7)
    one_hot[0, 0], one_hot[1, 6], one_hot[2, 3] = 1.0, 1.0, 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert inverse_cdf_sample(one_hot, g).tolist() == [0, 6, 3]
    assert greedy_sample(torch.tensor([[0.1, 0.7, 0.2]])).tolist() == [1]


def test_seeded_is_deterministic():
    probs = torch.rand(4, 50)
    a = inverse_cdf_sample(probs, torch.Generator().manual_seed(3))
    b = inverse_cdf_sample(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_filter_logits_top_k_top_p_temperature():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.05, 0.05, 0.05, 0.85]]))
    assert torch.equal(filter_logits(logits, 1.0, 1.0, None), logits)
    assert torch.allclose(filter_logits(logits, 0.5, 1.0, None), logits * 2)
    k2 = filter_logits(logits, 1.0, 1.0, 2)
    assert torch.isfinite(k2).sum(-1).tolist() == [2, 2] and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, 1.0, 0.65, None)  # row 0: 0.4 + 0.3 >= 0.65; row 1: 0.85 alone
    assert torch.isfinite(p).tolist() == [[True, True, False, False], [False, False, False, True]]
    assert torch.isfinite(filter_logits(logits, 1.0, 1e-6, None)).sum(-1).tolist() == [1, 1]  # at least one kept
    both = filter_logits(logits, 1.0, 0.5, 3)  # top-k first, then nucleus on the renormalised 3
    assert torch.isfinite(both).sum(-1).tolist() == [2, 1]
    greedy = filter_logits(logits, 0.0, 1.0, None)
    assert torch.isfinite(greedy).tolist() == [[True, False, False, False], [False, False, False, True]]
    with pytest.raises(ValueError):
        filter_logits(logits, 1.0, 0.0, None)
