"""`Dist`: who this process is in a `torchrun` job, and the few collectives the trainer needs.

    dist = init_dist()          # world 1 without torchrun; gloo on CPU, NCCL on CUDA under torchrun
    n = dist.sum(local_count)   # all-reduce SUM (global token / sequence counts, z-score moments)
    parts = dist.gather(obj)    # every rank's object, in rank order (small per-step values: masks, log-probs)

Under `torchrun --nproc_per_node=N [--nnodes=M --rdzv-endpoint=host:port]` the environment carries RANK,
WORLD_SIZE, LOCAL_RANK; the device is `cuda:LOCAL_RANK` when CUDA is available, else the CPU (a single process: `cuda:0` or the CPU). Nothing here is
home-made distributed machinery: it is `torch.distributed` with one default process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, x):
        """All-reduce SUM of a number or a tensor (returned as the same kind)."""
        if not self.distributed:
            return x
        import torch.distributed as dist

        t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).to(self.comm_device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.item() if not torch.is_tensor(x) else t.to(x.device)

    def max(self, x):
        if not self.distributed:
            return x
        import torch.distributed as dist

        t = torch.as_tensor(x, dtype=torch.float64 if not torch.is_tensor(x) else None).to(self.comm_device).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() if not torch.is_tensor(x) else t.to(x.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shard(self, items: list, offset: int = 0) -> list[int]:
        """The indices of `items` this rank handles: rank r takes r, r + world, ... (deterministic, any sizes)."""
        return list(range(self.rank, len(items), self.world))


def init_dist() -> Dist:
    """A `Dist` from the torchrun environment (initialising the default process group once), else world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:  # one process: the first GPU when there is one (as rank 0 of a torchrun job would take)
        return Dist(device=torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local, device=device, backend=backend)


def close_dist(d: Dist) -> None:
    if d.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
