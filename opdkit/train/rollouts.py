"""Where each training step's batch comes from: the step's prompts (a deterministic function of (seed, step)), the
rollout backend that samples them (synchronously, or ahead of the trainer by an AsyncRollout producer), GKD's
reference responses on off-policy steps, weight pushes after optimizer steps, and the bookkeeping of stale rows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from opdkit.data.prompts import PromptRecord, encode_prompts
from opdkit.errors import UserError
from opdkit.rollout import SAMPLERS
from opdkit.rollout.async_ import AsyncRollout
from opdkit.rollout.base import SamplingSpec
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.hf import HFRollout, teacher_forced_logprobs
from opdkit.rollout.reference import ReferenceRollout
from opdkit.vllm_server import resolve_python


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


@dataclass
class StepPlan:
    step: int
    records: list[PromptRecord]
    prompt_ids: list[list[int]]
    report: dict
    on_policy: bool
    seed: int
    prompt_index: list[int] = None  # the step's (global) index of each prompt

    def __post_init__(self) -> None:
        if self.prompt_index is None:
            self.prompt_index = list(range(len(self.prompt_ids)))


def own_prompts(plan: StepPlan, dist) -> StepPlan:
    """The prompts rank r handles: r, r + world, ... of the step's prompts (after over-long ones were dropped)."""
    idx = dist.shard(plan.prompt_ids)
    if not idx:
        raise UserError(f"step {plan.step}: rank {dist.rank} got no prompt ({len(plan.prompt_ids)} prompts kept for "
                        f"{dist.world} ranks); raise rollout.prompts_per_step or data.max_prompt_tokens")
    return StepPlan(plan.step, [plan.records[i] for i in idx], [plan.prompt_ids[i] for i in idx], plan.report,
                    plan.on_policy, plan.seed, [plan.prompt_index[i] for i in idx])


import contextlib  # noqa: E402


@contextlib.contextmanager
def generation_weights(student, rollout):
    """An FSDP2 student sampled in this process is unsharded for the generation (each rank decodes its own rows for
    as many steps as they need, with no collective per decode step)."""
    from opdkit.fsdp import unsharded

    if isinstance(rollout, HFRollout) and not rollout.snapshot:
        with unsharded(student):
            yield
    else:
        yield


def plan_step(cfg, source, tokenizer, step: int) -> StepPlan:
    """Step `step`'s prompts and whether it is on-policy (GKD lambda): the same whenever and wherever it is asked."""
    seed = step_seed(cfg.seed, step)
    rng = random.Random(seed)
    records = source.draw(rng, cfg.rollout.prompts_per_step)
    prompt_ids, report = encode_prompts(records, tokenizer, use_chat_template=cfg.data.use_chat_template,
                                        max_prompt_tokens=cfg.data.max_prompt_tokens,
                                        on_too_long=cfg.data.on_too_long)
    records = [records[i] for i in report["kept_indices"]]
    return StepPlan(step, records, prompt_ids, report, rng.random() < cfg.rollout.gkd_lambda, seed)


def sampling_spec(cfg, eos: list[int], pad: int, masked: list[int]) -> SamplingSpec:
    r = cfg.rollout
    return SamplingSpec(max_new_tokens=r.max_new_tokens, eos_ids=tuple(eos), pad_id=pad, n=r.n_samples,
                        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, masked_ids=tuple(masked))


