"""Teacher scoring: the declared teacher signal for the response positions, chunked over the vocabulary."""

from opdkit.teacher.hf import (
    TeacherInputs,
    build_teacher_inputs,
    frozen_copy,
    head_matches_logits,
    score,
    score_kwargs,
    score_rollout,
)

__all__ = [
    "TeacherInputs",
    "build_teacher_inputs",
    "frozen_copy",
    "head_matches_logits",
    "score",
    "score_kwargs",
    "score_rollout",
]
