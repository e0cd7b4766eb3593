"""f-divergences between the student p and the teacher q at one position.

Every divergence is written in the OPD+ framework (Zhao et al., seeds/000, eq. 1):

    D_f(p || q) = sum_y p(y) f(u(y)) = E_{y~p}[f(u)],   u = q(y) / p(y),   f convex, f(1) = 0.

Differentiating through both the sampling distribution and u gives (OPD+ section 3.2)

    grad D_f = E_{y~p}[ grad log p(y) * (f(u) - u f'(u)) ],

so the unbiased per-token advantage (minimising D_f by ascending A * grad log p) is A = u f'(u) - f(u)
("corrected", OPD+), while vanilla OPD's stop-gradient form uses A = -f(u) ("stopgrad"). For reverse KL,
f(u) = -log u, so the two differ by the constant 1 and both are unbiased; for forward KL and JSD they are not.

Adding a divergence = one small function returning `Divergence(name, f)`; `f_prime` is derived by autograd when
not given, and `pointwise` (the stable log-space form of p * f(q/p) used by the full / top-K estimators) falls back
to a generic form computed from f. Built-ins give closed forms for both, and `advantage_fn`: the sampled advantage
computed from log u directly (log space, expm1/logaddexp), with every exponential's exponent capped at
ADV_EXP_CAP, so that no accepted configuration gives an inf/NaN reward in float32 or float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# Log-probabilities are floored here before any arithmetic: exp(-1e4) is exactly 0 in float32/64, so a teacher
# log-prob of -inf (probability 0) behaves as probability 0 without producing inf - inf or 0 * inf.
LOGPROB_FLOOR = -1.0e4
# Exponents are capped here in the generic fallback (exp(50) ~ 5e21 is finite in float32).
_EXP_CAP = 50.0
# Sampled advantages that grow exponentially in log u saturate where their exponent reaches this (the log-ratio
# itself is clamped to `log_ratio_bound` <= 700 first). The largest built-in advantage there is forward KL's
# stop-grad -u log u ~ 2.6e23 (the value it always had at the default log_ratio_bound = 50): finite in float32 with
# room for x log p, PPO's ratio (<= e^20) and sums over many tokens. The cap keeps every advantage monotone in
# log u (a saturation, not a wrap-around).
ADV_EXP_CAP = 50.0
_FORMS = ("stopgrad", "corrected")


@dataclass(frozen=True)
class Divergence:
    name: str
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor] | None = None
    pointwise: Callable[[Tensor, Tensor], Tensor] | None = None
    # (log_u float64, form) -> advantage, computed stably from log u; None: from u = exp(log u) and f, f'.
    advantage_fn: Callable[[Tensor, str], Tensor] | None = None

    def fprime(self, u: Tensor) -> Tensor:
        if self.f_prime is not None:
            return self.f_prime(u)
        with torch.enable_grad():
            x = u.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self.f(x).sum(), x)
        return g

    def advantage(self, log_u: Tensor, gradient: str) -> Tensor:
        """Per-token advantage from log u = log q(y) - log p(y) (already clamped by the caller).

        stopgrad: -f(u) (vanilla OPD); corrected: u f'(u) - f(u) (OPD+). Computed in float64; built-ins in log space
        (`advantage_fn`), saturating where an exponent reaches ADV_EXP_CAP."""
        if gradient not in _FORMS:
            raise ValueError(f"objective.gradient={gradient!r} is not one of stopgrad, corrected")
        if self.advantage_fn is not None:
            return self.advantage_fn(log_u.double(), gradient)
        u = torch.exp(log_u.double())
        fu = self.f(u)
        if gradient == "stopgrad":
            return -fu
        if gradient == "corrected":
            return u * self.fprime(u) - fu
        raise ValueError(f"objective.gradient={gradient!r} is not one of stopgrad, corrected")

    def term(self, lp: Tensor, lq: Tensor) -> Tensor:
        """p * f(q / p) elementwise from log-probs (summing over the support gives D_f(p || q))."""
        lp = lp.clamp(min=LOGPROB_FLOOR)
        lq = lq.clamp(min=LOGPROB_FLOOR)
        if self.pointwise is not None:
            return self.pointwise(lp, lq)
        log_u = (lq - lp).clamp(-_EXP_CAP, _EXP_CAP)
        return lp.exp() * self.f(log_u.exp())


def reverse_kl() -> Divergence:
    """KL(p || q) = E_p[log p - log q]: f(u) = -log u."""
    return Divergence(
        "reverse_kl",
        f=lambda u: -torch.log(u),
        f_prime=lambda u: -1.0 / u,
        pointwise=lambda lp, lq: lp.exp() * (lp - lq),
        # -f(u) = log u; u f'(u) - f(u) = log u - 1 (OPD+ Table 1): linear in log u, nothing to overflow.
        advantage_fn=lambda x, form: x if form == "stopgrad" else x - 1.0,
    )


def forward_kl() -> Divergence:
    """KL(q || p) = E_q[log q - log p] = E_p[u log u]: f(u) = u log u."""
    return Divergence(
        "forward_kl",
        f=lambda u: u * torch.log(u),
        f_prime=lambda u: torch.log(u) + 1.0,
        pointwise=lambda lp, lq: lq.exp() * (lq - lp),
        advantage_fn=_forward_kl_advantage,
    )


def _forward_kl_advantage(x: Tensor, form: str) -> Tensor:
    """-f(u) = -u log u; u f'(u) - f(u) = u (OPD+ Table 1), from x = log u <= ADV_EXP_CAP."""
    x = x.clamp(max=ADV_EXP_CAP)
    return -x * x.exp() if form == "stopgrad" else x.exp()


