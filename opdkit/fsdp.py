"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the trainer under torchrun: shard, unshard for generation,
gather full weights, and the sharded checkpoint (torch.distributed.checkpoint).

- `shard(model)`: `fully_shard` on each decoder layer, then on the root (a peft/LoRA model too: its layers are
  found through the base model). Gradients are SUMMED across ranks (gradient divide factor 1): the trainer's loss
  already divides by the GLOBAL token count, so the summed gradient is the full batch's.
- `unsharded(model)`: all parameters gathered for the duration (generation runs a different number of decode steps
  on every rank: with the parameters resident there is no collective per forward), resharded afterwards.
- `full_state_dict(model)`: the full (unsharded) tensors on every rank's CPU (a collective): the final HF model,
  vLLM weight pushes.
- `save_dcp` / `load_dcp`: model + optimizer state as a sharded `torch.distributed.checkpoint`, loadable at any
  world size (DCP reshards on load), also by a single process without a process group.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


def decoder_layers(model) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to shard")
    return list(layers)


def shard(model, *, reshard_after_forward: bool = True):
    """FSDP2 on every decoder layer and the root; gradients summed across ranks."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    for m in model.modules():  # every FSDP unit: SUM across ranks (plain sums: gloo has no pre-multiplied sum)
        if is_sharded(m):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model):
    """All parameters gathered while inside (no-op for a model that is not sharded)."""
    if not is_sharded(model):
        yield model
        return
    modules = [m for m in model.modules() if is_sharded(m)]
    for m in modules:
        m.set_reshard_after_forward(False)
    model.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full tensors (CPU) of every parameter and buffer; a collective when the model is sharded."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_dcp(path: Path, model, optimizer) -> None:
    """Sharded model + optimizer state into `path` (every rank writes its shards; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))


def load_dcp(path: Path, model, optimizer) -> None:
    """Load a `save_dcp` checkpoint into `model` / `optimizer`, sharded or not, at any world size."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # a single process resuming a torchrun checkpoint: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
