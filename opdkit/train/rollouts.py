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


def build_rollout(cfg, student, tokenizer, version: int):
    """The rollout backend of `cfg.rollout` (HFRollout or VLLMRollout), sampling from `student` at `version`."""
    r = cfg.rollout
    if r.backend == "vllm":
        from opdkit.rollout.vllm import VLLMRollout

        v = r.vllm
        max_len = v.max_model_len or (cfg.data.max_prompt_tokens + r.max_new_tokens)
        n_pos = getattr(getattr(student, "config", None), "max_position_embeddings", None)
        if v.max_model_len is None and n_pos:
            max_len = min(max_len, int(n_pos))
        python = resolve_python(v.python)
        if v.mode == "server" and v.url is None and not Path(python).is_file():
            raise UserError(f"rollout.vllm.python={python} does not exist; make it with `bash scripts/setup_vllm.sh` "
                            "or point it at a Python that has vllm")
        return VLLMRollout.start(student, tokenizer, mode=v.mode, url=v.url, python=python, dtype=v.dtype,
                                 max_model_len=max_len, kv_cache_gib=v.kv_cache_gib, launch_args=v.launch_args,
                                 startup_timeout_s=v.startup_timeout_s, timeout_s=v.timeout_s, retries=v.retries,
                                 concurrency=v.concurrency, rows_per_request=v.rows_per_request,
                                 weight_sync_steps=r.weight_sync_steps,
                                 gpu_memory_utilization=v.gpu_memory_utilization, version=version)
    hf = HFRollout(student, SAMPLERS[r.sampler], snapshot=r.max_staleness is not None)
    hf.version = version
    return hf


class StepBatches:
    """`get(step)` -> (plan, batch, timings) for every step; `after_update(student, version)` pushes weights;
    `evaluate_rollout()` is the backend the held-out eval samples with (current weights)."""

    def __init__(self, cfg, source, tokenizer, student, spec: SamplingSpec, *, start_step: int):
        self.cfg, self.source, self.tok, self.student, self.spec = cfg, source, tokenizer, student, spec
        self.rollout = build_rollout(cfg, student, tokenizer, version=start_step)
        self.reference = ReferenceRollout(student, tokenizer) if cfg.rollout.gkd_lambda < 1.0 else None
        self.version = start_step
        self.producer = None
        if cfg.rollout.max_staleness is not None:
            self.producer = AsyncRollout(self._produce, start_step=start_step, end_step=cfg.steps,
                                         max_staleness=cfg.rollout.max_staleness)

    def _produce(self, step: int):
        plan = plan_step(self.cfg, self.source, self.tok, step)
        if not plan.on_policy:  # reference responses need the current student: built by the trainer
            return plan, None
        gen = torch.Generator().manual_seed(plan.seed)
        batch = self.rollout.sample(plan.prompt_ids, self.spec, records=plan.records, generator=gen, seed=plan.seed)
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
        return plan, batch, timing

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

    def eval_sample(self, prompt_ids, spec: SamplingSpec, student) -> RolloutBatch:
        """Greedy held-out rollouts with the CURRENT weights (the engine is synced first if it lags)."""
        from opdkit.rollout.vllm import VLLMRollout

        if isinstance(self.rollout, VLLMRollout):
            def sample():
                if self.rollout.version != self.version:
                    self.rollout.load_weights(student, self.version, force=True)
                return self.rollout.sample(prompt_ids, spec)
            if self.producer is not None:
                with self.producer.lock:
                    return sample()
            return sample()
        return HFRollout(student).sample(prompt_ids, spec)

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