def jsd(beta: float) -> Divergence:
    """Generalized JSD (GKD, Agarwal et al. 2024; TRL `generalized_jsd_loss` convention):

        JSD_beta(p, q) = beta * KL(q || M) + (1 - beta) * KL(p || M),   M = beta * q + (1 - beta) * p.

    As an f-divergence: m(u) = beta*u + 1 - beta, f(u) = beta*u*log(u/m) - (1-beta)*log m, f'(u) = beta*log(u/m).
    Endpoints follow TRL: beta = 0 is forward KL(q||p) and beta = 1 reverse KL(p||q), the limits of
    JSD_beta / beta (beta -> 0) and JSD_beta / (1 - beta) (beta -> 1); JSD_beta itself vanishes at both ends."""
    if beta == 0.0:
        return forward_kl()
    if beta == 1.0:
        return reverse_kl()
    lb, l1b = math.log(beta), math.log1p(-beta)

    def f(u: Tensor) -> Tensor:
        m = beta * u + (1.0 - beta)
        return beta * u * torch.log(u / m) - (1.0 - beta) * torch.log(m)

    def pointwise(lp: Tensor, lq: Tensor) -> Tensor:
        lm = torch.logaddexp(lb + lq, l1b + lp)
        return beta * lq.exp() * (lq - lm) + (1.0 - beta) * lp.exp() * (lp - lm)

    def advantage(x: Tensor, form: str) -> Tensor:
        # log m = log(beta u + 1 - beta) by logaddexp; corrected (1 - beta) log m (OPD+ Table 1) is ~linear in log u.
        if form == "corrected":
            return (1.0 - beta) * torch.logaddexp(lb + x, torch.full_like(x, l1b))
        x = x.clamp(max=ADV_EXP_CAP)
        lm = torch.logaddexp(lb + x, torch.full_like(x, l1b))
        return -(beta * x.exp() * (x - lm) - (1.0 - beta) * lm)

    return Divergence(f"jsd(beta={beta})", f=f, f_prime=lambda u: beta * torch.log(u / (beta * u + 1.0 - beta)),
                      pointwise=pointwise, advantage_fn=advantage)


def total_variation() -> Divergence:
    """TV(p, q) = 1/2 sum |p - q|: f(u) = |u - 1| / 2 (f'(u) = sign(u - 1) / 2; the corrected advantage is
    sign(u - 1) / 2)."""
    return Divergence(
        "tv",
        f=lambda u: 0.5 * torch.abs(u - 1.0),
        f_prime=lambda u: 0.5 * torch.sign(u - 1.0),
        pointwise=lambda lp, lq: 0.5 * torch.abs(lq.exp() - lp.exp()),
        advantage_fn=lambda x, form: (0.5 * torch.sign(x) if form == "corrected"
                                      else -0.5 * torch.expm1(x.clamp(max=ADV_EXP_CAP)).abs()),
    )


