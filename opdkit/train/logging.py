"""A progress display and run-dir safety checks (the metrics JSONL itself: `opdkit.metrics_log`).

- `Progress(total_steps)`: a rich bar with ETA and a few key metrics on a terminal; plain one-line summaries every
  N steps otherwise (CI logs).
- `prepare_run_dir(path, config_hash, resume, overwrite)`: refuses to clobber another (or the same) run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence, TextIO


from opdkit.config import dump_config
from opdkit.paths import _nearest_existing, check_creatable
from opdkit.errors import UserError
from opdkit.metrics_log import METRICS_FILE, TB_DIR, flatten, scalar

CONFIG_FILE = "config.yaml"
_HASH_TAG = "opdkit config_hash:"


# ----------------------------------------------------------------------------------------------------------- progress

DEFAULT_KEYS = ("loss", "reward_mean", "reward/mean", "acc", "accuracy", "kl", "lr")


def _fmt_num(v: Any) -> str:
    x = scalar(v)
    if x is None:
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{x:.4g}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    hh, rem = divmod(s, 3600)
    mm, ss = divmod(rem, 60)
    return f"{hh}h{mm:02d}m{ss:02d}s" if hh else (f"{mm}m{ss:02d}s" if mm else f"{ss}s")


class Progress:
    """Progress of a run of `total_steps`: a rich bar (ETA + key metrics) on a terminal, else one plain line every
    `every` steps (default: about 20 lines per run) and at the last step. `keys`: metrics to show (default: those
    of DEFAULT_KEYS present, else the first 4 scalars). `update(step, metrics)` takes the number of completed steps.
    `exclude(seconds)`: time spent on something other than steps (the held-out evaluations), left out of the s/step
    rate and the ETA (still counted in `elapsed`).
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool = True,
        keys: Sequence[str] | None = None,
        every: int | None = None,
        stream: TextIO | None = None,
        start_step: int = 0,
        description: str = "train",
    ):
        self.total = int(total_steps)
        self.enabled = enabled
        self.keys = tuple(keys) if keys is not None else None
        self.every = max(1, int(every) if every else max(1, self.total // 20))
        self.stream = stream if stream is not None else sys.stdout
        self.start_step = int(start_step)
        self.description = description
        self._t0 = time.monotonic()
        self._excluded = 0.0
        self._rich = None
        self._task = None
        try:
            tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            tty = False
        self.interactive = enabled and tty

    def _metric_text(self, metrics: Mapping[str, Any] | None) -> str:
        if not metrics:
            return ""
        flat = flatten(metrics)
        if self.keys is not None:
            keys = [k for k in self.keys if k in flat]
        else:
            keys = [k for k in DEFAULT_KEYS if k in flat] or [k for k, v in flat.items() if scalar(v) is not None][:4]
        return " | ".join(f"{k} {_fmt_num(flat[k])}" for k in keys)

    def start(self) -> Progress:
        if self.interactive and self._rich is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn)

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta {task.fields[eta]}"), TextColumn("{task.fields[metrics]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.description, total=self.total, completed=self.start_step, metrics="",
                                             eta="?")
        self._t0 = time.monotonic()
        self._excluded = 0.0
        return self

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (e.g. an evaluation) out of the s/step rate and the ETA."""
        if math.isfinite(seconds) and seconds > 0:
            self._excluded += float(seconds)

    def _rate(self, step: int) -> tuple[float, float, float]:
        """(elapsed wall seconds, seconds per step without the excluded time, ETA seconds)."""
        elapsed = time.monotonic() - self._t0
        done = step - self.start_step
        per = max(elapsed - self._excluded, 0.0) / done if done > 0 else math.nan
        eta = per * (self.total - step) if done > 0 else math.nan
        return elapsed, per, eta

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        text = self._metric_text(metrics)
        if self.interactive:
            if self._rich is None:
                self.start()
            self._rich.update(self._task, completed=step, metrics=text, eta=_fmt_time(self._rate(step)[2]))
            return
        if step % self.every and step != self.total and step != self.start_step + 1:
            return
        elapsed, per, eta = self._rate(step)
        pct = 100.0 * step / self.total if self.total else 100.0
        parts = [f"{self.description} step {step}/{self.total} ({pct:.0f}%)"]
        if text:
            parts.append(text)
        parts.append(f"{per:.3g} s/step | elapsed {_fmt_time(elapsed)} | eta {_fmt_time(eta)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def print(self, message: str) -> None:
        """A line of text above the bar (or plain)."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.console.print(message)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------- run dirs

# What opdkit itself writes into a run dir: only these entries are ever deleted by overwrite=true (and only in a dir
# that carries opdkit's run marker). Hidden temp names of atomic writes (`.final.tmp-*`, `.config.yaml.*.tmp`) count.
RUN_MARKER = ".opdkit_run"
OWNED_ENTRIES = frozenset({RUN_MARKER, CONFIG_FILE, METRICS_FILE, METRICS_FILE + ".tmp", TB_DIR, "checkpoints", "final",
                           "plots", "tokenizer", "eval.json"})


def _is_owned(name: str) -> bool:
    return name in OWNED_ENTRIES or (name.startswith(".") and ".tmp" in name)


def read_run_hash(run_dir: str | os.PathLike) -> str | None:
    """The config hash recorded in `run_dir/config.yaml` (its `# opdkit config_hash: ...` header), or None."""
    p = Path(run_dir) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if not line.startswith("#"):
                    break
                text = line.lstrip("#").strip()
                if text.startswith(_HASH_TAG):
                    return text[len(_HASH_TAG):].strip() or None
    except (OSError, UnicodeDecodeError):
        return None
    return None


def is_run_dir(run_dir: str | os.PathLike) -> bool:
    """Whether `run_dir` carries opdkit's own run marker: the marker file, or a config.yaml with opdkit's hash
    header (run dirs written before the marker existed)."""
    p = Path(run_dir)
    return (p / RUN_MARKER).is_file() or read_run_hash(p) is not None


def config_command(config: Any) -> str | None:
    """The `opdkit` command of a config object (`train` for TrainConfig, `sft` for SFTConfig, ...): the first word
    after `opdkit ` in its class docstring ("opdkit train: ..."), None when there is none."""
    import re

    m = re.match(r"\s*opdkit (\w+):", type(config).__doc__ or "")
    return m.group(1) if m else None


def write_run_config(run_dir: str | os.PathLike, config: Any, config_hash: str) -> Path:
    """Write the resolved config to `run_dir/config.yaml` with its hash in the header (read by prepare_run_dir).
    The header says how to rerun it in the form the CLI accepts: the file as the first argument (no --config)."""
    path = Path(run_dir) / CONFIG_FILE
    cmd = f"opdkit {config_command(config) or '<command>'} {path}"
    header = (f"{_HASH_TAG} {config_hash}\nresolved config written by opdkit; continue this run with `{cmd} "
              f"resume=true`, or start a new one from it with `{cmd} run_dir=<new dir>`")
    return dump_config(config, path, header=header)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def config_differences(run_dir: str | os.PathLike, config: Any, exclude: Sequence[str] = ()) -> list[str]:
    """`key: saved -> now` for each knob whose value differs between `run_dir/config.yaml` and `config` (the knobs
    in `exclude` and keys missing on either side are compared too, except the excluded ones)."""
    import yaml

    from opdkit.config import config_to_dict

    try:
        saved = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    old, new = _flat(saved), _flat(json.loads(json.dumps(config_to_dict(config), default=str)))
    skip = set(exclude)
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(set(old) | set(new))
            if k not in skip and old.get(k) != new.get(k)]


