"""Everything `opdkit train` resolves before its first step: models, tokenizer checks, prompt sources.

All of it runs before the run directory is touched, so bad input fails with one line and nothing written.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from opdkit.data.prompts import PromptRecord
from opdkit.errors import UserError, one_line
from opdkit.models import apply_lora, check_compatible, load_causal_lm, load_error, resolve_dtype
from opdkit.specs import embedded_task_info, resolve_model_spec
from opdkit.teacher.hf import frozen_copy


# --------------------------------------------------------------------------------------------- models


def _config_file(spec: str) -> dict | None:
    """A model config file (.json/.yaml) -> dict for a randomly initialised model; None for other specs."""
    if not spec.endswith((".json", ".yaml", ".yml")):
        return None
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"model config file not found: {spec}")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"model config {spec} is not valid JSON/YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"model config {spec} must be a mapping with a model_type (e.g. llama)")
    return data


def load_student(mcfg, seed: int):
    """(student, tokenizer). A config-file student is randomly initialised with `seed` (deterministic)."""
    spec = resolve_model_spec(mcfg.student)
    dtype = resolve_dtype(mcfg.dtype)
    conf = _config_file(spec)
    if conf is not None:
        if not mcfg.tokenizer:
            raise UserError("model.student is a config file: set model.tokenizer to a tokenizer dir")
        torch.manual_seed(seed)
        return load_causal_lm(conf, tokenizer=resolve_model_spec(mcfg.tokenizer), dtype=dtype)
    model, tok = load_causal_lm(spec, dtype=dtype, trust_remote_code=mcfg.trust_remote_code,
                                gguf_cache_dir=mcfg.gguf_cache_dir)
    if mcfg.tokenizer:  # an explicit tokenizer dir overrides the model's own
        from transformers import AutoTokenizer

        tok_dir = resolve_model_spec(mcfg.tokenizer)
        if not Path(tok_dir).is_dir():
            raise UserError(f"model.tokenizer={mcfg.tokenizer!r} is not a directory")
        try:
            tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
            raise load_error("model.tokenizer", tok_dir, exc) from None
    return model, tok


def load_teacher_model(spec: str, mcfg, tcfg, student, student_tok):
    """A frozen HF teacher model from `spec` (teacher.dtype), checked against the student's tokenizer and head."""
    teacher, t_tok = load_causal_lm(resolve_model_spec(spec), dtype=resolve_dtype(tcfg.dtype),
                                    trust_remote_code=mcfg.trust_remote_code, gguf_cache_dir=mcfg.gguf_cache_dir)
    try:
        check_compatible(student_tok, t_tok, student, teacher)
    except UserError as e:  # a single teacher with another tokenizer is still usable: say how
        if tcfg.routes:
            raise
        raise UserError(f"{e}, or set teacher.cross_tokenizer=true with objective.estimator=sampled (the teacher "
                        "scores the student's text in its own tokens, mapped back by chunk alignment; "
                        "docs/cross_tokenizer.md)") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def frozen_self_teacher(cfg, student):
    """OPSD's frozen teacher: the student's initial weights (before LoRA), in teacher.dtype (bf16 scoring is ~1.9x
    faster on CPUs with AMX). None unless teacher.backend=self."""
    if cfg.teacher.backend != "self":
        return None
    return frozen_copy(student).to(resolve_dtype(cfg.teacher.dtype))


