"""Multi-turn (tool-using) rollouts: any rollout backend, called once per policy turn, with the environment's
observations appended to the context in between (`opdkit.tasks.env.Env`).

    rollout = MultiTurnRollout(HFRollout(student), env_for=lambda rec: task.make_env(rec.meta["example"]),
                               tokenizer=tok, max_turns=4)
    batch = rollout.sample(prompt_ids, spec, records=records, generator=gen)

Layout: the `RolloutBatch` of a single-turn rollout, whose response region (at most `spec.max_new_tokens` tokens:
the episode's budget, policy and environment tokens together) holds the whole episode after the prompt:

    column:        0 ... P-1 | P ...........................................................  P+T-1
    input_ids:     pad prompt | [ 3 4 * 8 6 ]  = 2 9 8 4 2 \\n  [ 2 9 8 4 2 + 5 1 2 ] ... => 3 0 3 5 4 \\n EOS pad
    eos_mask:       -    -    | 1 ........ 1   1 ......... 1    1 ................ 1 ... 1 ............... 1  0
    env_mask:       -    -    | 0 ........ 0   1 ......... 1    0 ................ 0 ... 0 ............... 0  0
    response_mask:  -    -    | 1 ........ 1   0 ......... 0    1 ................ 1 ... 1 ............... 1  0

Every token of the episode is attended (the teacher scores each policy token in the full multi-turn context); only
policy tokens are in `response_mask_BT` (the loss), and environment tokens get log-prob 0. Each policy turn is one
`inner.sample` call on the rows still running (prompt + episode so far, re-prefilled), stopping at EOS, at one of
the env's stop strings (`Env.stop`), or at the row's remaining budget; the env's `step` gets the turn's text.

An episode ends (`finished_B` True) when the policy emits EOS or the env says done. It is cut (`finished_B` False,
counted in `stats()`) when a turn runs out of budget (`rollout/truncated`), when an observation would not fit in the
budget (`rollout/env_overflow`: the observation is NOT appended, so no context is ever silently cut), or after
`max_turns` policy turns (`rollout/turn_limit`). An exception in `Env.reset/step/reward` (or in making the env)
raises `UserError` naming the env, the row and the prompt.

Determinism: a list of per-row generators keeps each row's stream across turns (its samples do not depend on the
other rows); a single generator is shared by the turns in order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from opdkit.errors import UserError
from opdkit.rollout.base import SamplingSpec
from opdkit.rollout.batch import RolloutBatch, left_pad

__all__ = ["MultiTurnRollout"]


class _Row:
    __slots__ = ("ids", "policy", "samp_lp", "model_lp", "done", "finished")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.policy: list[int] = []  # 1 where the policy wrote the token, 0 where the env did
        self.samp_lp: list[float] = []
        self.model_lp: list[float] = []
        self.done = False
        self.finished = False


class MultiTurnRollout:
    """A multi-turn rollout around `inner` (a `Rollout`: HFRollout, or a VLLMRollout — tested against a real engine
    with a toy env). `env_for(record) -> Env` makes one env per row (episode);
    `tokenizer` encodes observations and stop strings and decodes turns."""

    def __init__(self, inner, env_for: Callable[[Any], Any], tokenizer, *, max_turns: int):
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} must be an integer >= 1")
        self.inner, self.env_for, self.tok, self.max_turns = inner, env_for, tokenizer, max_turns
        self._stop_cache: dict[tuple[str, ...], list[int]] = {}
        self._counts = self._zero()

    @staticmethod
    def _zero() -> dict:
        return {"episodes": 0, "turns": 0, "env_tokens": 0, "tokens": 0, "truncated": 0, "env_overflow": 0,
                "turn_limit": 0}

    # -- the Rollout protocol ---------------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.inner.version

    def load_weights(self, student, version: int, **kw) -> None:
        self.inner.load_weights(student, version, **kw)

    def stats(self) -> dict:
        out = dict(self.inner.stats())
        c, self._counts = self._counts, self._zero()
        if c["episodes"]:
            out.update({"rollout/turns_mean": c["turns"] / c["episodes"],
                        "rollout/env_token_frac": c["env_tokens"] / max(c["tokens"], 1),
                        "rollout/truncated": c["truncated"], "rollout/env_overflow": c["env_overflow"],
                        "rollout/turn_limit": c["turn_limit"]})
        return out

    def close(self) -> None:
        self.inner.close()

    # -- helpers -------------------------------------------------------------------------------------------------
    def _stop_ids(self, env) -> list[int]:
        stop = tuple(getattr(env, "stop", ()) or ())
        if stop not in self._stop_cache:
            ids = []
            for s in stop:
                enc = self.tok(s, add_special_tokens=False)["input_ids"]
                if len(enc) != 1:
                    raise UserError(f"env {_name(env)!r}: stop string {s!r} is {len(enc)} tokens of the policy's "
                                    "tokenizer; a turn can only stop on a single token: use a one-token stop string")
                unk = getattr(self.tok, "unk_token_id", None)
                if unk is not None and int(enc[0]) == unk:
                    raise UserError(f"env {_name(env)!r}: stop string {s!r} is not in the policy's vocabulary (it "
                                    "encodes to the unknown token); use a student/tokenizer made for the task (the "
                                    "calc task: scripts/make_tool_task.py)")
                ids.append(int(enc[0]))
            self._stop_cache[stop] = ids
        return self._stop_cache[stop]

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    # -- sampling ------------------------------------------------------------------------------------------------
    def sample(self, prompt_ids: Sequence[Sequence[int]], spec: SamplingSpec, *, records=None, generator=None,
               seed: int = 0) -> RolloutBatch:
        if records is None or len(records) != len(prompt_ids):
            raise ValueError("MultiTurnRollout.sample needs one record per prompt (the env is made from it)")
        n, budget = spec.n, spec.max_new_tokens
        B = len(prompt_ids) * n
        row_rec = [records[b // n] for b in range(B)]
        envs = [_guard(None, b, row_rec[b], "making the env", lambda r=row_rec[b]: self.env_for(r)) for b in range(B)]
        stops = [self._stop_ids(e) for e in envs]
        eos = set(spec.eos_ids)
        rows = [_Row() for _ in range(B)]
        for b, env in enumerate(envs):
            first = _guard(env, b, row_rec[b], "reset", lambda e=env, r=row_rec[b]: e.reset(r))
            if first:
                self._observe(rows[b], self._encode(first), budget)
        version = None
        for _turn in range(self.max_turns):
            active = [b for b in range(B) if not rows[b].done]
            if not active:
                break
            room = {b: budget - len(rows[b].ids) for b in active}
            turn_eos = tuple(sorted(eos | {i for b in active for i in stops[b]}))
            sub = replace(spec, n=1, max_new_tokens=max(room.values()), eos_ids=turn_eos)
            gen = [generator[b] for b in active] if isinstance(generator, (list, tuple)) else generator
            out = self.inner.sample([list(prompt_ids[b // n]) + rows[b].ids for b in active], sub, generator=gen,
                                    seed=seed + _turn)
            if version is None and out.policy_version_B is not None:
                version = int(out.policy_version_B[0])
            self._counts["turns"] += len(active)
            for j, b in enumerate(active):
                r, L = rows[b], int(out.eos_mask_BT[j].sum())
                toks = out.response_ids_BT[j, :L].tolist()
                cut = L > room[b] or (L == room[b] and toks[-1] not in eos and toks[-1] not in stops[b])
                keep = min(L, room[b])
                toks = toks[:keep]
                r.ids += toks
                r.policy += [1] * keep
                r.samp_lp += out.sampler_logprobs_BT[j, :keep].tolist()
                r.model_lp += out.model_logprobs_BT[j, :keep].tolist()
                if cut or not toks:
                    r.done = True
                    self._counts["truncated"] += 1
                    continue
                ended = toks[-1] in eos
                text = self.tok.decode(toks[:-1] if ended else toks, skip_special_tokens=True)
                st = _guard(envs[b], b, row_rec[b], "step", lambda e=envs[b], t=text: e.step(t))
                if ended or st.done:
                    r.done = r.finished = True
                else:
                    self._observe(r, self._encode(st.observation), budget)
        for r in rows:
            if not r.done:
                r.done = True
                self._counts["turn_limit"] += 1
        rewards = [float(_guard(envs[b], b, row_rec[b], "reward", envs[b].reward)) for b in range(B)]
        self._counts["episodes"] += B
        self._counts["tokens"] += sum(len(r.ids) for r in rows)
        self._counts["env_tokens"] += sum(len(r.ids) - sum(r.policy) for r in rows)
        batch = self._assemble(prompt_ids, n, rows, spec, rewards)
        if version is not None:
            batch.policy_version_B = torch.full((B,), version, dtype=torch.long)
        return batch.with_records(records)

    def _observe(self, r: _Row, obs: list[int], budget: int) -> None:
        """Append an observation, or end the episode (counted) when it would not fit in the budget."""
        if len(r.ids) + len(obs) > budget:
            r.done = True
            self._counts["env_overflow"] += 1
            return
        r.ids += obs
        r.policy += [0] * len(obs)
        r.samp_lp += [0.0] * len(obs)
        r.model_lp += [0.0] * len(obs)
        if len(r.ids) >= budget:  # no room left for the policy to answer
            r.done = True
            self._counts["truncated"] += 1

    @staticmethod
    def _assemble(prompt_ids, n: int, rows: list[_Row], spec: SamplingSpec, rewards: list[float]) -> RolloutBatch:
        B = len(rows)
        ids_BP, mask_BP = left_pad([list(prompt_ids[b // n]) for b in range(B)], spec.pad_id)
        T = max(1, max(len(r.ids) for r in rows))
        resp = torch.full((B, T), spec.pad_id, dtype=torch.long)
        att = torch.zeros((B, T), dtype=torch.long)
        pol = torch.zeros((B, T), dtype=torch.long)
        slp = torch.zeros((B, T), dtype=torch.float32)
        mlp = torch.zeros((B, T), dtype=torch.float32)
        for b, r in enumerate(rows):
            k = len(r.ids)
            if k:
                resp[b, :k] = torch.tensor(r.ids)
                att[b, :k] = 1
                pol[b, :k] = torch.tensor(r.policy)
                slp[b, :k] = torch.tensor(r.samp_lp)
                mlp[b, :k] = torch.tensor(r.model_lp)
        masked = torch.as_tensor(sorted(set(spec.masked_ids)), dtype=torch.long)
        response_mask = pol * (~torch.isin(resp, masked)).long()
        return RolloutBatch(
            input_ids_BL=torch.cat([ids_BP, resp], dim=1), attention_mask_BL=torch.cat([mask_BP, att], dim=1),
            prompt_len=int(ids_BP.shape[1]), response_ids_BT=resp, response_mask_BT=response_mask, eos_mask_BT=att,
            sampler_logprobs_BT=slp, model_logprobs_BT=mlp,
            prompt_index_B=torch.arange(len(prompt_ids)).repeat_interleave(n), response_lengths_B=att.sum(-1),
            finished_B=torch.tensor([r.finished for r in rows], dtype=torch.bool), env_mask_BT=att * (1 - pol),
            env_rewards_B=torch.tensor(rewards, dtype=torch.float64))


def _name(env) -> str:
    return str(getattr(env, "name", None) or type(env).__name__)


def _guard(env, b: int, record, what: str, fn):
    try:
        return fn()
    except UserError:
        raise
    except Exception as e:  # an env is user code: its failure names itself, the row and the prompt
        prompt = getattr(record, "prompt_text", None) or getattr(record, "prompt", None) or record
        who = f"env {_name(env)!r}" if env is not None else "the env factory"
        raise UserError(f"{who} raised in {what} on row {b} (prompt {str(prompt)[:60]!r}): {type(e).__name__}: "
                        f"{' '.join(str(e).split())}; fix the env (answer a malformed policy turn with an "
                        "observation that says so rather than raising)") from e
