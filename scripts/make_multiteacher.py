#!/usr/bin/env python
"""Multi-teacher OPD: two specialist teachers, one student, routed vs single teacher (docs/multiteacher.md).

    # CPU (1 torch thread; the measured run in docs/multiteacher.md):
    OMP_NUM_THREADS=1 python scripts/make_multiteacher.py --run-dir runs/multiteacher
    # the OPD part again on the same models with another seed (copy tokenizer/, t_*/ and student/ over first)
    OMP_NUM_THREADS=1 python scripts/make_multiteacher.py --run-dir runs/multiteacher_seed1 --skip-build --seed 1

No GPU / N-GPU command: the models have 21k-280k parameters (a GPU would not speed them up), and `opdkit sft` and a
single-process `opdkit train` run on the CPU (opdkit uses GPUs under torchrun only).

Steps (all artifacts under --run-dir; nothing is written elsewhere):
1. a character tokenizer of the union alphabet of `addition` and `arith_chain`, shared by every model (teachers and
   student must share a tokenizer; `model.tokenizer=char` would only cover the one task an `opdkit sft` run sees);
2. two specialist teachers made with `opdkit sft` (`run_sft`) from scratch, each on ONE built-in task only
   (`t_addition` on addition, `t_arith_chain` on arith_chain; 30% perturbed completions with the step redone, as
   the embedded teacher): each is strong on its task and has never seen the other;
3. one small student SFT-initialised briefly on a 50/50 mixture of both tasks (a JSONL of train-split
   completions), so it starts weak on both;
4. `opdkit train data.prompts=task:addition+arith_chain` (subprocesses of `python -m opdkit.cli train`, same seed,
   same held-out problems) with the teachers
     routed  : teacher.routes='{addition: t_addition, arith_chain: t_arith_chain}'
     single  : teacher.routes='{addition: T, arith_chain: T}' for T = each specialist alone; the same single
               teacher scores every prompt (bit-for-bit what `teacher.model=T` would score), but routed by task
               the per-route metrics route/<task>/kl separate the teacher's strong task from its weak one;
5. a markdown table (printed and written to <run-dir>/results.md, the raw numbers to results.json): per-task
   held-out greedy accuracy of the teachers, of the student before and after each configuration, and per-route
   rows / tokens / KL (k1 estimate of KL(student || teacher) on that route's sampled tokens) over the first and the
   last 10% of the steps.

Deterministic: every seed is fixed (`--seed`), one torch thread; a rerun on the same machine gives the same table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opdkit.config import load_config  # noqa: E402
from opdkit.tasks import TASKS, build_char_tokenizer, get_task  # noqa: E402
from opdkit.train.sft import SFTConfig, run_sft  # noqa: E402

# ----------------------------------------------------------------------------------------------------- the recipe
# `data.prompts=task:a+b` uses each task's default options, so the teachers and the student are made for those too.
TASK_NAMES = ("addition", "arith_chain")
MAX_NEW_TOKENS = 100  # arith_chain's longest completion is 94 characters + EOS; addition's (3 digits) 72
TEACHER = ["model.hidden_size=96", "model.num_layers=3", "model.num_heads=4", "model.intermediate_size=192",
           "data.perturbed_fraction=0.3", "data.recovery=redo", "optim.warmup_steps=30", "optim.schedule=cosine",
           "optim.min_lr_ratio=0.1"]
# Per specialist (measured on this CPU, 100 held-out problems): addition is column-wise digit facts and reaches
# 95% in 800 steps at lr 2e-3; arith_chain has to memorise products and two-digit sums (12*6, 17-12), and at 1200
# steps / lr 2e-3 it knew the format but only 15% of the answers (19% at 1500 steps with lr 3e-3), so it gets more
TEACHER_STEPS = {"addition": 800, "arith_chain": 3000}
TEACHER_LR = {"addition": 2e-3, "arith_chain": 3e-3}
STUDENT = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
           "optim.lr=3e-3"]
# OPD: the trainer's default objective (exact full-vocabulary reverse KL, rollout temperature 0.7, cosine lr);
# small batches so the three runs fit in a few minutes on one thread
OPD = ["rollout.prompts_per_step=32", f"rollout.max_new_tokens={MAX_NEW_TOKENS}", "optim.lr=2e-3", "save_every=0",
       "progress=false"]


def sft(run_dir: Path, args: list[str], seed: int) -> dict:
    common = [f"seed={seed}", "threads=1", f"run_dir={run_dir}", "overwrite=true", "progress=false",
              f"data.max_new_tokens={MAX_NEW_TOKENS}", "model.max_position_embeddings=192"]
    return run_sft(load_config(SFTConfig, None, common + args))


def heldout(name: str, n: int, seed: int) -> list:
    """The held-out problems `opdkit train data.prompts=task:a+b data.eval_prompts=2n seed=S` evaluates on
    (opdkit.train.setup.prompt_source: `sample("heldout", n, seed=10_007 + S, unique=True)` per task), so the
    teachers' accuracies below are on exactly the student's problems."""
    return get_task(name).sample("heldout", n=n, seed=10_007 + seed, unique=True)


def accuracy(model_dir: Path, name: str, n: int, seed: int) -> float:
    from opdkit.eval.run import evaluate, load_eval_model

    model, tok = load_eval_model(str(model_dir))
    res = evaluate(model, tok, heldout(name, n, seed), get_task(name), max_new_tokens=MAX_NEW_TOKENS,
                   batch_size=100, keep_records=False)
    return float(res["accuracy"])


def student_jsonl(path: Path, n: int, seed: int) -> None:
    """n train-split problems, half from each task, shuffled: the student's cold-start SFT data."""
    rows = []
    for i, name in enumerate(TASK_NAMES):
        rows += [{"prompt": e.prompt, "completion": e.completion, "task": name}
                 for e in get_task(name).sample("train", n=n // len(TASK_NAMES), seed=seed + 100 + i)]
    random.Random(seed).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def opd(run_dir: Path, student: Path, routes: dict[str, Path], steps: int, eval_n: int,
        seed: int) -> tuple[list, float]:
    """One `opdkit train` run (a subprocess of the CLI, so the command below is the one that ran); its records."""
    route_arg = "teacher.routes={" + ", ".join(f"{k}: {v}" for k, v in routes.items()) + "}"
    cmd = [sys.executable, "-m", "opdkit.cli", "train", f"model.student={student}",
           "data.prompts=task:" + "+".join(TASK_NAMES), f"data.eval_prompts={2 * eval_n}", route_arg,
           f"steps={steps}", f"seed={seed}", "threads=1", f"run_dir={run_dir}", "overwrite=true", *OPD]
    print("  $", " ".join(c if " " not in c else repr(c) for c in cmd[1:]), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, cwd=str(ROOT))
    wall = time.monotonic() - t0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return recs, wall


def route_summary(recs: list[dict], key: str, frac: float = 0.1) -> dict:
    """rows and tokens summed over the run; the token-weighted k1 KL over the first and the last `frac` of the steps
    (a step's route/<key>/kl is already a mean over that step's tokens of the route)."""
    steps = [r for r in recs if "loss" in r]
    k = max(1, round(frac * len(steps)))

    def kl(rs):
        num = sum(r.get(f"route/{key}/kl", 0.0) * r.get(f"route/{key}/tokens", 0) for r in rs)
        den = sum(r.get(f"route/{key}/tokens", 0) for r in rs)
        return num / den if den else float("nan")

    return {"rows": sum(r.get(f"route/{key}/rows", 0) for r in steps),
            "tokens": sum(r.get(f"route/{key}/tokens", 0) for r in steps),
            "kl_first": kl(steps[:k]), "kl_last": kl(steps[-k:])}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "multiteacher"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=0, help="both teachers (0: TEACHER_STEPS)")
    ap.add_argument("--student-steps", type=int, default=1000)
    ap.add_argument("--opd-steps", type=int, default=300)
    ap.add_argument("--eval", type=int, default=200, help="held-out problems per task")
    ap.add_argument("--skip-build", action="store_true", help="reuse the teachers and student already in --run-dir")
    a = ap.parse_args()
    torch.set_num_threads(1)
    run, seed = Path(a.run_dir).resolve(), a.seed
    t_start = time.monotonic()
    teachers = {name: run / f"t_{name}" / "final" for name in TASK_NAMES}
    student = run / "student" / "final"
    timing = {}

    if a.skip_build:
        missing = [str(p) for p in (*teachers.values(), student) if not (p / "config.json").is_file()]
        if missing:  # one line, before any run is started
            sys.exit(f"make_multiteacher: --skip-build needs the built models in {run}: {', '.join(missing)} missing "
                     "(run without --skip-build, or copy tokenizer/, t_*/ and student/ from a built run dir)")

    run.mkdir(parents=True, exist_ok=True)

    # 1-3. tokenizer, specialist teachers, student
    if not a.skip_build:
        t0 = time.monotonic()
        build_char_tokenizer(["".join(TASKS[n].alphabet for n in TASK_NAMES)], save_dir=run / "tokenizer")
        for i, name in enumerate(TASK_NAMES):
            steps = a.teacher_steps or TEACHER_STEPS[name]
            print(f"sft teacher t_{name}: {name} only, {steps} steps", flush=True)
            sft(run / f"t_{name}", [f"data.task={name}", f"model.tokenizer={run / 'tokenizer'}", *TEACHER,
                                     f"optim.lr={TEACHER_LR[name]}", f"steps={steps}", "data.eval_prompts=0"],
                seed + i)
        timing["teachers_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        student_jsonl(run / "student_data.jsonl", a.student_steps * 32, seed)
        print(f"sft student: both tasks, {a.student_steps} steps", flush=True)
        sft(run / "student", [f"data.jsonl={run / 'student_data.jsonl'}", f"model.tokenizer={run / 'tokenizer'}",
                              *STUDENT, f"steps={a.student_steps}", "data.eval_prompts=0"], seed + 10)
        timing["student_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    acc = {f"t_{t}": {n: accuracy(teachers[t], n, a.eval, seed) for n in TASK_NAMES} for t in TASK_NAMES}
    timing["teacher_eval_s"] = time.monotonic() - t0
    for t, row in acc.items():
        print(f"{t}: " + ", ".join(f"{n} {pct(v)}" for n, v in row.items()), flush=True)

    # 4. OPD: routed, then each specialist alone
    configs = {"routed": {n: teachers[n] for n in TASK_NAMES},
               **{f"single t_{t}": {n: teachers[t] for n in TASK_NAMES} for t in TASK_NAMES}}
    results = {}
    for label, routes in configs.items():
        print(f"opdkit train: {label}", flush=True)
        recs, wall = opd(run / ("opd_" + label.replace("single ", "single_")), student, routes, a.opd_steps, a.eval,
                         seed)
        first, last = recs[0], recs[-1]
        results[label] = {"wall_s": wall,
                          "before": {n: first[f"eval/accuracy/{n}"] for n in TASK_NAMES},
                          "after": {n: last[f"eval/accuracy/{n}"] for n in TASK_NAMES},
                          "routes": {n: route_summary(recs, n) for n in TASK_NAMES}}
    timing["total_s"] = time.monotonic() - t_start

    # 5. the table
    before = results["routed"]["before"]
    assert all(r["before"] == before for r in results.values()), "same student, same held-out problems"
    lines = [f"| model | {' | '.join(f'{n} (held-out, {a.eval})' for n in TASK_NAMES)} | OPD wall time |",
             "|---|" + "---|" * (len(TASK_NAMES) + 1)]
    for t in TASK_NAMES:
        lines.append(f"| teacher t_{t} (SFT on {t} only) | " + " | ".join(pct(acc[f't_{t}'][n]) for n in TASK_NAMES)
                     + " | |")
    lines.append("| student before OPD | " + " | ".join(pct(before[n]) for n in TASK_NAMES) + " | |")
    for label, r in results.items():
        cells = [f"{pct(r['after'][n])} ({100 * (r['after'][n] - r['before'][n]):+.1f})" for n in TASK_NAMES]
        lines.append(f"| student after OPD, {label} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} s |")
    lines += ["", "| configuration | route | teacher | rows | tokens | KL first 10% of steps | KL last 10% |",
              "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        for n in TASK_NAMES:
            s = r["routes"][n]
            lines.append(f"| {label} | {n} | {configs[label][n].parent.name} | {s['rows']} | {s['tokens']} | "
                         f"{s['kl_first']:.3f} | {s['kl_last']:.3f} |")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    t_steps = "/".join(str(a.teacher_steps or TEACHER_STEPS[n]) for n in TASK_NAMES)
    lines += ["", f"seed {seed}; {t_steps} teacher / {a.student_steps} student SFT steps, {a.opd_steps} OPD "
              f"steps x 32 prompts; 1 torch thread; total wall time {timing['total_s']:.0f} s "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in timing.items() if k != 'total_s')}); load average at the "
              f"end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs"]
    table = "\n".join(lines) + "\n"
    (run / "results.md").write_text(table, encoding="utf-8")
    (run / "results.json").write_text(json.dumps({"teachers": acc, "opd": results, "timing": timing,
                                                  "args": vars(a), "loadavg": load}, indent=1, default=str) + "\n")
    print("\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
