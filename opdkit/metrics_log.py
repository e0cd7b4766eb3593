"""metrics.jsonl: the per-step records of a run (writer and reader), plus TensorBoard scalars.

A low-level module: the trainers write it, `opdkit.report` plots it, `opdkit compare` and the failure detector read it.

- `MetricsLogger(run_dir)`: one JSON object per line in `run_dir/metrics.jsonl` (always valid JSON: NaN/inf are
  written as the strings "nan"/"inf"/"-inf", which `read_metrics` turns back into floats) and scalars to
  TensorBoard under `run_dir/tb`.
- `read_metrics(path)`: the records back, non-finite strings as floats.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ----------------------------------------------------------------------------------------------------------- values


def _float_json(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def to_jsonable(value: Any) -> Any:
    """A metric value as JSON types: tensors/numpy -> Python numbers or lists, NaN/inf -> "nan"/"inf"/"-inf"."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _float_json(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return str(value)


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def scalar(value: Any) -> float | None:
    """A real number for TensorBoard, or None (bools, strings, lists, multi-element tensors)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item()) if value.numel() == 1 and not value.dtype == torch.bool else None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _from_json(value: Any) -> Any:
    if isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (or of `run_dir/metrics.jsonl`), "nan"/"inf" strings back to floats. A torn
    last line (a crash mid-write) is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    records = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        records.append({k: _from_json(v) for k, v in rec.items()})
    return records


# ----------------------------------------------------------------------------------------------------------- logger


class MetricsLogger:
    """`.log(step, metrics)` appends `{"step": step, **metrics}` as one JSON line (flushed) and writes the scalar
    metrics to TensorBoard. Nested dicts are flattened with "/" keys. `resume_step`: drop the records (and TB
    events) of steps after it, left by the interrupted run."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self._fh: BinaryIO | None = None
        self._tb = None
        self._step: int | None = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None and self.path.exists():
                self._truncate_after(resume_step)
            # unbuffered: each record reaches the file in one write call (a failed write raises there, and nothing
            # is left in a buffer for a later close to fail on)
            self._fh = open(self.path, "ab", buffering=0)
        except OSError as exc:
            from opdkit.errors import UserError, write_error_message

            raise UserError(write_error_message(exc, self.path)) from None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency
                warnings.warn("tensorboard is not installed; metrics go to metrics.jsonl only", stacklevel=2)
            else:
                purge = None if resume_step is None else resume_step + 1
                with self._writing(self.run_dir / TB_DIR):
                    self._tb = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge, flush_secs=10)

    def _writing(self, path: Path):
        """Context: an OSError while writing `path` (disk full, ...) -> RunFailed, one line, exit code 3."""
        import contextlib

        logger = self

        @contextlib.contextmanager
        def guard():
            try:
                yield
            except OSError as exc:
                from opdkit.errors import RunFailed, write_error_message

                logger._drop()  # nothing more is written; a later close() does not fail again
                at = f"; the run stopped at step {logger._step}" if logger._step is not None else ""
                raise RunFailed(write_error_message(exc, path) + at + ": resume=true continues from its last "
                                "checkpoint") from None

        return guard()

    def _truncate_after(self, step: int) -> None:
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write one record; returns it (as written)."""
        if self._fh is None:
            raise RuntimeError("MetricsLogger is closed")
        flat = flatten(metrics)
        record = {"step": int(step), **{k: to_jsonable(v) for k, v in flat.items() if k != "step"}}
        self._step = int(step)
        data = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
        with self._writing(self.path):
            view = memoryview(data)
            while view:
                view = view[self._fh.write(view):]
        if self._tb is not None:
            with self._writing(self.run_dir / TB_DIR):
                for k, v in flat.items():
                    x = scalar(v)
                    if x is not None and k != "step":
                        self._tb.add_scalar(k, x, int(step))
        return record

    def _drop(self) -> None:
        """Forget both writers after a failed write (the metrics file is closed, TensorBoard's is abandoned)."""
        fh, self._fh, self._tb = self._fh, None, None
        if fh is not None:
            try:
                fh.close()
            except OSError:
                pass

    def flush(self) -> None:
        if self._tb is not None:
            with self._writing(self.run_dir / TB_DIR):
                self._tb.flush()

    def close(self) -> None:
        """Close both files; safe to call twice, and after a failed write (the file handles are dropped)."""
        fh, tb, self._fh, self._tb = self._fh, self._tb, None, None
        try:
            if fh is not None:
                with self._writing(self.path):
                    fh.close()
        finally:
            if tb is not None:
                with self._writing(self.run_dir / TB_DIR):
                    tb.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
