#!/usr/bin/env python
"""Multi-turn tool-use OPD on the `calc` task (docs/agents.md): build a teacher that uses the calculator and a student
that does not, then OPD vs SFT on teacher episodes at equal teacher compute.

    # CPU, 1 torch thread (the measured run in docs/agents.md; ~2 min to build, ~1 min per OPD seed)
    OMP_NUM_THREADS=1 python scripts/make_tool_task.py --run-dir runs/tool_calc --seeds 0
    OMP_NUM_THREADS=1 python scripts/make_tool_task.py --run-dir runs/tool_calc --skip-build --seeds 1 2
    python scripts/make_tool_task.py --run-dir runs/tool_calc --skip-build --ship   # -> embedded:calc_teacher|student

Steps (everything under --run-dir):
1. teacher: `opdkit sft data.task=calc` from scratch (char tokenizer of the task alphabet, 280k parameters) on the
   task's reference episodes, every one using the tool (`[a*b]` -> `=P`, `[P+c]` -> `=R`, `=> R`); the calculator's
   outputs are masked from the loss (context, not targets); greedy held-out accuracy through the env: 100%;
2. student: a smaller Llama (hidden 48, 2 layers) with the teacher's tokenizer, SFT-initialised briefly on episodes of
   which only half use the tool (`tool_fraction=0.5`; the rest answer directly, a guess): it calls the tool
   sometimes and copies digits badly (greedy ~0%);
3. per seed: `opdkit train data.prompts=task:calc` (full-vocabulary reverse KL, the trainer's default objective) for
   --opd-steps steps, and `opdkit sft data.samples_from=<teacher>` (SFT on the teacher's sampled episodes, env
   outputs masked) with a budget of teacher tokens equal to what OPD's teacher scored (`teacher_tokens`);
4. a table (printed, and <run-dir>/results.md, raw numbers in results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from opdkit.cli import main; sys.exit(main())"]
MAX_NEW = 48  # the episode budget (policy + calculator tokens); the longest reference episode is 44 chars + EOS
TEACHER = ["model.tokenizer=char", "model.hidden_size=96", "model.num_layers=3", "model.num_heads=4",
           "model.intermediate_size=192", "model.max_position_embeddings=128", "data.batch_size=32", "optim.lr=2e-3",
           "optim.warmup_steps=50", "optim.schedule=cosine", "optim.min_lr_ratio=0.1", "steps=1200"]
STUDENT = ["data.task_args={tool_fraction: 0.5}", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=2",
           "model.intermediate_size=96", "model.max_position_embeddings=128", "data.batch_size=32", "optim.lr=3e-3",
           "steps=800", "seed=1"]


def run(args: list[str], log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.call(CLI + args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"failed ({rc}): opdkit {' '.join(args)}; see {log}")
    return time.monotonic() - t0


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def last_eval(run_dir: Path) -> dict:
    return [r for r in metrics(run_dir) if "eval/accuracy" in r][-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/tool_calc")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--opd-steps", type=int, default=300)
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--skip-build", action="store_true", help="reuse <run-dir>/teacher and <run-dir>/student")
    ap.add_argument("--ship", action="store_true",
                    help="copy the built teacher and student into opdkit/assets/embedded/calc_teacher|calc_student "
                         "(embedded:calc_teacher, embedded:calc_student) and exit")
    a = ap.parse_args()
    out = Path(a.run_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["data.task=calc", "threads=1", "overwrite=true", "progress=false", f"data.max_new_tokens={MAX_NEW}",
              f"data.eval_prompts={a.eval_prompts}"]
    times = {}
    if not a.skip_build:
        times["teacher_s"] = run(["sft", f"run_dir={out / 'teacher'}", *common, "eval_every=300", *TEACHER],
                                 out / "teacher.log")
        times["student_s"] = run(["sft", f"run_dir={out / 'student'}", *common, "eval_every=200",
                                  f"model.tokenizer={out / 'teacher' / 'final'}", *STUDENT], out / "student.log")
    teacher, student = out / "teacher" / "final", out / "student" / "final"
    if a.ship:
        import shutil

        for name, src in (("calc_teacher", teacher), ("calc_student", student)):
            dst = ROOT / "opdkit" / "assets" / "embedded" / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("generation_config.json"))
            print(f"shipped {src} -> {dst}")
        return 0
    res = {"teacher_acc": last_eval(out / "teacher")["eval/accuracy"],
           "student_acc": last_eval(out / "student")["eval/accuracy"], "seeds": {}, **times}
    for seed in a.seeds:
        opd = out / f"opd_seed{seed}"
        t_opd = run(["train", f"model.student={student}", f"model.teacher={teacher}", "data.prompts=task:calc",
                     f"data.eval_prompts={a.eval_prompts}", f"rollout.max_new_tokens={MAX_NEW}",
                     f"steps={a.opd_steps}", "eval_every=50", f"run_dir={opd}", f"seed={seed}", "threads=1",
                     "overwrite=true", "progress=false"], out / f"opd_seed{seed}.log")
        rows = metrics(opd)
        budget = max(r.get("teacher_tokens", 0) for r in rows)
        base = out / f"sft_on_teacher_seed{seed}"
        t_sft = run(["sft", f"run_dir={base}", *common, f"model.init={student}", f"data.samples_from={teacher}",
                     "optim.lr=1e-3", "eval_every=50", "steps=100000", f"max_teacher_tokens={budget}",
                     f"seed={seed}"], out / f"sft_on_teacher_seed{seed}.log")
        sft_rows = metrics(base)
        res["seeds"][seed] = {
            "opd_acc": last_eval(opd)["eval/accuracy"], "opd_teacher_tokens": budget, "opd_s": round(t_opd, 1),
            "opd_curve": [(r["step"], r.get("teacher_tokens", 0), r["eval/accuracy"]) for r in rows
                          if "eval/accuracy" in r],
            "sft_acc": last_eval(base)["eval/accuracy"],
            "sft_teacher_tokens": max(r.get("teacher_tokens", 0) for r in sft_rows), "sft_s": round(t_sft, 1)}
    lines = [f"teacher (SFT, all episodes use the tool): held-out greedy accuracy {100 * res['teacher_acc']:.1f}%",
             f"student (SFT-initialised, half the episodes use the tool): {100 * res['student_acc']:.1f}%", "",
             "| seed | OPD accuracy | teacher tokens (OPD) | wall s | SFT on teacher episodes | teacher tokens (SFT) "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    for seed, r in res["seeds"].items():
        lines.append(f"| {seed} | {100 * r['opd_acc']:.1f}% | {r['opd_teacher_tokens']} | {r['opd_s']} | "
                     f"{100 * r['sft_acc']:.1f}% | {r['sft_teacher_tokens']} | {r['sft_s']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
