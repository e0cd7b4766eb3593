"""`opdkit sft`: supervised fine-tuning (token-mean cross-entropy on completion tokens) of a causal LM.

    opdkit sft data.task=addition run_dir=runs/teacher model.hidden_size=128 model.num_layers=4 steps=2000
    opdkit sft model.init=runs/sft/final data.jsonl=train.jsonl
    opdkit sft run_dir=runs/student model.tokenizer=runs/teacher/final data.samples_from=runs/teacher/final

Used to make teachers and students from scratch (`scripts/make_embedded.py`) and as the off-policy baseline of OPD:
SFT of a student on TEACHER SAMPLES (`data.samples_from=<teacher>`), which logs the cumulative number of teacher
tokens generated (`teacher_tokens`) next to the held-out accuracy, so it can be compared with `opdkit train` (which
logs the teacher tokens it scores) at equal teacher compute. See docs/sft_eval.md.

Outputs in `run_dir`: config.yaml, metrics.jsonl, tb/, checkpoints/step_N/ (config.json + tokenizer written next to
the weights, so `opdkit eval model=<checkpoint>` works), final/ (a standard HF model dir with the tokenizer).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from opdkit.config import config_hash, h, load_config
from opdkit.config_help import help_text
from opdkit.errors import RunFailed, UserError, one_line, run_cli
from opdkit.validate import choice, in_range, pos_int


@dataclass
class SFTModelConfig:
    """The model: an existing HF model dir (model.init) or a Llama built from scratch with the knobs below."""

    init: str | None = h("start from this HF model dir / checkpoint dir / embedded:student|teacher (its tokenizer "
                         "too); null = a Llama from scratch", default=None)
    tokenizer: str | None = h("from-scratch models: a tokenizer dir, or char (a character-level tokenizer of the "
                              "task alphabet / training texts, saved with the model); default: the samples_from "
                              "model's tokenizer if set, else char", default=None)
    hidden_size: int = h("from scratch: hidden size", default=64)
    num_layers: int = h("from scratch: decoder layers", default=2)
    num_heads: int = h("from scratch: attention heads", default=4)
    num_kv_heads: int | None = h("from scratch: key/value heads (GQA; default: num_heads)", default=None)
    intermediate_size: int = h("from scratch: MLP size", default=128)
    max_position_embeddings: int = h("from scratch: longest sequence (prompt + response)", default=256)
    tie_word_embeddings: bool = h("from scratch: share the input embedding and the lm_head", default=True)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            pos_int("model", name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            pos_int("model", "num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
        if self.init == "":
            raise ValueError("model.init is empty: give a model dir or null (from scratch)")


@dataclass
class SFTDataConfig:
    """Training data: a built-in task, a dataset, and optionally completions sampled from another model."""

    task: str | None = h("built-in task (addition, arith_chain, or embedded = the embedded setting's task); "
                         "default: addition unless jsonl is given", default=None)
    task_args: dict = h("task options, e.g. {digits: 4}", default_factory=dict)
    jsonl: str | None = h("a JSONL file / save_to_disk dir with prompt and completion fields (alias: data.prompts, "
                          "opdkit train's name)", default=None)
    prompt_field: str = h("dataset field with the prompt", default="prompt")
    completion_field: str = h("dataset field with the target completion", default="completion")
    answer_field: str | None = h("dataset field with the answer (only for eval_jsonl)", default="answer")
    perturbed_fraction: float = h("built-in tasks: fraction of examples with a perturbed completion (one wrong step, "
                                  "masked from the loss, then the correct recovery)", default=0.0)
    recovery: str = h("perturbed completions: resume (carry on from the true state) or redo (rewrite the step)",
                      default="resume")
    samples_from: str | None = h("train on completions sampled from this model (HF dir / checkpoint / "
                                 "embedded:teacher) for the task's / dataset's prompts, generated every step "
                                 "(counted as teacher_tokens)", default=None)
    sample_temperature: float = h("samples_from: sampling temperature (0 = greedy)", default=1.0)
    sample_top_p: float = h("samples_from: nucleus sampling (1.0 = off)", default=1.0)
    max_new_tokens: int | None = h("samples_from / eval: response length limit (default: the task's longest "
                                   "completion + 1, datasets 256)", default=None)
    batch_size: int = h("sequences per optimizer step", default=32)
    eval_prompts: int = h("held-out problems for the periodic greedy eval (tasks: held-out split; datasets: "
                          "eval_jsonl)", default=200)
    eval_jsonl: str | None = h("datasets: held-out JSONL for the eval (prompt + answer fields)", default=None)
    checker: str = h("datasets: answer checker for eval_jsonl (marker:<TEXT>, marker = marker:=>, math_verify, "
                     "py:<module>:<fn> or py:<file.py>:<fn>: imports and runs that code)", default="marker:=>")

    def __post_init__(self) -> None:
        in_range("data", "perturbed_fraction", self.perturbed_fraction, 0.0, 1.0)
        in_range("data", "sample_temperature", self.sample_temperature, 0.0, 100.0)
        in_range("data", "sample_top_p", self.sample_top_p, 0.0, 1.0, lo_open=True)
        pos_int("data", "batch_size", self.batch_size)
        pos_int("data", "eval_prompts", self.eval_prompts, allow_zero=True)
        if self.max_new_tokens is not None:
            pos_int("data", "max_new_tokens", self.max_new_tokens)
        choice("data", "recovery", self.recovery, ("resume", "redo"))
        if self.jsonl is not None and self.jsonl.startswith("task:"):  # opdkit train's data.prompts=task:<name>
            raise ValueError(f"data.jsonl={self.jsonl} names a built-in task: opdkit sft takes "
                             f"data.task={self.jsonl[len('task:'):]}")
        if self.task is not None and self.jsonl is not None:
            raise ValueError("data.task and data.jsonl exclude each other: train on a task or on a dataset")
        if self.perturbed_fraction > 0 and (self.jsonl is not None or self.samples_from is not None):
            raise ValueError("data.perturbed_fraction needs a built-in task's own completions (not jsonl / "
                             "samples_from)")


@dataclass
class SFTOptimConfig:
    """AdamW with linear warm-up, then a constant or cosine learning rate."""

    lr: float = h("AdamW learning rate", default=1e-3)
    weight_decay: float = h("AdamW weight decay", default=0.0)
    beta1: float = h("AdamW beta1", default=0.9)
    beta2: float = h("AdamW beta2", default=0.99)
    warmup_steps: int = h("linear warm-up steps", default=0)
    schedule: str = h("after warm-up: constant or cosine (to min_lr_ratio x lr at the last step)",
                      default="constant")
    min_lr_ratio: float = h("cosine: final learning rate / lr", default=0.0)
    grad_clip: float = h("clip the gradient norm to this (0 = off)", default=1.0)
    micro_batch_size: int = h("sequences per forward/backward (gradient accumulation; same result)", default=32)
    max_skipped_steps: int = h("steps with a non-finite loss or gradient norm are skipped; after this many in a "
                               "row the run stops with a checkpoint (exit code 3)", default=10)

    def __post_init__(self) -> None:
        in_range("optim", "lr", self.lr, 0.0, 1.0, lo_open=True)
        in_range("optim", "weight_decay", self.weight_decay, 0.0, 10.0)
        in_range("optim", "beta1", self.beta1, 0.0, 1.0, hi_open=True)
        in_range("optim", "beta2", self.beta2, 0.0, 1.0, hi_open=True)
        pos_int("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        choice("optim", "schedule", self.schedule, ("constant", "cosine"))
        in_range("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        in_range("optim", "grad_clip", self.grad_clip, 0.0, math.inf, hi_open=True)
        pos_int("optim", "micro_batch_size", self.micro_batch_size)
        pos_int("optim", "max_skipped_steps", self.max_skipped_steps)


@dataclass
class SFTConfig:
    """opdkit sft: supervised fine-tuning on task completions, a dataset, or another model's samples."""

    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    steps: int = h("optimizer steps", default=1000)
    max_seconds: float = h("also stop once training (not eval) has taken this many seconds (0 = no limit)",
                           default=0.0)
    max_teacher_tokens: int = h("also stop once the teacher (data.samples_from) has generated this many tokens "
                                "(0 = no limit): SFT on teacher samples at a given teacher compute, as `opdkit "
                                "compare` matches it to an OPD run's scored tokens", default=0)
    seed: int = h("seed: the init and every step's data derive from (seed, step), so a resumed run continues "
                  "exactly", default=0)
    threads: int = h("torch CPU threads", default=1)
    run_dir: str = h("output directory (config.yaml, metrics.jsonl, tb/, checkpoints/, final/)", default="runs/sft")
    resume: bool = h("continue the run in run_dir from its latest checkpoint (steps may be raised)", default=False)
    overwrite: bool = h("replace the run in run_dir", default=False)
    save_every: int = h("checkpoint every N steps (0 = only at the end)", default=0)
    keep_last: int = h("checkpoints kept", default=2)
    eval_every: int = h("greedy held-out eval every N steps (0 = only before and after)", default=0)
    progress: bool = h("show progress", default=True)

    def __post_init__(self) -> None:
        pos_int("sft", "steps", self.steps)
        in_range("sft", "max_seconds", self.max_seconds, 0.0, math.inf, hi_open=True)
        pos_int("sft", "threads", self.threads)
        pos_int("sft", "max_teacher_tokens", self.max_teacher_tokens, allow_zero=True)
        if self.max_teacher_tokens and not self.data.samples_from:
            raise ValueError("sft.max_teacher_tokens needs data.samples_from (a teacher that generates the data)")
        pos_int("sft", "save_every", self.save_every, allow_zero=True)
        pos_int("sft", "keep_last", self.keep_last)
        pos_int("sft", "eval_every", self.eval_every, allow_zero=True)
        if self.resume and self.overwrite:
            raise ValueError("sft.resume=true and overwrite=true exclude each other: pick one")


