"""Atomic training checkpoints and atomic HF model directories.

Layout: `run_dir/checkpoints/step_000123/` with `model.safetensors`, `optimizer.pt`, `scheduler.pt`, `rng.pt` and
`state.json`. Every directory is written under a hidden temp name (`.tmp-...`) inside `checkpoints/` and renamed
into place only once complete, so a crash mid-write never leaves a directory that looks like a checkpoint; temp dirs
are ignored by `latest_checkpoint` and removed by the next save.

Tied / shared tensors (e.g. `lm_head.weight` tied to `model.embed_tokens.weight` with `tie_word_embeddings`) are
stored once: the alias names are recorded in the safetensors metadata and filled in again on load, so the model is
loaded with every key present; keys the model ties but the file lacks are accepted only if they are tied.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from opdkit.errors import UserError, one_line

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d+)$")
_ALIASES_KEY = "opdkit_aliases"


# ----------------------------------------------------------------------------------------------------------- files


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` dir to `final`, replacing an existing `final` (moved aside first, then deleted)."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint dir: rename it to a temp name first, so a half-deleted dir never looks complete."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- listing


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """`run_dir/checkpoints/step_000123` (the directory a checkpoint of `step` has once complete)."""
    return Path(run_dir) / CHECKPOINTS / f"step_{int(step):06d}"


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first; temp dirs are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_RE.match(d.name)
        if m and is_checkpoint(d):
            out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------------------- tensors


def split_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, {alias: source}) from a state dict: identical views of one storage (tied weights) are kept
    once and recorded as aliases; other tensors that overlap in memory are cloned. All CPU, contiguous, detached."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.numel() == 0 or t.device.type == "meta":
            groups[("solo", name)] = [name]
        else:
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for names in groups.values():
        views: dict[tuple, str] = {}
        for name in names:
            t = state[name]
            sig = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if sig in views:
                aliases[name] = views[sig]
            else:
                views[sig] = name
        shared = len(views) > 1
        for name in views.values():
            t = state[name].detach()
            t = t.to("cpu").clone() if shared else t.to("cpu")
            tensors[name] = t.contiguous()
    # a tensor moved from an accelerator is a fresh copy; one left on CPU may still be a view of a larger storage
    return tensors, aliases


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn("checkpoint holds CUDA RNG states for a different set of devices; not restored", stacklevel=3)


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------- save


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Atomically write `run_dir/checkpoints/step_{step:06d}/` and return it; then keep only the newest `keep_last`
    complete checkpoints (None or <= 0 keeps all; the one just written is never deleted). `extra` must be JSON-able.
    An existing checkpoint of the same step is replaced."""
    state_json = json.dumps({"step": int(step), "time": time.time(), "extra": extra or {}}, indent=1, allow_nan=True)
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash: never complete
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_path(run_dir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        tensors, aliases = split_shared(model_state)
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})
        written = [tmp / MODEL_FILE]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            written.append(tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            written.append(tmp / SCHEDULER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
        written += [tmp / RNG_FILE, tmp / STATE_FILE]
        for f in written:
            _fsync_file(f)
        _fsync_dir(tmp)
        _swap_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None and keep_last > 0:
        older = [d for _, d in list_checkpoints(run_dir) if d != final]
        n_keep_older = keep_last - 1
        for d in older[: max(0, len(older) - n_keep_older)]:
            _remove_dir(d)
    return final


# ----------------------------------------------------------------------------------------------------------- load


def _require_checkpoint(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not is_checkpoint(p):
        raise UserError(f"not an opdkit checkpoint (no {MODEL_FILE}/{STATE_FILE}): {p}")
    return p


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The `state.json` of a checkpoint (`step`, `time`, `extra`)."""
    p = _require_checkpoint(path)
    try:
        return json.loads((p / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {p / STATE_FILE}: {one_line(exc)}") from None


def _names(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_model_state(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Load a checkpoint's (or a bare `model.safetensors`') weights into `model`.

    Aliases recorded at save time (tied weights) are filled in; keys the model still misses are accepted only when
    the model ties them to a loaded key. Any other missing/unexpected key or shape mismatch -> UserError.
    """
    p = Path(path)
    f = p / MODEL_FILE if p.is_dir() else p
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
        sd = load_file(str(f), device="cpu")
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise UserError(f"cannot read weights {f}: {one_line(exc)}") from None
    for alias, source in json.loads(meta.get(_ALIASES_KEY, "{}")).items():
        sd.setdefault(alias, sd[source])
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise UserError(f"checkpoint {p} does not fit the model: {one_line(exc)[:500]}") from None
    own = model.state_dict()
    loaded_ptrs = {own[k].untyped_storage().data_ptr() for k in sd if k in own and own[k].numel()}
    untied = [
        k for k in result.missing_keys
        if own[k].numel() == 0 or own[k].untyped_storage().data_ptr() not in loaded_ptrs
    ]
    if untied or result.unexpected_keys:
        raise UserError(
            f"checkpoint {p} does not fit the model: missing keys [{_names(untied)}], "
            f"unexpected keys [{_names(list(result.unexpected_keys))}]"
        )


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict:
    """Restore weights (strict, tied keys handled), optimizer, scheduler and RNG states from checkpoint dir `path`;
    returns its state.json (`{"step": ..., "time": ..., "extra": {...}}`). Not a checkpoint -> UserError."""
    p = _require_checkpoint(path)
    state = read_checkpoint_state(p)
    load_model_state(p, model)
    for obj, name in ((optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if obj is None:
            continue
        if not (p / name).is_file():
            raise UserError(f"checkpoint {p} has no {name} to restore")
        obj.load_state_dict(torch.load(p / name, map_location="cpu", weights_only=True))
    if restore_rng:
        if (p / RNG_FILE).is_file():
            _set_rng_state(torch.load(p / RNG_FILE, map_location="cpu", weights_only=True))
        else:
            warnings.warn(f"checkpoint {p} has no {RNG_FILE}; RNG state not restored", stacklevel=2)
    return state


# ----------------------------------------------------------------------------------------------------------- HF dirs


def save_model_dir(model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Atomically write a standard HF model directory (safetensors weights + config [+ tokenizer]) loadable with
    `AutoModelForCausalLM.from_pretrained(out_dir)`. An existing model dir (one with config.json) is replaced; any
    other non-empty path -> UserError. A peft model must be merged (`merge_and_unload()`) by the caller first."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"refusing to replace {out}: it exists and is not a model directory (no config.json)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_PREFIX}", dir=out.parent))
    try:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
