"""`ObjectiveConfig`: the axes a user combines to get any OPD objective from the literature.

Every field carries a `help` string (used by `opdkit train --help` and docs/objectives.md). Validation happens in
`__post_init__`, before any compute: a bad value raises ValueError naming the field and the allowed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opdkit.config import h
from opdkit.validate import choice, in_range

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "tv", "alpha")
ESTIMATORS = ("sampled", "topk", "full")
GRADIENTS = ("stopgrad", "corrected")
REWARDS = ("divergence", "power")
TRANSFORMS = ("none", "clip", "tanh", "zscore", "signmaxabs")
PG_FORMS = ("reinforce", "ppo")
ENTROPY_SOURCES = ("student", "teacher")
ENTROPY_SCOPES = ("batch", "sample")
RETURNS_AT_MASK = ("carry", "restart", "skip")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "sum")


# Knobs that switch on a method only one estimator runs, with the value that leaves it off. Any other value with
# another estimator is refused (it would be silently ignored). Numeric parameters of those methods (power_a,
# clip_low/high, tanh_tau, log_ratio_bound, eps_low/high, top_k) are not: like alpha with divergence != alpha, they
# are inert until their method is on.
SAMPLED_ONLY = {"gradient": "stopgrad", "reward": "divergence", "transform": "none", "pg": "reinforce",
                "gamma": 0.0, "returns_at_mask": "carry"}
TOPK_ONLY = {"topk_tail": False, "topk_include_sampled": False}
# Alpha-divergence values this close to 0 or 1 are refused (see ObjectiveConfig.__post_init__).
ALPHA_LIMIT_GAP = 1e-3
TASK_REWARD_COEF_MAX = 1e3
CLIP_BOUND_MAX = 1e6


@dataclass
class ObjectiveConfig:
    # 1. divergence D(p || q) per position, p = student, q = teacher, written as an f-divergence
    #    D_f = E_{y~p}[f(u)], u = q(y)/p(y) (OPD+ eq. 1).
    divergence: str = h(
        "per-position divergence between student p and teacher q: reverse_kl KL(p||q), forward_kl KL(q||p), "
        "jsd (generalized JSD, see beta), tv (total variation), alpha (Amari alpha-divergence, see alpha)",
        default="reverse_kl",
    )
    beta: float = h(
        "jsd only: JSD_beta = beta*KL(q||M) + (1-beta)*KL(p||M), M = beta*q + (1-beta)*p (GKD/TRL convention); "
        "beta=0 is forward KL and beta=1 reverse KL (the limits of JSD_beta/beta and JSD_beta/(1-beta))",
        default=0.5,
    )
    alpha: float = h(
        "alpha only: f(u) = (u^alpha - 1 - alpha*(u-1)) / (alpha*(alpha-1)); alpha=1 is forward KL, alpha=0 "
        "reverse KL, alpha=0.5 is 4x squared Hellinger; Amari's alpha_A = 2*alpha - 1",
        default=0.5,
    )
    # 2. estimator: which teacher signal the objective needs
    estimator: str = h(
        "sampled: only the sampled token's teacher log-prob (policy gradient); topk: teacher top-K support, both "
        "distributions renormalised on it; full: exact divergence over the whole vocabulary, chunked",
        default="sampled",
    )
    gradient: str = h(
        "sampled only: stopgrad = vanilla OPD advantage -f(u); corrected = OPD+ advantage u*f'(u) - f(u) "
        "(unbiased for every f; for reverse_kl the two differ by a constant baseline)",
        default="stopgrad",
    )
    top_k: int = h("topk only: size K of the teacher's top-K support", default=16)
    topk_tail: bool = h("topk only: add the mass outside the support as one extra category", default=False)
    topk_include_sampled: bool = h("topk only: add the sampled token to the support when it is not in it", default=False)
    chunk_size: int = h("full only: positions per chunk; peak extra memory O(chunk_size x V)", default=1024)
    # 3. reward map (sampled only)
    reward: str = h(
        "sampled only: divergence = the advantage given by `gradient` (for reverse_kl the log-ratio "
        "log q - log p); power = PowerOPD reward q^a - p^a (bounded in [-1, 1])",
        default="divergence",
    )
    power_a: float = h("power reward exponent a > 0 (PowerOPD eq. 4); a -> 0 recovers a * log-ratio", default=1.0)
    transform: str = h(
        "sampled only, applied to the reward after the map: none, clip (to [clip_low, clip_high]), tanh "
        "(tanh(r / tanh_tau)), zscore (over the valid tokens of the batch), signmaxabs (PowerOPD's sign_max_abs: "
        "positive rewards divided by the batch's largest positive one, negative ones by the largest |negative|)",
        default="none",
    )
    tanh_tau: float = h(
        "tanh transform: temperature tau in tanh(r / tau). The PowerOPD authors' Tanh baseline uses tau = 5 "
        "(log_reward_tanh_temperature); the default 1 keeps opdkit's earlier tanh(r), with which docs/results.md "
        "was measured",
        default=1.0,
    )
    clip_low: float = h("clip transform: lower bound (PowerOPD used -1)", default=-1.0)
    clip_high: float = h("clip transform: upper bound (PowerOPD used 1)", default=1.0)
    log_ratio_bound: float = h(
        "numerical guard: |log q - log p| is clamped to this in sampled rewards (a teacher log-prob of -inf gives a "
        "finite reward); far beyond real log-ratios. Rewards that grow exponentially in log u (forward_kl, jsd/tv "
        "stop-grad, alpha) also saturate where their exponent reaches 50 (|reward| <~ 3e23), finite in float32",
        default=50.0,
    )
    # 4. credit assignment
    gamma: float = h(
        "sampled only: discount in [0, 1] for the reward-to-go: 0 = token-level (each token its own reward), "
        "1 = sequence-level (topk/full take the exact per-position divergence: token-level)",
        default=0.0,
    )
    returns_at_mask: str = h(
        "sampled, gamma > 0: what the reward-to-go does at a masked position inside a sequence: carry (it gives 0 "
        "reward and the return runs through it, discounted one step) or restart (the return is cut there, as in "
        "Revisiting OPD's code, which resets its running return where the response mask is 0) or skip (it is no step: "
        "the discount counts valid tokens only, e.g. a multi-turn episode's policy tokens, docs/agents.md)",
        default="carry",
    )
    # 5. policy-gradient form
    pg: str = h(
        "sampled only: reinforce (-A * log p) or ppo (clipped importance ratio p/p_old, several epochs per rollout)",
        default="reinforce",
    )
    eps_low: float = h("ppo: ratio clipped below at 1 - eps_low", default=0.2)
    eps_high: float = h("ppo: ratio clipped above at 1 + eps_high", default=0.2)
    # 6. token selection
    entropy_keep_fraction: float = h(
        "keep only this fraction of the valid tokens with the highest entropy (1.0 keeps all)", default=1.0
    )
    entropy_source: str = h("whose entropy ranks tokens: student or teacher (teacher needs topk or full)", default="student")
    entropy_scope: str = h(
        "where entropy_keep_fraction is taken: batch (the top ceil(f * n) of all valid tokens of the batch) or "
        "sample (each sequence keeps its top max(1, floor(f * n_b)) valid tokens: Revisiting OPD's "
        "entropy_top_ratio, which is per sample)",
        default="batch",
    )
    # 7. aggregation
    aggregation: str = h(
        "token_mean (sum / global token count), seq_mean_token_mean (mean over sequences of per-sequence token "
        "means), sum",
        default="token_mean",
    )
    # 8. task reward (OPD-RL hybrid)
    task_reward_coef: float = h(
        "coefficient of the per-sequence task reward added to every valid token's advantage (sampled), or "
        "as a REINFORCE term on the sequence log-prob (topk/full); 0 disables; |coef| <= 1000",
        default=0.0,
    )

    def __post_init__(self) -> None:
        choice("objective", "divergence", self.divergence, DIVERGENCES)
        choice("objective", "estimator", self.estimator, ESTIMATORS)
        choice("objective", "gradient", self.gradient, GRADIENTS)
        choice("objective", "reward", self.reward, REWARDS)
        choice("objective", "transform", self.transform, TRANSFORMS)
        choice("objective", "pg", self.pg, PG_FORMS)
        choice("objective", "entropy_source", self.entropy_source, ENTROPY_SOURCES)
        choice("objective", "entropy_scope", self.entropy_scope, ENTROPY_SCOPES)
        choice("objective", "returns_at_mask", self.returns_at_mask, RETURNS_AT_MASK)
        choice("objective", "aggregation", self.aggregation, AGGREGATIONS)
        in_range("objective", "beta", self.beta, 0.0, 1.0)
        in_range("objective", "alpha", self.alpha, -1e6, 1e6)
        # (the 1e-12 slack lets the typed 1.001 and 0.999 through: 1.001 - 1 rounds below 1e-3)
        if self.alpha not in (0.0, 1.0) and min(abs(self.alpha), abs(self.alpha - 1.0)) < ALPHA_LIMIT_GAP - 1e-12:
            limit = 0.0 if abs(self.alpha) < ALPHA_LIMIT_GAP else 1.0
            raise ValueError(
                f"objective.alpha={self.alpha!r} is within {ALPHA_LIMIT_GAP} of {limit:g}: there the form "
                f"(u^alpha - 1 - alpha (u - 1)) / (alpha (alpha - 1)) cancels catastrophically (float32 rounding "
                f"amplified ~1/|alpha (alpha - 1)|, non-finite below ~1e-38) while the divergence differs from its "
                f"limit by O({ALPHA_LIMIT_GAP}); set objective.alpha={limit:g} (computed in exact closed form)")
        in_range("objective", "tanh_tau", self.tanh_tau, 0.0, math.inf, lo_open=True, hi_open=True)
        in_range("objective", "power_a", self.power_a, 0.0, math.inf, lo_open=True, hi_open=True)
        in_range("objective", "gamma", self.gamma, 0.0, 1.0)
        in_range("objective", "eps_low", self.eps_low, 0.0, 1.0, hi_open=True)
        in_range("objective", "eps_high", self.eps_high, 0.0, math.inf, hi_open=True)
        in_range("objective", "entropy_keep_fraction", self.entropy_keep_fraction, 0.0, 1.0, lo_open=True)
        in_range("objective", "log_ratio_bound", self.log_ratio_bound, 0.0, 700.0, lo_open=True)
        if not (isinstance(self.task_reward_coef, (int, float)) and not isinstance(self.task_reward_coef, bool)
                and math.isfinite(self.task_reward_coef) and abs(self.task_reward_coef) <= TASK_REWARD_COEF_MAX):
            raise ValueError(
                f"objective.task_reward_coef={self.task_reward_coef!r} must be a number in [-{TASK_REWARD_COEF_MAX:g}, "
                f"{TASK_REWARD_COEF_MAX:g}]: coef x task reward is added to every advantage, and a larger coefficient "
                f"only rescales the learning rate until coef x reward x log p overflows float32")
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and abs(v) <= CLIP_BOUND_MAX):
                raise ValueError(
                    f"objective.{name}={v!r} must be a number in [-{CLIP_BOUND_MAX:g}, {CLIP_BOUND_MAX:g}]: a clip "
                    f"bound is a reward value (log-ratios are at most log_ratio_bound <= 700), and a bound far "
                    f"beyond that clips nothing, or, with both bounds on one side, becomes a reward that overflows "
                    f"float32 in reward x log p")
        if self.clip_low >= self.clip_high:
            raise ValueError(f"objective.clip_low={self.clip_low} must be below objective.clip_high={self.clip_high}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1:
            raise ValueError(f"objective.top_k={self.top_k!r} must be an integer >= 1 (and <= vocab size)")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"objective.chunk_size={self.chunk_size!r} must be an integer >= 1")
        self._refuse_ignored_knobs()
        if self.reward == "power" and (self.divergence != "reverse_kl" or self.gradient != "stopgrad"):
            raise ValueError(
                "objective.reward='power' is PowerOPD's reverse-KL reward q^a - p^a (stop-gradient, eq. 4): set "
                "objective.divergence=reverse_kl and objective.gradient=stopgrad"
            )
        if self.entropy_source == "teacher" and self.estimator == "sampled" and self.entropy_keep_fraction < 1.0:
            raise ValueError(
                "objective.entropy_source='teacher' needs estimator topk or full (a sampled teacher signal has no "
                "entropy); use entropy_source=student"
            )

    def _refuse_ignored_knobs(self) -> None:
        """A knob that switches on a method the chosen estimator does not run is refused, not ignored."""
        if self.estimator != "sampled":
            for name, off in SAMPLED_ONLY.items():
                if getattr(self, name) != off:
                    what = ("token-level credit: the exact per-position divergence" if name == "gamma"
                            else "the exact divergence, with no reward, advantage or policy-gradient form")
                    raise ValueError(
                        f"objective.{name}={getattr(self, name)!r} applies to the sampled estimator only "
                        f"(objective.estimator={self.estimator} uses {what}); add objective.estimator=sampled, or "
                        f"leave objective.{name} at {off!r}")
        if self.estimator != "topk":
            for name, off in TOPK_ONLY.items():
                if getattr(self, name) != off:
                    raise ValueError(
                        f"objective.{name}={getattr(self, name)!r} applies to the topk estimator only "
                        f"(objective.estimator={self.estimator} has no top-K support); add objective.estimator=topk, "
                        f"or leave objective.{name} at {off!r}")

    @property
    def teacher_signal(self) -> str:
        """The teacher signal this objective needs: 'sampled', 'topk' or 'full'."""
        return self.estimator

    @property
    def needs_sampled_teacher_logprobs(self) -> bool:
        """topk with the sampled token in the support also needs the sampled token's teacher log-prob."""
        return self.estimator == "sampled" or (self.estimator == "topk" and self.topk_include_sampled)

    @property
    def uses_old_logprobs(self) -> bool:
        return self.estimator == "sampled" and self.pg == "ppo"