def build_rollout(cfg, student, tokenizer, version: int, dist=None):
    """The rollout backend of `cfg.rollout` (HFRollout or VLLMRollout), sampling from `student` at `version`."""
    r = cfg.rollout
    if r.backend == "vllm":
        from opdkit.rollout.vllm import VLLMRollout, merged_state_dict, write_model_dir

        v = r.vllm
        max_len = v.max_model_len or (cfg.data.max_prompt_tokens + r.max_new_tokens)
        n_pos = getattr(getattr(student, "config", None), "max_position_embeddings", None)
        if v.max_model_len is None and n_pos:
            max_len = min(max_len, int(n_pos))
        python = resolve_python(v.python)
        if v.mode == "server" and v.url is None and not Path(python).is_file():
            raise UserError(f"rollout.vllm.python={python} does not exist; make it with `bash scripts/setup_vllm.sh` "
                            "or point it at a Python that has vllm")
        kw = dict(mode=v.mode, python=python, dtype=v.dtype, max_model_len=max_len, kv_cache_gib=v.kv_cache_gib,
                  launch_args=v.launch_args, startup_timeout_s=v.startup_timeout_s, timeout_s=v.timeout_s,
                  retries=v.retries, concurrency=v.concurrency, rows_per_request=v.rows_per_request,
                  weight_sync_steps=r.weight_sync_steps, gpu_memory_utilization=v.gpu_memory_utilization,
                  version=version)
        if dist is None or not dist.distributed:
            return VLLMRollout.start(student, tokenizer, url=v.url, **kw)
        # torchrun: rank 0 launches the server (or all use rollout.vllm.url); every rank samples its own prompts;
        # weights are gathered by all ranks and pushed by rank 0
        launched, err = None, None
        state = None if v.url else merged_state_dict(student)  # a collective: full weights on every rank
        if dist.is_main and not v.url:
            try:
                import tempfile as _tf

                d = write_model_dir(state, student.config, tokenizer, Path(_tf.mkdtemp(prefix="opdkit-vllm-init-")))
                launched = VLLMRollout.start(student, tokenizer, url=None, model_dir=str(d), **kw)
            except UserError as e:
                err = str(e)
        url, err = dist.broadcast((launched.engine.url if launched is not None else v.url, err))
        if err:
            raise UserError(err)
        rollout = launched if launched is not None else VLLMRollout.start(
            student, tokenizer, url=url, push=False, **kw)
        rollout.dist = dist
        if v.url:  # a server started elsewhere: give it this student's weights
            rollout.load_weights(student, version, force=True)
        return rollout
    hf = HFRollout(student, SAMPLERS[r.sampler], snapshot=r.max_staleness is not None)
    hf.version = version
    return hf


class StepBatches:
    """`get(step)` -> (plan, batch, timings) for every step; `after_update(student, version)` pushes weights;
    `evaluate_rollout()` is the backend the held-out eval samples with (current weights)."""

    def __init__(self, cfg, source, tokenizer, student, spec: SamplingSpec, *, start_step: int, dist=None):
        from opdkit.dist import Dist

        self.cfg, self.source, self.tok, self.student, self.spec = cfg, source, tokenizer, student, spec
        self.dist = dist or Dist()
        # one generator per row (seeded by step, prompt and sample): a prompt's samples do not depend on which rank
        # or batch holds it. Always so under torchrun; single-process runs keep one generator per step (their
        # documented results) unless rollout.seed_per_prompt=true.
        self.per_row_seeds = self.dist.distributed or bool(cfg.rollout.seed_per_prompt)
        from opdkit.train import episodes

        # a tool task (source.env_for): each policy turn is one call of the backend, env turns appended in between
        self.rollout = episodes.wrap(build_rollout(cfg, student, tokenizer, version=start_step, dist=self.dist),
                                     source, tokenizer, cfg)
        self.reference = ReferenceRollout(student, tokenizer) if cfg.rollout.gkd_lambda < 1.0 else None
        self.version = start_step
        self.producer = None
        if cfg.rollout.max_staleness is not None:
            self.producer = AsyncRollout(self._produce, start_step=start_step, end_step=cfg.steps,
                                         max_staleness=cfg.rollout.max_staleness)

    def _produce(self, step: int):
        plan = plan_step(self.cfg, self.source, self.tok, step)
        if self.dist.distributed:  # this rank's prompts: r, r + world, ... of the step's (global) prompts
            plan = own_prompts(plan, self.dist)
        if not plan.on_policy:  # reference responses need the current student: built by the trainer
            return plan, None
        if self.per_row_seeds:
            gen = [torch.Generator().manual_seed(step_seed(plan.seed, 1 + i * 1000 + j))
                   for i in plan.prompt_index for j in range(self.spec.n)]
        else:
            gen = torch.Generator().manual_seed(plan.seed)
        with generation_weights(self.student, self.rollout):
            batch = self.rollout.sample(plan.prompt_ids, self.spec, records=plan.records, generator=gen,
                                        seed=plan.seed)
        return plan, batch

    def get(self, step: int) -> tuple[StepPlan, RolloutBatch, dict]:
        timing = {}
        if self.producer is not None:
            (plan, batch), waited, gen_s = self.producer.get(step)
            timing = {"rollout/wait_seconds": waited, "rollout/generate_seconds": gen_s}
        else:
            plan, batch = self._produce(step)
        if batch is None:
            batch = self.reference.sample(plan.prompt_ids, self.spec, records=plan.records)
        return plan, batch.to(self.dist.device) if self.dist.device.type != "cpu" else batch, timing

    def after_update(self, student, version: int) -> None:
        """The student's weights after optimizer step `version`: to the engine (vLLM every weight_sync_steps; a
        snapshot for async HF), and the producer may run ahead again."""
        self.version = int(version)
        if self.reference is not None:
            self.reference.load_weights(student, version)
        if self.producer is not None:
            self.producer.push(lambda: self.rollout.load_weights(student, version), version)
        else:
            self.rollout.load_weights(student, version)

    def eval_sample(self, prompt_ids, spec: SamplingSpec, student, records=None) -> RolloutBatch:
        """Greedy held-out rollouts with the CURRENT weights (the engine is synced first if it lags); `records`:
        the prompts' records (a multi-turn task makes each episode's env from its record)."""
        from opdkit.rollout.vllm import VLLMRollout
        from opdkit.train import episodes

        recs = records if self.source.env_for is not None else None
        if isinstance(getattr(self.rollout, "inner", self.rollout), VLLMRollout):
            def sample():
                if self.rollout.version != self.version:
                    self.rollout.load_weights(student, self.version, force=True)
                return self.rollout.sample(prompt_ids, spec, records=recs)
            if self.producer is not None:
                with self.producer.lock:
                    return sample()
            return sample()
        from opdkit.fsdp import unsharded

        with unsharded(student):
            return episodes.wrap(HFRollout(student), self.source, self.tok, self.cfg).sample(prompt_ids, spec,
                                                                                           records=recs)

    def stats(self) -> dict:
        out = dict(self.rollout.stats())
        if self.producer is not None:
            out.update(self.producer.stats())
        return out

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        self.rollout.close()