def build_teacher(cfg, student, tok, frozen=None, *, pad_token_id: int, source: PromptSource | None = None,
                  dist=None):
    """The teacher backend of a TrainConfig (`opdkit.teacher`), after the student got its LoRA adapters (a live
    self-teacher is the trained student itself): teacher.routes (several teachers) or teacher.backend, wrapped in a
    disk cache when teacher.cache_dir is set. Everything that can fail on bad input fails here, before the run dir is
    written."""
    from opdkit.teacher import HFTeacher, SelfTeacher

    t = cfg.teacher
    if t.routes:
        teacher = routed_teacher(cfg, student, tok, source)
    elif t.backend == "server":
        teacher = server_teacher(cfg, tok, dist=dist)
    elif t.backend in ("self", "self_live"):
        model = frozen if t.backend == "self" else student
        if t.backend == "self" and _placed(dist):
            model = place_teacher(model, t, dist)
        teacher = SelfTeacher(model, tok, t.privileged_template, live=t.backend == "self_live",
                              pad_token_id=pad_token_id, use_chat_template=cfg.data.use_chat_template)
    elif t.cross_tokenizer:
        model, t_tok = cross_tokenizer_teacher_model(cfg, student, tok, dist)
        if _placed(dist):
            model = place_teacher(model, t, dist)
        teacher = HFTeacher(model, name=t.model)
    else:
        model = load_teacher_model(t.model, cfg.model, t, student, tok)
        if _placed(dist):
            model = place_teacher(model, t, dist)
        teacher = HFTeacher(model, name=t.model)
    if t.cache_dir:
        from opdkit.teacher.cache import CachedTeacher

        try:
            teacher = CachedTeacher(teacher, t.cache_dir)
        except BaseException:
            teacher.close()
            raise
    if t.cross_tokenizer:  # outside the cache: the cache keeps the teacher's scores of its own tokens
        from opdkit.teacher.cross_tokenizer import CrossTokenizerTeacher

        n_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        teacher = CrossTokenizerTeacher(teacher, tok, t_tok, use_chat_template=cfg.data.use_chat_template,
                                        max_len=n_pos, chunks=t.cross_tokenizer_chunks)
    return teacher


def cross_tokenizer_teacher_model(cfg, student, tok, dist=None):
    """teacher.cross_tokenizer=true: (frozen teacher model, its own tokenizer). Refused before loading unless the
    estimator is sampled; the tokenizer check runs as usual and, where the tokenizers differ, a notice says what
    cross-tokenizer mode does instead (where they are the same, that the alignment is the identity)."""
    t = cfg.teacher
    if cfg.objective.estimator != "sampled":
        raise UserError(f"teacher.cross_tokenizer=true serves objective.estimator=sampled only, not "
                        f"{cfg.objective.estimator}: top-K ids and full distributions are over the teacher's "
                        "vocabulary, which has no token-by-token map onto the student's; fix: "
                        "objective.estimator=sampled")
    teacher, t_tok = load_causal_lm(resolve_model_spec(t.model), dtype=resolve_dtype(t.dtype),
                                    trust_remote_code=cfg.model.trust_remote_code,
                                    gguf_cache_dir=cfg.model.gguf_cache_dir)
    try:
        check_compatible(tok, t_tok, student, teacher)
        note = ("opdkit: note: teacher.cross_tokenizer=true with a teacher of the student's own tokenizer: the "
                "alignment is the identity wherever the student's tokens are its tokenizer's encoding of their text "
                "(always for a character tokenizer), and the signal then the plain teacher's; "
                "teacher.cross_tokenizer=false scores the student's ids directly")
    except UserError as e:
        diff = str(e).removeprefix("teacher/student mismatch: ").split("; fix:")[0]
        note = (f"opdkit: note: teacher.cross_tokenizer=true: teacher and student tokenizers differ ({diff}); the "
                f"teacher scores each response decoded to text and re-tokenized in its own vocabulary, and its "
                f"log-probs are mapped back to the student's tokens by character-span chunk alignment (sum over "
                f"each chunk, split over the chunk's student tokens by their log-probs); rows whose text does not "
                f"round-trip are left out of the loss (xtok/skipped_rows)")
    if dist is None or dist.is_main:
        print(note, file=sys.stderr, flush=True)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), t_tok


def _placed(dist) -> bool:
    """A local teacher leaves the CPU under torchrun or in one process on a GPU."""
    return dist is not None and (dist.distributed or dist.device.type != "cpu")


def place_teacher(model, tcfg, dist):
    """A local teacher under torchrun: on this rank's device, replicated (teacher.shard=false: every rank scores its
    own rows with a full copy) or sharded with FSDP2 (teacher.shard=true: 1/world of it at rest, gathered for the
    step's scoring)."""
    model.to(dist.device)
    if tcfg.shard and dist.distributed:
        from opdkit.fsdp import shard

        shard(model)
    return model


