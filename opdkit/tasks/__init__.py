"""Verifiable tasks and data for on-policy distillation.

* Built-in synthetic tasks (:class:`Addition` ``"addition"``, :class:`ArithChain` ``"arith_chain"``; :class:`Calc`
  ``"calc"``, a multi-turn tool task with an :class:`Env`, ``opdkit.tasks.env``): seeded, unlimited generators with a hash-based train/held-out split, exact verifiers and perturbed-prefix completions.
* :func:`load_examples`: user datasets from local JSONL files or ``save_to_disk`` directories.
* :func:`get_checker`: answer checkers for user data (``math_verify``, ``marker:<TEXT>``, ``py:<module>:<function>``).
* :func:`build_char_tokenizer`: a character-level Hugging Face tokenizer.

See ``docs/tasks.md``.
"""

from __future__ import annotations

from .addition import Addition
from .arith_chain import ArithChain
from .calc import Calc
from .base import ANSWER_MARKER, SPLITS, Example, Perturbation, Task, extract_answer, split_of
from .checkers import Checker, get_checker
from .env import Env, EnvStep
from .data import DatasetError, format_prompt, load_examples
from .tokenizer import SPECIAL_TOKENS, build_char_tokenizer
from .word_arith import WordArith

__all__ = [
    "ANSWER_MARKER",
    "SPLITS",
    "SPECIAL_TOKENS",
    "TASKS",
    "Addition",
    "ArithChain",
    "Calc",
    "Env",
    "EnvStep",
    "Checker",
    "DatasetError",
    "Example",
    "Perturbation",
    "Task",
    "build_char_tokenizer",
    "extract_answer",
    "format_prompt",
    "get_checker",
    "get_task",
    "load_examples",
    "split_of",
]

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (Addition, ArithChain, WordArith, Calc)}


def get_task(name: str, **kwargs) -> Task:
    """The built-in task ``name`` configured with ``kwargs`` (e.g. ``get_task("addition", digits=4)``).

    Raises ``ValueError("unknown task 'foo': known tasks are addition, arith_chain")`` for an unknown name and
    ``TypeError`` naming the accepted options for a bad keyword."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: known tasks are {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    try:
        return cls(**kwargs)
    except TypeError as e:
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise TypeError(f"task {name!r}: {e}; accepted options are {', '.join(params)}") from None
