"""The `smollm2-opsd` preset on a real model over several seeds (issue #15 item 3): held-out accuracy of
SmolLM2-135M-Instruct before and after OPSD, against SFT on the reference solutions (the OPSD teacher's privileged
context) at the same steps and references, with its own learning rate chosen on a validation split.

    CPU:    python scripts/smollm2_trial.py --out trials/smollm2 --seeds 0 1 2             (~35 min per OPSD seed)
            python scripts/smollm2_trial.py --out trials/smollm2 --seeds 2 --only opsd      (one lane of two)
            python scripts/smollm2_trial.py --out trials/smollm2 --seeds 0 1 --only opsd --opsd-lrs 1e-4   (lr probe)
    1 GPU:  the same command with --threads 8 (the runs are CPU-sized: 4 prompts x 2 samples per step)
    N GPUs: one seed per GPU (CUDA_VISIBLE_DEVICES=i python scripts/smollm2_trial.py --seeds i --only opsd ...)

Stages, each skipped when its output exists (a killed trial continues), `--only` picks some:
  base  `opdkit eval model=smollm2` on the test and validation sets;
  opsd  per seed `opdkit train smollm2-opsd seed=S steps=N ...` (the preset unchanged but for the step count and
        the in-run eval size), then `opdkit eval` of its final checkpoint on the test set;
  sft   `opdkit sft model.init=smollm2 data.task=word_arith` on the same number of reference solutions per step
        as OPSD has prompts per step (4) and the same steps, warm-up and clip; the lr chosen on seed 0 among
        --sft-lrs (incl. the preset's OPSD lr) by greedy accuracy on the validation set, then the other seeds.
Test set: word_arith's held-out split, `n=--n-test` problems (seed 0). Validation set: `--n-val` problems of the
TRAIN split drawn with seed 777 (word_arith's train split has ~10^6 problems; a run sees at most a few hundred).
All evals greedy, `max_new_tokens` = the preset's 96. `results.md` / `results.json` in --out hold the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opdkit.compare import mean_ci, opdkit_command as opdkit  # noqa: E402

PRESET_LR = 2e-5
PROMPTS_PER_STEP = 4  # smollm2-opsd's rollout.prompts_per_step
MAX_NEW = 96  # smollm2-opsd's rollout.max_new_tokens
VAL_SEED = 777


def run(argv: list[str], log: Path) -> float:
    t = time.time()
    print(f"$ {' '.join(argv)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise SystemExit(f"failed (exit {rc}), see {log}")
    return time.time() - t


def evaluate(model: str, out: Path, split: str, n: int, threads: int) -> float:
    """Greedy accuracy in % (cached in `out`)."""
    if not out.exists():
        seed = 0 if split == "heldout" else VAL_SEED
        run(opdkit() + ["eval", f"model={model}", "task=word_arith", f"split={split}", f"n={n}", f"seed={seed}",
                        f"max_new_tokens={MAX_NEW}", f"threads={threads}", "progress=false", "show=0",
                        f"out={out}"], out.with_suffix(".log"))
    return 100.0 * json.loads(out.read_text())["accuracy"]


def trained(argv: list[str], rd: Path, log: Path) -> Path:
    """Run `argv` (an opdkit train / sft writing to rd) unless rd/final exists; returns rd/final. A killed run's
    checkpoints are not taken for a finished model: it is run again."""
    if not (rd / "final" / "config.json").exists():
        secs = run(argv, log)
        (rd / "wall_s").write_text(f"{secs:.0f}\n")
        shutil.rmtree(rd / "checkpoints", ignore_errors=True)  # 1.6 GB of optimizer state; final/ is kept
    return rd / "final"


def opsd_name(seed: int, lr: float) -> str:
    return f"opsd_s{seed}" if lr == PRESET_LR else f"opsd_lr{lr:g}_s{seed}"


def opsd(out: Path, seed: int, lr: float, a) -> Path:
    rd = out / opsd_name(seed, lr)
    return trained(opdkit() + ["train", "smollm2-opsd", f"seed={seed}", f"steps={a.steps}", f"optim.lr={lr:g}",
                               f"eval_every={a.steps // 2}", "data.eval_prompts=64", "save_every=0",
                               f"threads={a.threads}", "progress=false", f"run_dir={rd}"], rd, out / f"{rd.name}.log")


def sft(out: Path, seed: int, lr: float, a) -> Path:
    rd = out / f"sft_lr{lr:g}_s{seed}"
    return trained(opdkit() + ["sft", "model.init=smollm2", "data.task=word_arith", f"seed={seed}",
                               f"steps={a.steps}", f"data.batch_size={PROMPTS_PER_STEP}",
                               f"optim.micro_batch_size={PROMPTS_PER_STEP}", f"optim.lr={lr:g}",
                               "optim.warmup_steps=5", "optim.grad_clip=1.0", "data.eval_prompts=0",
                               f"threads={a.threads}", "progress=false", f"run_dir={rd}"], rd, out / f"{rd.name}.log")


def ci(xs: list[float]) -> str:
    m, half = mean_ci(xs)
    return f"{m:.1f} ± {half:.1f}" if len(xs) > 1 else f"{m:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "trials" / "smollm2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--opsd-lrs", type=float, nargs="+", default=[PRESET_LR],
                   help="OPSD learning rates (the preset's 2e-5; others are probes, named opsd_lr<LR>_s<SEED>)")
    p.add_argument("--sft-lrs", type=float, nargs="+", default=[PRESET_LR, 1e-5, 1e-4])
    p.add_argument("--only", nargs="+", choices=("base", "opsd", "sft"), default=("base", "opsd", "sft"))
    a = p.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    test = lambda m, tag: evaluate(str(m), out / f"{tag}.test.json", "heldout", a.n_test, a.threads)  # noqa: E731
    val = lambda m, tag: evaluate(str(m), out / f"{tag}.val.json", "train", a.n_val, a.threads)  # noqa: E731
    res: dict = {}
    if "base" in a.only:
        res["base"] = {"test": test("smollm2", "base"), "val": val("smollm2", "base")}
    if "opsd" in a.only:
        for lr in a.opsd_lrs:
            key = "opsd" if lr == PRESET_LR else f"opsd_lr{lr:g}"
            for s in a.seeds:
                res.setdefault(key, {})[str(s)] = test(opsd(out, s, lr, a), opsd_name(s, lr))
    if "sft" in a.only:
        sweep = {f"{lr:g}": val(sft(out, 0, lr, a), f"sft_lr{lr:g}_s0") for lr in a.sft_lrs}
        best = max(sweep, key=lambda k: (sweep[k], -abs(float(k) - PRESET_LR)))
        res["sft_val_sweep"], res["sft_lr"] = sweep, best
        for s in a.seeds:
            res.setdefault("sft", {})[str(s)] = test(sft(out, s, float(best), a), f"sft_lr{best}_s{s}")
    # lanes run in parallel (--only, --seeds): merge into what the others wrote meanwhile, seed by seed
    latest = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for k, v in res.items():
        latest[k] = {**latest.get(k, {}), **v} if isinstance(v, dict) and isinstance(latest.get(k), dict) else v
    res = latest
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Greedy accuracy (%) on {a.n_test} held-out word_arith problems, max_new_tokens {MAX_NEW}.", "",
             "| model | per seed | mean ± 95% CI (t, over seeds) |", "|---|---|---|"]
    if "base" in res:
        lines.append(f"| SmolLM2-135M-Instruct, untrained | (greedy: one value) | {res['base']['test']:.1f} |")
    names = {k: f"OPSD, {a.steps} steps, lr {k[len('opsd_lr'):] if k != 'opsd' else f'{PRESET_LR:g}'}"
             for k in res if k.startswith("opsd")}
    names["sft"] = f"SFT on the references, {a.steps} steps, lr {res.get('sft_lr')} (chosen on validation)"
    for key, name in names.items():
        got = {s: v for s, v in sorted(res.get(key, {}).items())}
        if got:
            per = ", ".join(f"s{s} {v:.1f}" for s, v in got.items())
            lines.append(f"| {name} | {per} | {ci(list(got.values()))} |")
    if "sft_val_sweep" in res:
        lines += ["", "SFT lr sweep (seed 0, validation accuracy %): "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in res["sft_val_sweep"].items())
                  + (f"; untrained {res['base']['val']:.1f}" if "base" in res else "")]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