def routed_teacher(cfg, student, tok, source: PromptSource | None):
    """teacher.routes: one teacher per route key (a model spec, or server:<url>), each checked against the student."""
    from opdkit.teacher import HFTeacher
    from opdkit.teacher.route import RoutedTeacher

    built: dict[str, object] = {}
    try:
        for key, spec in cfg.teacher.routes.items():
            if spec.startswith("server:"):
                built[key] = server_teacher(cfg, tok, url=spec.split(":", 1)[1])
            else:
                built[key] = HFTeacher(load_teacher_model(spec, cfg.model, cfg.teacher, student, tok), name=spec)
        routed = RoutedTeacher(built, source.route_key if source is not None else (lambda r: None))
        if source is not None:  # every key of the data must have a teacher: checked now, not at step 300
            routed.check_keys(source.train_records if source.train_records is not None else source.eval_records)
    except BaseException:
        for t in built.values():
            t.close()
        raise
    return routed


def served_model_dir(cfg) -> str:
    """The HF model directory vLLM serves for teacher.model: the directory itself, or for a .gguf file the
    dequantised safetensors copy opdkit caches (made once if missing)."""
    from opdkit.models import _is_complete_cache, gguf_cache_path

    path = resolve_model_spec(cfg.teacher.model)
    if path.endswith(".gguf") and Path(path).is_file():
        cache = gguf_cache_path(path, cfg.model.gguf_cache_dir)
        if not _is_complete_cache(cache):
            load_causal_lm(path, gguf_cache_dir=cfg.model.gguf_cache_dir)  # dequantises and caches
        if _is_complete_cache(cache):
            return str(cache)
        raise UserError(f"teacher.server.launch: could not cache a dequantised copy of {path} at {cache}; set "
                        "model.gguf_cache_dir to a writable dir")
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"teacher.server.launch serves a HF model directory (config.json + weights) or a .gguf file; "
                        f"teacher.model={cfg.teacher.model} is neither")
    return path


def server_teacher(cfg, tok, url: str | None = None, dist=None):
    """A vLLM teacher server (teacher.server): connected to, or launched on 127.0.0.1 for teacher.model (under
    torchrun by rank 0, every rank connecting to it); its tokenizer checked against the student's `tok`."""
    from opdkit.teacher.server import ServerTeacher

    s = cfg.teacher.server
    launched = None
    if url is None and s.launch and dist is not None and dist.distributed:
        err = None
        if dist.is_main:
            try:
                launched = _launch_teacher_server(cfg)
                url = launched.url
            except UserError as e:
                err = str(e)
        url, err = dist.broadcast((url, err))
        if err:
            raise UserError(err)
    if url is None and s.launch:
        launched = _launch_teacher_server(cfg)
        url = launched.url
    try:
        teacher = ServerTeacher(url or s.url, s.model, timeout_s=s.timeout_s, retries=s.retries,
                                concurrency=s.concurrency, rows_per_request=s.rows_per_request, launched=launched)
        teacher.check_tokenizer(tok)
    except BaseException:
        if launched is not None:
            launched.stop()
        raise
    return teacher


def _launch_teacher_server(cfg):
    from opdkit.teacher.server import LaunchedServer

    s = cfg.teacher.server
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[resolve_dtype(cfg.teacher.dtype)]
    return LaunchedServer(served_model_dir(cfg), python=s.python, dtype=dtype, max_logprobs=s.max_logprobs,
                          kv_cache_gib=s.kv_cache_gib, extra_args=s.launch_args, startup_timeout_s=s.startup_timeout_s)


def maybe_lora(model, mcfg):
    if mcfg.lora_r <= 0:
        return model
    return apply_lora(model, r=mcfg.lora_r, alpha=mcfg.lora_alpha, dropout=mcfg.lora_dropout,
                      target_modules=list(mcfg.lora_target_modules))


# --------------------------------------------------------------------------------------------- prompt sources
@dataclass
class PromptSource:
    """Training prompts drawn per step, held-out eval records, and the answer check."""

    draw: Callable[[random.Random, int], list[PromptRecord]]   # (rng, n) -> n records
    eval_records: list[PromptRecord]
    score: Callable[[str, PromptRecord], float]              # response text -> reward in [0, 1]
    description: str
    route_key: Callable[[PromptRecord], str | None] = lambda r: None  # which teacher of teacher.routes (if any)
    train_records: list[PromptRecord] | None = None  # a dataset's rows (None: generated on the fly by a task)
    notes: list[str] = field(default_factory=list)  # set-up notices (a checker that scores no reference), printed
    env_for: Callable[[PromptRecord], object] | None = None  # multi-turn tasks: the Env of a record's episode
    max_turns: int | None = None  # multi-turn tasks: the tasks' policy-turn limit (rollout.max_turns overrides)