SFTConfig.KEY_ALIASES = {"data.prompts": "data.jsonl"}  # train's name of the data path (eval's is `data`)

HASH_EXCLUDE = ("resume", "overwrite", "steps", "max_seconds", "max_teacher_tokens", "threads", "progress", "save_every",
                "keep_last", "eval_every", "run_dir", "optim.max_skipped_steps")


# ----------------------------------------------------------------------------------------------------------- setup


@dataclass
class _Setup:
    model: torch.nn.Module
    tokenizer: object
    tokenizer_is_char: bool
    task: object
    train_examples: list | None
    eval_examples: list
    scorer: object
    teacher: torch.nn.Module | None
    max_new_tokens: int
    notes: list = field(default_factory=list)  # set-up notices, printed at the start
    checker_name: str | None = None
    checker_verified: bool = False  # the checker credits some reference completion: an all-zero eval is the model's


def _user(msg: str, exc: BaseException | None = None) -> UserError:
    return UserError(msg + (f": {one_line(exc)}" if exc is not None else ""))


def _load_dataset(path: str, cfg: SFTDataConfig, completion: bool, answer: bool):
    from opdkit.tasks import load_examples

    try:
        return load_examples(path, prompt_field=cfg.prompt_field,
                             answer_field=cfg.answer_field if answer else None,
                             completion_field=cfg.completion_field if completion else None)
    except ValueError as exc:  # DatasetError: one line naming file, line and fix
        raise UserError(one_line(exc)) from None


