#!/usr/bin/env python
"""Cross-tokenizer OPD at embedded scale: a BPE teacher distils the character-level embedded student.

    OMP_NUM_THREADS=1 python scripts/make_cross_tokenizer.py                    # everything, in runs/xtok
    OMP_NUM_THREADS=1 python scripts/make_cross_tokenizer.py --stage teacher    # only the BPE tokenizer + teacher
    OMP_NUM_THREADS=1 python scripts/make_cross_tokenizer.py --stage opd        # only the OPD runs (teacher built)
    OMP_NUM_THREADS=1 python scripts/make_cross_tokenizer.py --stage opd --seed 1   # the OPD runs with another seed
    OMP_NUM_THREADS=1 python scripts/make_cross_tokenizer.py --opd-steps 150 --teacher-steps 1200 --run-dir runs/xtok

Steps, all under --run-dir (nothing outside it is written):
1. `bpe_tokenizer/`: a BPE tokenizer of --vocab ids trained with the `tokenizers` library on the embedded task's
   text (prompts + completions of its train split; `opdkit.tasks.bpe_tokenizer`), so its ids and token boundaries
   differ from the student's character tokenizer (merges such as '+0=1' and '\\nA: ');
2. `teacher_bpe/`: a Llama of the embedded teacher's shape trained from scratch with `opdkit sft` on the embedded
   task with that tokenizer (the embedded teacher's recipe: 30% perturbed completions with the step redone, masked),
   evaluated greedily on the held-out split;
3. `opd_xtok/`: `opdkit train` of the embedded student (character tokenizer) from the BPE teacher with
   teacher.cross_tokenizer=true (safe chunks, the default); `opd_xtok_minimal/`: the same with GOLD's minimal chunks
   (teacher.cross_tokenizer_chunks=minimal); `opd_same/`: the same run from the embedded teacher (same tokenizer as
   the student, plain teacher): same seed, steps and objective (sampled estimator: the only one cross-tokenizer mode
   serves);
4. a table of held-out accuracy before/after, wall time and skipped rows, also written to `results.json`.

Runs on CPU with 1 torch thread; the default budget takes minutes (see docs/cross_tokenizer.md for measured times).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opdkit.config import load_config  # noqa: E402
from opdkit.metrics_log import read_metrics  # noqa: E402

SEED = 0
# The embedded teacher's shape and recipe (scripts/make_embedded.py TEACHER), with fewer steps: BPE sequences are
# ~2x shorter than character ones, and the demo must stay minutes on one thread.
TEACHER = [
    "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=256",
    "model.max_position_embeddings=256", "data.perturbed_fraction=0.3", "data.recovery=redo",
    "data.batch_size=32", "optim.lr=2e-3", "optim.warmup_steps=50", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
]
# The OPD runs: sampled estimator (cross-tokenizer mode serves only that) with PowerOPD's bounded reward (a = 0.5),
# which on the embedded task gains fastest of the sampled methods (docs/results.md: 50.8 -> 61.8 greedy at step 100).
OPD = ["objective.estimator=sampled", "objective.reward=power", "objective.power_a=0.5", "optim.lr=1e-3",
       "rollout.prompts_per_step=32", "progress=false", "threads=1"]


def task_texts(n: int = 4000) -> list[str]:
    """Prompt + completion texts of the embedded task's train split (what the BPE tokenizer is trained on)."""
    from opdkit.specs import resolve_task

    task, _ = resolve_task("embedded")
    return [task.alphabet] + [ex.prompt + ex.completion for ex in task.sample("train", n=n, seed=SEED + 7)]


def build_teacher(run_dir: Path, vocab: int, steps: int) -> dict:
    from opdkit.specs import embedded_task_info, resolve_task, task_examples
    from opdkit.eval.run import evaluate, load_eval_model
    from opdkit.tasks.bpe_tokenizer import build_bpe_tokenizer
    from opdkit.train.sft import SFTConfig, run_sft

    t0 = time.monotonic()
    tok_dir = run_dir / "bpe_tokenizer"
    task, max_new = resolve_task("embedded")
    tok = build_bpe_tokenizer(task_texts(), vocab, tok_dir, alphabet=task.alphabet)
    example = task.sample("heldout", n=1, seed=1)[0]
    pieces = tok.convert_ids_to_tokens(tok(example.prompt + example.completion)["input_ids"])
    print(f"BPE tokenizer: {len(tok)} ids; {example.prompt + example.completion!r} -> {len(pieces)} tokens {pieces}")
    info = embedded_task_info()
    cfg = load_config(SFTConfig, None, [
        "data.task=embedded", f"model.tokenizer={tok_dir}", *TEACHER, f"steps={steps}", f"seed={SEED}", "threads=1",
        f"run_dir={run_dir / 'teacher_bpe'}", "overwrite=true", "eval_every=0", "data.eval_prompts=100",
        f"data.max_new_tokens={info['max_new_tokens']}", "progress=false"])
    res = run_sft(cfg)
    model, mtok = load_eval_model(res["final_dir"])
    heldout = task_examples(task, "heldout", 500, seed=0)
    acc = float(evaluate(model, mtok, heldout, task, max_new_tokens=max_new, batch_size=100,
                         keep_records=False)["accuracy"])
    out = {"final_dir": res["final_dir"], "params": res["params"], "vocab": len(tok), "steps": steps,
           "heldout_acc_500": acc, "wall_s": round(time.monotonic() - t0, 1),
           "embedded_teacher_heldout_acc_500": info["teacher_heldout_acc"]}
    print(f"BPE teacher: {res['params']:,} params, {steps} SFT steps, {out['wall_s']:.0f} s, held-out accuracy "
          f"{acc:.3f} (500 problems; the embedded char teacher: {info['teacher_heldout_acc']:.3f})")
    return out