def _record(ex, privileged_field: str | None = None, completion_field: str | None = None) -> PromptRecord:
    meta = dict(ex.meta)
    meta["example"] = ex
    if completion_field or ex.completion is not None:
        meta["completion"] = ex.completion
    privileged = ex.meta.get(privileged_field) if privileged_field else None
    if privileged is None:
        privileged = ex.completion if ex.completion is not None else ex.answer
    return PromptRecord(prompt_text=ex.prompt, answer=ex.answer, privileged=privileged, meta=meta)


def _load_split(spec: str, split: str, dcfg, kw: dict) -> list:
    """The rows of data.prompts that `opdkit train` uses for `split` ("train", or "heldout" for data.eval_prompts).
    The messages name the knobs `opdkit train` has (it has no `split` knob)."""
    from opdkit.tasks import DatasetError, load_examples

    try:
        return load_examples(spec, split=split, **kw)
    except DatasetError as e:
        knob = "" if split == "train" else " (or set data.eval_prompts=0: no held-out evaluation)"
        if e.reason == "no_split":
            raise UserError(f"data.prompts={spec}: a DatasetDict with splits {', '.join(e.splits or [])} and no "
                            f"{split!r} split; opdkit train reads split 'train' for training and 'heldout' for "
                            f"data.eval_prompts: save those splits{knob}") from None
        if e.reason == "empty_split":
            raise UserError(f"data.prompts={spec}: none of its {e.n_rows} rows falls in the {split} split (opdkit "
                            f"puts about 1 row in 10 in the held-out split, by a hash of the prompt): add rows"
                            f"{knob}") from None
        raise UserError(one_line(e)) from None  # already names the file, line and fix


def _load_all(spec: str, dcfg, kw: dict) -> list:
    """Every row of data.prompts (with data.eval_jsonl); a saved DatasetDict: its 'train' split."""
    from opdkit.tasks import DatasetError, load_examples

    try:
        return load_examples(spec, **kw)
    except DatasetError as e:
        if e.reason == "no_split":
            return _load_split(spec, "train", dcfg, kw)
        raise UserError(one_line(e)) from None


def _load_eval_file(dcfg, kw: dict) -> list:
    """Every row of data.eval_jsonl (prompt and answer fields; a reference completion is not needed)."""
    from opdkit.tasks import DatasetError, load_examples

    try:
        return load_examples(dcfg.eval_jsonl, **{**kw, "completion_field": None})
    except DatasetError as e:
        if e.reason == "no_split":
            raise UserError(f"data.eval_jsonl={dcfg.eval_jsonl}: a DatasetDict with splits {', '.join(e.splits or [])}"
                            "; save the held-out split alone") from None
        raise UserError(f"data.eval_jsonl: {one_line(e)}") from None


