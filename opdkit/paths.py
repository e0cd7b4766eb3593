"""Path checks shared by every command that writes (train, sft, eval, plot): below opdkit.train and opdkit.report."""

from __future__ import annotations

import os
from pathlib import Path

from opdkit.errors import UserError


def _nearest_existing(p: Path) -> Path:
    for d in (p, *p.parents):
        if os.path.lexists(d):
            return d
    return Path(".")


def check_creatable(p: str | os.PathLike, what: str = "run dir", knob: str = "run_dir") -> None:
    """UserError when `p` (or the missing dirs above it) obviously cannot be written: an ancestor that is a file,
    or a dir on a read-only file system / without write permission (os.access; root is refused only by EROFS)."""
    p = Path(p)
    base = _nearest_existing(p)
    if not base.is_dir():
        raise UserError(f"cannot create {what} {p}: {base} is not a directory; choose another {knob}")
    try:
        virtual = os.statvfs(base).f_blocks == 0
    except (OSError, AttributeError):
        virtual = False
    if virtual:
        raise UserError(f"cannot create {what} {p}: {base} is on a virtual file system (like /proc), not storage; "
                        f"choose another {knob}")
    if not os.access(base, os.W_OK | os.X_OK):
        try:
            ro = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            ro = False
        why = "is on a read-only file system" if ro else "is not writable"
        raise UserError(f"cannot create {what} {p}: {base} {why}; choose a writable {knob}")
