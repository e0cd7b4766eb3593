"""One bench case in its own process: `python -m opdkit.bench.child SPEC.json RESULT.json`.

SPEC: {"kind": "opdkit", "args": [opdkit train arguments], "run_dir": ..., "threads": N} or {"kind": "trl", ...}
(opdkit.bench.trl_case). RESULT: per-step phase times, tokens, the update's matmul FLOPs, the matmul peak measured
here after the run, the peak RSS up to the end of the last step (VmHWM) and the load average before and after. The
parent adds the whole process's peak RSS from wait4.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def vm_hwm_bytes() -> int | None:
    """This process's peak resident set so far (Linux /proc/self/status VmHWM), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_opdkit(spec: dict) -> dict:
    """`opdkit train` with spec["args"] in this process; its update wrapped to record the batch shapes (B, L, T)
    and the student's config for the FLOP count. Times per phase come from the run's metrics.jsonl (the loop's
    time/generate, time/score, time/update)."""
    import torch

    from opdkit.bench import flops
    from opdkit.config import load_config
    from opdkit.presets import config_args
    from opdkit.train import loop
    from opdkit.train.config import TrainConfig

    loop.quiet_transformers()
    shapes: list[dict] = []
    seen: dict = {}
    original = loop.update

    def recording_update(cfg, m, opt, sched, batch, *a, **kw):
        seen["config"] = m.student.config
        B, L = batch.input_ids_BL.shape
        shapes.append({"B": int(B), "L": int(L), "T": int(batch.response_len), "epochs": cfg.optim.ppo_epochs})
        out = original(cfg, m, opt, sched, batch, *a, **kw)
        seen["hwm"] = vm_hwm_bytes()
        return out

    yaml_path, overrides = config_args(spec["args"])
    cfg = load_config(TrainConfig, yaml_path, overrides + [f"run_dir={spec['run_dir']}"])
    loop.update = recording_update
    try:
        loop.train(cfg)
    finally:
        loop.update = original
    torch.set_num_threads(cfg.threads)
    rows = [json.loads(x) for x in (Path(spec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "time/update" in r]
    steps = []
    for r, s in zip(rows, shapes, strict=True):
        n = r["tokens_per_s/generate"] * r["time/generate"]  # the step's generated tokens (n_gen)
        steps.append({"step": r["time/step"], "generate": r["time/generate"], "score": r["time/score"],
                      "update": r["time/update"], "tokens": round(n),
                      "flops_update": flops.update_flops(seen["config"], s["B"], s["L"], s["T"], s["epochs"]),
                      **s})
    c = seen["config"]
    last = shapes[-1]
    return {"steps": steps, "peak": flops.matmul_peak(c, last["B"], last["T"]), "rss_train_bytes": seen.get("hwm"),
            "student_params": sum(p.numel() for p in _params(c)), "vocab": c.vocab_size}


def _params(config):
    """Parameters of a freshly built model of `config` on the meta device (no memory): for the table."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(config).parameters())


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    threads = int(spec["threads"])
    import torch

    torch.set_num_threads(threads)
    load0, t0 = os.getloadavg(), time.time()
    if spec["kind"] == "opdkit":
        result = run_opdkit(spec)
    else:
        from opdkit.bench.trl_case import run_trl

        result = run_trl(spec)
    result.update(threads=torch.get_num_threads(), load_before=list(load0), load_after=list(os.getloadavg()),
                  wall=time.time() - t0)
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