def prompt_source(dcfg, seed: int) -> PromptSource:
    from opdkit.tasks import get_checker, get_task

    spec = dcfg.prompts
    if spec.startswith("task:"):
        tasks = {}
        for name in spec.split(":", 1)[1].split("+"):
            args: dict = {}
            if name == "embedded":
                info = embedded_task_info()
                name, args = info["task"], dict(info.get("task_args", {}))
            try:
                tasks[name] = get_task(name, **args)
            except (ValueError, TypeError) as e:
                raise UserError(f"data.prompts={spec!r}: {e}") from None
        names = list(tasks)
        # held-out records: split evenly between the tasks (a mixture task:a+b is evaluated on both)
        per = [dcfg.eval_prompts // len(names) + (i < dcfg.eval_prompts % len(names)) for i in range(len(names))]
        eval_records = [_record(ex) for name, n in zip(names, per) for ex in
                        (tasks[name].sample("heldout", n=n, seed=10_007 + seed, unique=True) if n else [])]

        def draw(rng: random.Random, n: int) -> list[PromptRecord]:
            if len(names) == 1:
                return [_record(ex) for ex in tasks[names[0]].sample("train", n=n, seed=rng.randrange(2**31))]
            picks = [names[rng.randrange(len(names))] for _ in range(n)]
            return [_record(tasks[k].sample("train", n=1, seed=rng.randrange(2**31))[0]) for k in picks]

        env_for, max_turns = None, None
        if any(getattr(t, "multi_turn", False) for t in tasks.values()):  # a tool task: episodes with an Env
            from opdkit.tasks.env import SingleTurnEnv

            def env_for(r: PromptRecord):
                t, ex = tasks[r.meta["task"]], r.meta["example"]
                return t.make_env(ex) if getattr(t, "multi_turn", False) else SingleTurnEnv(lambda x: t.score(x, ex))

            max_turns = max(int(getattr(t, "max_turns", 1)) for t in tasks.values())
        return PromptSource(draw, eval_records, lambda text, r: tasks[r.meta["task"]].score(text, r.meta["example"]),
                            f"task {'+'.join(names)}", route_key=lambda r: r.meta.get("task"), env_for=env_for,
                            max_turns=max_turns)

    kw = dict(prompt_field=dcfg.prompt_field, answer_field=dcfg.answer_field, completion_field=dcfg.completion_field,
              messages_field=dcfg.messages_field)
    if dcfg.eval_jsonl is not None:  # a separate test file: all of data.prompts trains, the file is the held-out set
        train = _load_all(spec, dcfg, kw)
        held = _load_eval_file(dcfg, kw) if dcfg.eval_prompts else []
    else:
        train = _load_split(spec, "train", dcfg, kw)
        held = _load_split(spec, "heldout", dcfg, kw) if dcfg.eval_prompts else []
    try:
        checker = get_checker(dcfg.checker)
    except ValueError as e:
        raise UserError(f"data.checker: {one_line(e)}") from None
    train_records = [_record(ex, dcfg.privileged_field, dcfg.completion_field) for ex in train]
    eval_records = [_record(ex, dcfg.privileged_field) for ex in held[: dcfg.eval_prompts]]
    if dcfg.completion_field and any(r.meta.get("completion") is None for r in train_records):
        raise UserError(f"data.completion_field={dcfg.completion_field!r} is missing in some rows of {spec}")

    def draw(rng: random.Random, n: int) -> list[PromptRecord]:
        return [train_records[rng.randrange(len(train_records))] for _ in range(n)]

    def score(text: str, r: PromptRecord) -> float:
        return float(checker(text, r.answer)) if r.answer is not None else 0.0

    route = (lambda r: None if r.meta.get(dcfg.route_field) is None else str(r.meta[dcfg.route_field])) \
        if dcfg.route_field else (lambda r: None)
    if dcfg.route_field and all(route(r) is None for r in train_records):
        raise UserError(f"data.route_field={dcfg.route_field!r} is in no row of {spec}; name a field of its rows")
    from opdkit.tasks.checkers import reference_check

    # a checker that gives no reference completion credit scores 0 on a perfect model too: said before any compute
    note = reference_check(checker, [(r.meta.get("completion"), r.answer) for r in train_records], dcfg.checker,
                           knob="data.checker")
    return PromptSource(draw, eval_records, score, f"{spec} ({len(train_records)} train prompts)", route_key=route,
                        train_records=train_records, notes=[note] if note else [])


# --------------------------------------------------------------------------------------------- checks before the run
PROMPT_CHECK_ROWS = 2048  # train prompts encoded at set-up (all of a dataset up to this many; a task: a draw)


def check_vocab_knobs(cfg, student) -> None:
    """Knobs bounded by the vocabulary, checked against the student's output layer before anything is written:
    objective.top_k (estimator topk) and rollout.top_k."""
    head = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    V = None if head is None or getattr(head, "weight", None) is None else int(head.weight.shape[0])
    if V is None:
        return
    if cfg.objective.estimator == "topk" and cfg.objective.top_k > V:
        raise UserError(f"objective.top_k={cfg.objective.top_k} is larger than the vocabulary ({V} tokens in the "
                        f"student's output layer); fix: objective.top_k <= {V}")
    if cfg.rollout.top_k > V:
        raise UserError(f"rollout.top_k={cfg.rollout.top_k} is larger than the vocabulary ({V} tokens in the "
                        f"student's output layer); fix: rollout.top_k <= {V} (0 = off)")


def unknown_chars(texts, tok, limit: int = 8) -> list[str]:
    """Characters of `texts` that the tokenizer turns into its unk token (first `limit`, in order of appearance);
    [] for tokenizers without one (byte-level BPE encodes every character)."""
    from opdkit.data.prompts import unk_id

    unk = unk_id(tok)
    if unk is None:
        return []
    seen, out = set(), []
    for text in texts:
        for ch in text:
            if ch in seen:
                continue
            seen.add(ch)
            if unk in tok(ch, add_special_tokens=False)["input_ids"]:
                out.append(ch)
                if len(out) >= limit:
                    return out
    return out


def longest_completion(records, tok) -> tuple[int, int] | None:
    """(tokens of the longest reference completion + 1 for EOS, completions checked) over `records` (their
    meta["completion"]: a dataset's completion field, a built-in task's worked solution); None without any."""
    texts = [r.meta.get("completion") for r in records]
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        return None
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids) + 1, len(texts)


