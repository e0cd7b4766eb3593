"""Teacher backends: the declared teacher signal for the response positions (see `opdkit.teacher.base`)."""

from opdkit.teacher.base import Teacher, TeacherRequest, check_serves
from opdkit.teacher.hf import (
    HFTeacher,
    SelfTeacher,
    TeacherInputs,
    build_teacher_inputs,
    frozen_copy,
    head_matches_logits,
    score,
    score_rollout,
)

__all__ = [
    "HFTeacher",
    "SelfTeacher",
    "Teacher",
    "TeacherInputs",
    "TeacherRequest",
    "build_teacher_inputs",
    "check_serves",
    "frozen_copy",
    "head_matches_logits",
    "score",
    "score_rollout",
]
