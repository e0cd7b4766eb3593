#!/usr/bin/env python
"""Build the embedded teacher and student shipped in `opdkit/assets/embedded/` (see docs/embedded.md).

    python scripts/make_embedded.py                     # ~10 min on 1 CPU thread; deterministic (seeded, 1 thread)
    python scripts/make_embedded.py --baseline 300      # + SFT of the student on teacher samples for 300 s (the
                                                        #   off-policy baseline OPD is compared with), curve printed
    python scripts/make_embedded.py --skip-build --baseline 300 --opd-probe 300   # compare on the built assets
    python scripts/make_embedded.py --vllm-student      # only the head_dim-32 student vLLM can serve (~2 min)

Steps (all with `opdkit sft`, i.e. `run_sft`, in `--work`):
1. teacher: a Llama from scratch with a character tokenizer, trained on the task's own completions with a fraction
   of PERTURBED completions (one wrong step line, masked from the loss, followed by the correct recovery), so it
   knows how to carry on after a mistake — the student's own mistakes are what OPD shows it;
2. student: a much smaller Llama sharing the teacher's tokenizer, trained briefly on the task's completions, so it
   starts clearly weaker than the teacher;
3. both evaluated greedily on `HELDOUT_N` held-out problems; models, tokenizer and `task.json` copied to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opdkit.config import load_config  # noqa: E402
from opdkit.eval.run import evaluate, load_eval_model, resolve_task, task_examples  # noqa: E402
from opdkit.train.sft import SFTConfig, run_sft  # noqa: E402

# ----------------------------------------------------------------------------------------------------- the recipe
TASK = "addition"
TASK_ARGS = {"digits": 5}
MAX_NEW_TOKENS = 100  # longest clean completion: 90 chars + EOS (a redone step line adds <= 16; rare)
HELDOUT_N = 500
SEED = 0

TEACHER = [
    "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=256",
    "model.max_position_embeddings=256", "data.perturbed_fraction=0.3", "data.recovery=redo",
    "data.batch_size=32", "optim.lr=2e-3", "optim.warmup_steps=50", "optim.schedule=cosine", "optim.min_lr_ratio=0.1",
    "steps=1500",
]
STUDENT = [
    "model.hidden_size=24", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=48",
    "model.max_position_embeddings=256", "data.batch_size=32", "optim.lr=3e-3", "steps=2500",
]
# The same recipe with one 32-wide head: vLLM's CPU attention kernels need head_dim >= 32 (the default student's is
# 12), so this student is the one the vLLM rollout backend (rollout.backend=vllm) serves in tests and docs.
STUDENT_VLLM = [a for a in STUDENT if not a.startswith(("model.hidden_size", "model.num_heads", "model.intermediate"))
                ] + ["model.hidden_size=32", "model.num_heads=1", "model.intermediate_size=64"]


def sft(run_dir: Path, args: list[str]) -> dict:
    common = [f"data.task={TASK}", f"data.task_args={json.dumps(TASK_ARGS)}", f"seed={SEED}", "threads=1",
              f"run_dir={run_dir}", "overwrite=true", "eval_every=250", "data.eval_prompts=200",
              f"data.max_new_tokens={MAX_NEW_TOKENS}"]
    cfg = load_config(SFTConfig, None, common + args)
    return run_sft(cfg)


def heldout_acc(model_dir: Path) -> float:
    task, _ = resolve_task(TASK, TASK_ARGS)
    model, tok = load_eval_model(model_dir)
    res = evaluate(model, tok, task_examples(task, "heldout", HELDOUT_N, seed=0), task,
                   max_new_tokens=MAX_NEW_TOKENS, batch_size=100, keep_records=False)
    return float(res["accuracy"])


def opd_probe(out: Path, seconds: float, lr: float = 1e-3, batch: int = 32, eval_every: int = 50) -> list[dict]:
    """A minimal OPD loop (full-vocabulary reverse KL, student rollouts at temperature 1, AdamW) on the built assets,
    for a fixed training time; returns the eval curve (step, teacher tokens scored, train seconds, accuracy). A
    reference point for `opdkit train`, not a replacement."""
    from opdkit.data.prompts import prompt_to_ids
    from opdkit.objectives import ObjectiveConfig, opd_loss
    from opdkit.rollout import generate
    from opdkit.teacher.hf import score
    from opdkit.train.sft_data import mix_seed

    task, _ = resolve_task(TASK, TASK_ARGS)
    teacher, tok = load_eval_model(out / "teacher")
    teacher.requires_grad_(False)
    student, _ = load_eval_model(out / "student")
    student.train()
    heldout = task_examples(task, "heldout", 200, seed=0)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.99))
    objective = ObjectiveConfig(estimator="full", divergence="reverse_kl")
    step, scored, train_s, curve = 0, 0, 0.0, []

    def ev() -> None:
        acc = evaluate(student, tok, heldout, task, max_new_tokens=MAX_NEW_TOKENS, batch_size=100,
                       keep_records=False)["accuracy"]
        student.train()
        curve.append({"step": step, "teacher_tokens": scored, "train_seconds": train_s, "accuracy": acc})

    ev()
    while train_s < seconds:
        t0 = time.monotonic()
        exs = task.sample("train", batch, seed=mix_seed(SEED + 3, step, 1))
        gen = torch.Generator().manual_seed(mix_seed(SEED + 3, step, 3))
        rb = generate(student, [prompt_to_ids(e.prompt, tok) for e in exs], max_new_tokens=MAX_NEW_TOKENS,
                      temperature=1.0, eos_token_ids=tok.eos_token_id, pad_token_id=tok.pad_token_id, generator=gen)
        signal = score(teacher, rb.input_ids_BL, rb.attention_mask_BL, rb.prompt_len, rb.response_ids_BT,
                       rb.response_mask_BT, signal="full")
        logits = student(input_ids=rb.input_ids_BL, attention_mask=rb.attention_mask_BL,
                         position_ids=rb.position_ids_BL(), use_cache=False).logits[:, rb.prompt_len - 1:-1]
        loss, _ = opd_loss(objective, tokens_BT=rb.response_ids_BT, mask_BT=rb.response_mask_BT.bool(),
                           teacher=signal, logits_BTV=logits)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        step, scored, train_s = step + 1, scored + int(rb.response_mask_BT.sum()), train_s + time.monotonic() - t0
        if step % eval_every == 0:
            ev()
    ev()
    return curve


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "opdkit" / "assets" / "embedded"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "make_embedded"))
    ap.add_argument("--baseline", type=float, default=0.0,
                    help="also run SFT of the student on teacher samples for this many seconds and print the curve")
    ap.add_argument("--opd-probe", type=float, default=0.0,
                    help="also run a minimal full-vocabulary reverse-KL OPD loop for this many seconds")
    ap.add_argument("--skip-build", action="store_true", help="use the assets already in --out")
    ap.add_argument("--vllm-student", action="store_true",
                    help="build only the vLLM-servable student (head_dim 32) into --out/student_vllm")
    a = ap.parse_args()
    torch.set_num_threads(1)
    work, out = Path(a.work), Path(a.out)
    if a.vllm_student:
        build_vllm_student(work, out)
    elif not a.skip_build:
        build(work, out)
    if a.baseline > 0:
        base = sft(work / "sft_on_teacher_samples", [
            f"model.init={out / 'student'}", f"data.samples_from={out / 'teacher'}", "optim.lr=1e-3",
            f"max_seconds={a.baseline}", "steps=1000000", "eval_every=50", f"seed={SEED + 2}"])
        print("SFT on teacher samples: step, teacher tokens generated, train seconds, held-out accuracy (200)")
        for r in base["history"]:
            print(f"  {r['step']:5d} {r['teacher_tokens']:9d} {r['train_seconds']:6.0f} {r['eval/accuracy']:.3f}")
    if a.opd_probe > 0:
        print("OPD probe (full-vocabulary reverse KL): step, teacher tokens scored, train seconds, held-out accuracy")
        for r in opd_probe(out, a.opd_probe):
            print(f"  {r['step']:5d} {r['teacher_tokens']:9d} {r['train_seconds']:6.0f} {r['accuracy']:.3f}")
    return 0


def build(work: Path, out: Path) -> None:
    t0 = time.monotonic()

    teacher = sft(work / "teacher", ["model.tokenizer=char", *TEACHER])
    t_teacher = time.monotonic() - t0
    student = sft(work / "student", [f"model.tokenizer={teacher['final_dir']}", *STUDENT, f"seed={SEED + 1}"])
    t_student = time.monotonic() - t0 - t_teacher
    t_acc, s_acc = heldout_acc(Path(teacher["final_dir"])), heldout_acc(Path(student["final_dir"]))
    print(f"teacher: {teacher['params']:,} params, {t_teacher:.0f} s, held-out accuracy {t_acc:.3f}")
    print(f"student: {student['params']:,} params, {t_student:.0f} s, held-out accuracy {s_acc:.3f}")

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, res in (("teacher", teacher), ("student", student)):
        shutil.copytree(res["final_dir"], out / name)
    shutil.copytree(Path(teacher["run_dir"]) / "tokenizer", out / "tokenizer")
    info = {"task": TASK, "task_args": TASK_ARGS, "max_new_tokens": MAX_NEW_TOKENS,
            "teacher_heldout_acc": round(t_acc, 4), "student_heldout_acc": round(s_acc, 4), "heldout_n": HELDOUT_N,
            "teacher_params": teacher["params"], "student_params": student["params"]}
    (out / "task.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out} ({time.monotonic() - t0:.0f} s)")


def build_vllm_student(work: Path, out: Path) -> None:
    t0 = time.monotonic()
    res = sft(work / "student_vllm", [f"model.tokenizer={out / 'teacher'}", *STUDENT_VLLM, f"seed={SEED + 1}"])
    acc = heldout_acc(Path(res["final_dir"]))
    if (out / "student_vllm").exists():
        shutil.rmtree(out / "student_vllm")
    shutil.copytree(res["final_dir"], out / "student_vllm")
    info = json.loads((out / "task.json").read_text())
    info.update({"student_vllm_heldout_acc": round(acc, 4), "student_vllm_params": res["params"]})
    (out / "task.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    print(f"student_vllm: {res['params']:,} params, held-out accuracy {acc:.3f}, {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
