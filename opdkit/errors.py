"""User-facing errors and the CLI wrapper that turns them into one line on stderr and exit code 2.

`UserError` is for bad user input (a missing file, an unknown or ill-typed config key, a knob out of range, a run dir
that holds another run). The CLI prints `opdkit: error: <message>` as ONE line and exits with code 2. A ValueError
raised by a config dataclass's `__post_init__` (field validation) is treated the same way; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

EXIT_USAGE = 2
EXIT_RUN_FAILED = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad user input: files, config fields, knobs. The message must say what is wrong and how to fix it."""


class RunFailed(UserError):
    """A run that stopped on its own (e.g. too many consecutive non-finite steps): one line, exit code 3. The
    message says what happened, where the resumable state is, and what to change."""


def one_line(message: object) -> str:
    """`message` as a single line (newlines folded into spaces, surrounding blanks stripped)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _free_space(path: str | os.PathLike) -> str | None:
    """Free space on the file system of `path` (or of its nearest existing parent) as text, or None."""
    p = Path(path)
    for d in (p, *p.parents):
        try:
            return f"{shutil.disk_usage(d).free / 2**20:.1f} MiB free"
        except OSError:
            continue
    return None


DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def is_short_write(exc: BaseException) -> bool:
    """torch.save's zip writer reports a failed write (disk full, quota) as RuntimeError 'unexpected pos X vs Y'."""
    return isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc))


def write_error_message(exc: BaseException, path: str | os.PathLike, what: str = "write") -> str:
    """One line for a failed write of `path`: says 'disk full' / 'read-only file system' / 'permission denied' and
    the fix. `exc`: the OSError (or torch's short-write RuntimeError)."""
    code = getattr(exc, "errno", None)
    if code in DISK_FULL or is_short_write(exc):
        free = _free_space(path)
        return (f"disk full: cannot {what} {path} ({free + ' on its file system' if free else 'no space left'}); "
                "free space or choose another run_dir")
    if code == errno.EROFS:
        return f"read-only file system: cannot {what} {path}; choose a run_dir on a writable file system"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied: cannot {what} {path}; choose a run_dir you can write to"
    reason = getattr(exc, "strerror", None) or one_line(exc)[:200]
    return f"cannot {what} {path}: {reason}; choose a writable run_dir"


def is_config_validation_error(exc: BaseException) -> bool:
    """True for a ValueError raised (directly or indirectly) inside a dataclass `__post_init__` (config validation)."""
    if not isinstance(exc, ValueError):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            return True
        tb = tb.tb_next
    return False


def format_error(exc: BaseException) -> str:
    return f"opdkit: error: {one_line(exc)}"


def run_cli(
    fn: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None = None, *, stderr: TextIO | None = None
) -> int:
    """Call `fn(argv)` and return its exit code (None -> 0).

    UserError, and ValueError raised by config validation (`__post_init__`), are printed as
    `opdkit: error: <message>` (one line) to stderr and give exit code 2 (RunFailed: 3). KeyboardInterrupt gives
    130 (a SIGTERM is turned into one by the trainers, see `opdkit.train.signals`).
    Any other exception propagates with its traceback (it is a bug, not a user error).
    """
    err = stderr if stderr is not None else sys.stderr
    try:
        code = fn(list(sys.argv[1:] if argv is None else argv))
    except RunFailed as exc:
        print(format_error(exc), file=err, flush=True)
        return EXIT_RUN_FAILED
    except UserError as exc:
        print(format_error(exc), file=err, flush=True)
        return EXIT_USAGE
    except ValueError as exc:
        if not is_config_validation_error(exc):
            raise
        print(format_error(exc), file=err, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", None)
        print(getattr(exc, "message", None) or "opdkit: interrupted", file=err, flush=True)
        return EXIT_INTERRUPTED if signum is None else 128 + int(signum)
    return 0 if code is None else int(code)


def cli_entry(fn: Callable[[Sequence[str]], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorator: `main(argv)` -> a function that returns an exit code via `run_cli` (use `sys.exit(main())`)."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        return run_cli(fn, argv)

    return wrapper
