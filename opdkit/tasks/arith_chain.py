"""Multi-step arithmetic: evaluate an expression one operation at a time, rewriting it after each step.

Prompt ``"Q: (3+4)*5-6\\nA: "``; completion::

    7*5-6
    35-6
    29
    => 29

Every line is the previous expression with exactly one operation replaced by its value: the leftmost operation
whose operands are both numbers and that precedence allows (``*`` before ``+``/``-``, parentheses first,
left to right among equals).  Parentheses around a lone number disappear.  There are as many step lines as
operations; the last one is the value, repeated after ``=>``.  All intermediate values are integers in
``0..max_value`` (no negative numbers, so ``-`` is always binary).
"""

from __future__ import annotations

import random
import re
from typing import Union

from .base import Task

__all__ = ["ArithChain"]

# an expression tree: an int leaf, or (op, left, right)
Tree = Union[int, tuple]
_PREC = {"+": 1, "-": 1, "*": 2}
_TOKEN = re.compile(r"\d+|[-+*()]")


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _value(t: Tree) -> int:
    return t if isinstance(t, int) else _apply(t[0], _value(t[1]), _value(t[2]))


def _render(t: Tree) -> str:
    if isinstance(t, int):
        return str(t)
    op, left, right = t
    ls, rs = _render(left), _render(right)
    if isinstance(left, tuple) and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if isinstance(right, tuple) and _PREC[right[0]] <= _PREC[op]:
        rs = f"({rs})"
    return f"{ls}{op}{rs}"


def _n_ops(t: Tree) -> int:
    return 0 if isinstance(t, int) else 1 + _n_ops(t[1]) + _n_ops(t[2])


def _reduce(t: Tree, replace=None) -> tuple[Tree, bool]:
    """Reduce the leftmost node whose children are both numbers (replacing it by ``replace(op, a, b)`` if given,
    else by its value).  Returns (new tree, whether a node was reduced)."""
    if isinstance(t, int):
        return t, False
    op, left, right = t
    if isinstance(left, int) and isinstance(right, int):
        return (replace(op, left, right) if replace else _apply(op, left, right)), True
    new_left, done = _reduce(left, replace)
    if done:
        return (op, new_left, right), True
    new_right, done = _reduce(right, replace)
    return (op, left, new_right), done


def _parse(text: str) -> Tree:
    """Parse ``text`` (digits, ``+ - *``, parentheses; no spaces) with the usual precedence, left-associative."""
    tokens = _TOKEN.findall(text)
    if "".join(tokens) != text or not tokens:
        raise ValueError(f"arith_chain problem must use only digits, + - * and parentheses, got {text!r}")
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"unexpected end of expression {text!r}")
        pos += 1
        return tokens[pos - 1]

    def atom() -> Tree:
        tok = take()
        if tok == "(":
            t = expr()
            if take() != ")":
                raise ValueError(f"missing ')' in {text!r}")
            return t
        if not tok.isdigit():
            raise ValueError(f"expected a number at token {pos} of {text!r}, got {tok!r}")
        return int(tok)

    def term() -> Tree:
        t = atom()
        while peek() == "*":
            take()
            t = ("*", t, atom())
        return t

    def expr() -> Tree:
        t = term()
        while peek() in ("+", "-"):
            t = (take(), t, term())
        return t

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"trailing tokens in {text!r}")
    return tree


def _trajectory(t: Tree) -> list[Tree]:
    """The trees after each step (the last one is the value)."""
    out = []
    while not isinstance(t, int):
        t, _ = _reduce(t)
        out.append(t)
    return out


def _leaf_paths(t: Tree, path: tuple = ()) -> list[tuple]:
    if isinstance(t, int):
        return [path]
    return _leaf_paths(t[1], path + (1,)) + _leaf_paths(t[2], path + (2,))


def _set(t: Tree, path: tuple, value: int) -> Tree:
    if not path:
        return value
    node = list(t)
    node[path[0]] = _set(t[path[0]], path[1:], value)
    return tuple(node)


def _get(t: Tree, path: tuple) -> Tree:
    for i in path:
        t = t[i]
    return t


def _wrong_reductions(expr: str, clean_next: str) -> list[str]:
    """Rewrites of ``expr`` that evaluate some adjacent ``a op b`` other than the correct one (a precedence or
    order mistake), with non-negative results; parentheses around a lone number are dropped."""
    toks = _TOKEN.findall(expr)
    out = []
    for i in range(len(toks) - 2):
        a, op, b = toks[i : i + 3]
        if not (a.isdigit() and op in _PREC and b.isdigit()):
            continue
        v = _apply(op, int(a), int(b))
        if v < 0:
            continue
        new = toks[:i] + [str(v)] + toks[i + 3 :]
        if 0 < i and i + 1 < len(new) and new[i - 1] == "(" and new[i + 1] == ")":
            new = new[: i - 1] + [new[i]] + new[i + 2 :]
        s = "".join(new)
        if s != clean_next:
            out.append(s)
    return out


