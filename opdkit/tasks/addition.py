"""Multi-digit addition written column by column, right to left, with carries.

Prompt ``"Q: 357+468\\nA: "``; completion (one line per column, then one for a final carry, then the answer)::

    7+8+0=15 5
    5+6+1=12 25
    3+4+1=8 825
    => 825

Each column line is ``a+b+c=s p``: the two digits of the column (``0`` where an operand is shorter), the carry
in, their sum, and the partial result so far (``s mod 10`` written in front of the previous partial result).
The carry into the next column is ``s // 10``; a final carry gets its own line ``0+0+1=1 1...``.  The last
partial result is the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Task

__all__ = ["Addition"]


@dataclass(frozen=True)
class _Problem:
    a: int
    b: int


def _columns(a: int, b: int) -> list[tuple[int, int, int]]:
    """(digit of a, digit of b, carry in) of each column, right to left, including a final carry column."""
    da, db = str(a)[::-1], str(b)[::-1]
    cols, carry, i = [], 0, 0
    while i < max(len(da), len(db)) or carry:
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        cols.append((x, y, carry))
        carry = (x + y + carry) // 10
        i += 1
    return cols


def _line(x: int, y: int, c: int, s: int, partial: str) -> str:
    return f"{x}+{y}+{c}={s} {partial}"


class Addition(Task):
    """``a+b`` with operands of ``min_digits..digits`` digits (lengths drawn independently, no leading zeros).

    Perturbed completions (:meth:`perturb`): one column line is written wrongly, in one of three ways —
    ``"sum"`` (the sum is off by 1-3), ``"carry"`` (the carry in is flipped), ``"digit"`` (an operand digit is
    miscopied); the line is internally consistent with its mistake (its partial result uses the wrong digit).
    The lines after it follow the correct carry logic of the problem (the true carry and the true partial
    result) — with ``recovery="redo"`` the wrong line is first followed by its correct version — so the final
    answer is correct.
    """

    name = "addition"
    alphabet = "0123456789+=> \nQA:"

    def __init__(self, digits: int = 3, min_digits: int = 1):
        if not (1 <= min_digits <= digits):
            raise ValueError(f"need 1 <= min_digits <= digits, got min_digits={min_digits}, digits={digits}")
        self.digits = digits
        self.min_digits = min_digits

    def _random_problem(self, rng: random.Random) -> _Problem:
        def operand() -> int:
            n = rng.randint(self.min_digits, self.digits)
            return rng.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

        a = operand()
        return _Problem(a, operand())

    def _parse_problem(self, problem: str) -> _Problem:
        parts = problem.split("+")
        if len(parts) != 2 or not all(p.isdigit() and p.isascii() and (p == "0" or p[0] != "0") for p in parts):
            raise ValueError(f"addition problem must look like '123+45', got {problem!r}")
        return _Problem(int(parts[0]), int(parts[1]))

    def _canonical(self, obj: _Problem) -> str:
        return f"{obj.a}+{obj.b}"

    def _solve(self, obj: _Problem) -> tuple[list[str], str, dict]:
        lines, partial = [], ""
        for x, y, c in _columns(obj.a, obj.b):
            s = x + y + c
            partial = str(s % 10) + partial
            lines.append(_line(x, y, c, s, partial))
        answer = str(obj.a + obj.b)
        assert partial == answer
        return lines, answer, {"a": obj.a, "b": obj.b}

    def _corrupt_step(self, obj: _Problem, step: int, rng: random.Random) -> tuple[str, str]:
        cols = _columns(obj.a, obj.b)
        answer = str(obj.a + obj.b)
        # the true partial result before this column
        prev = answer[len(answer) - step :] if step else ""
        x, y, c = cols[step]
        kind = rng.choice(("sum", "carry", "digit"))
        if kind == "carry":
            c = 1 - c
            s = x + y + c
        elif kind == "digit":
            if rng.random() < 0.5:
                x = rng.choice([d for d in range(10) if d != x])
            else:
                y = rng.choice([d for d in range(10) if d != y])
            s = x + y + c
        else:
            s = x + y + c
            s = rng.choice([v for v in range(max(0, s - 3), s + 4) if v != s])
        # a final-carry column writes its whole sum; others only s mod 10 (both: digit in front of prev)
        return _line(x, y, c, s, str(s % 10) + prev), kind

    def max_completion_chars(self) -> int:
        n = self.digits + 1  # columns including a final carry
        col_lines = sum(len("9+9+1=19 ") + (i + 1) + 1 for i in range(n))
        final = len("=> ") + n + 1
        longest_line = len("9+9+1=19 ") + n + 1
        return col_lines + final + longest_line  # + one extra line for recovery="redo"
