"""Atomic training checkpoints and atomic HF model directories.

Layout: `run_dir/checkpoints/step_000123/` with `model.safetensors`, `optimizer.pt`, `scheduler.pt`, `rng.pt`,
`state.json`, any sidecar files (the model's config.json and tokenizer, so `opdkit eval <checkpoint>` works) and,
written last, `manifest.json` (the step, and every file's size and SHA-256). Every directory is written under a
hidden temp name (`.tmp-...`) inside `checkpoints/` and renamed into place only once complete, so a crash mid-write
never leaves a directory that looks like a checkpoint; temp dirs are ignored by `latest_checkpoint` and removed by
the next save. `verify_checkpoint` re-checks the manifest (flipped bytes, a truncated file, an edited step), and
loading refuses non-finite weights; `latest_checkpoint(verify=True)` skips a checkpoint that fails, with a notice,
and resumes from the previous good one. Non-finite weights are never saved.

Tied / shared tensors (e.g. `lm_head.weight` tied to `model.embed_tokens.weight` with `tie_word_embeddings`) are
stored once: the alias names are recorded in the safetensors metadata and filled in again on load, so the model is
loaded with every key present; keys the model ties but the file lacks are accepted only if they are tied.
"""

from __future__ import annotations

import hashlib
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
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from opdkit.errors import RunFailed, UserError, is_short_write, one_line, write_error_message

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
MANIFEST_FILE = "manifest.json"
DCP_DIR = "dcp"  # a sharded checkpoint (torchrun runs): torch.distributed.checkpoint files instead of MODEL_FILE
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
    return p.is_dir() and (p / STATE_FILE).is_file() and ((p / MODEL_FILE).is_file() or is_sharded_checkpoint(p))


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


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


