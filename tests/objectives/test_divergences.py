"""Full divergences against hand-written closed forms (float64), generic-f fallback, JSD endpoints."""

import pytest
import torch

from opdkit.objectives import Divergence, make_divergence

DT = torch.float64


def _pq(V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=DT), -1)
    q = torch.softmax(1.5 * torch.randn(V, generator=g, dtype=DT), -1)
    return p, q


def full(div, p, q):
    return div.term(p.log(), q.log()).sum()


def test_reverse_forward_kl_closed_form():
    p, q = _pq()
    assert torch.allclose(full(make_divergence("reverse_kl"), p, q), (p * (p / q).log()).sum())
    assert torch.allclose(full(make_divergence("forward_kl"), p, q), (q * (q / p).log()).sum())


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_closed_form(beta):
    p, q = _pq(seed=1)
    m = beta * q + (1 - beta) * p
    expected = beta * (q * (q / m).log()).sum() + (1 - beta) * (p * (p / m).log()).sum()
    assert torch.allclose(full(make_divergence("jsd", beta=beta), p, q), expected)


def test_jsd_endpoints_are_the_limits_of_the_scaled_jsd():
    p, q = _pq(seed=2)
    fkl = (q * (q / p).log()).sum()
    rkl = (p * (p / q).log()).sum()
    # beta = 0 and 1 are forward and reverse KL (TRL convention) ...
    assert torch.allclose(full(make_divergence("jsd", beta=0.0), p, q), fkl)
    assert torch.allclose(full(make_divergence("jsd", beta=1.0), p, q), rkl)
    # ... which are the limits of JSD_beta / beta and JSD_beta / (1 - beta); JSD_beta itself goes to 0.
    eps = 1e-6
    assert torch.allclose(full(make_divergence("jsd", beta=eps), p, q) / eps, fkl, rtol=1e-4)
    assert torch.allclose(full(make_divergence("jsd", beta=1 - eps), p, q) / eps, rkl, rtol=1e-4)
    assert full(make_divergence("jsd", beta=eps), p, q) < 1e-5


def test_tv_closed_form():
    p, q = _pq(seed=3)
    assert torch.allclose(full(make_divergence("tv"), p, q), 0.5 * (p - q).abs().sum())


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.3, 0.5, 1.0, 2.0])
def test_alpha_closed_form(alpha):
    p, q = _pq(seed=4)
    if alpha == 1.0:
        expected = (q * (q / p).log()).sum()
    elif alpha == 0.0:
        expected = (p * (p / q).log()).sum()
    else:
        expected = ((q**alpha * p ** (1 - alpha)).sum() - 1) / (alpha * (alpha - 1))
    assert torch.allclose(full(make_divergence("alpha", alpha=alpha), p, q), expected)
    if alpha == 0.5:  # 4 * (1 - Bhattacharyya coefficient)
        assert torch.allclose(expected, 4 * (1 - (p * q).sqrt().sum()))


@pytest.mark.parametrize("name,kw", [("reverse_kl", {}), ("forward_kl", {}), ("jsd", {"beta": 0.3}),
                                     ("tv", {}), ("alpha", {"alpha": 0.7}), ("alpha", {"alpha": 3.0})])
def test_generic_fallback_and_autograd_fprime_match_closed_forms(name, kw):
    div = make_divergence(name, **kw)
    bare = Divergence("bare", f=div.f)  # only f: f' by autograd, p*f(q/p) generic
    p, q = _pq(seed=5)
    assert torch.allclose(full(bare, p, q), full(div, p, q))
    u = torch.tensor([0.1, 0.7, 1.3, 4.0], dtype=DT)
    assert torch.allclose(bare.fprime(u), div.fprime(u))
    for form in ("stopgrad", "corrected"):
        assert torch.allclose(bare.advantage(u.log(), form), div.advantage(u.log(), form))


def test_f_is_zero_at_one_and_divergence_zero_when_equal():
    p, _ = _pq(seed=6)
    for name in ("reverse_kl", "forward_kl", "jsd", "tv", "alpha"):
        div = make_divergence(name)
        assert abs(div.f(torch.ones(1, dtype=DT)).item()) < 1e-12
        assert abs(full(div, p, p).item()) < 1e-12


def test_corrected_advantages_closed_forms():
    """OPD+ Table 1: RKL log u - 1, FKL u, JSD (1 - beta) log(beta u + 1 - beta)."""
    lu = torch.linspace(-3, 3, 13, dtype=DT)
    u = lu.exp()
    assert torch.allclose(make_divergence("reverse_kl").advantage(lu, "corrected"), lu - 1)
    assert torch.allclose(make_divergence("reverse_kl").advantage(lu, "stopgrad"), lu)
    assert torch.allclose(make_divergence("forward_kl").advantage(lu, "corrected"), u)
    assert torch.allclose(make_divergence("forward_kl").advantage(lu, "stopgrad"), -u * lu)
    b = 0.4
    assert torch.allclose(make_divergence("jsd", beta=b).advantage(lu, "corrected"),
                          (1 - b) * torch.log(b * u + 1 - b))
    lu_tv = torch.tensor([-1.0, -0.1, 0.2, 2.0], dtype=DT)
    assert torch.allclose(make_divergence("tv").advantage(lu_tv, "corrected"), 0.5 * torch.sign(lu_tv))


@pytest.mark.parametrize("alpha", [-0.5, 0.5, 2.0])
def test_alpha_corrected_advantage_is_box_cox(alpha):
    lu = torch.linspace(-2, 2, 9, dtype=DT)
    got = make_divergence("alpha", alpha=alpha).advantage(lu, "corrected")
    assert torch.allclose(got, (torch.exp(alpha * lu) - 1) / alpha)
