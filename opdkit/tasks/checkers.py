"""Answer checkers for user datasets, chosen by a spec string; each is ``fn(completion, answer) -> float`` in
``[0, 1]`` (or whatever a user function returns) and returns 0.0 instead of raising on garbage model output.

Specs:

* ``"math_verify"`` — the ``math_verify`` package: ``verify(parse(answer), parse(completion))``.
* ``"marker:<TEXT>"`` — exact match of the stripped text after the last ``<TEXT>`` in the completion (to the end
  of that line) with the answer; if the answer itself contains ``<TEXT>`` (e.g. a GSM8K solution ending in
  ``#### 72``), the text after its last ``<TEXT>`` is the reference.  E.g. ``marker:####``, ``marker:=>``.
* ``"marker"`` — the same with the built-in tasks' answer marker ``=>`` (the default): ``marker:=>`` without the
  ``>`` that a shell reads as a redirect when the argument is not quoted.
* ``"py:<module>:<function>"`` — a user function ``fn(completion: str, answer: str) -> bool | float`` imported from
  an installed (importable) module, dotted names allowed on both sides, e.g. ``py:mypkg.rewards:exact``.  The
  module is imported, i.e. its code runs: a config or grid file that names a ``py:`` checker makes opdkit run
  that code.  opdkit's commands do not put the working directory on the import path; to use a file there, name
  the file:
* ``"py:<path/to/file.py>:<function>"`` — the same, loaded from that file (relative to the working directory).

Nothing else is imported: any other spec (``"regex:x"``, ``"exact"``, a bare ``"my_rewards:exact"``) is refused
with the list of checkers, without importing anything.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
from typing import Any, Callable

from .base import ANSWER_MARKER, extract_answer

__all__ = ["Checker", "all_zero_warning", "credits_references", "get_checker", "marker_checker",
           "math_verify_checker", "reference_check"]

Checker = Callable[[str, str], float]
log = logging.getLogger(__name__)


def marker_checker(marker: str) -> Checker:
    """Exact match after the last ``marker`` (see the module docstring)."""
    if not marker:
        raise ValueError("marker checker needs a non-empty marker: use e.g. 'marker:####'")

    def check(completion: str, answer: str) -> float:
        got = extract_answer(completion, marker)
        if got is None or not isinstance(answer, str):
            return 0.0
        ref = extract_answer(answer, marker) if marker in answer else answer.strip()
        return 1.0 if got == ref else 0.0

    check.__name__ = f"marker_checker({marker!r})"
    return check


def math_verify_checker() -> Checker:
    """``math_verify``'s ``verify(parse(answer), parse(completion))`` as 1.0 / 0.0.  Outside the main thread the
    package's signal-based timeouts are switched off (they only work in the main thread)."""
    try:
        from math_verify import parse, verify
    except ImportError:  # pragma: no cover - math-verify is in the train extra
        raise ValueError("checker 'math_verify' needs the math-verify package: pip install math-verify") from None

    def timeout() -> int | None:
        return 5 if threading.current_thread() is threading.main_thread() else None

    @functools.lru_cache(maxsize=4096)
    def gold(answer: str) -> Any:
        parsed = parse(answer, parsing_timeout=timeout())
        if not parsed and "$" not in answer:
            parsed = parse(f"${answer}$", parsing_timeout=timeout())
        return parsed

    def check(completion: str, answer: str) -> float:
        if not isinstance(completion, str) or not isinstance(answer, str):
            return 0.0
        try:
            ref = gold(answer)
            if not ref:
                return 0.0
            pred = parse(completion, parsing_timeout=timeout())
            if not pred:
                return 0.0
            return 1.0 if verify(ref, pred, timeout_seconds=timeout()) else 0.0
        except Exception:  # noqa: BLE001 - garbage output must score 0, not crash training
            return 0.0

    check.__name__ = "math_verify_checker"
    return check


USER_PREFIX = "py:"
BUILTIN_SPECS = ("math_verify", "marker:<TEXT>", "marker")
FORMS = ("math_verify, marker:<TEXT> (e.g. marker:####), marker (= marker:=>), py:<module>:<function> or "
         "py:<file.py>:<function>")


