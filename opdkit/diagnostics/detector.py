"""Failure-mode detector: watches the per-step metrics of an OPD run and names known pathologies as they appear.

`FailureDetector(config, objective=..., max_new_tokens=...)`; `.update(step, metrics) -> list[Warning]` once per
logged record (the step-0 eval row, every training step, eval rows). Each check keeps its own running history;
a warning fires once per *episode*: after firing, its code stays silent until the condition has been clear for
`rearm_steps` consecutive evaluations. The checks, their defaults and the seed each comes from are in
docs/diagnostics.md.

Codes (defaults; seed):
- non_finite: loss / grad_norm / reward/mean / kl is NaN or inf.
- heavy_negative_tail: reward p50 - p05 >= 5 and >= 3 x (p95 - p50) (PowerOPD §3.2 Fig. 2a; OPD+ Table 2).
- early_position_extremes: max |reward| at positions 0-3 >= 5 and >= 3 x the median over later positions
  (PowerOPD §3.2 Fig. 2b).
- grad_norm_spike: grad_norm > 10 x the median of the previous 20 steps, after 5 (PowerOPD §6.2 Fig. 6).
- length_runaway: finished fraction falls below 50% (and by 0.25), mean length >= 95% of max_new_tokens (when the
  first steps were below it), or +50% in 10 steps (PowerOPD §3.1, §6.1).
- length_collapse: mean length < 25% of its start (PowerOPD §3.1 Fig. 3b).
- accuracy_collapse: accuracy (10-step mean, or eval) <= 50% of its best and >= 0.15 below it (OPD+ §4; PowerOPD
  §3.1).
- reward_collapse: 10-step reward mean below its best by > 0.5 x the median token reward std (OPD+ §4).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from opdkit.diagnostics.config import CODES, DetectorConfig, Warning

_NONFINITE_KEYS = ("loss", "grad_norm", "reward/mean", "kl")
_BIASED_DIVS = {"forward_kl": "forward KL", "jsd": "JSD", "tv": "TV", "alpha": "alpha-divergence"}


# A failure of one of these kinds within the first EARLY_LR_STEPS steps (or twice the warm-up) is put down to the
# learning rate first.
EARLY_LR_STEPS = 30
_LR_CODES = ("non_finite", "grad_norm_spike", "length_runaway", "length_collapse", "accuracy_collapse",
             "reward_collapse")

# ----------------------------------------------------------------------------------------------------------- helpers


def _num(metrics: Mapping, key: str) -> float | None:
    """metrics[key] as a float (also "nan"/"inf" strings), or None when absent / not a number."""
    v = metrics.get(key)
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    try:  # 0-d tensors / numpy scalars
        return float(v)
    except (TypeError, ValueError):
        return None


def _vec(metrics: Mapping, key: str) -> list[float] | None:
    v = metrics.get(key)
    if not isinstance(v, (list, tuple)):
        tolist = getattr(v, "tolist", None)
        v = tolist() if callable(tolist) else None
        if not isinstance(v, list):
            return None
    out = []
    for x in v:
        try:
            out.append(float(x))
        except (TypeError, ValueError):
            out.append(math.nan)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.4g}"


def _objective_info(objective: Any) -> dict[str, Any]:
    """divergence / gradient / reward / transform / estimator / power_a from a config object or a mapping (plain or
    `objective.`-prefixed keys)."""
    keys = ("divergence", "gradient", "reward", "transform", "estimator", "power_a")
    if objective is None:
        return dict.fromkeys(keys)
    if isinstance(objective, Mapping):
        if isinstance(objective.get("objective"), Mapping):
            objective = objective["objective"]
        return {k: objective.get(k, objective.get(f"objective.{k}")) for k in keys}
    inner = getattr(objective, "objective", None)  # a whole TrainConfig
    if inner is not None and not isinstance(objective, type):
        objective = inner
    return {k: getattr(objective, k, None) for k in keys}


class _Gate:
    """Once-per-episode firing: armed -> fire and disarm; re-armed after `rearm` consecutive clear evaluations."""

    def __init__(self, rearm: int):
        self.rearm = rearm
        self.armed = True
        self.clear = 0

    def __call__(self, condition: bool | None) -> bool:
        if condition is None:  # no data this step: no information either way
            return False
        if condition:
            self.clear = 0
            if self.armed:
                self.armed = False
                return True
            return False
        if not self.armed:
            self.clear += 1
            if self.clear >= self.rearm:
                self.armed, self.clear = True, 0
        return False


# ----------------------------------------------------------------------------------------------------------- detector


class FailureDetector:
    """Watches metric records and returns warnings for known OPD failure modes.

    `objective`: the run's objective (an `ObjectiveConfig`, a TrainConfig, or a dict) to tailor the advice, e.g.
    stop-gradient forward KL / JSD is told to use the corrected advantage (OPD+). `max_new_tokens`: the rollout
    length limit (enables the 'length at the cap' check). Unknown or missing metrics are skipped silently."""

    def __init__(self, config: DetectorConfig | None = None, objective: Any = None,
                 max_new_tokens: int | None = None, optim: Any = None):
        self.config = config if config is not None else DetectorConfig()
        if not isinstance(self.config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, not {type(self.config).__name__}")
        self.objective = _objective_info(objective)
        self.max_new_tokens = max_new_tokens
        # lr and warm-up: a run that breaks in its first steps at the full lr with no warm-up is told so first
        # (issue #15: an SFT-initialised student wrecked at step 1 by lr 2e-3 without warm-up got length advice).
        get = optim.get if isinstance(optim, Mapping) else (lambda key: getattr(optim, key, None))
        self.lr, self.warmup_steps = get("lr"), get("warmup_steps")
        self.history: list[Warning] = []
        self.ongoing: dict[str, bool] = {}
        c = self.config
        self._gates = {code: _Gate(c.rearm_steps) for code in CODES}
        self._grad: deque[float] = deque(maxlen=c.grad_window)
        self._len: list[float] = []
        self._fin: deque[float] = deque(maxlen=c.smooth_steps)
        self._fin_start: list[float] = []
        self._acc: deque[float] = deque(maxlen=c.acc_window)
        self._acc_best = -math.inf
        self._eval_best = -math.inf
        self._eval_bad: bool | None = None
        self._eval_fig: tuple[float, float] | None = None
        self._rew: deque[float] = deque(maxlen=c.reward_window)
        self._rew_std: list[float] = []
        self._rew_best = -math.inf

    @classmethod
    def for_run(cls, train_config: Any, config: DetectorConfig | None = None) -> FailureDetector:
        """A detector for a TrainConfig: objective advice and max_new_tokens taken from it."""
        rollout = getattr(train_config, "rollout", None)
        return cls(config if config is not None else getattr(train_config, "diagnostics", None),
                   objective=getattr(train_config, "objective", None),
                   max_new_tokens=getattr(rollout, "max_new_tokens", None),
                   optim=getattr(train_config, "optim", None))

    # ------------------------------------------------------------------------------------------------- public

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[Warning]:
        """Feed one metrics record; returns the warnings that fire at this step (usually none)."""
        if not self.config.enabled:
            return []
        out: list[Warning] = []
        for code, check in (("non_finite", self._non_finite), ("heavy_negative_tail", self._tail),
                            ("early_position_extremes", self._early), ("grad_norm_spike", self._grad_spike),
                            ("length_runaway", self._length_runaway), ("length_collapse", self._length_collapse),
                            ("accuracy_collapse", self._accuracy), ("reward_collapse", self._reward)):
            cond, message, figure = check(metrics)
            if cond is not None:
                self.ongoing[code] = bool(cond)  # the condition now (a warning fires once per episode)
            if self._gates[code](cond):
                out.append(Warning(int(step), code, message, float(figure), self.advice(code, step=int(step))))
        self._record(metrics)
        self.history.extend(out)
        return out

    def replay(self, records: Sequence[Mapping[str, Any]]) -> list[Warning]:
        """Feed a whole run's records (e.g. `read_metrics(run_dir)`, or to rebuild state on resume)."""
        out: list[Warning] = []
        for rec in records:
            out.extend(self.update(int(rec.get("step", 0)), rec))
        return out

    def advice(self, code: str, step: int | None = None) -> str:
        """The concrete advice for `code`, tailored to the objective (and, given the step, the lr schedule)."""
        text = self._objective_advice(code)
        early = self._early_lr(code, step)
        return f"{early}; then: {text}" if early else text

    def _early_lr(self, code: str, step: int | None) -> str:
        """The lead for a failure in the first steps at the full learning rate (no or a short warm-up)."""
        if step is None or self.lr is None or self.warmup_steps is None or code not in _LR_CODES:
            return ""
        warm = int(self.warmup_steps)
        if step > max(EARLY_LR_STEPS, 2 * warm):
            return ""
        if warm == 0:
            return (f"this began at step {step}, in the first steps at the full optim.lr={self.lr:g} with no "
                    f"warm-up: AdamW's first updates move every weight by about lr and can knock an "
                    f"SFT-initialised student off its start; set optim.warmup_steps=20 (or more) or lower optim.lr")
        return (f"this began at step {step}, within {2 * warm} steps of a {warm}-step warm-up to optim.lr="
                f"{self.lr:g}: lower optim.lr or lengthen optim.warmup_steps")

    def _objective_advice(self, code: str) -> str:
        o = self.objective
        div, grad, reward, transform = o["divergence"], o["gradient"], o["reward"], o["transform"]
        sampled = o["estimator"] in (None, "sampled")
        corrected = ""
        if sampled and grad == "stopgrad" and div in _BIASED_DIVS:
            corrected = (f"use the corrected advantage (objective.gradient=corrected, OPD+): the stop-gradient "
                         f"{_BIASED_DIVS[div]} advantage is biased and its runs collapsed in OPD+ Table 2 (no gain "
                         f"over the SFT start)")
        knobs = ([] if sampled else ["objective.estimator=sampled"]) + ["objective.reward=power", "objective.power_a=1"]
        knobs += (["objective.gradient=stopgrad"] if grad == "corrected" else []) + \
            (["objective.transform=none"] if transform not in (None, "none") else [])
        power = f"the power reward ({' '.join(knobs)})"
        if div not in (None, "reverse_kl"):
            power = "a bounded reward (objective.transform=clip or tanh; PowerOPD's power reward is reverse-KL only)"
        lead = f"{corrected}; " if corrected else ""
        if code == "non_finite":
            fix = "a larger objective.power_a" if reward == "power" else power
            return f"{lead}the run is diverging: lower optim.lr, keep optim.grad_clip > 0 and use {fix}"
        if code == "heavy_negative_tail":
            if corrected:
                return corrected
            if reward == "power":
                return "raise objective.power_a: a larger a mutes tokens both models find unlikely (PowerOPD §6.2)"
            if transform in ("clip", "tanh", "zscore", "signmaxabs"):
                return (f"objective.transform={transform} rescales the log-ratio only after it is formed and did not "
                        f"fix training in PowerOPD §3.3; switch to {power}")
            return f"try {power} or clipping (objective.transform=clip)"
        if code == "early_position_extremes":
            base = "extreme rewards on the first tokens shift the prefix of later rollouts (PowerOPD §3.2)"
            if reward == "power":
                return f"{lead}{base}: raise objective.power_a"
            return f"{lead}{base}: use {power}; clip/tanh bound it only post hoc"
        if code == "grad_norm_spike":
            tail = "keep optim.grad_clip > 0 (e.g. 1.0) and consider a lower optim.lr"
            if not sampled:
                return f"a full/top-K objective has no sampled reward to bound: {tail}"
            if reward == "power":
                return f"raise objective.power_a (PowerOPD: larger a stabilises training); {tail}"
            return (f"{lead}{power} kept grad norms flat at 0.25-0.35, >3000x below vanilla OPD's spike (PowerOPD "
                    f"Fig. 6; clip/tanh/z-score only partly help); {tail}")
        if code == "length_runaway":
            if reward == "power":
                fix = "raise objective.power_a (larger a gives shorter, more stable responses, PowerOPD §6.1)"
            elif not sampled:
                fix = (f"full-vocabulary OPD saturated the length limit in PowerOPD §6.1, {power} gave shorter "
                       "responses at lower cost")
            else:
                fix = (f"use {power}: larger a gives shorter, more stable responses, while vanilla OPD's length "
                       "oscillates (PowerOPD §3.1, §6.1)")
            return f"{fix}; raise rollout.max_new_tokens if the task needs longer answers"
        if code == "length_collapse":
            return (f"{lead}the student ends responses early: check that EOS / chat template match the teacher's "
                    "(data.use_chat_template, rollout.masked_tokens) and lower optim.lr")
        if code in ("accuracy_collapse", "reward_collapse"):
            if corrected:
                return corrected
            if reward == "power":
                return "lower optim.lr or raise objective.power_a (PowerOPD: larger a converges faster and higher)"
            if not sampled:
                return f"lower optim.lr; in PowerOPD {power} beat full-vocabulary OPD at lower cost"
            return (f"vanilla OPD's accuracy first drops and recovers only after ~300 steps (PowerOPD §3.1); "
                    f"{power} reached the same accuracy ~10x sooner; or lower optim.lr")
        raise KeyError(f"unknown warning code {code!r}")

    # ------------------------------------------------------------------------------------------------- checks
    # Each returns (condition or None when there is no data, message, figure); state is updated in _record.

    def _non_finite(self, m: Mapping) -> tuple[bool | None, str, float]:
        vals = {k: _num(m, k) for k in _NONFINITE_KEYS}
        vals = {k: v for k, v in vals.items() if v is not None}
        if not vals:
            return None, "", math.nan
        bad = {k: v for k, v in vals.items() if not math.isfinite(v)}
        if not bad:
            return False, "", math.nan
        k, v = next(iter(bad.items()))
        return True, ", ".join(f"{k} = {v}" for k, v in bad.items()), v

    def _tail(self, m: Mapping) -> tuple[bool | None, str, float]:
        if self.objective["estimator"] not in (None, "sampled"):
            return None, "", math.nan
        pre = "reward" if _num(m, "reward/p05") is not None else "log_ratio"
        p05, p50, p95 = (_num(m, f"{pre}/{q}") for q in ("p05", "p50", "p95"))
        if p05 is None or p50 is None or not (math.isfinite(p05) and math.isfinite(p50)):
            return None, "", math.nan
        c = self.config
        gap = p50 - p05
        right = (p95 - p50) if p95 is not None and math.isfinite(p95) else 0.0
        cond = gap >= c.tail_gap and gap >= c.tail_asymmetry * max(right, 0.0)
        msg = f"{pre} p05 = {p05:.1f} vs median {p50:.1f}"
        lo = _num(m, f"{pre}/min")
        if lo is not None and math.isfinite(lo):
            msg += f" (min {lo:.1f})"
        return cond, msg, p05

    def _early(self, m: Mapping) -> tuple[bool | None, str, float]:
        if self.objective["estimator"] not in (None, "sampled"):
            return None, "", math.nan
        lo, hi = _vec(m, "reward_by_position/min"), _vec(m, "reward_by_position/max")
        if lo is None or hi is None:
            return None, "", math.nan
        cnt = _vec(m, "reward_by_position/count") or [math.inf] * len(lo)
        c = self.config
        mags = [max(abs(a), abs(b)) if n >= c.early_min_count and math.isfinite(a) and math.isfinite(b) else None
                for a, b, n in zip(lo, hi, cnt)]
        early = [(t, x) for t, x in enumerate(mags[:c.early_positions]) if x is not None]
        late = [x for x in mags[c.early_positions:] if x is not None]
        if not early or len(late) < 3:
            return None, "", math.nan
        t, mag = max(early, key=lambda tx: tx[1])
        ref = statistics.median(late)
        cond = mag >= c.early_magnitude and mag >= c.early_ratio * ref
        msg = (f"max |reward| = {mag:.1f} at position {t} vs median {ref:.2g} over positions >= "
               f"{c.early_positions}")
        return cond, msg, mag

    def _grad_spike(self, m: Mapping) -> tuple[bool | None, str, float]:
        g = _num(m, "grad_norm")
        if g is None or not math.isfinite(g):
            return None, "", math.nan  # non-finite: reported by non_finite
        if len(self._grad) < max(self.config.grad_warmup, 1):
            return None, "", g
        med = statistics.median(self._grad)
        ratio = g / med if med > 0 else (math.inf if g > 0 else 1.0)
        cond = ratio > self.config.grad_spike_ratio
        return cond, f"grad norm {_fmt(g)} = {_fmt(ratio)}x the median {_fmt(med)} of the last {len(self._grad)} " \
                     f"steps", g

    def _length_runaway(self, m: Mapping) -> tuple[bool | None, str, float]:
        c = self.config
        L, F = _num(m, "response_length/mean"), _num(m, "finished_frac")
        L = L if L is not None and math.isfinite(L) else None
        F = F if F is not None and math.isfinite(F) else None
        if L is None and F is None:
            return None, "", math.nan
        lens = self._len + ([L] if L is not None else [])
        fins = list(self._fin) + ([F] if F is not None else [])
        cur = _mean(lens[-c.smooth_steps:]) if len(lens) >= c.smooth_steps else None
        start = self._fin_start + ([F] if F is not None and len(self._fin_start) < c.length_ref_steps else [])
        if len(fins) >= c.smooth_steps and F is not None and len(start) >= c.length_ref_steps:
            fin, fin0 = _mean(fins[-c.smooth_steps:]), statistics.median(start)
            if fin < c.finished_floor and fin0 - fin >= c.finished_drop:
                return True, (f"only {100 * fin:.0f}% of responses end with EOS (was {100 * fin0:.0f}% at the "
                              f"start; the rest hit max_new_tokens)"), fin
        cap = c.length_cap_frac * self.max_new_tokens if self.max_new_tokens else None
        # At the limit counts as a runaway only for a run that got there: one whose first smooth_steps steps were
        # already there (a verbose base model: SmolLM2-135M samples 90-96 of 96 tokens from step 1) has nothing
        # that ran away, and backing off its lr would only slow it.
        if cap is not None and cur is not None and cur >= cap and _mean(lens[:c.smooth_steps]) < cap:
            return True, f"mean response length {_fmt(cur)} is at the limit max_new_tokens = {self.max_new_tokens}", cur
        W = c.length_window
        if L is not None and len(lens) >= 2 * W:
            now, before = _mean(lens[-W:]), _mean(lens[-2 * W:-W])
            if before > 0 and now > (1 + c.length_growth) * before:
                return True, (f"mean response length grew {100 * (now / before - 1):.0f}% in {W} steps "
                              f"({_fmt(before)} -> {_fmt(now)})"), now
        if cur is None and len(fins) < c.smooth_steps:
            return None, "", math.nan
        return False, "", math.nan

    def _length_collapse(self, m: Mapping) -> tuple[bool | None, str, float]:
        c = self.config
        L = _num(m, "response_length/mean")
        if L is None or not math.isfinite(L):
            return None, "", math.nan
        lens = self._len + [L]
        if len(lens) < max(c.length_ref_steps, c.smooth_steps) + 1:
            return None, "", math.nan
        ref = statistics.median(lens[:c.length_ref_steps])
        cur = _mean(lens[-c.smooth_steps:])
        cond = ref > 0 and cur < c.length_collapse * ref
        return cond, f"mean response length {_fmt(cur)} vs {_fmt(ref)} at the start ({100 * cur / ref:.0f}%)" \
            if ref > 0 else "", cur

    def _accuracy(self, m: Mapping) -> tuple[bool | None, str, float]:
        c = self.config
        ev = _num(m, "eval/accuracy")
        if ev is not None and math.isfinite(ev):
            best = max(self._eval_best, ev)
            self._eval_bad = self._dropped(ev, best)
            self._eval_fig = (ev, best)
            self._eval_best = best
        a = _num(m, "train/accuracy")
        train_bad, fig = None, None
        if a is not None and math.isfinite(a):
            accs = list(self._acc) + [a]
            if len(accs) >= c.acc_window:
                cur = _mean(accs[-c.acc_window:])
                best = max(self._acc_best, cur)
                train_bad = self._dropped(cur, best)
                fig = (cur, best)
        if ev is None and train_bad is None:
            return None, "", math.nan  # nothing new this step (a stale eval verdict is not re-judged)
        if train_bad:
            cur, best = fig
            return True, (f"train accuracy ({c.acc_window}-step mean) {100 * cur:.1f}% vs best "
                          f"{100 * best:.1f}%"), cur
        if self._eval_bad:
            cur, best = self._eval_fig
            return True, f"eval accuracy {100 * cur:.1f}% vs best {100 * best:.1f}%", cur
        return False, "", math.nan

    def _dropped(self, cur: float, best: float) -> bool:
        c = self.config
        return best > 0 and best - cur >= c.acc_drop_abs and cur <= (1 - c.acc_drop) * best

    def _reward(self, m: Mapping) -> tuple[bool | None, str, float]:
        c = self.config
        r = _num(m, "reward/mean")
        if r is None or not math.isfinite(r):
            return None, "", math.nan
        rs = list(self._rew) + [r]
        if len(rs) < c.reward_window:
            return None, "", math.nan
        cur = _mean(rs[-c.reward_window:])
        best = max(self._rew_best, cur)
        s = _num(m, "reward/std")
        stds = self._rew_std + ([s] if s is not None and math.isfinite(s) else [])
        scale = statistics.median(stds) if stds else abs(best)
        cond = scale > 0 and best - cur > c.reward_drop * scale
        return cond, (f"reward mean ({c.reward_window}-step average) {_fmt(cur)} vs best {_fmt(best)} "
                      f"(drop {_fmt(best - cur)}, token-level reward std {_fmt(scale)})"), cur

    # ------------------------------------------------------------------------------------------------- state

    def _record(self, m: Mapping) -> None:
        c = self.config
        g = _num(m, "grad_norm")
        if g is not None and math.isfinite(g):
            self._grad.append(g)
        L = _num(m, "response_length/mean")
        if L is not None and math.isfinite(L):
            self._len.append(L)
        F = _num(m, "finished_frac")
        if F is not None and math.isfinite(F):
            self._fin.append(F)
            if len(self._fin_start) < c.length_ref_steps:
                self._fin_start.append(F)
        a = _num(m, "train/accuracy")
        if a is not None and math.isfinite(a):
            self._acc.append(a)
            if len(self._acc) >= c.acc_window:
                self._acc_best = max(self._acc_best, _mean(self._acc))
        r = _num(m, "reward/mean")
        if r is not None and math.isfinite(r):
            self._rew.append(r)
            if len(self._rew) >= c.reward_window:
                self._rew_best = max(self._rew_best, _mean(self._rew))
        s = _num(m, "reward/std")
        if s is not None and math.isfinite(s):
            self._rew_std.append(s)
            if len(self._rew_std) > 1000:
                del self._rew_std[: len(self._rew_std) - 1000]


def detect(records: Sequence[Mapping[str, Any]], config: DetectorConfig | None = None, objective: Any = None,
           max_new_tokens: int | None = None) -> list[Warning]:
    """Run a fresh detector over a run's records (e.g. `read_metrics(run_dir)`): every warning it would have given."""
    return FailureDetector(config, objective=objective, max_new_tokens=max_new_tokens).replay(records)