def opd_run(run_dir: Path, name: str, teacher_args: list[str], steps: int, eval_prompts: int, seed: int) -> dict:
    from opdkit.train.config import TrainConfig
    from opdkit.train.loop import train

    t0 = time.monotonic()
    cfg = load_config(TrainConfig, None, [*OPD, *teacher_args, f"seed={seed}", f"steps={steps}", f"run_dir={run_dir / name}",
                                          "overwrite=true", f"data.eval_prompts={eval_prompts}", "eval_every=0",
                                          "save_every=0"])
    summary = train(cfg)
    wall = time.monotonic() - t0
    recs = [r for r in read_metrics(run_dir / name) if r.get("step", 0) > 0]
    skipped = sum(r.get("xtok/skipped_rows", 0) for r in recs)
    rows = sum(r.get("xtok/rows", 0) for r in recs)
    out = {"name": name, "seed": seed, "teacher": summary["teacher"], "before": summary["initial"]["eval/accuracy"],
           "after": summary["final"]["eval/accuracy"], "steps": steps, "wall_s": round(wall, 1),
           "teacher_tokens": recs[-1]["teacher_tokens"] if recs else 0, "xtok_rows": rows, "xtok_skipped_rows": skipped,
           "time_score_s": round(sum(r.get("time/score", 0.0) for r in recs), 1),
           "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    print(f"{name}: {out['before']:.3f} -> {out['after']:.3f} ({steps} steps, {wall:.0f} s; teacher {out['teacher']})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "xtok"))
    ap.add_argument("--stage", choices=("all", "teacher", "opd"), default="all")
    ap.add_argument("--vocab", type=int, default=40, help="BPE vocabulary size (22 = characters only)")
    ap.add_argument("--teacher-steps", type=int, default=1200)
    ap.add_argument("--opd-steps", type=int, default=150)
    ap.add_argument("--eval-prompts", type=int, default=500)
    ap.add_argument("--seed", type=int, default=SEED, help="OPD runs' seed (runs of seed S > 0 are named *_seedS)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    res_path = run_dir / "results.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if a.stage in ("all", "teacher"):
        results["teacher"] = build_teacher(run_dir, a.vocab, a.teacher_steps)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
    if a.stage in ("all", "opd"):
        final = run_dir / "teacher_bpe" / "final"
        if not final.is_dir():
            print(f"make_cross_tokenizer: {final} is missing: run --stage teacher first", file=sys.stderr)
            return 2
        suffix = "" if a.seed == 0 else f"_seed{a.seed}"
        runs = {"opd_xtok": [f"teacher.model={final}", "teacher.cross_tokenizer=true"],
                "opd_xtok_minimal": [f"teacher.model={final}", "teacher.cross_tokenizer=true",
                                     "teacher.cross_tokenizer_chunks=minimal"],
                "opd_same": ["teacher.model=embedded:teacher"]}
        for name, args in runs.items():
            results[name + suffix] = opd_run(run_dir, name + suffix, args, a.opd_steps, a.eval_prompts, a.seed)
            res_path.write_text(json.dumps(results, indent=1) + "\n")
        results["load"] = os.getloadavg()
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        print("| run | teacher | before | after | change | wall | skipped rows |")
        print("|---|---|---|---|---|---|---|")
        for k, r in results.items():
            if not k.startswith("opd_"):
                continue
            print(f"| {k} (seed {r.get('seed', 0)}) | {r['teacher']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
                  f"{100 * (r['after'] - r['before']):+.1f} pts | {r['wall_s']:.0f} s | "
                  f"{r['xtok_skipped_rows']} of {r['xtok_rows']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