def _is_file_ref(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or "\\" in ref


def _import_function(spec: str) -> Callable[..., Any]:
    """The function named by ``py:<module>:<function>`` or ``py:<file.py>:<function>`` (imported: its code runs)."""
    ref, _, attr = spec[len(USER_PREFIX):].rpartition(":")
    if not ref or not attr:
        raise ValueError(f"checker {spec!r}: expected py:<module>:<function> or py:<file.py>:<function>")
    if _is_file_ref(ref):
        obj = _load_file(spec, ref)
        where = f"file {ref!r}"
    else:
        where = f"module {ref!r}"
        try:
            obj = importlib.import_module(ref)
        except ModuleNotFoundError as e:
            if e.name is not None and ref.split(".")[0] == e.name.split(".")[0] and ref.startswith(e.name):
                raise ValueError(
                    f"checker {spec!r}: no module {ref!r} on the import path (opdkit does not add the working "
                    f"directory to it: for a file there, write py:./{ref.replace('.', '/')}.py:{attr})"
                ) from None
            raise ValueError(f"checker {spec!r}: importing module {ref!r} failed (ModuleNotFoundError: {e})") from None
        except Exception as e:  # noqa: BLE001 - an error inside the module
            raise ValueError(f"checker {spec!r}: importing module {ref!r} failed ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"checker {spec!r}: {where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"checker {spec!r}: {attr!r} is not callable")
    return obj


def _load_file(spec: str, ref: str):
    import importlib.util
    import os
    import sys

    path = os.path.abspath(os.path.expanduser(ref))
    if not os.path.isfile(path):
        raise ValueError(f"checker {spec!r}: no file {path}")
    name = "opdkit_user_checker_" + "".join(c if c.isalnum() else "_" for c in path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"checker {spec!r}: {path} cannot be loaded as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error inside the user's file
        sys.modules.pop(name, None)
        raise ValueError(f"checker {spec!r}: running {path} failed ({type(e).__name__}: {e})") from None
    return module


def _wrap_user(fn: Callable[..., Any], name: str) -> Checker:
    warned = []

    def check(completion: str, answer: str) -> float:
        try:
            result = fn(completion, answer)
        except Exception as e:  # noqa: BLE001 - a user fn choking on garbage output scores 0
            if not warned:
                warned.append(True)
                log.warning("checker %s raised %s: %s; scoring 0.0 (logged once)", name, type(e).__name__, e)
            return 0.0
        if isinstance(result, bool):
            return 1.0 if result else 0.0
        if isinstance(result, (int, float)) or hasattr(result, "__float__"):
            value = float(result)
            return value if math.isfinite(value) else 0.0
        raise TypeError(f"checker {name} returned {type(result).__name__}; it must return a bool or a float")

    check.__name__ = name
    return check


def get_checker(spec: str | Callable[[str, str], Any]) -> Checker:
    """The checker of ``spec``: ``"math_verify"``, ``"marker:<TEXT>"``, ``"py:<module>:<function>"``,
    ``"py:<file.py>:<function>"``, or a callable (wrapped so it returns a float and scores 0.0 when it raises).
    Unknown specs raise ``ValueError`` listing the forms, and import nothing."""
    if callable(spec):
        return _wrap_user(spec, getattr(spec, "__name__", repr(spec)))
    if not isinstance(spec, str):
        raise ValueError(f"checker spec must be a string, got {type(spec).__name__}")
    if spec == "math_verify":
        return math_verify_checker()
    if spec == "marker":
        return marker_checker(ANSWER_MARKER)
    if spec.startswith("marker:"):
        return marker_checker(spec[len("marker:") :])
    if spec.startswith(USER_PREFIX):
        return _wrap_user(_import_function(spec), spec)
    hint = ""
    if ":" in spec:
        head, _, tail = spec.partition(":")
        hint = (f"; for a Python function write py:{spec} (that imports {head!r} and runs its code)" if head and tail
                else "")
    raise ValueError(f"unknown checker {spec!r}: the checkers are {FORMS}{hint}")


# ----------------------------------------------------------------------------------------------------------- sanity

_SHELL_HINT = ("a shell reads an unquoted '>' as a redirect (marker:=> becomes marker:=): quote the argument, "
               "or write marker (= marker:=>)")


def _hint(spec: str) -> str:
    return _SHELL_HINT if isinstance(spec, str) and spec.startswith("marker:") else "check the checker and the answer field"


def _with_completion(pairs, limit: int) -> list:
    return [(c, a) for c, a in pairs if isinstance(c, str) and c and isinstance(a, str)][:limit]


def credits_references(checker: Checker, pairs, limit: int = 200) -> bool:
    """Whether `checker` gives at least one reference (completion, answer) pair credit: then an evaluation that
    scores 0 is the model's doing, not the checker's (no all-zero warning needed)."""
    pairs = _with_completion(pairs, limit)
    try:
        return any(float(checker(c, a)) > 0 for c, a in pairs)
    except Exception:  # noqa: BLE001
        return False


def reference_check(checker: Checker, pairs, spec: str, knob: str = "checker", limit: int = 200) -> str | None:
    """A one-line note when `checker` scores 0 on EVERY reference (completion, answer) pair of the data (the first
    `limit` pairs with a completion): then it would score 0 on a perfect model too (a wrong marker, e.g. a shell
    that ate the '>' of marker:=>). None when it gives some pair credit, or there are no completions to check."""
    pairs = _with_completion(pairs, limit)
    if not pairs:
        return None
    try:
        if any(float(checker(c, a)) > 0 for c, a in pairs):
            return None
    except Exception:  # noqa: BLE001 - a user checker that raises is reported by its own wrapper
        return None
    c, a = pairs[0]
    return (f"opdkit: warning: {knob}={spec} scores 0 on every one of the {len(pairs)} reference completions "
            f"checked (e.g. completion {c[:60]!r}, answer {a[:40]!r}), so it would score 0 on a perfect model too; "
            f"{_hint(spec)}")


def all_zero_warning(spec: str, n: int, knob: str = "checker") -> str:
    """The warning line for an evaluation in which every one of `n` responses scored 0 with checker `spec`."""
    return (f"opdkit: warning: every one of the {n} responses scored 0 with {knob}={spec}: if the model is not "
            f"that bad, the checker matches nothing ({_hint(spec)})")
