"""Multi-turn (tool) tasks in `opdkit train`: the checks at set-up, the rollout wrapper, and the task reward of a
batch (the env's episode reward when the batch has one). A source without an env (every single-turn task or
dataset) goes through none of this: its runs are bit-for-bit those of a build without multi-turn support."""

from __future__ import annotations

import torch

from opdkit.errors import UserError
from opdkit.rollout.multiturn import MultiTurnRollout


def check_multi_turn(cfg, source) -> None:
    """Knobs that multi-turn episodes do not support (yet), refused before anything is written."""
    if source.env_for is None:
        if cfg.rollout.max_turns is not None:
            raise UserError(f"rollout.max_turns={cfg.rollout.max_turns} applies to multi-turn tasks (task:calc); "
                            f"data.prompts={cfg.data.prompts} is single-turn: remove it")
        return
    if cfg.rollout.gkd_lambda < 1.0:
        raise UserError("rollout.gkd_lambda < 1 (reference responses) is not supported on a multi-turn task: a "
                        "reference transcript holds tool outputs that would be trained on; set rollout.gkd_lambda=1")
    if getattr(cfg.teacher, "cross_tokenizer", False):
        raise UserError("teacher.cross_tokenizer=true is not supported on a multi-turn task yet (the alignment does "
                        "not know the environment's tokens); use a teacher with the student's tokenizer")


def check_env_tokens(source, tokenizer) -> None:
    """The env's stop strings are single known tokens of the student's tokenizer (checked on one record's env
    before the run dir is written; every env of a built-in task has the same stop strings)."""
    if source.env_for is None:
        return
    import random

    rec = (source.eval_records or source.draw(random.Random(0), 1))[0]
    MultiTurnRollout(None, source.env_for, tokenizer, max_turns=1)._stop_ids(source.env_for(rec))


def wrap(rollout, source, tokenizer, cfg):
    """`rollout` itself for a single-turn source; a `MultiTurnRollout` around it for a tool task."""
    if source.env_for is None:
        return rollout
    return MultiTurnRollout(rollout, source.env_for, tokenizer, max_turns=cfg.rollout.max_turns or source.max_turns)


def task_rewards(batch, texts, records, score) -> torch.Tensor:
    """Each row's task reward: the env's episode reward (multi-turn), else `score(text, record)`."""
    if batch.env_rewards_B is not None:
        return batch.env_rewards_B.detach().to("cpu", torch.float64)
    return torch.tensor([score(t, r) for t, r in zip(texts, records, strict=True)], dtype=torch.float64)
