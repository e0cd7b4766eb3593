"""Builders for trainer tests: a tiny teacher/student pair on a char tokenizer for the addition task."""

from __future__ import annotations

from pathlib import Path

from opdkit.models import tiny_llama
from opdkit.tasks import Addition, build_char_tokenizer
from opdkit.checkpoint import save_model_dir


def make_pair(root: Path, *, teacher_vocab_extra: int = 0, teacher_seed: int = 1) -> dict[str, str]:
    tok = build_char_tokenizer([Addition.alphabet], save_dir=None)
    V = len(tok)
    paths = {"tokenizer": str(root / "tok")}
    tok.save_pretrained(paths["tokenizer"])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for name, seed, extra in (("student", 0, 0), ("teacher", teacher_seed, teacher_vocab_extra)):
        model = tiny_llama(V + extra, seed=seed, **ids)
        paths[name] = str(save_model_dir(model, tok, root / name))
    return paths


def base_overrides(paths: dict[str, str], run_dir: Path, steps: int = 3) -> list[str]:
    return [
        f"model.student={paths['student']}", f"model.teacher={paths['teacher']}", "data.prompts=task:addition",
        "data.eval_prompts=4", "rollout.prompts_per_step=3", "rollout.n_samples=2", "rollout.max_new_tokens=12",
        "optim.micro_batch_size=4", "optim.lr=1e-3", f"steps={steps}", f"run_dir={run_dir}", "progress=false",
        "save_every=0", "model.teacher_dtype=float32",  # the default (auto) depends on the CPU's bf16 support
    ]