class ArithChain(Task):
    """Expressions with ``min_ops..ops`` operations over ``+ - *`` (``operators``), operands ``1..max_operand``,
    random tree shapes (hence parentheses), every intermediate value in ``0..max_value`` (a ``-`` that would go
    negative has its operands swapped; a ``*`` or ``+`` that would exceed ``max_value`` is changed to ``+`` / ``-``).

    Perturbed completions (:meth:`perturb`): one step line is written wrongly, one of —
    ``"arith"`` (the operation's value is off by 1-3), ``"precedence"`` (a different adjacent ``a op b`` is
    evaluated, e.g. ``3+4*5`` -> ``7*5``), ``"copy"`` (the right operation is done but a number is miscopied);
    the kind is drawn uniformly among those possible, and only mistakes that change the expression's value are
    used where any exist.  Recovery: with ``recovery="resume"`` the next line is the correct expression after step ``k+1``
    (the solver re-derives it from the problem, ignoring the wrong line); with ``"redo"`` the correct line ``k``
    comes first.  The final answer is always correct.
    """

    name = "arith_chain"
    alphabet = "0123456789+-*()=> \nQA:"

    def __init__(self, ops: int = 4, min_ops: int = 2, max_operand: int = 9, max_value: int = 99, operators: str = "+-*"):
        if not (1 <= min_ops <= ops):
            raise ValueError(f"need 1 <= min_ops <= ops, got min_ops={min_ops}, ops={ops}")
        if max_operand < 1 or max_value < max_operand:
            raise ValueError(f"need 1 <= max_operand <= max_value, got {max_operand}, {max_value}")
        if not operators or set(operators) - set(_PREC):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {operators!r}")
        self.ops = ops
        self.min_ops = min_ops
        self.max_operand = max_operand
        self.max_value = max_value
        self.operators = operators

    def _random_problem(self, rng: random.Random) -> Tree:
        ops = list(self.operators)

        def build(n: int) -> Tree:
            if n == 0:
                return rng.randint(1, self.max_operand)
            k = rng.randrange(n)
            left, right = build(k), build(n - 1 - k)
            op = rng.choice(ops)
            a, b = _value(left), _value(right)
            if op == "*" and a * b > self.max_value:
                op = "+"
            if op == "+" and a + b > self.max_value:
                op = "-"
            if op == "-" and a < b:
                left, right = right, left
            return (op, left, right)

        return build(rng.randint(self.min_ops, self.ops))

    def _parse_problem(self, problem: str) -> Tree:
        tree = _parse(problem)
        if isinstance(tree, int):
            raise ValueError(f"arith_chain problem needs at least one operation, got {problem!r}")
        if any(_value(s) < 0 for s in [tree, *_subtrees(tree)]):
            raise ValueError(f"arith_chain problem has a negative intermediate value: {problem!r}")
        return tree

    def _canonical(self, obj: Tree) -> str:
        return _render(obj)

    def _solve(self, obj: Tree) -> tuple[list[str], str, dict]:
        lines = [_render(t) for t in _trajectory(obj)]
        return lines, lines[-1], {"ops": _n_ops(obj)}

    def _corrupt_step(self, obj: Tree, step: int, rng: random.Random) -> tuple[str, str]:
        traj = _trajectory(obj)
        before = obj if step == 0 else traj[step - 1]
        clean = _render(traj[step])
        reduced: list[int] = []
        _reduce(before, lambda op, a, b: reduced.append(_apply(op, a, b)) or 0)
        v = reduced[0]
        cands = {
            "arith": [_render(_reduce(before, lambda *_, w=w: w)[0]) for w in range(max(0, v - 3), v + 4) if w != v],
            "precedence": _wrong_reductions(_render(before), clean),
            "copy": [],
        }
        leaves = _leaf_paths(traj[step])
        if len(leaves) > 1:
            for path in leaves:
                x = _get(traj[step], path)
                w = rng.choice([y for y in range(max(1, x - 3), x + 4) if y != x])
                cands["copy"].append(_render(_set(traj[step], path, w)))
        answer = _value(obj)
        # prefer mistakes that change the value (e.g. reducing (7+5) first in 9*3-2*(7+5) is no mistake)
        wrong = {k: [c for c in cs if c != clean and _value(_parse(c)) != answer] for k, cs in cands.items()}
        if not any(wrong.values()):  # e.g. everything under a 0*(...): settle for a textual mistake
            wrong = {k: [c for c in cs if c != clean] for k, cs in cands.items()}
        kind = rng.choice([k for k in ("arith", "precedence", "copy") if wrong[k]])
        return rng.choice(wrong[kind]), kind

    def max_completion_chars(self) -> int:
        n_leaves = self.ops + 1
        problem = n_leaves * len(str(self.max_operand)) + self.ops + 2 * (self.ops - 1)
        # each step shortens the expression (a value has fewer digits than "a op b") or replaces it by a value
        line = max(problem, len(str(self.max_value)) + 3) + 2  # +1 newline, +1 a corrupted number's extra digit
        final = len("=> ") + len(str(self.max_value)) + 3 + 1
        return (self.ops + 1) * line + final


def _subtrees(t: Tree) -> list[Tree]:
    if isinstance(t, int):
        return []
    return [t[1], t[2], *_subtrees(t[1]), *_subtrees(t[2])]
