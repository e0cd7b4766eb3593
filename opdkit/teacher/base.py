"""The teacher seam: what a teacher is asked for (`TeacherRequest`) and what every backend provides (`Teacher`).

    request = TeacherRequest.for_objective(cfg.objective, chunk_size=cfg.teacher.score_chunk_size)
    check_serves(teacher, request)                  # before any compute: one-line UserError if it cannot
    signal = teacher.score(batch, request)          # SampledSignal | TopKSignal | FullSignal for the response tokens

Backends, one file each: `hf.py` (HFTeacher: a HF causal LM in this process; SelfTeacher: OPSD, the student with
privileged context), `server.py` (a vLLM server's prompt log-probs), `cache.py` (teacher scores on disk, around any
backend), `route.py` (several teachers chosen per prompt). The objective declares the signal it needs (verl's
distillation losses do the same); a teacher computes exactly that and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from opdkit.errors import UserError
from opdkit.objectives.signals import SIGNAL_KINDS, TeacherSignal
from opdkit.rollout.batch import RolloutBatch


@dataclass(frozen=True)
class TeacherRequest:
    """What the objective needs from the teacher at every response position.

    kind: "sampled" (the sampled token's log-prob), "topk" (top-K log-probs + ids) or "full" (the whole
    distribution); top_k: K for "topk"; need_sampled: "topk" also returns the sampled token's log-prob;
    temperature: the teacher's logits are divided by it; chunk_size: positions per log-softmax chunk (memory);
    vocab_size: restrict the distribution to the first V ids (a padded lm_head)."""

    kind: str
    top_k: int | None = None
    need_sampled: bool = False
    temperature: float = 1.0
    chunk_size: int = 1024
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"TeacherRequest.kind={self.kind!r} is not one of {', '.join(SIGNAL_KINDS)}")
        if self.kind == "topk" and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"TeacherRequest.top_k={self.top_k!r} must be an integer >= 1 for kind topk")
        if not self.temperature > 0:
            raise ValueError(f"TeacherRequest.temperature={self.temperature} must be > 0")

    @classmethod
    def for_objective(cls, objective, *, chunk_size: int = 1024, temperature: float = 1.0) -> TeacherRequest:
        """The request an `ObjectiveConfig` implies (its `teacher_signal`, K, whether the sampled token is needed)."""
        kind = objective.teacher_signal
        return cls(kind=kind, top_k=objective.top_k if kind == "topk" else None,
                   need_sampled=bool(objective.needs_sampled_teacher_logprobs) and kind == "topk",
                   temperature=temperature, chunk_size=chunk_size)

    def score_kwargs(self) -> dict:
        """Keyword arguments of `opdkit.teacher.hf.score` for this request."""
        kw = {"signal": self.kind, "need_sampled": self.need_sampled, "chunk_size": self.chunk_size,
              "temperature": self.temperature, "vocab_size": self.vocab_size}
        if self.kind == "topk":
            kw["top_k"] = self.top_k
        return kw


@runtime_checkable
class Teacher(Protocol):
    """A teacher backend. `kinds`: the signal kinds it can serve; `score(batch, request)`: the signal for the
    batch's response tokens (positions outside `response_mask_BT` get log-prob 0 / id 0); `identity()`: a string that
    changes whenever its scores could (model, weights, dtype, prompt template) — the cache key — or None when the
    scores change during training (a live self-teacher); `describe()`: a short text for the run summary; `close()`:
    release what it holds (a server it started); `stats()`: counters since the last call, logged with each step
    (requests, cache hits, per-teacher token counts)."""

    kinds: frozenset[str]

    def score(self, batch: RolloutBatch, request: TeacherRequest) -> TeacherSignal: ...

    def identity(self) -> str | None: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...

    def stats(self) -> dict: ...


def check_serves(teacher: Teacher, request: TeacherRequest, what: str = "the teacher") -> None:
    """One-line UserError, before any compute, when `teacher` cannot serve `request`."""
    if request.kind not in teacher.kinds:
        hint = ""
        if request.kind == "full":
            hint = ("; use objective.estimator=topk (a served teacher returns its top-K), or a teacher in this "
                    "process (teacher.backend=hf)")
        raise UserError(f"{what} ({teacher.describe()}) cannot serve objective.estimator={request.kind}: it serves "
                        f"{', '.join(sorted(teacher.kinds))}{hint}")
    validate = getattr(teacher, "validate", None)  # a backend's own checks (a server asks for K once)
    if validate is not None:
        validate(request)
