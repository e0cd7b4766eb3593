#!/usr/bin/env python
"""Cost per step of each teacher backend on the same OPD run (docs/teachers.md).

    CPU:    .venv/bin/python scripts/bench_teachers.py                       # embedded task, ~6 min (with vLLM)
            .venv/bin/python scripts/bench_teachers.py --setting smollm2 --steps 6   # SmolLM2-135M as the teacher
    1 GPU / N GPUs: the same commands (the served teacher then runs on the GPU vLLM of .venv-vllm).

For each backend it runs `opdkit train` (in this process, 1 torch thread) for --steps steps of the same config and
reports the median `time/score` (the teacher's part of a step), `time/step`, and what the backend logs (requests,
cache hits). Backends: hf (fp32 and the machine's auto dtype), server (a vLLM server launched once, fp32), cache
(a first run that fills the cache, then the same run again: every row hits), self (OPSD) on the embedded setting.
The load average before and after each run is printed (the machine may be shared). Last line: a one-line summary.
Needs .venv-vllm (bash scripts/setup_vllm.sh) for the server rows; they are skipped without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opdkit.config import load_config  # noqa: E402
from opdkit.train import loop  # noqa: E402
from opdkit.train.config import TrainConfig  # noqa: E402

SETTINGS = {
    # the embedded default's models and task, top-K so that every backend (a server too) serves the objective
    "embedded": ["objective.estimator=topk", "objective.top_k=8", "rollout.prompts_per_step=32",
                 "data.eval_prompts=8", "eval_every=0"],
    # SmolLM2-135M-Instruct teaching the smollm2-distill student (8 prompts x 64 tokens, top-32)
    "smollm2": ["smollm2-distill", "data.eval_prompts=2", "eval_every=0", "rollout.gkd_lambda=1.0"],
}


def run(args: list[str], run_dir: Path) -> tuple[list[dict], float]:
    from opdkit.presets import config_args

    yaml_path, over = config_args(args)
    cfg = load_config(TrainConfig, yaml_path, over + [f"run_dir={run_dir}", "progress=false", "save_every=0",
                                                      "threads=1", "overwrite=true"])
    t0 = time.perf_counter()
    loop.train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=list(SETTINGS), default="embedded")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-server", action="store_true", help="skip the vLLM rows")
    a = ap.parse_args()
    base = SETTINGS[a.setting] + [f"steps={a.steps}"]
    work = Path(tempfile.mkdtemp(prefix="opdkit-bench-teachers-"))
    vllm = ROOT / ".venv-vllm" / "bin" / "python"
    cases = [("hf fp32", ["teacher.dtype=float32"]), ("hf auto", ["teacher.dtype=auto"])]
    if a.setting == "embedded":
        cases.append(("self (OPSD, frozen, fp32)", ["teacher.backend=self", "teacher.dtype=float32"]))
    cases += [("cache, first run (fills it)", ["teacher.dtype=float32", f"teacher.cache_dir={work / 'cache'}"]),
              ("cache, same run again (hits)", ["teacher.dtype=float32", f"teacher.cache_dir={work / 'cache'}"])]
    server = None
    if not a.no_server and vllm.is_file():
        from opdkit.specs import resolve_model_spec
        from opdkit.teacher.server import LaunchedServer
        from opdkit.train.setup import served_model_dir

        cfg = load_config(TrainConfig, *_yaml(base))
        path = served_model_dir(cfg) if a.setting == "smollm2" else resolve_model_spec("embedded:teacher")
        t0 = time.perf_counter()
        server = LaunchedServer(path, python=str(vllm), dtype="float32", max_logprobs=32, kv_cache_gib=2,
                                extra_args=[], startup_timeout_s=900)
        print(f"vLLM server of {path}: up in {time.perf_counter() - t0:.0f} s", flush=True)
        cases.append(("server (vLLM, fp32)", ["teacher.backend=server", f"teacher.server.url={server.url}"]))
    print(f"setting {a.setting}, {a.steps} steps per backend, 1 torch thread; cpu count {os.cpu_count()}")
    print("| backend | score s/step (median) | step s (median) | wall s | load before/after | backend counters |")
    print("|---|---|---|---|---|---|")
    summary = []
    try:
        for name, extra in cases:
            load0 = os.getloadavg()[0]
            rows, wall = run(base + extra, work / name.split()[0])
            load1 = os.getloadavg()[0]
            score = statistics.median(r["time/score"] for r in rows)
            step = statistics.median(r["time/step"] for r in rows)
            counters = {k: sum(r.get(k, 0) for r in rows) for k in ("teacher/requests", "teacher/cache_hits",
                                                                    "teacher/cache_misses") if k in rows[0]}
            shown = ", ".join(f"{k.split('/')[1]} {v}" for k, v in counters.items()) or "-"
            print(f"| {name} | {score:.3f} | {step:.3f} | {wall:.0f} | {load0:.2f}/{load1:.2f} | {shown} |",
                  flush=True)
            summary.append(f"{name.split(' (')[0]} {score:.3f}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench_teachers {a.setting}: score s/step " + "; ".join(summary))


def _yaml(args: list[str]):
    from opdkit.presets import config_args

    return config_args(args)


if __name__ == "__main__":
    main()