def _foreign_entries(p: Path) -> list[str]:
    return sorted(e.name for e in p.iterdir() if not _is_owned(e.name))


def _clear_run(p: Path) -> None:
    """Delete what opdkit wrote into run dir `p` (the caller checked that nothing else is there)."""
    for e in p.iterdir():
        if not _is_owned(e.name):  # appeared since the check: never deleted
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


def check_run_dir(
    path: str | os.PathLike, config_hash: str, resume: bool = False, overwrite: bool = False, config: Any = None,
    exclude: Sequence[str] = (),
) -> Path:
    """The checks of `prepare_run_dir` without writing or deleting anything (UserError when `path` may not hold this
    run); returns the path. The trainers call it first, then validate the rest of their input (a checkpoint to
    resume from, free space), and only then `create_run_dir`: bad input leaves the file system unchanged."""
    p = Path(path)
    if resume and overwrite:
        raise UserError("resume=true and overwrite=true exclude each other: pick one")
    try:
        if p.exists() and not p.is_dir():
            raise UserError(f"run_dir {p} exists and is not a directory")
        # a dir holding only opdkit's marker holds nothing of value yet
        nonempty = p.is_dir() and any(e.name != RUN_MARKER for e in p.iterdir())
    except OSError as exc:
        raise UserError(f"run_dir {p} cannot be read ({exc.strerror or exc}); choose another run_dir") from None
    if nonempty:
        if not is_run_dir(p):
            why = (f"{CONFIG_FILE} has no opdkit header" if (p / CONFIG_FILE).exists() else f"no {RUN_MARKER} marker")
            raise UserError(
                f"run dir {p} is not empty and holds no opdkit run ({why}); choose another run_dir"
                + (" (overwrite=true only replaces an opdkit run dir)" if overwrite else "")
            )
        old = read_run_hash(p)
        if overwrite:
            foreign = _foreign_entries(p)
            if foreign:
                raise UserError(f"refusing to overwrite run dir {p}: {p / foreign[0]} was not written by opdkit"
                                + (f" (+{len(foreign) - 1} more)" if len(foreign) > 1 else "")
                                + "; move it away or choose another run_dir")
        elif old != config_hash:
            diff = config_differences(p, config, exclude) if config is not None else []
            what = (f" ({'; '.join(diff[:3])}{f' (+{len(diff) - 3} more)' if len(diff) > 3 else ''})" if diff
                    else f" (config hash {old or 'unknown'}, this config {config_hash})")
            raise UserError(
                f"run dir {p} already holds a different run{what}; "
                + ("resume=true continues a run only with the same config: restore it, pass overwrite=true to "
                   "replace the run, or choose another run_dir" if resume else
                   "pass resume=true to continue it (with its config), overwrite=true to replace it, or choose "
                   "another run_dir")
            )
        elif not resume:
            raise UserError(
                f"run dir {p} already holds this run; pass resume=true to continue it, overwrite=true to replace it, "
                "or choose another run_dir"
            )
    check_creatable(p)
    return p


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str, reclaimable_bytes: int = 0) -> None:
    """UserError ('disk full') when the file system of `path` (or of its nearest existing parent) has less than
    `need_bytes` free (+ `reclaimable_bytes` that an overwrite will delete first). `what`: what needs the space."""
    import shutil as _shutil

    base = _nearest_existing(Path(path))
    try:
        if os.statvfs(base).f_blocks == 0:  # a virtual file system (/proc, /sys): no capacity to compare with
            return
        free = _shutil.disk_usage(base).free
    except (OSError, AttributeError):
        return
    if free + reclaimable_bytes < need_bytes:
        raise UserError(f"disk full: {base} has {free / 2**20:.1f} MiB free but {what} needs at least "
                        f"{need_bytes / 2**20:.1f} MiB; free space or choose another run_dir")