def _scratch_model(cfg: SFTModelConfig, tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lcfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=pad, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lcfg)
    return model


def _setup(cfg: SFTConfig) -> _Setup:
    """Everything that can fail on bad input, before anything is written."""
    from opdkit.eval.run import load_eval_model, resolve_task, task_examples
    from opdkit.models import check_compatible
    from opdkit.tasks import build_char_tokenizer

    d = cfg.data
    task, max_new, train_examples, eval_examples, scorer, notes, verified = None, 256, None, [], None, [], False
    if d.jsonl is not None:
        train_examples = _load_dataset(d.jsonl, d, completion=d.samples_from is None, answer=False)
        if d.eval_jsonl is not None:
            eval_examples = _load_dataset(d.eval_jsonl, d, completion=False, answer=True)[: d.eval_prompts]
            from opdkit.tasks import get_checker

            try:  # resolved now (it may import a py: module), not at the first evaluation
                scorer = get_checker(d.checker)
            except ValueError as exc:
                raise UserError(f"data.checker: {one_line(exc)}") from None
            from opdkit.tasks.checkers import credits_references, reference_check

            pairs = [((ex.meta or {}).get("completion"), ex.answer) for ex in eval_examples]
            note = reference_check(scorer, pairs, d.checker, knob="data.checker")
            notes += [note] if note else []
            verified = credits_references(scorer, pairs)
    else:
        task, max_new = resolve_task(d.task or "addition", d.task_args)
        eval_examples = task_examples(task, "heldout", d.eval_prompts, seed=0) if d.eval_prompts else []
        scorer = task
    if d.max_new_tokens is not None:
        max_new = d.max_new_tokens

    teacher, teacher_tok = None, None
    if d.samples_from is not None:
        teacher, teacher_tok = load_eval_model(d.samples_from)
        teacher.requires_grad_(False)

    m = cfg.model
    is_char = False
    if m.init is not None:
        model, tok = load_eval_model(m.init)
    else:
        spec = m.tokenizer
        if spec is None:
            spec = "char" if teacher_tok is None else None
        if spec == "char":
            texts = [task.alphabet] if task is not None else []
            for ex in train_examples or []:
                texts += [ex.prompt, ex.completion or ""]
            tok = build_char_tokenizer(texts)
            is_char = True
        elif spec is None:
            tok = teacher_tok
        else:
            from transformers import AutoTokenizer

            if not Path(spec).exists():
                raise UserError(f"model.tokenizer={spec} does not exist; give a tokenizer dir or char")
            try:
                tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise _user(f"model.tokenizer={spec}: cannot load a tokenizer", exc) from None
        if tok.eos_token_id is None:
            raise UserError("the tokenizer has no eos_token; completions must end with one")
        model = _scratch_model(m, tok, cfg.seed)
    if teacher is not None:
        check_compatible(tok, teacher_tok, model, teacher, check_chat_template=False)
    if tok.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; completions must end with one")
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if task is not None and n_pos is not None and n_pos < 64 + max_new:
        raise UserError(f"model.max_position_embeddings={n_pos} is too short for prompts + {max_new} new tokens; "
                        f"raise it to >= {64 + max_new}")
    model.train()
    return _Setup(model, tok, is_char, task, train_examples, eval_examples, scorer, teacher, max_new, notes,
                  f"data.checker={d.checker}" if task is None else None, verified)


