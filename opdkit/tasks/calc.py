"""`calc`: a multi-turn tool task. ``a*b+c`` with multi-digit operands, solved by calling a calculator.

Prompt ``"Q: 347*86+512\\nA: "``; a solution that uses the tool (policy turns, then the calculator's answers)::

    [347*86]          <- policy turn 1: a tool call, ends with "]" (the turn's stop string)
    =29842\\n          <- environment: the calculator's result (in the context, never in the loss)
    [29842+512]       <- policy turn 2: reads the result back into the next call
    =30354\\n          <- environment
    => 30354\\n<eos>   <- policy turn 3: the final answer

A tiny model cannot multiply a 3-digit by a 2-digit number in one go, so it needs the tool; it only has to copy
digits (operands from the prompt, results from the observations). ``tool_fraction`` is the share of reference
completions that use the tool; the others answer directly (``=> 30354``, a guess for a small model): ``0`` makes
training data for a student that does not use the tool. Which problems get which kind of completion is a hash of
the problem, so it is deterministic.

`make_env(example)` gives the episode's :class:`CalcEnv`; `opdkit train data.prompts=task:calc` and
`opdkit eval task=calc` roll out through it (docs/agents.md).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from .base import ANSWER_MARKER, Example, Task, extract_answer
from .env import EnvStep

__all__ = ["Calc", "CalcEnv"]

_CALL = re.compile(r"\[(\d{1,12})([*+])(\d{1,12})\]$")


@dataclass(frozen=True)
class _Problem:
    a: int
    b: int
    c: int


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


class CalcEnv:
    """The calculator of one episode. A policy turn that ends with ``[x*y]`` or ``[x+y]`` (non-negative integers of
    at most 12 digits) gets ``=<result>\\n``; a malformed call gets ``=?\\n``; a turn without a call ends the
    episode (its text is the final answer). Reward 1 iff the text after the last ``=>`` of the policy's turns equals
    the answer."""

    name = "calc"
    stop = ("]",)

    def __init__(self, example: Example):
        self.example = example
        self.turns: list[str] = []
        self.calls = 0

    def reset(self, record) -> str | None:
        self.turns, self.calls = [], 0
        return None

    def step(self, text: str) -> EnvStep:
        self.turns.append(text)
        if not text.endswith("]"):
            return EnvStep(None, done=True)
        self.calls += 1
        m = _CALL.search(text)
        if m is None:
            return EnvStep("=?\n", done=False)
        x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
        return EnvStep(f"={x * y if op == '*' else x + y}\n", done=False)

    def reward(self) -> float:
        got = extract_answer("".join(self.turns))
        return 1.0 if got is not None and got == self.example.answer else 0.0


class Calc(Task):
    """``a*b+c`` with ``a`` of ``digits_a`` digits, ``b`` of ``digits_b``, ``c`` of ``digits_c`` (see the module
    docstring). ``tool_fraction`` in [0, 1]: share of reference completions that call the calculator."""

    name = "calc"
    alphabet = "0123456789*+=>[]? \nQA:"
    multi_turn = True
    max_turns = 4  # policy turns of one episode: two calls, the answer, one spare

    def __init__(self, digits_a: int = 3, digits_b: int = 2, digits_c: int = 3, tool_fraction: float = 1.0):
        for k, v in (("digits_a", digits_a), ("digits_b", digits_b), ("digits_c", digits_c)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 6:
                raise ValueError(f"{k}={v!r} must be an integer in [1, 6]")
        if not isinstance(tool_fraction, (int, float)) or not 0.0 <= float(tool_fraction) <= 1.0:
            raise ValueError(f"tool_fraction={tool_fraction!r} must be in [0, 1]")
        self.digits_a, self.digits_b, self.digits_c = digits_a, digits_b, digits_c
        self.tool_fraction = float(tool_fraction)

    def make_env(self, example: Example) -> CalcEnv:
        return CalcEnv(example)

    def _random_problem(self, rng: random.Random) -> _Problem:
        return _Problem(_operand(rng, self.digits_a), _operand(rng, self.digits_b), _operand(rng, self.digits_c))

    def _parse_problem(self, problem: str) -> _Problem:
        m = re.fullmatch(r"(\d+)\*(\d+)\+(\d+)", problem)
        if m is None:
            raise ValueError(f"calc problem must look like '347*86+512', got {problem!r}")
        return _Problem(*(int(g) for g in m.groups()))

    def _canonical(self, obj: _Problem) -> str:
        return f"{obj.a}*{obj.b}+{obj.c}"

    def _uses_tool(self, problem: str) -> bool:
        h = int.from_bytes(hashlib.sha256(f"calc-tool:{problem}".encode()).digest()[:8], "big")
        return h / 2**64 < self.tool_fraction

    def _solve(self, obj: _Problem) -> tuple[list[str], str, dict]:
        p = obj.a * obj.b
        answer = str(p + obj.c)
        lines = [f"[{obj.a}*{obj.b}]={p}", f"[{p}+{obj.c}]={answer}"]
        return lines, answer, {"a": obj.a, "b": obj.b, "c": obj.c}

    def _example(self, obj: _Problem) -> Example:
        problem = self._canonical(obj)
        steps, answer, extra = self._solve(obj)
        if not self._uses_tool(problem):
            steps = []
        completion = "".join(s + "\n" for s in steps) + f"{ANSWER_MARKER} {answer}\n"
        spans, pos = [], 0  # character spans of the calculator's outputs ("=29842\n"): not the policy's text
        for s in steps:
            cut = s.index("]") + 1
            spans.append((pos + cut, pos + len(s) + 1))
            pos += len(s) + 1
        meta = {"task": self.name, "problem": problem, "split": self.split_of(problem), "env_spans": spans,
                "uses_tool": bool(steps), **extra}
        return Example(prompt=self.format_prompt(problem), answer=answer, completion=completion, meta=meta)

    def perturb(self, example, rng=None, recovery: str = "resume"):
        raise ValueError("calc: perturbed completions are not defined for a tool task (set perturbed_fraction=0)")

    def max_completion_chars(self) -> int:
        p = self.digits_a + self.digits_b
        r = max(p, self.digits_c) + 1
        call1 = 1 + self.digits_a + 1 + self.digits_b + 1 + 1 + p + 1
        call2 = 1 + p + 1 + self.digits_c + 1 + 1 + r + 1
        return call1 + call2 + len("=> ") + r + 1
