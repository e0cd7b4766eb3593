"""Shared pieces of the built-in tasks: the :class:`Example` record, the deterministic train/held-out split
rule, answer extraction after a marker, and the :class:`Task` base class (sampling, verification,
perturbed-prefix completions).

A built-in task writes its worked solution as a list of *step lines* followed by a final line
``=> ANSWER``; the completion is ``"\\n".join(steps + ["=> " + answer]) + "\\n"``.  Subclasses only say how
to generate / parse a problem, how to write its steps, and how to write one step wrongly.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = [
    "ANSWER_MARKER",
    "SPLITS",
    "Example",
    "Perturbation",
    "Task",
    "extract_answer",
    "split_of",
]

ANSWER_MARKER = "=>"
SPLITS = ("train", "heldout")
HELDOUT_MOD = 10  # 1 problem in 10 is held out


@dataclass
class Example:
    """One problem.  ``completion`` is the reference worked solution (``None`` for user data that has none);
    ``meta`` carries task-specific fields, for the built-in tasks at least ``task``, ``problem`` (the canonical
    problem string the split is derived from) and ``split``."""

    prompt: str
    answer: str
    completion: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Perturbation:
    """A perturbed-prefix completion: ``completion[error_start:error_end]`` is the erroneous step line (newline
    included); everything from ``error_end`` on is the recovery.  ``step`` is the 0-based index of the step that
    was written wrongly, ``kind`` names the kind of mistake."""

    completion: str
    error_start: int
    error_end: int
    step: int
    kind: str


def split_of(problem: str, task: str) -> str:
    """``"heldout"`` if ``sha256(f"{task}:{problem}")`` (first 8 bytes, big-endian) is 0 mod 10, else ``"train"``.

    The split depends only on the task name and the canonical problem string, so every generator seed and every
    difficulty setting agree on it and the two splits never share a problem."""
    digest = hashlib.sha256(f"{task}:{problem}".encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_MOD == 0 else "train"


def extract_answer(text: Any, marker: str = ANSWER_MARKER) -> str | None:
    """The stripped text after the last ``marker`` in ``text``, up to the end of that line; ``None`` if ``text``
    is not a string or has no marker.  Never raises."""
    if not isinstance(text, str) or not isinstance(marker, str) or not marker:
        return None
    pos = text.rfind(marker)
    if pos < 0:
        return None
    return text[pos + len(marker) :].split("\n", 1)[0].strip()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split


def _as_rng(rng: random.Random | int | None) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if rng is None or isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random or an int seed, got {type(rng).__name__}")


class Task:
    """Base class of the built-in verifiable tasks.

    Prompt format: ``"Q: <problem>\\nA: "``; the completion follows directly and ends with ``"\\n"``.
    Subclasses set ``name`` and ``alphabet`` and implement :meth:`_random_problem`, :meth:`_parse_problem`,
    :meth:`_solve` and :meth:`_corrupt_step`.
    """

    name: str = ""
    alphabet: str = ""
    max_tries: int = 100_000  # rejection-sampling guard (a held-out split of a tiny problem space)

    # ---- subclass hooks -------------------------------------------------------------------------------------
    def _random_problem(self, rng: random.Random) -> Any:  # pragma: no cover - abstract
        """A random problem object (task-specific) within the configured difficulty."""
        raise NotImplementedError

    def _parse_problem(self, problem: str) -> Any:  # pragma: no cover - abstract
        """Problem object from its canonical string; ``ValueError`` if malformed."""
        raise NotImplementedError

    def _canonical(self, obj: Any) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _solve(self, obj: Any) -> tuple[list[str], str, dict[str, Any]]:  # pragma: no cover - abstract
        """(step lines, answer, extra meta) of a problem."""
        raise NotImplementedError

    def _corrupt_step(self, obj: Any, step: int, rng: random.Random) -> tuple[str, str]:  # pragma: no cover
        """(wrong version of step line ``step``, kind of mistake); must differ from the clean line."""
        raise NotImplementedError

    def max_completion_chars(self) -> int:  # pragma: no cover - abstract
        """Upper bound on the length of any completion (clean or perturbed) at this difficulty."""
        raise NotImplementedError

    # ---- public API -----------------------------------------------------------------------------------------
    @staticmethod
    def format_prompt(problem: str) -> str:
        return f"Q: {problem}\nA: "

    def split_of(self, problem: str) -> str:
        return split_of(problem, self.name)

    def make_example(self, problem: str) -> Example:
        """The :class:`Example` of a canonical problem string (e.g. ``"357+468"``)."""
        obj = self._parse_problem(problem)
        return self._example(obj)

    def _example(self, obj: Any) -> Example:
        problem = self._canonical(obj)
        steps, answer, extra = self._solve(obj)
        completion = "\n".join([*steps, f"{ANSWER_MARKER} {answer}"]) + "\n"
        meta = {"task": self.name, "problem": problem, "split": self.split_of(problem), **extra}
        return Example(prompt=self.format_prompt(problem), answer=answer, completion=completion, meta=meta)

    def iterate(self, split: str = "train", seed: int = 0, unique: bool = False) -> Iterator[Example]:
        """Unlimited, seeded stream of examples of ``split`` (``"train"`` or ``"heldout"``).  Problems are drawn
        from the configured difficulty and kept when :func:`split_of` puts them in ``split``; with ``unique`` a
        problem is yielded at most once (the stream ends with ``ValueError`` when the space runs out)."""
        _check_split(split)
        rng = random.Random(seed)
        seen: set[str] = set()
        misses = 0
        while True:
            obj = self._random_problem(rng)
            problem = self._canonical(obj)
            if self.split_of(problem) != split or (unique and problem in seen):
                misses += 1
                if misses > self.max_tries:
                    raise ValueError(
                        f"{self.name}: no new {split!r} problem in {self.max_tries} draws; the problem space of "
                        f"this difficulty is too small (raise the difficulty or sample fewer / non-unique)"
                    )
                continue
            misses = 0
            if unique:
                seen.add(problem)
            yield self._example(obj)

    def sample(self, split: str = "train", n: int = 1, seed: int = 0, unique: bool = False) -> list[Example]:
        """``n`` examples of ``split``; the same arguments always give the same list."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        it = self.iterate(split, seed=seed, unique=unique)
        return [next(it) for _ in range(n)]

    def verify(self, completion_text: Any, example: Example) -> bool:
        """True iff the text after the last ``=>`` (stripped, to end of line) equals ``example.answer``.
        Never raises: garbage, ``None`` or non-strings give False."""
        got = extract_answer(completion_text)
        return got is not None and got == example.answer

    def score(self, completion_text: Any, example: Example) -> float:
        return 1.0 if self.verify(completion_text, example) else 0.0

    def perturb(self, example: Example, rng: random.Random | int | None = None, recovery: str = "resume") -> Perturbation:
        """A completion whose step ``k`` (uniform over the step lines) is written wrongly, followed by a correct
        recovery that ends in the correct final answer.

        ``recovery="resume"`` (default): the lines after the wrong one are exactly the clean solution's lines
        ``k+1, ...``, i.e. the solution carries on as if step ``k`` had been right (state is recomputed from the
        problem, not from the erroneous line).  ``recovery="redo"``: the wrong line is followed by the correct
        line ``k`` and then the rest of the clean solution.  In both modes the final ``=> ANSWER`` is correct
        and the text differs from the clean completion.  When training a teacher on these, mask the loss on
        ``completion[error_start:error_end]`` so it learns the recovery, not the mistake."""
        if recovery not in ("resume", "redo"):
            raise ValueError(f"unknown recovery {recovery!r}: use 'resume' or 'redo'")
        rng = _as_rng(rng)
        obj = self._parse_problem(example.meta.get("problem", "")) if example.meta.get("problem") else None
        if obj is None:
            raise ValueError(f"{self.name}: example has no meta['problem']; build it with sample() or make_example()")
        steps, answer, _ = self._solve(obj)
        k = rng.randrange(len(steps))
        bad, kind = self._corrupt_step(obj, k, rng)
        if bad == steps[k]:  # subclasses guarantee this; keep the promise even if one slips
            raise AssertionError(f"{self.name}: corrupted step equals the clean step {bad!r}")
        rest = steps[k + 1 :] if recovery == "resume" else steps[k:]
        head = "".join(s + "\n" for s in steps[:k])
        text = head + bad + "\n" + "".join(s + "\n" for s in rest) + f"{ANSWER_MARKER} {answer}\n"
        return Perturbation(text, len(head), len(head) + len(bad) + 1, k, kind)

    def perturbed_completion(self, example: Example, rng: random.Random | int | None = None, recovery: str = "resume") -> str:
        """The text of :meth:`perturb` (see there): one wrong step line, then a correct recovery, then the
        correct final answer."""
        return self.perturb(example, rng, recovery).completion

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
