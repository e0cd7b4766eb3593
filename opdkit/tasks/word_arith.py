"""Arithmetic word problems in natural language, for instruct models (e.g. SmolLM2-135M-Instruct).

Prompt: a plain question (no ``Q:``/``A:`` scaffold; the trainer applies the model's chat template), e.g.::

    Tom has 23 apples. He buys 15 more. How many apples does Tom have now?

Reference solution (``Example.completion``; the privileged context of a self-distillation teacher): one sentence
per operation, then a final line with the answer::

    Tom has 23 apples and buys 15 more, so he has 23 + 15 = 38 apples.
    The answer is 38.

The answer is a non-negative integer. :meth:`WordArith.verify` compares the **last number** in the response
(``1,234``, ``38.0``, ``-8`` are read as numbers; ``23-15`` is 23 and 15) with it, so "... = 38 apples." and
"The answer is 38." both count, and anything after the answer that contains a number overrides it.

Canonical problem string (the split key): ``<template>:<numbers>``, e.g. ``add_buy:23,15``. The names and the
item are a deterministic function of that string, so the held-out split is disjoint from the train split in the
arithmetic itself (template + numbers), not merely in the wording.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .base import Example, Perturbation, Task, _as_rng

__all__ = ["WordArith", "last_number"]

NAMES = (("Tom", "he", "his"), ("Anna", "she", "her"), ("Ben", "he", "his"), ("Mia", "she", "her"),
         ("Sam", "he", "his"), ("Lily", "she", "her"), ("Max", "he", "his"), ("Emma", "she", "her"),
         ("Leo", "he", "his"), ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Nina", "she", "her"))
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "cards", "shells", "coins",
         "balloons", "oranges")
FINAL = "The answer is {r}."


@dataclass(frozen=True)
class _Template:
    key: str
    ops: str  # the operations, in order (one step line each)
    question: str
    steps: tuple[str, ...]


# Fields: {N} {P} {p} {poss} (name, pronoun capitalised / lower case, possessive), {M} (another name), {items};
# numbers {a} {b} {c} (given), {s} (intermediate), {r} (result).
TEMPLATES = {t.key: t for t in (
    _Template("add_buy", "+", "{N} has {a} {items}. {P} buys {b} more. How many {items} does {N} have now?",
              ("{N} has {a} {items} and buys {b} more, so {p} has {a} + {b} = {r} {items}.",)),
    _Template("add_two", "+", "{N} has {a} {items} and {M} has {b} {items}. How many {items} do they have together?",
              ("Together they have {a} + {b} = {r} {items}.",)),
    _Template("sub_give", "-", "{N} has {a} {items} and gives {b} of them to {M}. How many {items} does {N} have left?",
              ("{N} gives away {b} of {poss} {a} {items}, so {p} has {a} - {b} = {r} {items} left.",)),
    _Template("sub_more", "-", "{N} has {a} {items} and {M} has {b} {items}. How many more {items} does {N} have "
              "than {M}?", ("{N} has {a} - {b} = {r} more {items} than {M}.",)),
    _Template("mul_box", "*", "{N} buys {a} boxes of {items}. Each box holds {b} {items}. How many {items} does {N} "
              "buy in total?", ("{a} boxes with {b} {items} each make {a} * {b} = {r} {items}.",)),
    _Template("div_share", "/", "{N} shares {a} {items} equally among {b} friends. How many {items} does each "
              "friend get?", ("{a} {items} shared among {b} friends is {a} / {b} = {r} {items} each.",)),
    _Template("add_sub", "+-", "{N} has {a} {items}. {P} buys {b} more and then gives {c} to {M}. How many {items} "
              "does {N} have now?", ("After buying, {N} has {a} + {b} = {s} {items}.",
                                     "After giving {c} to {M}, {p} has {s} - {c} = {r} {items}.")),
    _Template("sub_add", "-+", "{N} has {a} {items}. {P} loses {b} of them and then finds {c} more. How many {items} "
              "does {N} have now?", ("After losing {b}, {N} has {a} - {b} = {s} {items}.",
                                     "After finding {c} more, {p} has {s} + {c} = {r} {items}.")),
    _Template("add_add", "++", "{N} has {a} {items}. On Monday {p} gets {b} more and on Tuesday {c} more. How many "
              "{items} does {N} have now?", ("After Monday, {N} has {a} + {b} = {s} {items}.",
                                             "After Tuesday, {p} has {s} + {c} = {r} {items}.")),
    _Template("mul_add", "*+", "{N} has {a} bags with {b} {items} in each bag and {c} more {items} on the table. "
              "How many {items} does {N} have in total?",
              ("The bags hold {a} * {b} = {s} {items}.",
               "With the {c} on the table, {N} has {s} + {c} = {r} {items}.")),
    _Template("mul_sub", "*-", "{N} buys {a} packs of {items} with {b} {items} in each pack and gives {c} of them to "
              "{M}. How many {items} does {N} have left?", ("The packs hold {a} * {b} = {s} {items}.",
                                                            "After giving {c} to {M}, {N} has {s} - {c} = {r} {items} "
                                                            "left.")),
)}

# A number: optional minus (not after a digit, so "23-15" is 23 and 15), digits with optional thousands commas
# ("1,234"; "23,15" is 23 and 15) and an optional decimal part ("38.0"; a sentence-final "38." is 38).
_NUMBER = re.compile(r"(?<![0-9.])-?[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?")


def last_number(text: Any) -> Decimal | None:
    """The last number in ``text`` as a Decimal (commas dropped), or None (no number, not a string). Never raises."""
    if not isinstance(text, str):
        return None
    try:
        found = _NUMBER.findall(text)
        return Decimal(found[-1].replace(",", "")) if found else None
    except (InvalidOperation, ValueError, IndexError):  # pragma: no cover - the regex only yields valid numbers
        return None


def _apply(op: str, x: int, y: int) -> int:
    return {"+": x + y, "-": x - y, "*": x * y, "/": x // y}[op]


@dataclass(frozen=True)
class _Problem:
    key: str
    nums: tuple[int, ...]  # (a, b) or (a, b, c)


class WordArith(Task):
    """Word problems with ``min_ops..ops`` operations (1 or 2): eleven templates (add / subtract / multiply / share
    equally, and two-step combinations). Additive numbers are in ``2..max_operand``; factors (and quotients) in
    ``2..max_factor``; every intermediate value and the answer are non-negative (subtractions leave >= 1).

    Perturbed completions (:meth:`perturb`): one operation line states a wrong result (off by 1-3, kind
    ``"arith"``); the lines after it are the clean ones (``recovery="resume"``) or the correct line first
    (``"redo"``), and the final answer is correct."""

    name = "word_arith"

    def __init__(self, ops: int = 2, min_ops: int = 1, max_operand: int = 50, max_factor: int = 10):
        if not (1 <= min_ops <= ops <= 2):
            raise ValueError(f"need 1 <= min_ops <= ops <= 2, got min_ops={min_ops}, ops={ops}")
        if max_operand < 5 or max_factor < 2:
            raise ValueError(f"need max_operand >= 5 and max_factor >= 2, got {max_operand}, {max_factor}")
        self.ops = ops
        self.min_ops = min_ops
        self.max_operand = max_operand
        self.max_factor = max_factor
        chars = set("0123456789 \n-+*/=.,?") | set(FINAL)
        for t in TEMPLATES.values():
            chars |= set(t.question) | set("".join(t.steps))
        for n, p, poss in NAMES:
            chars |= set(n + p + p.capitalize() + poss)
        chars |= set("".join(ITEMS))
        self.alphabet = "".join(sorted(c for c in chars if c not in "{}"))

    # ---- problems -------------------------------------------------------------------------------------------
    def _templates(self, n_ops: int) -> list[str]:
        return sorted(k for k, t in TEMPLATES.items() if len(t.ops) == n_ops)

    def _random_problem(self, rng: random.Random) -> _Problem:
        key = rng.choice(self._templates(rng.randint(self.min_ops, self.ops)))
        A, F = self.max_operand, self.max_factor
        ops = TEMPLATES[key].ops
        if ops[0] in "*/":
            a, b = rng.randint(2, F), rng.randint(2, F)
            if ops[0] == "/":
                a = a * b  # a is the product, the answer a // b is in 2..F
        elif ops[0] == "-":
            a = rng.randint(3, A)
            b = rng.randint(1, a - 1)
        else:
            a, b = rng.randint(2, A), rng.randint(2, A)
        if len(ops) == 1:
            return _Problem(key, (a, b))
        s = _apply(ops[0], a, b)
        c = rng.randint(1, s - 1) if ops[1] == "-" else rng.randint(2, A)
        return _Problem(key, (a, b, c))

    def _parse_problem(self, problem: str) -> _Problem:
        key, _, rest = str(problem).partition(":")
        t = TEMPLATES.get(key)
        try:
            nums = tuple(int(x) for x in rest.split(",")) if rest else ()
        except ValueError:
            nums = ()
        if t is None or len(nums) != len(t.ops) + 1 or any(n < 0 for n in nums):
            raise ValueError(f"word_arith problem must look like 'add_buy:23,15' (templates: "
                             f"{', '.join(sorted(TEMPLATES))}), got {problem!r}")
        a, b = nums[0], nums[1]
        if t.ops[0] == "/" and (b == 0 or a % b):
            raise ValueError(f"word_arith problem {problem!r}: {a} is not divisible by {b}")
        s = _apply(t.ops[0], a, b)
        if s < 1 or (len(nums) == 3 and _apply(t.ops[1], s, nums[2]) < 1):
            raise ValueError(f"word_arith problem {problem!r}: intermediate values and the answer must be >= 1")
        return _Problem(key, nums)

    def _canonical(self, obj: _Problem) -> str:
        return f"{obj.key}:{','.join(map(str, obj.nums))}"

    def _surface(self, obj: _Problem) -> dict[str, str]:
        """Names and item: a deterministic function of the canonical problem string."""
        h = hashlib.sha256(f"{self.name}/surface:{self._canonical(obj)}".encode()).digest()
        rng = random.Random(int.from_bytes(h[:8], "big"))
        (n, p, poss), (m, _, _) = rng.sample(NAMES, 2)
        return {"N": n, "P": p.capitalize(), "p": p, "poss": poss, "M": m, "items": rng.choice(ITEMS)}

    def _values(self, obj: _Problem) -> dict[str, int]:
        ops = TEMPLATES[obj.key].ops
        a, b = obj.nums[0], obj.nums[1]
        s = _apply(ops[0], a, b)
        v = {"a": a, "b": b, "s": s, "r": s}
        if len(ops) == 2:
            v["c"] = obj.nums[2]
            v["r"] = _apply(ops[1], s, obj.nums[2])
        return v

    def _solve(self, obj: _Problem) -> tuple[list[str], str, dict[str, Any]]:
        t, f = TEMPLATES[obj.key], {**self._surface(obj), **self._values(obj)}
        steps = [line.format(**f) for line in t.steps]
        return steps, str(f["r"]), {"template": obj.key, "numbers": list(obj.nums)}

    def _question(self, obj: _Problem) -> str:
        return TEMPLATES[obj.key].question.format(**self._surface(obj), **self._values(obj))

    def _example(self, obj: _Problem) -> Example:
        problem = self._canonical(obj)
        steps, answer, extra = self._solve(obj)
        completion = "\n".join([*steps, FINAL.format(r=answer)])
        meta = {"task": self.name, "problem": problem, "split": self.split_of(problem), **extra}
        return Example(prompt=self._question(obj), answer=answer, completion=completion, meta=meta)

    # ---- verification ---------------------------------------------------------------------------------------
    def verify(self, completion_text: Any, example: Example) -> bool:
        """True iff the last number in the text equals ``example.answer`` numerically (``38``, ``38.0``, ``1,234``).
        Never raises: garbage, ``None`` or non-strings give False."""
        got = last_number(completion_text)
        if got is None:
            return False
        try:
            return got == Decimal(str(example.answer).replace(",", "").strip())
        except (InvalidOperation, ValueError, AttributeError):
            return False

    # ---- perturbed completions --------------------------------------------------------------------------------
    def _corrupt_step(self, obj: _Problem, step: int, rng: random.Random) -> tuple[str, str]:
        t, f = TEMPLATES[obj.key], {**self._surface(obj), **self._values(obj)}
        field = "s" if len(t.ops) == 2 and step == 0 else "r"
        true = f[field]
        f[field] = rng.choice([v for v in range(max(0, true - 3), true + 4) if v != true])
        return t.steps[step].format(**f), "arith"

    def perturb(self, example: Example, rng: random.Random | int | None = None,
                recovery: str = "resume") -> Perturbation:
        """One operation line with a wrong result (off by 1-3), then a correct recovery and the correct final line;
        ``completion[error_start:error_end]`` is the wrong line (newline included). See :meth:`Task.perturb`."""
        if recovery not in ("resume", "redo"):
            raise ValueError(f"unknown recovery {recovery!r}: use 'resume' or 'redo'")
        rng = _as_rng(rng)
        if not example.meta.get("problem"):
            raise ValueError(f"{self.name}: example has no meta['problem']; build it with sample() or make_example()")
        obj = self._parse_problem(example.meta["problem"])
        steps, answer, _ = self._solve(obj)
        k = rng.randrange(len(steps))
        bad, kind = self._corrupt_step(obj, k, rng)
        rest = steps[k + 1:] if recovery == "resume" else steps[k:]
        head = "".join(s + "\n" for s in steps[:k])
        text = head + bad + "\n" + "".join(s + "\n" for s in rest) + FINAL.format(r=answer)
        return Perturbation(text, len(head), len(head) + len(bad) + 1, k, kind)

    def max_completion_chars(self) -> int:
        """Upper bound on any completion (clean or perturbed, incl. one extra line for ``recovery="redo"``)."""
        width = len(str(max(3 * self.max_operand, self.max_factor**2 + self.max_operand))) + 1
        num = "9" * width
        longest = {"N": max((n for n, _, _ in NAMES), key=len), "M": max((n for n, _, _ in NAMES), key=len),
                   "P": "She", "p": "she", "poss": "her", "items": max(ITEMS, key=len),
                   **{k: num for k in "abcsr"}}
        best = 0
        for t in TEMPLATES.values():
            lines = [s.format(**longest) for s in t.steps]
            total = sum(len(x) + 1 for x in lines) + max(len(x) + 1 for x in lines) + len(FINAL.format(r=num))
            best = max(best, total)
        return best
