#!/usr/bin/env python
"""Seconds per step and peak RSS per rank of `opdkit train` in one process and under torchrun (docs/scaling.md).

    CPU:    .venv/bin/python scripts/bench_scaling.py                        # embedded + smollm2-distill, world 1 and 2
            .venv/bin/python scripts/bench_scaling.py --setting embedded --worlds 1 2 --steps 10
    1 GPU / N GPUs: the same script with --worlds 1 8 (each rank then takes cuda:LOCAL_RANK; RSS is host memory only)

Each run is a subprocess (`python -m opdkit.cli train ...`, or `python -m torch.distributed.run --nproc_per_node=N
-m opdkit.cli train ...`) with `threads=1` per rank; the script samples the resident memory of every rank process
every 0.2 s (psutil) and reads the step times from the run's metrics.jsonl. Printed per run: the median and range of
`time/step` over the steps after the first (the first step includes warm-up), the phase medians and the peak RSS of each rank. The load average before and after each run is printed (the machine may be
shared). Last line: a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    # the embedded default's models and objective (full-vocabulary RKL), 32 prompts per step
    "embedded": ["data.eval_prompts=0", "eval_every=0"],
    # SmolLM2-135M-Instruct teaching a small random student, 8 prompts x 64 tokens, top-32 FKL (docs/presets.md)
    "smollm2-distill": ["smollm2-distill", "data.eval_prompts=0", "eval_every=0", "rollout.gkd_lambda=1.0"],
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_rss(proc: subprocess.Popen, world: int) -> dict[int, int]:
    """Peak RSS (bytes) of each rank process while `proc` runs: the process itself at world 1, its python children
    (torchrun's workers) otherwise."""
    import psutil

    root, peak = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            procs = [root] if world == 1 else [c for c in root.children(recursive=True) if "python" in c.name()]
            for p in procs:
                peak[p.pid] = max(peak.get(p.pid, 0), p.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    return peak


def run_one(setting: str, world: int, steps: int, work: Path) -> dict:
    run_dir = work / f"{setting}-w{world}"
    args = [*SETTINGS[setting], f"steps={steps}", "save_every=0", "progress=false", "threads=1", f"run_dir={run_dir}"]
    launch = [sys.executable, "-m", "opdkit.cli", "train"]
    if world > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_addr=127.0.0.1",
                  f"--master_port={_free_port()}", "-m", "opdkit.cli", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*launch, *args], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    peak = _sample_rss(proc, world)
    out = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench_scaling: {setting} world {world} failed (exit {proc.returncode}):\n{out[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "time/step" in r]
    later = recs[1:] or recs
    med = {k: statistics.median(r[k] for r in later) for k in ("time/step", "time/generate", "time/score", "time/update")}
    return {"setting": setting, "world": world, "steps": len(recs), "wall": wall, "load": (load0, os.getloadavg()[0]),
            "step": med["time/step"], "range": (min(r["time/step"] for r in later), max(r["time/step"] for r in later)),
            "gen": med["time/generate"], "score": med["time/score"], "update": med["time/update"],
            "rss_gb": sorted(v / 1e9 for v in peak.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=list(SETTINGS), action="append")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    try:
        import psutil  # noqa: F401
    except ImportError:
        sys.exit("bench_scaling: needs psutil (pip install psutil, or opdkit[bench])")
    work = Path(tempfile.mkdtemp(prefix="opdkit-bench-scaling-"))
    rows = []
    print(f"threads per rank: 1 | cores: {os.cpu_count()} | work dir: {work}")
    print("| setting | world | s/step median (range) | generate | score | update | peak RSS per rank | load before/after |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in a.setting or list(SETTINGS):
        for world in a.worlds:
            r = run_one(setting, world, a.steps, work)
            rows.append(r)
            rss = " / ".join(f"{g:.2f}" for g in r["rss_gb"])
            print(f"| {setting} | {world} | {r['step']:.2f} ({r['range'][0]:.2f}-{r['range'][1]:.2f}) | {r['gen']:.2f} | "
                  f"{r['score']:.2f} | {r['update']:.2f} | {rss} GB | {r['load'][0]:.2f} / {r['load'][1]:.2f} |",
                  flush=True)
    summary = "; ".join(f"{r['setting']} w{r['world']} {r['step']:.2f} s/step, {max(r['rss_gb']):.2f} GB/rank"
                        for r in rows)
    print(f"bench_scaling: {summary}")


if __name__ == "__main__":
    main()