def owned_bytes(path: str | os.PathLike) -> int:
    """Bytes of what opdkit wrote into run dir `path` (what overwrite=true deletes)."""
    p, total = Path(path), 0
    if not p.is_dir():
        return 0
    for e in p.iterdir():
        if not _is_owned(e.name):
            continue
        for f in ([e] if not e.is_dir() else e.rglob("*")):
            try:
                if f.is_file() and not f.is_symlink():
                    total += f.stat().st_size
            except OSError:
                pass
    return total


def create_run_dir(path: str | os.PathLike, config_hash: str, overwrite: bool = False, config: Any = None) -> Path:
    """Create run dir `path` (checked by `check_run_dir`): with overwrite, first delete what opdkit wrote there;
    then write the `.opdkit_run` marker and `config` with its hash. A failed write (disk full, read-only file
    system, ...) removes the dirs and files this call created and raises a one-line UserError."""
    from opdkit.errors import write_error_message

    p = Path(path)
    created: list[Path] = []
    try:
        missing = [d for d in (p, *p.parents) if not os.path.lexists(d)]
        if overwrite and p.is_dir() and is_run_dir(p):
            _clear_run(p)
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if d == p or not d.is_dir():
                    raise
                continue  # a parent another process made meanwhile (parallel runs under one dir): not ours to remove
            created.append(d)
        for name, write in ((RUN_MARKER, lambda: (p / RUN_MARKER).write_text(
                json.dumps({"config_hash": config_hash}) + "\n", encoding="utf-8")),
                            (CONFIG_FILE, lambda: write_run_config(p, config, config_hash) if config is not None
                             else None)):
            target = p / name
            if not target.exists():
                created.append(target)
            write()
    except OSError as exc:
        for c in reversed(created):
            try:
                if c.is_dir() and not c.is_symlink():
                    shutil.rmtree(c)
                elif os.path.lexists(c):
                    c.unlink()
            except OSError:
                pass
        raise UserError(write_error_message(exc, getattr(exc, "filename", None) or p,
                                            "create run dir" if not created else "write")) from None
    return p


def prepare_run_dir(
    path: str | os.PathLike, config_hash: str, resume: bool = False, overwrite: bool = False, config: Any = None,
    exclude: Sequence[str] = (),
) -> Path:
    """Check that `path` may hold this run, then create it (and write `config` with its hash, when given).

    - missing or empty: fine (a fresh run; with resume=true too).
    - holds an opdkit run (the `.opdkit_run` marker, or a config.yaml with opdkit's hash header) with another
      hash: UserError naming the knobs that differ (`exclude`: knobs a resumption may change), unless overwrite.
    - holds this run: resume continues it; overwrite replaces it; neither -> UserError (it would be clobbered).
    - overwrite deletes only what opdkit writes into a run dir (config.yaml, metrics.jsonl, tb/, checkpoints/,
      final/, plots/, ...); a run dir that also holds anything else is refused, naming the file.
    - not empty and no marker: UserError (never deleted, even with overwrite).
    Nothing is written or deleted before the checks pass (`check_run_dir`, then `create_run_dir`).
    """
    p = check_run_dir(path, config_hash, resume=resume, overwrite=overwrite, config=config, exclude=exclude)
    return create_run_dir(p, config_hash, overwrite=overwrite, config=config)
