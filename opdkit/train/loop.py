"""The OPD training loop: rollout -> teacher scoring -> objective -> update.

CPU (default):   opdkit train                                   (embedded student <- embedded teacher)
                 opdkit train my.yaml objective.divergence=jsd objective.gradient=corrected
1 GPU / N GPUs:  not wired in this version: the loop runs on CPU (FSDP2 under torchrun is planned; see README).

Reads top to bottom: `train(cfg)` sets everything up, then each step
  1. draws prompts; with probability gkd_lambda the student samples responses (on-policy), otherwise the dataset's
     reference responses are used (GKD, Agarwal et al. 2024);
  2. the teacher scores the response tokens, returning only the signal the objective declares;
  3. sampled objectives get their advantages once for the whole batch (batch statistics such as z-score do not
     depend on the micro-batch split), from the sampler's log-probs (pi_old);
  4. PPO epochs x micro-batches of forward/backward, each aggregated over the step's GLOBAL token count, so the
     gradient equals the full-batch gradient; clip, AdamW step, schedule;
  5. log metrics + timings, evaluate, checkpoint (atomic; resume continues exactly: every step's randomness derives
     from (seed, step)).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opdkit.config import config_hash, load_config
from opdkit.config_help import help_text
from opdkit.diagnostics import FailureDetector
from opdkit.diagnostics.backoff import LrBackoff, runaway_signals
from opdkit.data.prompts import encode_prompts
from opdkit.errors import RunFailed, UserError, run_cli
from opdkit.objectives import opd_per_token_loss
from opdkit.dist import Dist, close_dist, init_dist
from opdkit.fsdp import full_tensor
from opdkit.objectives.loss import aggregate, token_entropies, token_stats
from opdkit.objectives.step import dense_reward
from opdkit.train.distributed import (NullLogger, check_distributed_config, gather_rows, global_batch_terms,
                                      global_selection, micro_batches, on_main, own_rows, save_final,
                                      shard_student)
from opdkit.rollout import RolloutBatch
from opdkit.rollout.base import stop_ids
from opdkit.teacher import Teacher, TeacherRequest, check_serves
from opdkit.teacher.cross_tokenizer import drop_unaligned
from opdkit.train import episodes, setup
from opdkit.checkpoint import latest_checkpoint, load_checkpoint, run_min_bytes, save_checkpoint, save_model_dir
from opdkit.checkpoint_dcp import save_sharded_checkpoint
from opdkit.train.config import TrainConfig
from opdkit.train.student_pass import student_inputs, use_fused
from opdkit.report.plots import plot_run, reward_histogram
from opdkit.train.logging import check_free_space, check_run_dir, create_run_dir, owned_bytes, Progress
from opdkit.train.rollouts import StepBatches, sampling_spec, stale_rows, step_seed
from opdkit.metrics_log import MetricsLogger, read_metrics
from opdkit.train.signals import GracefulStop

# Knobs that may change between a run and its resumption without making it a different run.
RESUMABLE_KNOBS = ("resume", "overwrite", "steps", "progress", "threads", "save_every", "keep_last", "eval_every",
                   "run_dir", "optim.max_skipped_steps", "max_seconds")


@dataclass
class Models:
    student: torch.nn.Module
    tokenizer: object
    teacher: Teacher
    eos_ids: list[int]
    pad_id: int
    masked_ids: list[int]
    dist: Dist = field(default_factory=Dist)  # world 1 without torchrun
    fused: bool = False  # optim.fused_loss resolved for this objective and model (train/student_pass.py)


# ----------------------------------------------------------------------------------------------- update
def update(cfg: TrainConfig, m: Models, opt, sched, batch: RolloutBatch, signal, task_rewards_B,
           behaviour_logprobs_BT=None) -> dict:
    """Steps 3-4: batch-level terms once per step on the WHOLE batch (every rank's rows: advantages with their
    z-score / sign-max-abs statistics, entropy selection, token and sequence counts), then PPO epochs x
    micro-batches of this rank's rows, each aggregated over the global counts, so the summed gradient (FSDP2 sums
    across ranks) equals the full batch's. `behaviour_logprobs_BT`: rows sampled by an older policy (async OPD) get
    a truncated importance weight."""
    obj, dist = cfg.objective, m.dist
    mask_BT = batch.response_mask_BT.bool()
    old_lp_BT = batch.model_logprobs_BT
    B, mb, T = batch.batch_size, cfg.optim.micro_batch_size, batch.response_len
    pos_BL = batch.position_ids_BL()

    def student_rows(rows):  # logits, or hidden states + lm_head for the fused path (optim.fused_loss)
        return student_inputs(m.student, batch.input_ids_BL[rows], batch.attention_mask_BL[rows], pos_BL[rows], T,
                              m.fused)

    terms, spans, mask_all_BT = global_batch_terms(dist, obj, signal, old_lp_BT, mask_BT, task_rewards_B)
    adv_BT, metrics = terms.advantages_BT, terms.metrics
    if adv_BT is not None:
        adv_BT = own_rows(dist, adv_BT, spans, B, T)
    if terms.raw_reward_BT is not None and dist.is_main:
        metrics["reward/hist"] = reward_histogram(terms.raw_reward_BT, mask_all_BT)
    selected_BT = None
    if obj.entropy_keep_fraction < 1.0:  # one selection for the whole batch, not per micro-batch or rank
        with torch.no_grad():
            ent = torch.zeros(B, T, dtype=torch.float64)
            for rows, dummy in micro_batches(B, mb, dist):
                e = token_entropies(obj, tokens_BT=batch.response_ids_BT[rows], mask_BT=_counted(mask_BT[rows], dummy),
                                    teacher=signal.rows(rows), **student_rows(rows)).double()
                if not dummy:
                    ent[rows] = e
        selected_BT = global_selection(dist, obj, ent, mask_BT)
    count_BT = mask_BT if selected_BT is None else mask_BT & selected_BT
    n_tokens = max(int(dist.sum(float(count_BT.sum()))), 1)
    n_seqs = max(int(dist.sum(float((count_BT.sum(-1) > 0).sum()))), 1)
    m.student.train()
    reward_BT = torch.zeros(B, T, dtype=torch.float64)
    sums = {"entropy/student": 0.0, "clip_frac": 0.0, "kl": 0.0, "entropy/teacher": 0.0, "divergence": 0.0}
    grad_norms = []
    for epoch in range(cfg.optim.ppo_epochs):
        opt.zero_grad(set_to_none=True)
        loss_total = 0.0
        for rows, dummy in micro_batches(B, mb, dist):
            per, mm = opd_per_token_loss(
                obj, tokens_BT=batch.response_ids_BT[rows], mask_BT=_counted(mask_BT[rows], dummy), teacher=signal.rows(rows),
                **student_rows(rows), old_logprobs_BT=old_lp_BT[rows] if obj.uses_old_logprobs else None,
                advantages_BT=None if adv_BT is None else adv_BT[rows],
                task_rewards_B=None if terms.task_rewards_B is None else terms.task_rewards_B[rows],
                behaviour_logprobs_BT=None if behaviour_logprobs_BT is None else behaviour_logprobs_BT[rows],
                is_truncation=cfg.rollout.is_truncation,
                selected_BT=None if selected_BT is None else selected_BT[rows], fused=m.fused)
            loss = aggregate(per.loss_BT, per.mask_BT, obj.aggregation, num_tokens=n_tokens, num_sequences=n_seqs)
            loss.backward()
            loss_total += loss.item()
            if epoch == 0 and not dummy:
                w = mm["num_tokens"] / n_tokens
                for k in sums:
                    sums[k] += w * mm.get(k, 0.0)
                if adv_BT is None:
                    reward_BT[rows] = dense_reward(per)
        loss_total = dist.sum(loss_total)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        gn = torch.nn.utils.clip_grad_norm_([p for p in m.student.parameters() if p.requires_grad], clip)
        gn = float(full_tensor(gn))
        grad_norms.append(gn)
        if epoch == 0:
            metrics["loss"] = loss_total
        if not (math.isfinite(loss_total) and math.isfinite(gn)):
            # A non-finite loss or gradient norm would write NaN into the weights (or, clipped, make the update a
            # silent no-op): skip the optimizer step, leaving weights and AdamW state untouched (the caller logs it,
            # counts consecutive skips and stops the run after optim.max_skipped_steps). Global values: every rank
            # decides the same.
            opt.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            metrics["skipped_loss"], metrics["skipped_grad_norm"] = loss_total, gn
            break
        opt.step()
    metrics.setdefault("skipped", 0.0)
    _step_schedule(sched)
    m.student.eval()
    if adv_BT is None:  # dense estimators: the "reward" is minus the per-token divergence (whole batch)
        reward_all, _ = gather_rows(dist, reward_BT)
        mask_all, _ = gather_rows(dist, mask_BT.to(torch.uint8))
        if dist.is_main:
            metrics.update(token_stats("reward", reward_all, mask_all.bool(), by_position=True))
            metrics["reward/hist"] = reward_histogram(reward_all, mask_all.bool())
    for k, v in sums.items():
        v = dist.sum(v)
        if k not in metrics and (v != 0.0 or k in ("entropy/student", "clip_frac")):
            metrics[k] = v
    if selected_BT is not None:
        metrics["selected_frac"] = n_tokens / max(dist.sum(float(mask_BT.sum())), 1.0)
    metrics["grad_norm"] = grad_norms[0]
    metrics["grad_norm_max_epoch"] = max(grad_norms)
    return metrics


def _counted(mask_BT, dummy: bool):
    return torch.zeros_like(mask_BT) if dummy else mask_BT


def _step_schedule(sched) -> None:
    with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule stepped before AdamW
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        sched.step()


# ----------------------------------------------------------------------------------------------- eval
def evaluate_greedy(m: Models, source: setup.PromptSource, cfg: TrainConfig, batches: StepBatches) -> dict:
    """Held-out accuracy with greedy decoding (avg@1) and mean response length, sampled by the run's rollout
    backend with the current weights and the run's EOS ids (the same as `opdkit eval`). Under torchrun every rank
    decodes its share of the held-out prompts."""
    if not source.eval_records:
        return {}
    dist = m.dist
    mine = dist.shard(source.eval_records) if dist.distributed else list(range(len(source.eval_records)))
    ids, report = encode_prompts([source.eval_records[i] for i in (mine or [0])], m.tokenizer,
                                 use_chat_template=cfg.data.use_chat_template,
                                 max_prompt_tokens=cfg.data.max_prompt_tokens, on_too_long="truncate")
    spec = sampling_spec(cfg, m.eos_ids, m.pad_id, m.masked_ids).greedy(batch_size=64)
    recs = [source.eval_records[i] for i in (mine or [0])]
    recs = [recs[j] for j in report["kept_indices"]]
    batch = batches.eval_sample(ids, spec, m.student, recs)  # every rank samples (a rank without prompts: a dummy)
    scores = episodes.task_rewards(batch, decode(m, batch), recs, source.score).tolist()
    rows = []
    for j, c, n in zip(report["kept_indices"], scores, batch.response_lengths_B.tolist(), strict=True):
        if mine:
            r = source.eval_records[mine[j]]
            rows.append((mine[j], c, n, source.route_key(r)))
    rows = sorted(x for part in dist.gather(rows) for x in part)
    correct = [c for _, c, _, _ in rows]
    fin = batch.finished_B.tolist()[:len(report["kept_indices"])] if mine else []
    cut = dist.sum(float(sum(1 for f in fin if not f)))  # responses cut at rollout.max_new_tokens
    out = {"eval/accuracy": sum(correct) / len(correct),
           "eval/response_length": sum(n for _, _, n, _ in rows) / len(rows), "eval/truncated": cut / len(rows)}
    keys = [k for _, _, _, k in rows]
    if len({k for k in keys if k is not None}) > 1:  # a mixture (task:a+b, routed data): accuracy per key too
        for key in sorted({k for k in keys if k is not None}):
            vals = [c for c, k in zip(correct, keys, strict=True) if k == key]
            out[f"eval/accuracy/{key}"] = sum(vals) / len(vals)
    return out


def decode(m: Models, batch: RolloutBatch) -> list[str]:
    out = []
    for ids, n in zip(batch.response_ids_BT.tolist(), batch.response_lengths_B.tolist(), strict=True):
        out.append(m.tokenizer.decode(ids[:n], skip_special_tokens=True))
    return out


def _scheduler(opt, cfg: TrainConfig):
    warm, total, kind = cfg.optim.warmup_steps, cfg.steps, cfg.optim.schedule

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------------------------- main loop
def train(cfg: TrainConfig) -> dict:
    """`opdkit train`: the same code path in one process and under `torchrun` (FSDP2, docs/scaling.md)."""
    dist = init_dist()  # world 1 without torchrun
    try:
        summary = _setup_and_train(cfg, dist)
        dist.barrier()  # every rank done before the process group goes: an early teardown aborted a rank's gloo thread
        return summary
    finally:
        close_dist(dist)


def _setup_and_train(cfg: TrainConfig, dist: Dist) -> dict:
    torch.set_num_threads(cfg.threads)
    if dist.distributed:
        check_distributed_config(cfg, dist)
        cfg.rollout.seed_per_prompt = True  # what a torchrun run does: recorded so that a 1-process resume matches
    # Set-up: everything that can fail on bad input happens before the run dir is written.
    source = setup.prompt_source(cfg.data, cfg.seed)
    episodes.check_multi_turn(cfg, source)  # a tool task: knobs it does not support, refused before any write
    if cfg.rollout.gkd_lambda < 1.0 and source.draw(random.Random(0), 1)[0].meta.get("completion") is None:
        raise UserError("rollout.gkd_lambda < 1 mixes in the dataset's reference responses: set "
                        "data.completion_field (built-in tasks have them)")
    student, tok = setup.load_student(cfg.model, cfg.seed)
    frozen = setup.frozen_self_teacher(cfg, student)  # OPSD's frozen teacher: the initial weights, before LoRA
    student = setup.maybe_lora(student, cfg.model)
    eos, pad, masked = stop_ids(student, tok, cfg.rollout.masked_tokens)
    episodes.check_env_tokens(source, tok)  # a tool task's stop strings: one known token each
    setup.check_vocab_knobs(cfg, student)  # objective.top_k / rollout.top_k above the vocabulary
    for note in setup.check_prompts(cfg, source, tok, cfg.seed):  # all prompts too long -> UserError; <unk> chars
        if dist.is_main:
            _printer(cfg)(note)
    if dist.distributed:  # rank 0's weights on every rank, then FSDP2: each decoder layer and the root
        student = shard_student(student, dist)
    elif dist.device.type != "cpu":  # one process on a GPU (cuda:0)
        student.to(dist.device)
    teacher = setup.build_teacher(cfg, student, tok, frozen, pad_token_id=pad, source=source, dist=dist)
    try:  # a teacher may hold a server it started: stopped however the run ends
        request = TeacherRequest.for_objective(cfg.objective, chunk_size=cfg.teacher.score_chunk_size)
        check_serves(teacher, request)  # a teacher that cannot give the objective's signal: one line, nothing written
        return _train(cfg, source, Models(student, tok, teacher, eos, pad, masked, dist), request)
    finally:
        teacher.close()


def _train(cfg: TrainConfig, source: setup.PromptSource, m: Models, request: TeacherRequest) -> dict:
    student, tok, teacher, dist = m.student, m.tokenizer, m.teacher, m.dist
    chash = config_hash(cfg, exclude=RESUMABLE_KNOBS)
    m.fused = use_fused(cfg.optim.fused_loss, cfg.objective, student, dist.distributed)  # `on` refused: nothing written
    # -- run dir: checked, then the checkpoint to resume from loaded and the free space checked, and only then
    #    written (issue #14: bad input leaves the file system unchanged); by rank 0 under torchrun
    run_dir = on_main(dist, lambda: check_run_dir(cfg.run_dir, chash, resume=cfg.resume, overwrite=cfg.overwrite,
                                                   config=cfg, exclude=RESUMABLE_KNOBS))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                            weight_decay=cfg.optim.weight_decay)
    sched = _scheduler(opt, cfg)
    say = _printer(cfg) if dist.is_main else (lambda line: None)
    start, extra = 0, {}
    ckpt = on_main(dist, lambda: latest_checkpoint(run_dir, verify=True, notice=say)) if cfg.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, opt, sched)
        start, extra = state["step"], state.get("extra", {})
    def make_run_dir() -> None:
        check_free_space(run_dir, run_min_bytes(student), "a checkpoint plus the final model",
                         reclaimable_bytes=owned_bytes(run_dir) if cfg.overwrite else 0)
        create_run_dir(run_dir, chash, overwrite=cfg.overwrite, config=cfg)

    on_main(dist, make_run_dir)
    # -- end of the run-dir block
    # A resumed run continues its counters (teacher compute is compared at equal budgets by `opdkit compare`).
    teacher_tokens, train_seconds = int(extra.get("teacher_tokens", 0)), float(extra.get("train_seconds", 0.0))
    skipped_streak, skipped_total = int(extra.get("skipped_streak", 0)), int(extra.get("skipped_total", 0))
    # metrics.jsonl keeps the records up to the checkpoint's step (a fresh start keeps none): every step once.
    # rank 0 writes metrics, prints and detects; the other ranks only compute
    logger = MetricsLogger(run_dir, resume_step=start if ckpt is not None else -1) if dist.is_main else NullLogger()
    detector = FailureDetector.for_run(cfg)  # known OPD failure modes, one log line each (docs/diagnostics.md)
    backoff = LrBackoff(cfg.diagnostics.backoff_factor, cfg.diagnostics.max_backoffs, cfg.diagnostics.length_window,
                        int(extra.get("lr_backoffs", 0)))
    if start and dist.is_main:
        detector.replay(read_metrics(run_dir))
    summary: dict = {"run_dir": str(run_dir), "start_step": start, "teacher": teacher.describe()}
    if hasattr(teacher, "dtype"):  # teacher.dtype=auto depends on the machine: the summary says what it chose
        summary["teacher_dtype"] = str(teacher.dtype).removeprefix("torch.")
    summary["fused_loss"] = m.fused  # optim.fused_loss=auto: which update path it chose

    def checkpoint(done: int) -> Path:
        sidecar = None
        if cfg.model.lora_r == 0:  # config + tokenizer beside the weights: `opdkit eval <checkpoint>` works
            def sidecar(d: Path) -> None:
                student.config.save_pretrained(d)
                tok.save_pretrained(d)
        extra = {"teacher_tokens": teacher_tokens, "skipped_total": skipped_total, "skipped_streak": skipped_streak,
                 "train_seconds": train_seconds, "lr_backoffs": backoff.count}
        if dist.distributed:  # sharded (torch.distributed.checkpoint): every rank writes its shards
            return save_sharded_checkpoint(run_dir, done, student, opt, sched, dist, extra=extra,
                                           keep_last=cfg.keep_last, sidecar=sidecar)
        return save_checkpoint(run_dir, done, student.state_dict(), opt, sched, keep_last=cfg.keep_last,
                               sidecar=sidecar, extra=extra)

    # Rollouts: the backend (HF decode loop or a vLLM engine holding the weights of version `start`), GKD's
    # reference responses, and with rollout.max_staleness a producer that samples the next steps meanwhile.
    batches = StepBatches(cfg, source, tok, student, sampling_spec(cfg, m.eos_ids, m.pad_id, m.masked_ids),
                          start_step=start, dist=dist)
    try:
        if start == 0:
            summary["initial"] = evaluate_greedy(m, source, cfg, batches)
            detector.update(0, summary["initial"])
            logger.log(0, summary["initial"])
        with Progress(cfg.steps, enabled=cfg.progress and dist.is_main, start_step=start, description="opd") as progress, \
                GracefulStop() as stop:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                torch.manual_seed(step_seed(cfg.seed, step))  # dropout etc. in the update
                # 1. prompts (a function of (seed, step)) and responses: the student's samples, or GKD's references
                plan, batch, rollout_timing = batches.get(step)
                # rows an older policy sampled (async): too old -> dropped; stale -> importance-weighted
                batch, behaviour_BT, stale_metrics = stale_rows(batch, step, cfg.rollout.max_staleness, student,
                                                          cfg.rollout.is_truncation)
                t1 = time.perf_counter()
                if batch.batch_size == 0:  # every row too stale: nothing to learn from this step (the schedule
                    # still advances, so the learning rate stays a function of the step)
                    metrics = {"skipped": 0.0, "loss": math.nan, "grad_norm": math.nan, "rollout/empty_step": 1.0}
                    _step_schedule(sched)
                    signal, rewards_B = None, torch.zeros(0, dtype=torch.float64)
                    t2 = t3 = t1
                else:
                    # 2. teacher scoring: exactly the signal the objective declared (TeacherRequest), any backend
                    signal = teacher.score(batch, request)
                    # cross-tokenizer teacher: rows whose text it could not align leave the loss (counted there)
                    batch, signal = drop_unaligned(batch, signal)
                    teacher_tokens += int(dist.sum(float(batch.eos_mask_BT.sum())))
                    t2 = time.perf_counter()
                    rewards_B = episodes.task_rewards(batch, decode(m, batch), batch.records_B, source.score)
                    task_rewards = rewards_B if cfg.task_reward else None
                    # 3-4. objective and update
                    metrics = update(cfg, m, opt, sched, batch, signal, task_rewards, behaviour_BT)
                    t3 = time.perf_counter()
                done = step + 1
                batches.after_update(student, done)  # the engine samples with the new weights (weight_sync_steps)
                t4 = time.perf_counter()
                train_seconds += t4 - t0
                # max_seconds (training time, not eval): this step is the last one, with the final eval and checkpoint
                out_of_time = bool(cfg.max_seconds) and done < cfg.steps and bool(
                    dist.max(float(train_seconds >= cfg.max_seconds)))
                last = done == cfg.steps or out_of_time
                if metrics["skipped"]:
                    skipped_streak, skipped_total = skipped_streak + 1, skipped_total + 1
                    say(f"opdkit: step {done}: non-finite loss {metrics['skipped_loss']:.4g} / gradient norm "
                        f"{metrics['skipped_grad_norm']:.4g}: optimizer step skipped, weights unchanged "
                        f"({skipped_streak} in a row; the run stops at {cfg.optim.max_skipped_steps})")
                else:
                    skipped_streak = 0
                n_gen = int(batch.eos_mask_BT.sum())
                rewards_all, lengths_all, finished_all = (gather_rows(dist, x)[0] for x in (
                    rewards_B, batch.response_lengths_B, batch.finished_B))  # the whole batch (every rank's rows)
                metrics.update({
                    "train/accuracy": rewards_all.mean().item() if rewards_all.numel() else math.nan,
                    "on_policy": float(plan.on_policy),
                    "response_length/mean": lengths_all.double().mean().item() if lengths_all.numel() else 0.0,
                    "response_length/max": int(lengths_all.max()) if lengths_all.numel() else 0,
                    "finished_frac": finished_all.double().mean().item() if finished_all.numel() else 0.0,
                    "prompts_too_long": plan.report["n_too_long"], "prompts_unk_tokens": plan.report["n_unk_tokens"],
                    "teacher_tokens": teacher_tokens, "train_seconds": train_seconds,
                    "skipped_total": skipped_total, **teacher.stats(), **batches.stats(), **stale_metrics,
                    **rollout_timing, "lr": sched.get_last_lr()[0], "time/generate": t1 - t0, "time/score": t2 - t1,
                    "time/update": t3 - t2, "time/weight_sync": t4 - t3,
                    "tokens_per_s/generate": n_gen / max(t1 - t0, 1e-9),
                    "tokens_per_s/score": n_gen / max(t2 - t1, 1e-9),
                    "tokens_per_s/update": n_gen * cfg.optim.ppo_epochs / max(t3 - t2, 1e-9),
                })
                # The held-out eval of this step goes into this step's record (the last step's is the final eval).
                if last or (cfg.eval_every and done % cfg.eval_every == 0):
                    t_eval = time.perf_counter()
                    metrics.update(evaluate_greedy(m, source, cfg, batches))
                    progress.exclude(time.perf_counter() - t_eval)  # the ETA counts steps, not evals
                    if last:
                        summary["final"] = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                metrics["time/step"] = time.perf_counter() - t0
                found = detector.update(done, metrics) if dist.is_main else []
                metrics["warnings"] = [w.to_dict() for w in found]
                for w in found:
                    progress.print(w.line())
                # Runaway responses: back off the lr, or stop. The detector runs on rank 0 only: one collective
                # hands its two facts to every rank (2 * fired + ongoing; the other ranks send 0).
                backoff_note, backoff_stop = None, False
                if backoff.enabled:
                    fired, ongoing = runaway_signals(found, detector.ongoing)
                    both = int(dist.max(float(2 * fired + ongoing)))
                    backoff_note, backoff_stop = backoff.react(bool(both & 2), bool(both & 1), sched)
                if backoff_note:  # an action, not only a warning: said even with progress=false
                    metrics["lr_backoffs"] = backoff.count
                    say(f"[step {done}] {backoff_note}")
                logger.log(done, metrics)
                progress.update(done, {"loss": metrics["loss"], "acc": metrics["train/accuracy"],
                                       "reward": metrics.get("reward/mean", 0.0), "gnorm": metrics["grad_norm"]})
                diverged = skipped_streak >= cfg.optim.max_skipped_steps
                if dist.distributed and dist.max(float(stop.requested is not None)) and stop.requested is None:
                    stop.requested = signal.SIGTERM  # torchrun signals every rank, not at the same step: agree
                if (cfg.save_every and done % cfg.save_every == 0) or last or diverged or stop.requested \
                        or backoff_stop:
                    ckpt = checkpoint(done)
                if backoff_stop:
                    raise RunFailed(f"{backoff_note} ({ckpt})")
                if diverged:
                    raise RunFailed(
                        f"{skipped_streak} consecutive steps had a non-finite loss or gradient norm (last: loss "
                        f"{metrics['skipped_loss']:.4g}, gradient norm {metrics['skipped_grad_norm']:.4g}); stopped "
                        f"at step {done} with a checkpoint of the last finite weights ({ckpt}); fix: lower "
                        "optim.lr, set optim.grad_clip > 0 or change the objective's extreme knobs, then resume=true")
                if stop.requested and not last:
                    raise stop.interrupted(f"opdkit: stopped after step {done}; checkpoint {ckpt}; continue with "
                                           f"the same command plus resume=true (plots now: opdkit plot {run_dir})")
                if out_of_time:
                    summary["stopped"] = f"max_seconds={cfg.max_seconds:g} reached after step {done}"
                    say(f"opdkit: max_seconds={cfg.max_seconds:g} reached ({train_seconds:.0f} s of training): "
                        f"stopped after step {done} of {cfg.steps} with the final eval and checkpoint {ckpt}; "
                        "continue with the same command plus resume=true (and a larger max_seconds)")
                    break
        if "final" not in summary:  # a rerun of a finished run: evaluate for the summary, log nothing new
            summary["final"] = evaluate_greedy(m, source, cfg, batches)
    finally:
        batches.close()
        logger.close()
    if start < cfg.steps or not (run_dir / "final").is_dir():
        if dist.distributed:  # the full weights gathered (a collective), written by rank 0 as a HF model dir
            save_final(cfg, student, tok, run_dir / "final", dist)
        else:
            final = student.merge_and_unload() if cfg.model.lora_r > 0 else student
            save_model_dir(final, tok, run_dir / "final")
    if not dist.is_main:
        return summary
    summary["plots"] = [str(p) for p in plot_run(run_dir)]
    summary["warnings"] = [w.line() for w in detector.history]
    summary["skipped_steps"] = skipped_total
    return summary


def _printer(cfg: TrainConfig):
    """A line for the user that is printed even without a progress bar (to stderr then)."""
    def say(line: str) -> None:
        print(line, file=sys.stdout if cfg.progress else sys.stderr, flush=True)
    return say


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    init, fin = summary.get("initial", {}), summary.get("final", {})
    table = Table(title=f"opdkit train — {summary['run_dir']}")
    if "teacher_dtype" in summary:  # model.teacher_dtype=auto depends on the machine: say what it chose
        table.caption = f"teacher dtype: {summary['teacher_dtype']}"
    for col in ("metric", "before", "after", "change"):
        table.add_column(col)
    for k in sorted(set(init) | set(fin)):
        a, b = init.get(k), fin.get(k)
        pct = k.endswith("accuracy")
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}")
        change = "" if a is None or b is None else (f"{100 * (b - a):+.1f} pts" if pct else f"{b - a:+.2f}")
        table.add_row(k, "-" if a is None else fmt(a), "-" if b is None else fmt(b), change)
    Console().print(table)


def quiet_transformers() -> None:
    """No per-file 'Loading weights' bars from transformers: opdkit prints its own progress."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: list[str]) -> int:
    quiet_transformers()

    def run(args: list[str]) -> int:
        if any(a in ("-h", "--help") for a in args):
            from opdkit.presets import preset_names

            print("usage: opdkit train [config.yaml | PRESET] [key=value ...]   presets: " + ", ".join(preset_names()))
            print()
            print(help_text(TrainConfig))
            return 0
        from opdkit.presets import config_args

        yaml_path, overrides = config_args(args)  # a config file, or a preset name (opdkit train smollm2-opsd)
        cfg = load_config(TrainConfig, yaml_path, overrides)
        summary = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one table, from rank 0
            print_summary(summary)
        return 0

    return run_cli(run, argv)
