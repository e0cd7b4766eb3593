#!/usr/bin/env python
"""Fuzz every configuration `ObjectiveConfig` accepts, extreme knob values included: loss, gradient, metrics finite.

    PYTHONPATH=. python scripts/fuzz_objectives.py --cases 100000 --dtype both --seed 0

CPU only, one thread, ~3 ms a case; `--cases N` is per dtype (`--dtype both`: N float32 + N float64 cases).

Configuration: the estimator, then each knob that estimator uses, at its default half of the time and otherwise
drawn from ordinary values and the ends of its accepted range (alpha = +-1e6 and 1e-3 from 0 and 1,
log_ratio_bound = 700, power_a = 1e300, eps_high = 1e300, tanh_tau = 1e-300, clip bounds +-1e6, task_reward_coef
+-1e3, beta = 1e-300, ...). A few listed values lie past a range's end (alpha = 1e-9, task_reward_coef = 1e300):
`ObjectiveConfig` refuses them, and refused draws are counted and redrawn, never run.
Problem (always valid input): finite student logits at scale 0.1 to 1e4 (sometimes as hidden states + lm_head,
temperature 0.5-2), normalised teacher log-probs that may hold exact zeros (-inf, also for the sampled token) and
values near the -1e4 floor, masks with holes, all-masked rows and empty batches, T up to 48, PPO old log-probs,
task rewards in [-1e3, 1e3], advantages precomputed by `compute_advantages` in some cases.
A case fails when the loss, a gradient or any metric is NaN/inf, or when the call raises. Prints per dtype the cases
run, the non-finite count, the refused draws and the wall time, then the first failures (rerun one with
--only SEED); exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opdkit.objectives import (  # noqa: E402
    FullSignal,
    ObjectiveConfig,
    SampledSignal,
    TopKSignal,
    compute_advantages,
    opd_loss,
)
from opdkit.objectives import config as C  # noqa: E402

FIELDS = {f.name for f in dataclasses.fields(ObjectiveConfig)}
# Ordinary and extreme values per knob (each at its default half of the time). Values outside the accepted range
# are listed too where the range was once wider: the config refuses them and they are counted as rejected.
VALUES = {
    "divergence": list(C.DIVERGENCES),
    "beta": [0.0, 1e-300, 1e-12, 0.1, 0.5, 0.9, 1 - 1e-12, 1.0],
    "alpha": [-1e6, -100.0, -2.0, -1.0, -0.5, -1e-3, 0.0, 1e-300, 1e-9, 1e-3, 0.3, 0.5, 0.999, 1.0, 1.001,
              1 + 1e-9, 2.0, 3.0, 10.0, 100.0, 1e6],
    "gradient": list(C.GRADIENTS),
    "topk_tail": [False, True],
    "topk_include_sampled": [False, True],
    "chunk_size": [1, 3, 1024],
    "reward": list(C.REWARDS),
    "power_a": [1e-300, 1e-12, 1e-3, 0.1, 0.5, 1.0, 5.0, 500.0, 1e6, 1e300],
    "transform": list(C.TRANSFORMS),
    "tanh_tau": [1e-300, 1e-6, 0.5, 1.0, 5.0, 1e6, 1e300],
    "clip": [(-1.0, 1.0), (-5.0, 5.0), (-1e6, 1e6), (0.5, 0.6), (-1e-300, 1e-300), (-1e6, -1e5), (1e5, 1e6),
             (-1e300, 1e300)],
    "log_ratio_bound": [1e-300, 1e-6, 1.0, 20.0, 50.0, 88.0, 89.0, 100.0, 300.0, 700.0],
    "gamma": [0.0, 1e-300, 0.5, 0.9, 0.99, 1.0],
    "returns_at_mask": ["carry", "restart"],
    "pg": list(C.PG_FORMS),
    "eps_low": [0.0, 0.2, 1 - 1e-12],
    "eps_high": [0.0, 0.2, 1e6, 1e300],
    "entropy_keep_fraction": [1e-300, 0.01, 0.2, 0.5, 0.99, 1.0],
    "entropy_source": list(C.ENTROPY_SOURCES),
    "entropy_scope": ["batch", "sample"],
    "aggregation": list(C.AGGREGATIONS),
    "task_reward_coef": [-1e300, -1e3, -1.0, 1e-300, 0.5, 1e3, 1e300],
}
SAMPLED_ONLY = ("gradient", "reward", "power_a", "transform", "tanh_tau", "clip", "log_ratio_bound", "gamma",
                "returns_at_mask", "pg", "eps_low", "eps_high")
TOPK_ONLY = ("topk_tail", "topk_include_sampled")


def draw_config(rng: random.Random, est: str, extreme_p: float) -> dict:
    kw: dict = {"estimator": est}
    for name, values in VALUES.items():
        if name in SAMPLED_ONLY and est != "sampled" or name in TOPK_ONLY and est != "topk":
            continue
        if rng.random() >= extreme_p:
            continue
        v = rng.choice(values)
        if name == "clip":
            kw["clip_low"], kw["clip_high"] = v
        elif name in FIELDS:
            kw[name] = v
    if "top_k" in FIELDS and est == "topk":
        kw["top_k"] = rng.choice([1, 2, 3, 5, 8])
    return kw


def _teacher_logprobs(g, B, T, V, scale, dtype, zero_p, floor_p):
    logits = scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    if zero_p:
        zero = torch.rand(B, T, V, generator=g) < zero_p
        zero[..., 0] = False  # at least one token with mass
        logits = logits.masked_fill(zero, float("-inf"))
    if floor_p:
        logits = torch.where(torch.rand(B, T, V, generator=g) < floor_p, logits - 1e4, logits)
    return torch.log_softmax(logits, -1).to(dtype)


def run_case(seed: int, dtype: torch.dtype, extreme_p: float = 0.5):
    """One case; returns (config kwargs, None) when finite, (config kwargs, reason) when not, or None if refused."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    est = rng.choice(C.ESTIMATORS)
    kw = draw_config(rng, est, extreme_p)
    try:
        cfg = ObjectiveConfig(**kw)
    except ValueError:
        return None
    B = 0 if rng.random() < 0.03 else rng.randint(1, 3)
    T = rng.randint(1, 6) if rng.random() < 0.9 else rng.randint(7, 48)
    V = rng.randint(max(3, cfg.top_k if est == "topk" else 3), 9)
    scale = rng.choice([0.1, 1.0, 5.0, 30.0, 1e3, 1e4])
    temperature = rng.choice([1.0, 1.0, 1.0, 0.5, 2.0])
    use_hidden = rng.random() < 0.15
    H = 4
    if use_hidden:
        hidden = (scale ** 0.5 * torch.randn(B, T, H, generator=g, dtype=torch.float64)).to(dtype)
        W = (scale ** 0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype)
        student = {"hidden_BTH": hidden.requires_grad_(True), "lm_head_weight_VH": W.requires_grad_(True)}
    else:
        logits = (scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
        student = {"logits_BTV": logits.requires_grad_(True)}
    t_scale = rng.choice([0.1, 1.0, 5.0, 30.0, 1e3, 1e4])
    t_lp = _teacher_logprobs(g, B, T, V, t_scale, dtype, rng.choice([0.0, 0.0, 0.3, 0.7]), rng.choice([0.0, 0.2]))
    tokens = torch.randint(0, V, (B, T), generator=g)
    if rng.random() < 0.3 and B:  # the sampled token has teacher probability exactly 0 (where any token has)
        zero_ids = torch.where(torch.isinf(t_lp), torch.arange(V).expand(B, T, V), -1).amax(-1)
        tokens = torch.where(zero_ids >= 0, zero_ids, tokens)
    mask = torch.rand(B, T, generator=g) < rng.choice([1.0, 0.7, 0.3, 0.0])
    if B and rng.random() < 0.2:
        mask[0] = False
    if est == "sampled":
        teacher = SampledSignal(t_lp.gather(-1, tokens[..., None]).squeeze(-1))
    elif est == "topk":
        vals, ids = t_lp.topk(cfg.top_k, dim=-1)
        sampled = t_lp.gather(-1, tokens[..., None]).squeeze(-1) if cfg.topk_include_sampled else None
        teacher = TopKSignal(vals, ids, sampled)
    elif rng.random() < 0.3:
        teacher = FullSignal(hidden_BTH=(t_scale ** 0.5 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
                                         ).to(dtype),
                             head_weight_VH=(t_scale ** 0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)
                                             ).to(dtype))
    else:
        teacher = FullSignal(logprobs_BTV=t_lp)
    old = None
    if rng.random() < 0.6:
        old = torch.log_softmax(rng.choice([1.0, 30.0, 1e4]) * torch.randn(B, T, V, generator=g), -1) \
            .gather(-1, tokens[..., None]).squeeze(-1).to(dtype)
    R = None
    if rng.random() < 0.7:
        R = (rng.choice([1.0, 1e3]) * (2 * torch.rand(B, generator=g) - 1)).to(dtype)
    extra = {}
    if est == "sampled" and rng.random() < 0.2:
        with torch.no_grad():
            if use_hidden:
                lg = (student["hidden_BTH"] @ student["lm_head_weight_VH"].T).float()
            else:
                lg = student["logits_BTV"].float()
            lp = torch.log_softmax(lg / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        extra["advantages_BT"] = compute_advantages(cfg, lp if old is None else old, teacher.logprobs_BT, mask, R)[0]
    loss, metrics = opd_loss(cfg, tokens_BT=tokens, mask_BT=mask, teacher=teacher, temperature=temperature,
                             old_logprobs_BT=old, task_rewards_B=R, **student, **extra)
    loss.backward()
    if not torch.isfinite(loss):
        return kw, f"loss={loss.item()}"
    for name, t in student.items():
        if t.grad is not None and not torch.isfinite(t.grad).all():
            return kw, f"grad of {name} non-finite"
    for k, v in metrics.items():
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals):
            return kw, f"metric {k}={v}"
    return kw, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100_000, help="cases run per dtype (refused draws not counted)")
    ap.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extreme-p", type=float, default=0.5, help="probability a knob leaves its default")
    ap.add_argument("--only", type=int, default=None, help="rerun one case seed (prints its config)")
    ap.add_argument("--show", type=int, default=10, help="failures printed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dtypes = [torch.float32, torch.float64] if args.dtype == "both" else [getattr(torch, args.dtype)]
    if args.only is not None:
        for dt in dtypes:
            print(dt, run_case(args.only, dt, args.extreme_p))
        return 0
    total_bad = 0
    for di, dt in enumerate(dtypes):
        t0 = time.time()
        ran = refused = bad = 0
        shown = []
        seed = args.seed * 10_000_000 + di * 5_000_000
        while ran < args.cases:
            seed += 1
            try:
                out = run_case(seed, dt, args.extreme_p)
            except Exception as exc:  # a valid problem must not raise either (ValueError included)
                out = ("?", f"raised {type(exc).__name__}: {exc}")
            if out is None:
                refused += 1
                continue
            ran += 1
            if out[1] is not None:
                bad += 1
                if len(shown) < args.show:
                    shown.append((seed, out))
        total_bad += bad
        print(f"{str(dt):14s} cases={ran} non_finite={bad} refused_draws={refused} wall={time.time() - t0:.0f}s")
        for s, (kw, why) in shown:
            print(f"  seed={s} {why} {kw}")
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
