"""Prompts: records, encoding to token ids (chat template or plain text), privileged teacher prompts (OPSD).

- `PromptRecord`: one prompt, its reference answer (for a task reward / eval), privileged context for a
  self-distillation teacher, and free-form metadata.
- `encode_prompts(records, tokenizer, ...)`: token ids per prompt plus a report of what happened to over-long
  prompts (skipped or left-truncated, always counted, never silent).
- `teacher_prompt_text(record, template)`: the teacher's prompt text with the privileged context filled in; the
  student's prompt is `record.prompt_text` alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

from opdkit.errors import UserError

log = logging.getLogger(__name__)

ON_TOO_LONG = ("skip", "truncate")
DEFAULT_TEACHER_TEMPLATE = "{prompt}\n\nReference solution: {privileged}\n"


@dataclass
class PromptRecord:
    prompt_text: str
    answer: str | None = None
    privileged: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def unk_id(tokenizer) -> int | None:
    """The id characters unknown to `tokenizer` become, or None: none for byte-level tokenizers, and none when the
    unk token is also its BOS/EOS/PAD token (GPT-2 style: the template's own special tokens are not unknown text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    others = {getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return None if unk is None or unk in others else int(unk)


def prompt_to_ids(
    text: str, tokenizer, *, use_chat_template: bool | None = None, system_prompt: str | None = None
) -> list[int]:
    """Token ids of one prompt. Chat template (user message = text, add_generation_prompt=True) when the tokenizer
    has one and `use_chat_template` is not False; otherwise plain text (system prompt + blank line first, if any)
    with the tokenizer's BOS prepended when it has one."""
    if use_chat_template and not has_chat_template(tokenizer):
        raise UserError("use_chat_template=True but the tokenizer has no chat template; fix: set it to false")
    if use_chat_template is not False and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template renders BOS itself when the model wants one; do not add special tokens twice
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    plain = f"{system_prompt}\n\n{text}" if system_prompt else text
    ids = list(tokenizer(plain, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + ids


def encode_prompts(
    records: Sequence[PromptRecord | str],
    tokenizer,
    *,
    use_chat_template: bool | None = None,
    max_prompt_tokens: int,
    on_too_long: str = "skip",
    system_prompt: str | None = None,
) -> tuple[list[list[int]], dict[str, Any]]:
    """Encode prompts; returns `(ids_per_kept_prompt, report)`.

    on_too_long: "skip" drops prompts longer than `max_prompt_tokens`; "truncate" keeps their LAST
    `max_prompt_tokens` tokens (left truncation: the end of a prompt, with the generation header, matters most).
    report: n_records, n_kept, n_too_long, n_skipped, n_truncated, max_len (longest before truncation),
    n_unk_tokens (tokens that are the tokenizer's unk token: characters it does not know, never silent),
    kept_indices (index into `records` of each returned prompt, to find its answer / privileged text).
    Every prompt skipped (or no records) -> UserError.
    """
    if on_too_long not in ON_TOO_LONG:
        raise UserError(f"on_too_long={on_too_long!r} is not one of {', '.join(ON_TOO_LONG)}")
    if not isinstance(max_prompt_tokens, int) or isinstance(max_prompt_tokens, bool) or max_prompt_tokens < 1:
        raise UserError(f"max_prompt_tokens={max_prompt_tokens!r} must be an integer >= 1")
    if len(records) == 0:
        raise UserError("no prompts to encode; fix: check the prompt file / dataset split")
    out: list[list[int]] = []
    kept: list[int] = []
    n_too_long = n_skipped = n_truncated = max_len = n_unk = 0
    unk = unk_id(tokenizer)
    for i, rec in enumerate(records):
        text = rec.prompt_text if isinstance(rec, PromptRecord) else str(rec)
        ids = prompt_to_ids(text, tokenizer, use_chat_template=use_chat_template, system_prompt=system_prompt)
        if unk is not None:
            n_unk += sum(1 for t in ids if t == unk)
        max_len = max(max_len, len(ids))
        if len(ids) > max_prompt_tokens:
            n_too_long += 1
            if on_too_long == "skip":
                n_skipped += 1
                continue
            ids = ids[-max_prompt_tokens:]
            n_truncated += 1
        out.append(ids)
        kept.append(i)
    report = {
        "n_records": len(records),
        "n_kept": len(out),
        "n_too_long": n_too_long,
        "n_skipped": n_skipped,
        "n_truncated": n_truncated,
        "max_len": max_len,
        "n_unk_tokens": n_unk,
        "kept_indices": kept,
    }
    if n_too_long:
        log.warning(
            "%d of %d prompts exceed max_prompt_tokens=%d (longest %d): %d skipped, %d left-truncated",
            n_too_long, len(records), max_prompt_tokens, max_len, n_skipped, n_truncated,
        )
    if not out:
        raise UserError(
            f"all {len(records)} prompts exceed max_prompt_tokens={max_prompt_tokens} (longest {max_len} tokens); "
            "fix: raise max_prompt_tokens or set on_too_long=truncate"
        )
    return out, report


def check_teacher_template(template: str) -> None:
    missing = [k for k in ("{prompt}", "{privileged}") if k not in template]
    if missing:
        raise UserError(
            f"teacher prompt template {template!r} lacks {' and '.join(missing)}; fix: include both {{prompt}} and "
            "{privileged}"
        )


def teacher_prompt_text(record: PromptRecord, template: str = DEFAULT_TEACHER_TEMPLATE) -> str:
    """The self-distillation (OPSD) teacher's prompt: `template` with {prompt} and {privileged} filled in.

    Plain substitution (not str.format), so braces elsewhere in the template or in the texts (LaTeX) are kept.
    The student's prompt is `record.prompt_text` alone and never contains the privileged text.
    """
    check_teacher_template(template)
    if record.privileged is None:
        raise UserError(
            "a self-distillation teacher needs privileged context but a record has none; fix: give every record a "
            "privileged field (e.g. the reference solution)"
        )
    # fill {privileged} first so a literal "{prompt}" inside the privileged text is not expanded
    return template.replace("{privileged}", "\0PRIV\0").replace("{prompt}", record.prompt_text).replace(
        "\0PRIV\0", record.privileged
    )


def teacher_records(records: Sequence[PromptRecord], template: str = DEFAULT_TEACHER_TEMPLATE) -> list[PromptRecord]:
    """Records whose prompt_text is the teacher's privileged prompt (encode them with `encode_prompts`, using the
    same settings as the student's, then align rows through `report["kept_indices"]`)."""
    return [PromptRecord(teacher_prompt_text(r, template), r.answer, r.privileged, dict(r.meta)) for r in records]