# ----------------------------------------------------------------------------------------------------------- training


def _lr_lambda(o: SFTOptimConfig, steps: int):
    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        span = max(1, steps - o.warmup_steps)
        t = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _train_step(model, seqs, pad_id: int, micro: int) -> tuple[float, int]:
    """Accumulate the gradient of the token-mean CE over all target tokens of `seqs`; returns (loss, tokens)."""
    from opdkit.train.sft_data import collate

    n_tok = sum(sum(s.mask[1:]) for s in seqs)
    if n_tok == 0:
        return math.nan, 0
    total = 0.0
    for s in range(0, len(seqs), micro):
        ids, attn, tgt = collate(seqs[s:s + micro], pad_id)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
        m = tgt[:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits[m], ids[:, 1:][m], reduction="sum") / n_tok
        loss.backward()
        total += float(loss.detach())
    return total, n_tok


def _eval(setup: _Setup, cfg: SFTConfig, warn: bool = False) -> dict:
    from opdkit.eval.run import evaluate

    if not setup.eval_examples:
        return {}
    res = evaluate(setup.model, setup.tokenizer, setup.eval_examples, setup.scorer, k=1, temperature=0.0,
                   max_new_tokens=setup.max_new_tokens, batch_size=100, seed=0, keep_records=False,
                   checker_name=setup.checker_name)
    setup.model.train()
    for line in res.get("warnings", []) if warn and not setup.checker_verified else []:  # the trained model scored 0 on everything: said once
        if line not in setup.notes:
            setup.notes.append(line)
            print(line, file=sys.stderr, flush=True)
    return {"eval/accuracy": res["accuracy"], "eval/mean_response_tokens": res["mean_response_tokens"],
            "eval/truncated": res["truncated"]}


def _write_sidecar(setup: _Setup, ckpt: Path) -> None:
    """config.json + tokenizer next to a checkpoint's weights (so `opdkit eval` can load the checkpoint alone)."""
    setup.model.config.save_pretrained(str(ckpt))
    setup.tokenizer.save_pretrained(str(ckpt))


