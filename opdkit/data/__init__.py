"""Prompt data: records, encoding, privileged teacher prompts."""

from opdkit.data.prompts import (
    DEFAULT_TEACHER_TEMPLATE,
    PromptRecord,
    encode_prompts,
    prompt_to_ids,
    teacher_prompt_text,
    teacher_records,
)

__all__ = [
    "DEFAULT_TEACHER_TEMPLATE",
    "PromptRecord",
    "encode_prompts",
    "prompt_to_ids",
    "teacher_prompt_text",
    "teacher_records",
]
