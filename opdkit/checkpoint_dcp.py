"""Sharded checkpoints of an FSDP2 student under torchrun: the model and optimizer as a torch.distributed.checkpoint
(`dcp/`, loadable at any world size, or by one process), next to the same scheduler / state.json / manifest files
and the same atomic rename as the single-process checkpoints of `opdkit.checkpoint`."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from opdkit.checkpoint import (CHECKPOINTS, DCP_DIR, SCHEDULER_FILE, STATE_FILE, TMP_PREFIX, _keep_newest, _rng_state,
                               _seal, checkpoint_path, first_nonfinite)
from opdkit.errors import RunFailed, UserError, one_line


def save_sharded_checkpoint(run_dir, step: int, model, optimizer, scheduler, dist, *, extra: dict | None = None,
                            keep_last: int | None = None, sidecar: Callable[[Path], None] | None = None) -> Path:
    """`save_checkpoint` for an FSDP2 student under torchrun (a collective: every rank calls it): model and optimizer
    as a sharded torch.distributed.checkpoint in `dcp/` (loadable at any world size), the scheduler, state.json,
    sidecar and manifest by rank 0, one RNG file per rank; the same atomic rename and manifest."""
    from opdkit.fsdp import save_dcp

    local_bad = first_nonfinite({k: getattr(v, "_local_tensor", v) for k, v in model.state_dict().items()})
    if dist.max(0.0 if local_bad is None else 1.0):
        raise RunFailed(f"refusing to save a checkpoint of step {step}: a weight is not finite (NaN/inf)")
    root = Path(run_dir) / CHECKPOINTS
    final = checkpoint_path(run_dir, step)
    tmp = None
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = str(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    tmp = Path(dist.broadcast(tmp))
    try:
        save_dcp(tmp / DCP_DIR, model, optimizer)
        torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
        dist.barrier()
        if dist.is_main:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            state = {"step": int(step), "time": time.time(), "extra": extra or {}, "world": dist.world}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=True), encoding="utf-8")
            if sidecar is not None:
                sidecar(tmp)
            _seal(tmp, final, step)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    if dist.is_main:
        _keep_newest(run_dir, final, keep_last)
    return final


def load_sharded(p: Path, model, optimizer) -> None:
    from opdkit.fsdp import load_dcp

    try:
        if optimizer is not None:
            load_dcp(p / DCP_DIR, model, optimizer)
        else:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

            state = {"model": get_model_state_dict(model)}
            single = not (dist.is_available() and dist.is_initialized())
            with warnings.catch_warnings():  # one process reading a torchrun checkpoint: intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
                dcp.load(state, checkpoint_id=str(p / DCP_DIR), no_dist=single)
            set_model_state_dict(model, state["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"sharded checkpoint {p} does not fit this run ({one_line(exc)[:300]})") from None
    bad = next((n for n, t in model.named_parameters() if t.is_floating_point() and t.numel()
                and not bool(torch.isfinite(getattr(t, "_local_tensor", t)).all())), None)
    if bad is not None:
        raise UserError(f"checkpoint {p} holds non-finite weights ({bad} has NaN/inf); fix: use an earlier checkpoint")