def latest_checkpoint(run_dir: str | os.PathLike, verify: bool = False,
                      notice: Callable[[str], None] | None = None) -> Path | None:
    """The complete checkpoint with the highest step, or None. With `verify`, the newest one that passes
    `verify_checkpoint`; each one skipped is reported through `notice` (one line)."""
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        if notice is not None:
            notice(f"opdkit: skipping checkpoint {path}: {problem}; using the previous one")
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(d: Path, step: int) -> dict:
    files = {}
    for f in sorted(d.rglob("*")):
        if f.is_file() and f.name != MANIFEST_FILE:
            files[f.relative_to(d).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    return {"format": 1, "step": int(step), "files": files}


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None if the checkpoint dir is intact, else what is wrong (one line): no or unreadable manifest, a step that
    differs between the dir name, manifest.json and state.json, a missing file, or a file whose size or SHA-256
    differs from the manifest's."""
    p = Path(path)
    try:
        man = json.loads((p / MANIFEST_FILE).read_text(encoding="utf-8"))
        files, step = dict(man["files"]), int(man["step"])
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (incomplete, or written by an older opdkit)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST_FILE} ({one_line(exc)[:120]})"
    m = _STEP_RE.match(p.name)
    if m and int(m.group(1)) != step:
        return f"{MANIFEST_FILE} says step {step} but the directory is {p.name}"
    for name, info in files.items():
        f = p / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("size") or _sha256(f) != info.get("sha256"):
            return f"{name} differs from {MANIFEST_FILE} (size or SHA-256): the file was changed or corrupted"
    for required in (f"{DCP_DIR}/.metadata" if is_sharded_checkpoint(p) else MODEL_FILE, STATE_FILE):
        if required not in files:
            return f"{MANIFEST_FILE} does not list {required}"
    try:
        state_step = json.loads((p / STATE_FILE).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable {STATE_FILE} ({one_line(exc)[:120]})"
    if not isinstance(state_step, int) or state_step != step:
        return f"{STATE_FILE} says step {state_step!r} but {MANIFEST_FILE} says {step}"
    return None


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


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


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
    sidecar: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write `run_dir/checkpoints/step_{step:06d}/` and return it; then keep only the newest `keep_last`
    complete checkpoints (None or <= 0 keeps all; the one just written is never deleted). `extra` must be JSON-able.
    `sidecar(dir)` writes further files (config.json, tokenizer) into the temp dir before the manifest. An existing
    checkpoint of the same step is replaced. Non-finite weights -> RunFailed, nothing written."""
    bad = first_nonfinite(model_state)
    if bad is not None:
        raise RunFailed(f"refusing to save a checkpoint of step {step}: weight {bad} is not finite (NaN/inf)")
    state_json = json.dumps({"step": int(step), "time": time.time(), "extra": extra or {}}, indent=1, allow_nan=True)
    root = Path(run_dir) / CHECKPOINTS
    final = checkpoint_path(run_dir, step)
    with write_guard(final, CHECKPOINT_LOST):
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash: never complete
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        tensors, aliases = split_shared(model_state)
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", _ALIASES_KEY: json.dumps(aliases)})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(_rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(state_json, encoding="utf-8")
        if sidecar is not None:
            sidecar(tmp)
        _seal(tmp, final, step)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or is_short_write(exc):
            raise RunFailed(_write_failed(exc, final)) from None
        raise
    _keep_newest(run_dir, final, keep_last)
    return final


def _seal(tmp: Path, final: Path, step: int) -> None:
    """fsync everything, write the manifest LAST (a checkpoint dir without it, or with files that differ from it,
    is never used), then rename the temp dir into place."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync_file(f)
    (tmp / MANIFEST_FILE).write_text(json.dumps(_manifest(tmp, step), indent=1), encoding="utf-8")
    _fsync_file(tmp / MANIFEST_FILE)
    _fsync_dir(tmp)
    _swap_into_place(tmp, final)


def _keep_newest(run_dir, final: Path, keep_last: int | None) -> None:
    if keep_last is not None and keep_last > 0:
        older = [d for _, d in list_checkpoints(run_dir) if d != final]
        with write_guard(Path(run_dir) / CHECKPOINTS):
            for d in older[: max(0, len(older) - (keep_last - 1))]:
                _remove_dir(d)


CHECKPOINT_LOST = ("; the incomplete checkpoint was removed (the previous ones are intact): resume=true "
                   "continues from the last complete one")
RESUME_HINT = "; resume=true continues the run from its last complete checkpoint"


def _write_failed(exc: BaseException, path: Path, after: str = CHECKPOINT_LOST) -> str:
    return write_error_message(exc, path) + after


class write_guard:
    """Context: an OSError (or torch's short write) while writing `path` -> RunFailed (exit code 3) with a
    one-line message ('disk full: ...') ending in `after`."""

    def __init__(self, path: Path, after: str = RESUME_HINT):
        self.path, self.after = path, after

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is not None and (isinstance(exc, OSError) or is_short_write(exc)):
            raise RunFailed(_write_failed(exc, self.path, self.after)) from None
        return False


def run_min_bytes(model: torch.nn.Module) -> int:
    """What every run writes at least: its last checkpoint (`checkpoint_bytes`) and the final model's weights. The
    trainers refuse to start when the run dir's file system has less free space (`check_free_space`): such a run
    could never finish."""
    return checkpoint_bytes(model) + sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """A lower bound of one checkpoint's size: the weights (tied ones once) plus AdamW's two fp32 moments of every
    trainable parameter."""
    seen, weights, moments = set(), 0, 0
    for p in model.parameters():
        # a DTensor (FSDP2) has no storage of its own here; parameters() already yields a tied Parameter once
        sharded = type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
        key = id(p) if sharded or p.device.type == "meta" else (p.untyped_storage().data_ptr(), p.storage_offset(),
                                                                 tuple(p.shape))
        if key in seen:
            continue
        seen.add(key)
        weights += p.numel() * p.element_size()
        if p.requires_grad:
            moments += 2 * p.numel() * 4
    return weights + moments


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
    if p.is_dir() and (p / MANIFEST_FILE).exists():
        problem = verify_checkpoint(p)
        if problem is not None:
            raise UserError(f"checkpoint {p} is damaged: {problem}")
    if p.is_dir() and is_sharded_checkpoint(p):
        from opdkit.checkpoint_dcp import load_sharded

        load_sharded(p, model, None)
        return
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
        sd = load_file(str(f), device="cpu")
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise UserError(f"cannot read weights {f}: {one_line(exc)}") from None
    bad = first_nonfinite(sd)
    if bad is not None:
        raise UserError(f"checkpoint {f} holds non-finite weights ({bad} has NaN/inf); fix: use an earlier checkpoint")
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


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    """ValueError when a restored optimizer state does not match its parameter's shape (an optimizer.pt of another
    model with as many parameters: torch loads it and would fail at the first step)."""
    for g, group in enumerate(optimizer.param_groups):
        for i, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"state {key!r} of parameter {i} (group {g}) has shape {tuple(value.shape)}, "
                                     f"the parameter {tuple(param.shape)}: an optimizer of another model")


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
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise UserError(f"{p / STATE_FILE}: step {state.get('step')!r} is not a non-negative integer; fix: use an "
                        "intact checkpoint")
    sharded = is_sharded_checkpoint(p)
    if sharded:  # model + optimizer from torch.distributed.checkpoint, resharded to this run's world size
        if (p / MANIFEST_FILE).exists() and (problem := verify_checkpoint(p)) is not None:
            raise UserError(f"checkpoint {p} is damaged: {problem}")
        from opdkit.checkpoint_dcp import load_sharded

        load_sharded(p, model, optimizer)
    else:
        from opdkit.fsdp import is_sharded

        if is_sharded(model):
            raise UserError(f"checkpoint {p} was written by a single-process run; resume it without torchrun (its "
                            "next checkpoints are then ordinary ones), or start the torchrun run afresh")
        load_model_state(p, model)

    def read(name: str):
        try:
            with warnings.catch_warnings():  # e.g. 'Detected pickle protocol 4': the error below says it all
                warnings.simplefilter("ignore")
                return torch.load(p / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file, a foreign or blocked pickle: several exception types
            raise UserError(f"cannot read {p / name}: {one_line(exc)[:200]}; fix: use an intact checkpoint") from None

    for obj, name in ((None if sharded else optimizer, OPTIMIZER_FILE), (scheduler, SCHEDULER_FILE)):
        if obj is None:
            continue
        if not (p / name).is_file():
            raise UserError(f"checkpoint {p} has no {name} to restore")
        try:
            obj.load_state_dict(read(name))
            if obj is optimizer:
                _check_optimizer_shapes(optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise UserError(f"{p / name} does not fit this run ({one_line(exc)[:200]}); fix: resume with the "
                            "model and optimizer settings that wrote it") from None
    rng_file = RNG_FILE
    if sharded:  # one RNG file per rank; a run at another world size takes rank 0's for the ranks it lacks
        rank_file = f"rng-{int(os.environ.get('RANK', '0'))}.pt"
        rng_file = rank_file if (p / rank_file).is_file() else "rng-0.pt"
    if restore_rng:
        if (p / rng_file).is_file():
            try:
                _set_rng_state(read(rng_file))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise UserError(f"{p / rng_file} is not an RNG state ({one_line(exc)[:200]})") from None
        else:
            warnings.warn(f"checkpoint {p} has no {rng_file}; RNG state not restored", stacklevel=2)
    return state


# ----------------------------------------------------------------------------------------------------------- HF dirs


def save_model_dir(model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Atomically write a standard HF model directory (safetensors weights + config [+ tokenizer]) loadable with
    `AutoModelForCausalLM.from_pretrained(out_dir)`. An existing model dir (one with config.json) is replaced; any
    other non-empty path -> UserError. A peft model must be merged (`merge_and_unload()`) by the caller first."""
    out = Path(out_dir)
    bad = first_nonfinite(dict(model.state_dict()))
    if bad is not None:
        raise RunFailed(f"refusing to save {out}: weight {bad} is not finite (NaN/inf)")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"refusing to replace {out}: it exists and is not a model directory (no config.json)")
    with write_guard(out):
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or is_short_write(exc):
            raise RunFailed(_write_failed(exc, out, RESUME_HINT)) from None
        raise
    return out