def stale_rows(batch: RolloutBatch, version: int, max_staleness: int | None, student,
               is_truncation: float = 2.0) -> tuple[RolloutBatch, torch.Tensor | None, dict]:
    """Rows older than `max_staleness` versions are dropped; for the remaining stale rows (sampled by an older
    version) the behaviour log-probs are kept for the truncated importance weight and `model_logprobs_BT` (pi_old of
    the advantages) is recomputed under the current student. Returns (batch, behaviour_logprobs_BT or None, metrics).
    A batch whose rows were all dropped comes back with zero rows."""
    if batch.policy_version_B is None:
        return batch, None, {}
    staleness = version - batch.policy_version_B
    metrics = {"staleness/mean": staleness.double().mean().item(), "staleness/max": int(staleness.max())}
    limit = max_staleness if max_staleness is not None else math.inf
    keep = staleness <= limit
    if not bool(keep.all()):
        metrics["rollout/dropped_rows"] = int((~keep).sum())
        batch = batch.rows(keep)
        staleness = staleness[keep]
        if batch.batch_size == 0:
            return batch, None, metrics
    metrics.setdefault("rollout/dropped_rows", 0)
    stale = staleness > 0
    if not bool(stale.any()):
        return batch, None, metrics
    behaviour = torch.where(stale[:, None], batch.model_logprobs_BT, torch.full_like(batch.model_logprobs_BT,
                                                                                        math.nan))
    batch.model_logprobs_BT = teacher_forced_logprobs(student, batch)
    metrics["staleness/stale_rows"] = int(stale.sum())
    m = stale[:, None] & batch.response_mask_BT.bool()
    if bool(m.any()):  # the truncated importance weights the update applies (same weights as its first epoch)
        log_w = (batch.model_logprobs_BT - behaviour.nan_to_num(0.0))[m].double()
        metrics["is_weight/mean"] = log_w.exp().clamp(max=is_truncation).mean().item()
        metrics["is_weight/truncated_frac"] = (log_w.exp() >= is_truncation).double().mean().item()
    return batch, behaviour, metrics
