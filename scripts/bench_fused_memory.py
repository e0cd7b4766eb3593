#!/usr/bin/env python
"""Peak memory and time of the full-vocabulary objective's forward + backward as the response grows (docs/performance.md).

    CPU:    .venv/bin/python scripts/bench_fused_memory.py                   # V = 32000, B = 8, T = 256 .. 2048
            .venv/bin/python scripts/bench_fused_memory.py --lengths 256 512 --vocab 50000
    1 GPU / N GPUs: not this script (it measures host RSS); on a GPU read torch.cuda.max_memory_allocated instead.

Only the objective: student hidden states [B, T, H] and lm_head [V, H] in, loss.backward() out; the teacher signal
is what opdkit's HF teacher gives for objective.estimator=full (hidden states + its lm_head, log-probs computed per
chunk), so no [B, T, V] tensor is needed anywhere. Paths: fused (optim.fused_loss=on: objectives/fused.py) and
generic (the autograd path from hidden states under activation checkpointing) and logits (generic from a [B, T, V]
logits tensor, what the trainer did before the fused path). Each (path, T) runs in its own subprocess, so the
peak RSS (ru_maxrss of the child) is that case's alone; the baseline RSS of the same process before the objective
(inputs built, torch imported) is printed beside it. Threads pinned to 1; load average printed. Last line: summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]


def child(path: str, B: int, T: int, H: int, V: int, div: str, reps: int) -> dict:
    import resource
    import time

    import torch

    sys.path.insert(0, str(ROOT))
    from opdkit.objectives import ObjectiveConfig
    from opdkit.objectives.loss import aggregate, opd_per_token_loss
    from opdkit.objectives.signals import FullSignal

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = (0.5 * torch.randn(B, T, H, generator=g)).requires_grad_(True)
    W = (0.05 * torch.randn(V, H, generator=g)).requires_grad_(True)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    sig = FullSignal(hidden_BTH=0.5 * torch.randn(B, T, H, generator=g), head_weight_VH=0.05 * torch.randn(V, H, generator=g))
    cfg = ObjectiveConfig(estimator="full", divergence=div, beta=0.5)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(reps):
        h.grad = W.grad = None
        t0 = time.perf_counter()
        kw = dict(tokens_BT=tok, mask_BT=mask, teacher=sig)
        if path == "logits":
            per, _ = opd_per_token_loss(cfg, logits_BTV=h @ W.T, **kw)
        else:
            per, _ = opd_per_token_loss(cfg, hidden_BTH=h, lm_head_weight_VH=W, fused=path == "fused", **kw)
        aggregate(per.loss_BT, per.mask_BT).backward()
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "T": T, "base_mb": base_mb, "peak_mb": peak_mb, "s": sorted(times)[len(times) // 2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--divergence", default="jsd", choices=["reverse_kl", "forward_kl", "jsd"])
    ap.add_argument("--paths", nargs="+", default=["fused", "generic", "logits"], choices=["fused", "generic", "logits"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.batch, int(a.lengths[0]), a.hidden, a.vocab, a.divergence, a.reps)))
        return 0
    print(f"B={a.batch} H={a.hidden} V={a.vocab} divergence={a.divergence}; 1 thread; load {os.getloadavg()[0]:.2f}")
    print(f"{'path':8} {'T':>5} {'peak RSS MB':>12} {'of which inputs':>16} {'s/fwd+bwd':>10}")
    res = {}
    for path in a.paths:
        for T in a.lengths:
            cmd = [sys.executable, __file__, "--child", path, "--lengths", str(T), "--batch", str(a.batch),
                   "--hidden", str(a.hidden), "--vocab", str(a.vocab), "--divergence", a.divergence,
                   "--reps", str(a.reps)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            res[(path, T)] = r
            print(f"{path:8} {T:>5} {r['peak_mb']:>12.0f} {r['base_mb']:>16.0f} {r['s']:>10.3f}", flush=True)
    lo, hi = min(a.lengths), max(a.lengths)
    parts = []
    for path in a.paths:
        over = lambda T: res[(path, T)]["peak_mb"] - res[(path, T)]["base_mb"]  # noqa: E731
        parts.append(f"{path}: peak {res[(path, lo)]['peak_mb']:.0f} -> {res[(path, hi)]['peak_mb']:.0f} MB "
                     f"({res[(path, hi)]['peak_mb'] / res[(path, lo)]['peak_mb']:.2f}x; above inputs "
                     f"{over(lo):.0f} -> {over(hi):.0f} MB)")
    print(f"summary T {lo}->{hi}: " + "; ".join(parts) + f"; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
