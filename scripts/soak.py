#!/usr/bin/env python
"""Memory soak of `opdkit train`: RSS sampled every --every steps of a long run (docs/reliability.md).

    CPU:    .venv/bin/python scripts/soak.py                      # 500 steps of the embedded default, ~2-3 min
            .venv/bin/python scripts/soak.py --steps 2000 --every 100 -- rollout.prompts_per_step=16
            .venv/bin/python scripts/soak.py --tracemalloc        # + the 15 call sites whose Python memory grew most
    1 GPU / N GPUs: not wired (the trainer runs on CPU in this version).

Runs the trainer in this process at 1 torch thread (extra `key=value` overrides after `--`), with the embedded
default's knobs except steps (--steps), save_every/eval_every (--save-every/--eval-every, default: as in the default
run scaled to the soak length) and run_dir (a temp dir, deleted afterwards). RSS (from /proc/self/statm) is read
right after each --every-th step's metrics record is written. Growth is measured from the warm-up sample (--warmup
steps: the allocator's and oneDNN's caches fill during the first steps) to the last sample; the last line is a
one-line summary, and the exit code is 1 when the growth is above --max-growth percent (0 by default: report only).
The load average before and after is printed (the machine may be shared: load slows the run, it does not change
the memory figures).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def object_counts() -> dict[str, tuple[int, int]]:
    """Live objects tracked by the garbage collector: type name -> (count, bytes of tensor storage)."""
    import warnings

    import torch

    gc.collect()
    out: dict[str, list[int]] = {}
    with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        objs = [(o, isinstance(o, torch.Tensor)) for o in gc.get_objects()]
    for obj, is_tensor in objs:
        try:
            name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        except Exception:  # noqa: BLE001 - exotic objects
            continue
        entry = out.setdefault(name, [0, 0])
        entry[0] += 1
        if is_tensor:
            try:
                entry[1] += obj.untyped_storage().nbytes()
            except Exception:  # noqa: BLE001 - meta / sparse tensors
                pass
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=25, help="sample RSS every N steps")
    ap.add_argument("--warmup", type=int, default=50, help="growth is measured from the sample at this step")
    ap.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default: steps // 3)")
    ap.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: steps // 3)")
    ap.add_argument("--tracemalloc", action="store_true", help="also diff Python allocations warm-up -> end (slow)")
    ap.add_argument("--objects", action="store_true",
                    help="also diff the live Python objects by type (and tensors' bytes) warm-up -> end (cheap)")
    ap.add_argument("--trim", action="store_true",
                    help="diagnosis: call glibc malloc_trim(0) before each sample (RSS that trimming returns is freed "
                         "memory the allocator kept, not live data)")
    ap.add_argument("--no-tensorboard", action="store_true", help="diagnosis: metrics.jsonl only")
    ap.add_argument("--max-growth", type=float, default=0.0, help="exit 1 above this growth in percent (0: off)")
    ap.add_argument("--json", type=Path, default=None, help="write the samples here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of opdkit train (after --)")
    a = ap.parse_args()

    import torch

    from opdkit import metrics_log
    from opdkit.config import load_config
    from opdkit.train import loop
    from opdkit.train.config import TrainConfig

    torch.set_num_threads(1)
    loop.quiet_transformers()
    third = max(1, a.steps // 3)
    run_dir = Path(tempfile.mkdtemp(prefix="opdkit-soak-"))
    over = [f"steps={a.steps}", f"save_every={a.save_every if a.save_every is not None else third}",
            f"eval_every={a.eval_every if a.eval_every is not None else third}", "progress=false", "threads=1",
            f"run_dir={run_dir}", "overwrite=true", *a.overrides]
    cfg = load_config(TrainConfig, None, over)

    samples: list[tuple[int, float, float]] = []  # (step, rss MB, seconds since start)
    snaps: dict[int, object] = {}
    counts: dict[int, dict] = {}
    t0 = time.perf_counter()
    real_log = metrics_log.MetricsLogger.log

    def log(self, step, metrics):
        rec = real_log(self, step, metrics)
        if "loss" in rec and (step % a.every == 0 or step == a.steps):
            if a.trim:
                import ctypes

                before = rss_mb()
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                print(f"soak step {step:5d}  rss before malloc_trim {before:8.1f} MB", flush=True)
            samples.append((step, rss_mb(), time.perf_counter() - t0))
            print(f"soak step {step:5d}  rss {samples[-1][1]:8.1f} MB  {samples[-1][2]:7.1f} s", flush=True)
            if a.tracemalloc and step in (a.warmup, a.steps):
                import tracemalloc

                gc.collect()
                snaps[step] = tracemalloc.take_snapshot()
            if a.objects and step in (a.warmup, a.steps):
                counts[step] = object_counts()
        return rec

    metrics_log.MetricsLogger.log = log
    if a.no_tensorboard:
        real_init = metrics_log.MetricsLogger.__init__

        def init(self, run_dir, tensorboard=True, resume_step=None):
            real_init(self, run_dir, tensorboard=False, resume_step=resume_step)

        metrics_log.MetricsLogger.__init__ = init
    if a.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    load0 = os.getloadavg()
    print(f"soak: opdkit train {' '.join(over)}  (load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"rss before set-up {rss_mb():.1f} MB)", flush=True)
    try:
        loop.train(cfg)
    finally:
        metrics_log.MetricsLogger.log = real_log
        shutil.rmtree(run_dir, ignore_errors=True)
    load1 = os.getloadavg()
    if a.tracemalloc and len(snaps) == 2:
        print("tracemalloc: top 15 growth sites, warm-up -> end")
        for stat in snaps[a.steps].compare_to(snaps[a.warmup], "traceback")[:15]:
            print(f"  {stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks  "
                  + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback[:4]))
    if a.objects and len(counts) == 2:
        print("objects: the 15 types whose live count grew most, warm-up -> end (count, tensor MB)")
        c0, c1 = counts[a.warmup], counts[a.steps]
        for name in sorted(c1, key=lambda k: c0.get(k, (0, 0))[0] - c1[k][0])[:15]:
            (n0, b0), (n1, b1) = c0.get(name, (0, 0)), c1[name]
            print(f"  {name:50s} {n0:8d} -> {n1:8d}  ({(b1 - b0) / 2**20:+.2f} MB of tensor data)")
    base = next(((s, r) for s, r, _ in samples if s >= a.warmup), samples[0][:2])
    end = samples[-1]
    growth = 100.0 * (end[1] - base[1]) / base[1]
    peak = max(r for s, r, _ in samples if s >= base[0])
    if a.json is not None:
        a.json.write_text(json.dumps({"overrides": over, "samples": samples, "load": [load0, load1]}, indent=1))
    print(f"soak: {a.steps} steps in {end[2]:.0f} s; rss at step {base[0]} {base[1]:.1f} MB -> step {end[0]} "
          f"{end[1]:.1f} MB ({growth:+.1f}%, peak {peak:.1f} MB); load average {load0[0]:.2f} -> {load1[0]:.2f}")
    return 1 if a.max_growth and growth > a.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