def check_prompts(cfg, source: PromptSource, tok, seed: int) -> list[str]:
    """Encode the held-out prompts and the train prompts (a dataset's, up to PROMPT_CHECK_ROWS; a task's: a draw)
    before anything is written. Every train prompt over data.max_prompt_tokens with on_too_long=skip -> UserError
    (the run could not take a step). Returns notice lines: the source's own (a checker that scores no reference
    completion), reference completions longer than rollout.max_new_tokens, prompts over the limit, characters the
    tokenizer turns into <unk> (counted per step in the metrics as prompts_unk_tokens)."""
    from opdkit.data.prompts import prompt_to_ids, unk_id

    d = cfg.data
    if source.train_records is not None:
        rows = source.train_records
        if len(rows) > PROMPT_CHECK_ROWS:
            rows = random.Random(seed).sample(rows, PROMPT_CHECK_ROWS)
        what = (f"{len(rows)} of its {len(source.train_records)} train prompts" if len(rows) < len(
            source.train_records) else f"all {len(rows)} train prompts")
    else:
        rows = source.draw(random.Random(seed), min(PROMPT_CHECK_ROWS, max(256, cfg.rollout.prompts_per_step)))
        what = f"{len(rows)} train prompts drawn"
    lens, unk_tokens, unk_prompts = [], 0, 0
    unk = unk_id(tok)
    for r in list(rows) + list(source.eval_records):
        ids = prompt_to_ids(r.prompt_text, tok, use_chat_template=d.use_chat_template)
        lens.append(len(ids))
        n = sum(1 for i in ids if i == unk) if unk is not None else 0
        unk_tokens += n
        unk_prompts += n > 0
    train_lens = lens[:len(rows)]
    notes = list(source.notes)
    # a dataset's reference completions (built-in tasks: the trainer's limit is the caller's choice, e.g. in tests)
    longest = longest_completion(list(rows) + list(source.eval_records), tok) if source.train_records is not None \
        else None
    if longest is not None and longest[0] > cfg.rollout.max_new_tokens:
        notes.append(f"opdkit: note: the data's longest reference completion is {longest[0]} tokens with EOS "
                     f"(of {longest[1]} checked) but rollout.max_new_tokens={cfg.rollout.max_new_tokens}: longer "
                     "rollouts and held-out answers are cut there (per step: finished_frac, eval/truncated); fix: "
                     f"rollout.max_new_tokens={longest[0]}")
    over = sum(1 for n in train_lens if n > d.max_prompt_tokens)
    if over == len(train_lens) and d.on_too_long == "skip":
        raise UserError(f"data.prompts={d.prompts}: every prompt is longer than data.max_prompt_tokens="
                        f"{d.max_prompt_tokens} ({what}: {min(train_lens)} to {max(train_lens)} tokens); fix: "
                        f"data.max_prompt_tokens={max(train_lens)} or data.on_too_long=truncate")
    if over:
        notes.append(f"opdkit: note: {over} of {what} are longer than data.max_prompt_tokens={d.max_prompt_tokens}"
                     f" (longest {max(train_lens)} tokens): "
                     + ("skipped when drawn" if d.on_too_long == "skip" else "left-truncated"))
    if unk_tokens:
        chars = unknown_chars((r.prompt_text for r in list(rows) + list(source.eval_records)), tok)
        notes.append(f"opdkit: note: {unk_prompts} of {len(lens)} prompts checked hold characters the tokenizer "
                     f"does not know ({', '.join(repr(c) for c in chars) or '?'}): they become "
                     f"{getattr(tok, 'unk_token', '<unk>')} ({unk_tokens} tokens; counted per step as "
                     "prompts_unk_tokens); fix: a tokenizer that covers them, or clean the prompts")
    return notes