def alpha_divergence(alpha: float) -> Divergence:
    """Amari alpha-divergence, Cichocki-Amari parameterisation:

        f(u) = (u^alpha - 1 - alpha (u - 1)) / (alpha (alpha - 1)),
        D = (sum_y q^alpha p^(1-alpha) - 1) / (alpha (alpha - 1)).

    alpha -> 1 gives forward KL, alpha -> 0 reverse KL (with the linear term u - 1 that has zero mean under p),
    alpha = 1/2 gives 4 * (1 - Bhattacharyya coefficient). Amari's alpha_A in (-1, 1) is alpha_A = 2*alpha - 1.
    The linear term only adds a constant to the corrected advantage, so OPD+ is unaffected by it."""
    a = float(alpha)
    if a == 1.0:
        return Divergence(
            "alpha(1)",
            f=lambda u: u * torch.log(u) - u + 1.0,
            f_prime=lambda u: torch.log(u),
            pointwise=lambda lp, lq: lq.exp() * (lq - lp) - lq.exp() + lp.exp(),
            advantage_fn=_alpha_advantage(1.0),
        )
    if a == 0.0:
        return Divergence(
            "alpha(0)",
            f=lambda u: u - 1.0 - torch.log(u),
            f_prime=lambda u: 1.0 - 1.0 / u,
            pointwise=lambda lp, lq: lq.exp() - lp.exp() + lp.exp() * (lp - lq),
            advantage_fn=_alpha_advantage(0.0),
        )
    c = 1.0 / (a * (a - 1.0))

    def pointwise(lp: Tensor, lq: Tensor) -> Tensor:
        mixed = torch.exp((a * lq + (1.0 - a) * lp).clamp(max=_EXP_CAP))
        return c * (mixed - lp.exp() - a * (lq.exp() - lp.exp()))

    return Divergence(
        f"alpha({a})",
        f=lambda u: c * (u**a - 1.0 - a * (u - 1.0)),
        f_prime=lambda u: (u ** (a - 1.0) - 1.0) / (a - 1.0),
        pointwise=pointwise,
        advantage_fn=_alpha_advantage(a),
    )


def _alpha_advantage(a: float) -> Callable[[Tensor, str], Tensor]:
    """The alpha-divergence's sampled advantages from x = log u, in expm1 form (exact for small |a x|):

        corrected  u f'(u) - f(u) = (u^a - 1) / a = expm1(a x) / a          (Box-Cox; a = 0: x)
        stopgrad   -f(u) = -(expm1(a x) - a expm1(x)) / (a (a - 1))         (a = 0: -(expm1(x) - x);
                                                                              a = 1: -(x e^x - expm1(x)))
    x is clamped to the side where an exponent (a x or x) would pass ADV_EXP_CAP; the other side saturates by
    itself (u^a -> 0), so it is left alone."""
    if a == 0.0:
        def adv0(x: Tensor, form: str) -> Tensor:
            return x if form == "corrected" else -(torch.expm1(x.clamp(max=ADV_EXP_CAP)) - x.clamp(max=ADV_EXP_CAP))
        return adv0
    if a == 1.0:
        def adv1(x: Tensor, form: str) -> Tensor:
            x = x.clamp(max=ADV_EXP_CAP)
            return torch.expm1(x) if form == "corrected" else -(x * x.exp() - torch.expm1(x))
        return adv1
    # a x <= CAP and (stop-grad only, for e^x) x <= CAP.
    ax_hi, ax_lo = (ADV_EXP_CAP / a, None) if a > 0 else (None, ADV_EXP_CAP / a)
    stop_hi = min(ADV_EXP_CAP, ax_hi) if ax_hi is not None else ADV_EXP_CAP

    def adv(x: Tensor, form: str) -> Tensor:
        if form == "corrected":
            return torch.expm1(a * x.clamp(min=ax_lo, max=ax_hi)) / a
        x = x.clamp(min=ax_lo, max=stop_hi)
        return -(torch.expm1(a * x) - a * torch.expm1(x)) / (a * (a - 1.0))

    return adv


def make_divergence(name: str, *, beta: float = 0.5, alpha: float = 0.5) -> Divergence:
    if name == "reverse_kl":
        return reverse_kl()
    if name == "forward_kl":
        return forward_kl()
    if name == "jsd":
        return jsd(beta)
    if name == "tv":
        return total_variation()
    if name == "alpha":
        return alpha_divergence(alpha)
    raise ValueError(f"objective.divergence={name!r} is not one of reverse_kl, forward_kl, jsd, tv, alpha")
