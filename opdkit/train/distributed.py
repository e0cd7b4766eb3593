"""Batch-global statistics when the step's rows are spread over ranks (torchrun), and token selection that does not
depend on how the batch is split (ranks or micro-batches).

Every rank holds its own rows (prompts r, r + world, ...). Whatever the objective computes over the WHOLE batch —
z-score and sign-max-abs transforms of the sampled rewards, entropy-based token selection, the aggregation's token
and sequence counts, reward statistics — is computed here on all ranks' rows gathered (small [B, T] tensors only:
log-probs, masks, entropies; never logits or hidden states), then each rank keeps its own rows. With world 1 every
function is the plain single-process computation.
"""

from __future__ import annotations

import torch

from opdkit.dist import Dist
from opdkit.objectives.sampled import select_by_entropy
from opdkit.objectives.signals import SampledSignal
from opdkit.objectives.step import BatchTerms, batch_terms


def gather_rows(dist: Dist, x: torch.Tensor | None) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
    """All ranks' [B_r, T_r, ...] tensors concatenated along rows, T right-padded with zeros to the longest; and
    each rank's (row offset, T_r) to take its rows back."""
    if not dist.distributed:
        return x, [(0, 0 if x is None else int(x.shape[1]) if x.dim() > 1 else 0)]
    parts = dist.gather(None if x is None else x.detach().to("cpu"))
    if any(p is None for p in parts):
        return None, []
    T = max(int(p.shape[1]) for p in parts) if parts[0].dim() > 1 else 0
    out, spans, off = [], [], 0
    for p in parts:
        if p.dim() > 1 and p.shape[1] < T:
            p = torch.cat([p, p.new_zeros((p.shape[0], T - p.shape[1], *p.shape[2:]))], dim=1)
        out.append(p)
        spans.append((off, int(p.shape[1]) if p.dim() > 1 else 0))
        off += int(p.shape[0])
    return torch.cat(out).to(x.device), spans


def own_rows(dist: Dist, x: torch.Tensor, spans, B: int, T: int) -> torch.Tensor:
    """This rank's [B, T, ...] rows of a tensor built from `gather_rows` (world 1: `x`)."""
    if not dist.distributed:
        return x
    off = spans[dist.rank][0]
    return x[off:off + B, :T] if x.dim() > 1 else x[off:off + B]


def global_selection(dist: Dist, cfg, entropy_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """The tokens entropy selection keeps (objective.entropy_keep_fraction, entropy_scope), decided on the whole
    batch (every rank's rows, all micro-batches at once), as this rank's [B, T] bool mask."""
    B, T = mask_BT.shape
    ent, spans = gather_rows(dist, entropy_BT.double())
    msk, _ = gather_rows(dist, mask_BT.to(torch.uint8))
    keep = select_by_entropy(ent, msk.bool(), cfg.entropy_keep_fraction, cfg.entropy_scope)
    return own_rows(dist, keep, spans, B, T)


def global_batch_terms(dist: Dist, cfg, signal, old_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                       task_rewards_B: torch.Tensor | None) -> tuple[BatchTerms, list, torch.Tensor]:
    """`batch_terms` over every rank's rows (sampled estimators: advantages with batch statistics); returns the terms
    (advantages for ALL rows: take yours with `own_rows`), the row spans, and the whole batch's mask."""
    if not dist.distributed:
        return batch_terms(cfg, signal, old_logprobs_BT, mask_BT, task_rewards_B), [(0, mask_BT.shape[1])], mask_BT
    mask_all, spans = gather_rows(dist, mask_BT.to(torch.uint8))
    mask_all = mask_all.bool()
    if not isinstance(signal, SampledSignal):  # dense estimators have no batch statistics before the loss
        return batch_terms(cfg, signal, old_logprobs_BT, mask_BT, task_rewards_B), spans, mask_all
    old_all, _ = gather_rows(dist, old_logprobs_BT)
    t_all, _ = gather_rows(dist, signal.logprobs_BT)
    tr_all = gather_rows(dist, task_rewards_B)[0] if task_rewards_B is not None else None
    return batch_terms(cfg, SampledSignal(t_all), old_all, mask_all, tr_all), spans, mask_all


def check_distributed_config(cfg, dist: Dist) -> None:
    """What a torchrun run needs beyond a single process; one line each."""
    from opdkit.errors import UserError

    if cfg.rollout.prompts_per_step < dist.world:
        raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} is below the world size "
                        f"{dist.world}: every rank needs at least one prompt per step")
    if cfg.rollout.max_staleness is not None:
        raise UserError("rollout.max_staleness (asynchronous OPD) is single-process in this version; drop it under "
                        "torchrun (docs/scaling.md)")
    if cfg.model.lora_r > 0 and cfg.teacher.backend == "self_live":
        raise UserError("teacher.backend=self_live with LoRA under torchrun is not supported; use teacher.backend=self")


def shard_student(student, dist: Dist):
    """Every rank starts from rank 0's weights (a random init, LoRA adapters), then FSDP2 shards them."""
    import torch.distributed as tdist

    from opdkit.fsdp import shard

    student.to(dist.device)
    with torch.no_grad():
        for t in list(student.parameters()) + list(student.buffers()):
            buf = t.data.to(dist.comm_device)
            tdist.broadcast(buf, src=0)
            t.data.copy_(buf.to(t.device))
    return shard(student)


def on_main(dist: Dist, fn):
    """`fn()` on rank 0, its result (or its UserError, raised everywhere) on every rank: run-dir checks and
    checkpoint choice happen once, and a bad input stops every rank with the same one line."""
    from opdkit.errors import UserError

    if not dist.distributed:
        return fn()
    result, err = None, None
    if dist.is_main:
        try:
            result = fn()
        except UserError as e:
            err = str(e)
    result, err = dist.broadcast((result, err))
    if err is not None:
        raise UserError(err)
    return result


class NullLogger:
    """The metrics logger of ranks other than 0."""

    def log(self, step, metrics):
        return {}

    def close(self) -> None:
        pass


def save_final(cfg, student, tokenizer, out, dist: Dist) -> None:
    """The trained student as a HF model dir: full weights gathered from the shards (every rank), written by rank 0
    into a fresh copy of the model (a LoRA student merged)."""
    from opdkit.checkpoint import save_model_dir
    from opdkit.fsdp import full_state_dict
    from opdkit.train import setup

    state = full_state_dict(student)
    if dist.is_main:
        model, _ = setup.load_student(cfg.model, cfg.seed)
        model = setup.maybe_lora(model, cfg.model)
        model.load_state_dict(state)
        if cfg.model.lora_r > 0:
            model = model.merge_and_unload()
        save_model_dir(model, tokenizer, out)
    dist.barrier()


def micro_batches(B: int, mb: int, dist: Dist) -> list[tuple[slice, bool]]:
    """(rows, dummy) per micro-batch: this rank's rows in slices of `mb`, then — when another rank has more — dummy
    micro-batches (row 0 with nothing counted) so that every rank runs as many forward/backward passes: FSDP2's
    gathers and reductions are collectives and must line up."""
    n = -(-B // mb) if B else 0
    n_all = int(dist.max(float(n))) if dist.distributed else n
    out = [(slice(s, min(s + mb, B)), False) for s in range(0, B, mb)]
    return out + [(slice(0, 1), True)] * (n_all - n)
