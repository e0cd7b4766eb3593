#!/usr/bin/env python
"""Seconds per step and phase split of each rollout setting on the same OPD run (docs/rollouts.md).

    CPU:    .venv/bin/python scripts/bench_rollouts.py                           # embedded:student_vllm, ~8 min
            .venv/bin/python scripts/bench_rollouts.py --setting smollm2-opsd --steps 4
    1 GPU / N GPUs: the same commands (with vllm installed for the GPU in .venv-vllm).

Settings: hf (the HF decode loop, synchronous), vllm (a vLLM server that receives the weights after every step),
vllm async (rollout.max_staleness=1: the next step is generated while this one trains), hf async. For each it runs
`opdkit train` in this process (1 torch thread) and prints the median seconds per step of each phase (generate =
waiting for the step's rollouts, score, update, weight sync), the engine's tokens/s and the mean staleness. The
vLLM server is launched once and reused (the trainer pushes its own student's weights when it connects). Load
average before/after each run is printed (the machine may be shared). Last line: a one-line summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_teachers import run  # noqa: E402

SETTINGS = {
    "embedded": ["model.student=embedded:student_vllm", "teacher.dtype=float32", "rollout.prompts_per_step=32",
                 "data.eval_prompts=8", "eval_every=0", "optim.lr=5e-4", "optim.warmup_steps=5"],
    "smollm2-opsd": ["smollm2-opsd", "data.eval_prompts=2", "eval_every=0"],
    "smollm2-distill": ["smollm2-distill", "data.eval_prompts=2", "eval_every=0", "rollout.gkd_lambda=1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=list(SETTINGS), default="embedded")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    base = SETTINGS[a.setting] + [f"steps={a.steps}"]
    work = Path(tempfile.mkdtemp(prefix="opdkit-bench-rollouts-"))
    vllm = ROOT / ".venv-vllm" / "bin" / "python"
    cases = [("hf", []), ("hf async (max_staleness=1)", ["rollout.max_staleness=1"])]
    rollout = None
    if vllm.is_file():
        from opdkit.config import load_config
        from opdkit.presets import config_args
        from opdkit.rollout.vllm import VLLMRollout
        from opdkit.train import setup
        from opdkit.train.config import TrainConfig

        cfg = load_config(TrainConfig, *config_args(base))
        student, tok = setup.load_student(cfg.model, cfg.seed)
        t0 = time.perf_counter()
        max_len = min(cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens,  # as the trainer sizes it
                      int(getattr(student.config, "max_position_embeddings", 1 << 30)))
        rollout = VLLMRollout.start(student, tok, python=str(vllm), max_model_len=max_len, kv_cache_gib=2,
                                    startup_timeout_s=900)
        print(f"vLLM rollout server up in {time.perf_counter() - t0:.0f} s", flush=True)
        url = f"rollout.vllm.url={rollout.engine.url}"
        cases += [("vllm", ["rollout.backend=vllm", url]),
                  ("vllm async (max_staleness=1)", ["rollout.backend=vllm", url, "rollout.max_staleness=1"])]
    print(f"setting {a.setting}, {a.steps} steps per case, 1 torch thread, {os.cpu_count()} cores")
    print("| rollout | s/step | generate (wait) | score | update | weight sync | engine tok/s | staleness | "
          "load before/after |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    try:
        for name, extra in cases:
            l0 = os.getloadavg()[0]
            rows, _ = run(base + extra, work / name.split()[0])
            l1 = os.getloadavg()[0]
            med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
            print(f"| {name} | {med('time/step'):.2f} | {med('time/generate'):.2f} | {med('time/score'):.2f} | "
                  f"{med('time/update'):.2f} | {med('time/weight_sync'):.3f} | "
                  f"{med('rollout/engine_tokens_per_s') or med('tokens_per_s/generate'):.0f} | "
                  f"{statistics.mean(r.get('staleness/mean', 0.0) for r in rows):.2f} | {l0:.2f}/{l1:.2f} |",
                  flush=True)
            summary.append(f"{name.split(' (')[0]} {med('time/step'):.2f}")
    finally:
        if rollout is not None:
            rollout.close()
    print(f"bench_rollouts {a.setting}: s/step " + "; ".join(summary))


if __name__ == "__main__":
    main()