def run_sft(cfg: SFTConfig) -> dict:
    """Train per `cfg`; returns {"steps", "final_dir", "run_dir", "loss", "teacher_tokens", "train_seconds",
    "eval": {...final eval...}, "history": [eval records]}. Bad input -> UserError before anything is written.

    Same guarantees as `opdkit train`: a step with a non-finite loss or gradient norm is skipped and logged
    (sft.max_skipped_steps in a row stop the run with a checkpoint, exit 3); SIGINT/SIGTERM stop after the step
    with a checkpoint; every step appears once in metrics.jsonl (its eval, if any, in the same record)."""
    from opdkit.checkpoint import (latest_checkpoint, load_checkpoint, run_min_bytes, save_checkpoint,
                                   save_model_dir, write_guard)
    from opdkit.train.logging import Progress, check_free_space, check_run_dir, create_run_dir, owned_bytes
    from opdkit.metrics_log import MetricsLogger
    from opdkit.train.sft_data import StepData
    from opdkit.train.signals import GracefulStop

    torch.set_num_threads(cfg.threads)
    setup = _setup(cfg)
    model, tok = setup.model, setup.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.optim, cfg.steps))
    # the run dir is checked, the checkpoint to resume from loaded and the free space checked before anything is
    # written (bad input leaves the file system unchanged)
    chash = config_hash(cfg, HASH_EXCLUDE)
    run_dir = check_run_dir(cfg.run_dir, chash, resume=cfg.resume, overwrite=cfg.overwrite, config=cfg,
                            exclude=HASH_EXCLUDE)
    say = (lambda line: print(line, file=sys.stdout if cfg.progress else sys.stderr, flush=True))  # noqa: E731
    start, extra, history = 0, {}, []
    ck = latest_checkpoint(run_dir, verify=True, notice=say) if cfg.resume else None
    if ck is not None:
        state = load_checkpoint(ck, model, opt, sched)
        start, extra = state["step"], state.get("extra", {})
    check_free_space(run_dir, run_min_bytes(model), "a checkpoint plus the final model",
                     reclaimable_bytes=owned_bytes(run_dir) if cfg.overwrite else 0)
    create_run_dir(run_dir, chash, overwrite=cfg.overwrite, config=cfg)
    teacher_tokens, train_seconds = int(extra.get("teacher_tokens", 0)), float(extra.get("train_seconds", 0.0))
    skipped_streak, skipped_total = int(extra.get("skipped_streak", 0)), int(extra.get("skipped_total", 0))
    if setup.tokenizer_is_char:
        with write_guard(run_dir / "tokenizer"):
            tok.save_pretrained(str(run_dir / "tokenizer"))
    data = StepData(tokenizer=tok, batch_size=cfg.data.batch_size, seed=cfg.seed, task=setup.task,
                    examples=setup.train_examples, perturbed_fraction=cfg.data.perturbed_fraction,
                    recovery=cfg.data.recovery, teacher=setup.teacher, sample_temperature=cfg.data.sample_temperature,
                    sample_top_p=cfg.data.sample_top_p, max_new_tokens=setup.max_new_tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_params = sum(p.numel() for p in model.parameters())
    logger = MetricsLogger(run_dir, resume_step=start if ck is not None else -1)
    progress = Progress(cfg.steps, enabled=cfg.progress, start_step=start, description="sft",
                        keys=("loss", "eval/accuracy", "teacher_tokens", "lr"))
    progress.start()
    progress.print(f"sft: {n_params:,} params, steps {start}->{cfg.steps}, run_dir {run_dir}")
    for line in setup.notes:
        say(line)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(run_dir, step, model.state_dict(), opt, sched, keep_last=cfg.keep_last,
                               sidecar=lambda d: _write_sidecar(setup, d),
                               extra={"teacher_tokens": teacher_tokens, "train_seconds": train_seconds,
                                      "skipped_streak": skipped_streak, "skipped_total": skipped_total})

    def with_eval(step: int, rec: dict, final: bool = False) -> dict:
        t_eval = time.monotonic()
        ev = _eval(setup, cfg, warn=final)
        progress.exclude(time.monotonic() - t_eval)  # the ETA counts training steps, not evals
        if ev:
            rec = {**rec, **ev, "teacher_tokens": teacher_tokens, "train_seconds": train_seconds}
            history.append({"step": step, **rec})
            progress.print(f"step {step}: held-out accuracy {ev['eval/accuracy']:.3f} "
                           f"(teacher_tokens {teacher_tokens}, {train_seconds:.0f}s)")
        return rec

    last_loss, step, final_eval = math.nan, start, {}
    try:
        with GracefulStop() as stop:
            if start == 0:
                rec0 = with_eval(0, {})
                if rec0:
                    logger.log(0, rec0)

            def budget_left() -> bool:
                # Checked before each step: the last step may overshoot max_teacher_tokens by at most one batch.
                return not ((cfg.max_seconds and train_seconds >= cfg.max_seconds)
                            or (cfg.max_teacher_tokens and teacher_tokens >= cfg.max_teacher_tokens))

            while step < cfg.steps and budget_left():
                t0 = time.monotonic()
                seqs, info = data.batch(step)
                opt.zero_grad(set_to_none=True)
                loss, n_tok = _train_step(model, seqs, pad_id, cfg.optim.micro_batch_size)
                gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf))
                lr = sched.get_last_lr()[0]
                skipped = n_tok > 0 and not (math.isfinite(loss) and math.isfinite(gn))
                if skipped:  # never write NaN into the weights: skip the step, state untouched (see opdkit train)
                    opt.zero_grad(set_to_none=True)
                    skipped_streak, skipped_total = skipped_streak + 1, skipped_total + 1
                    say(f"opdkit: sft step {step + 1}: non-finite loss {loss:.4g} / gradient norm {gn:.4g}: "
                        f"optimizer step skipped ({skipped_streak} in a row; the run stops at "
                        f"{cfg.optim.max_skipped_steps})")
                else:
                    opt.step()
                    skipped_streak = 0
                with warnings.catch_warnings():  # a skipped first step: the schedule steps before AdamW did
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    sched.step()
                step += 1
                teacher_tokens += info["teacher_tokens"]
                dt = time.monotonic() - t0
                train_seconds += dt
                last_loss = loss
                rec = {"loss": loss, "lr": lr, "grad_norm": gn, "tokens": n_tok, "teacher_tokens": teacher_tokens,
                       "perturbed": info["perturbed"], "step_seconds": dt, "train_seconds": train_seconds,
                       "skipped": float(skipped), "skipped_total": skipped_total}
                if "teacher_finished" in info:
                    rec["teacher_finished"] = info["teacher_finished"]
                last = step >= cfg.steps or not budget_left()
                if last or (cfg.eval_every and step % cfg.eval_every == 0):
                    rec = with_eval(step, rec, final=last)
                    if last:
                        final_eval = {k: v for k, v in rec.items() if k.startswith("eval/")}
                logger.log(step, rec)
                progress.update(step, rec)
                diverged = skipped_streak >= cfg.optim.max_skipped_steps
                if last or diverged or stop.requested or (cfg.save_every and step % cfg.save_every == 0):
                    ckpt = checkpoint(step)
                if diverged:
                    raise RunFailed(f"{skipped_streak} consecutive sft steps had a non-finite loss or gradient "
                                    f"norm; stopped at step {step} with a checkpoint of the last finite weights "
                                    f"({ckpt}); fix: lower optim.lr or set optim.grad_clip > 0, then resume=true")
                if stop.requested and not last:
                    logger.close()
                    _plots(run_dir, say)
                    raise stop.interrupted(f"opdkit: sft stopped after step {step}; checkpoint {ckpt}; continue "
                                           "with the same command plus resume=true")
            if step == start and (ck is None or not (run_dir / "final").is_dir()):
                # nothing trained in this invocation (a budget already spent, or steps reached): checkpoint once
                checkpoint(step)
                rec = with_eval(step, {}, final=True)
                final_eval = {k: v for k, v in rec.items() if k.startswith("eval/")}
            if step > start or not (run_dir / "final").is_dir():
                save_model_dir(model, tok, run_dir / "final")
    finally:
        progress.close()
        logger.close()
    plots = _plots(run_dir, say)
    return {"run_dir": str(run_dir), "final_dir": str(run_dir / "final"), "steps": step, "loss": last_loss,
            "teacher_tokens": teacher_tokens, "train_seconds": train_seconds, "params": n_params,
            "eval": final_eval, "history": history, "skipped_steps": skipped_total, "plots": plots}


def _plots(run_dir: Path, say) -> list[str]:
    """run_dir/plots/*.png from metrics.jsonl (as `opdkit train` draws them; `opdkit plot <run_dir>` redraws)."""
    from opdkit.report.plots import plot_run

    paths = [str(p) for p in plot_run(run_dir)]
    if paths:
        say(f"sft: {len(paths)} plots in {run_dir / 'plots'}")
    return paths


# ----------------------------------------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str]) -> int:
    from opdkit.eval.run import quiet_transformers, split_cli_args

    if any(a in ("-h", "--help") for a in argv):
        print("usage: opdkit sft [config.yaml] key=value ...\n\n" + help_text(SFTConfig))
        return 0
    path, overrides = split_cli_args(argv)
    cfg = load_config(SFTConfig, path, overrides)
    quiet_transformers()
    res = run_sft(cfg)
    acc = res["eval"].get("eval/accuracy")
    print(f"sft done: {res['steps']} steps, loss {res['loss']:.4f}"
          + (f", held-out accuracy {acc:.3f}" if acc is not None else "") + f"; model in {res['final_dir']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`opdkit sft [config.yaml] key=value ...`; bad input -> one line `opdkit: error: ...` and exit code 2."""
    return run_cli(_main, argv)
