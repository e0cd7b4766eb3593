"""`RolloutBatch`: the value that crosses the rollout -> teacher -> objective seams (imports only torch).

Layout (B rows = n_samples per prompt, prompt-major: row b comes from prompt_index_B[b]):

    column:      0 ........ P-1 | P ............ P+T-1
    input_ids:   pad pad prompt | r_0 r_1 ... EOS pad pad
    attention:    0   0    1    |  1   1  ...  1   0   0

Prompts are left-padded to a common length P (= `prompt_len`), responses start at column P and are right-padded
to T. Position ids come from the attention-mask cumsum (`position_ids_from_mask`), so left padding does not shift
positions. Per-row metadata: the prompt record each row answers (`records_B`: what a self-teacher puts in its
privileged prompt, what a router reads its key from), and the policy version that sampled it (`policy_version_B`).
Multi-turn episodes (`opdkit.rollout.multiturn`) keep this layout: the response region holds the policy's turns
AND the environment's observations in order, all attended; `env_mask_BT` marks the observation tokens, which are
outside `response_mask_BT` (never in the loss) and get log-prob 0; `env_rewards_B` holds each episode's reward.
Single-turn batches have `env_mask_BT = env_rewards_B = None`.
`rows(idx)` selects rows, `RolloutBatch.cat(parts)` joins batches (padding prompts on the left, responses on the
right), so routers and caches can split a batch and join the results.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch


def position_ids_from_mask(attention_mask_BL: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real (mask 1) tokens of its row; pads get 0."""
    return (attention_mask_BL.long().cumsum(dim=-1) - 1).clamp_(min=0)


def left_pad(
    seqs: Sequence[Sequence[int]], pad_token_id: int, *, length: int | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to `length` (default: the longest); returns (ids_BP, attention_mask_BP)."""
    P = max(len(s) for s in seqs) if length is None else length
    ids_BP = torch.full((len(seqs), P), pad_token_id, dtype=torch.long)
    mask_BP = torch.zeros((len(seqs), P), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s) > P:
            raise ValueError(f"sequence {b} has {len(s)} tokens > pad length {P}")
        if len(s):
            ids_BP[b, P - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask_BP[b, P - len(s):] = 1
    return ids_BP.to(device), mask_BP.to(device)


def _index(idx, n: int) -> torch.Tensor:
    if isinstance(idx, slice):
        return torch.arange(n)[idx]
    t = torch.as_tensor(idx)
    if t.dtype == torch.bool:
        if t.shape != (n,):
            raise ValueError(f"a boolean row mask must have shape ({n},), got {tuple(t.shape)}")
        return t.nonzero(as_tuple=True)[0]
    return t.long().reshape(-1)


def _pad_cols(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
    if left == 0 and right == 0:
        return x
    shape = list(x.shape)
    parts = []
    if left:
        parts.append(torch.full([shape[0], left, *shape[2:]], value, dtype=x.dtype, device=x.device))
    parts.append(x)
    if right:
        parts.append(torch.full([shape[0], right, *shape[2:]], value, dtype=x.dtype, device=x.device))
    return torch.cat(parts, dim=1)


@dataclass
class RolloutBatch:
    input_ids_BL: torch.Tensor  # prompt (left-padded to P) + response (right-padded to T), L = P + T
    attention_mask_BL: torch.Tensor  # 1 on real prompt tokens and on response tokens up to and including EOS
    prompt_len: int  # P: response token t is at column P + t
    response_ids_BT: torch.Tensor  # pad after EOS
    response_mask_BT: torch.Tensor  # eos_mask_BT minus user-masked ids (e.g. <think>): the tokens a loss sees
    eos_mask_BT: torch.Tensor  # 1 for generated tokens up to and including the first EOS, 0 after
    sampler_logprobs_BT: torch.Tensor  # log-prob under the sampled-from distribution (temp/top-k/top-p); 0 after EOS
    model_logprobs_BT: torch.Tensor  # log-prob under the raw model at temperature 1 (pi_old); 0 after EOS
    prompt_index_B: torch.Tensor  # which prompt each row came from
    response_lengths_B: torch.Tensor  # eos_mask_BT.sum(-1): generated tokens including the EOS
    finished_B: torch.Tensor  # True where the row emitted EOS (False: cut at max_new_tokens)
    records_B: list[Any] | None = None  # the prompt record of each row (PromptRecord), when the caller attached them
    policy_version_B: torch.Tensor | None = None  # the student version (optimizer steps) that sampled each row
    env_mask_BT: torch.Tensor | None = None  # multi-turn: 1 on environment (observation) tokens, None: single-turn
    env_rewards_B: torch.Tensor | None = None  # multi-turn: each episode's final reward (Env.reward())

    @property
    def batch_size(self) -> int:
        return int(self.response_ids_BT.shape[0])

    @property
    def response_len(self) -> int:
        return int(self.response_ids_BT.shape[1])

    def position_ids_BL(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask_BL)

    def to(self, device) -> RolloutBatch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def with_records(self, records: Sequence[Any]) -> RolloutBatch:
        """This batch with `records_B[b] = records[prompt_index_B[b]]` (records: one per prompt)."""
        return replace(self, records_B=[records[i] for i in self.prompt_index_B.tolist()])

    def rows(self, idx) -> RolloutBatch:
        """The rows `idx` (indices, a slice or a boolean mask), same P and T; prompt_index_B keeps its values."""
        ix = _index(idx, self.batch_size)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                kw[f.name] = v[ix.to(v.device)]
            elif isinstance(v, list):
                kw[f.name] = [v[i] for i in ix.tolist()]
            else:
                kw[f.name] = v
        return RolloutBatch(**kw)

    @staticmethod
    def cat(parts: Sequence[RolloutBatch], pad_token_id: int = 0) -> RolloutBatch:
        """Rows of all `parts` in order: prompts left-padded to the longest P, responses right-padded to the longest
        T (pad ids `pad_token_id`, masks and log-probs 0). prompt_index_B values are kept as they are."""
        if not parts:
            raise ValueError("RolloutBatch.cat needs at least one batch")
        P = max(p.prompt_len for p in parts)
        T = max(p.response_len for p in parts)
        out: dict[str, Any] = {"prompt_len": P}

        def seq(p: RolloutBatch, name: str, value) -> torch.Tensor:
            x = getattr(p, name)
            prompt, resp = x[:, : p.prompt_len], x[:, p.prompt_len:]
            return torch.cat([_pad_cols(prompt, P - p.prompt_len, 0, value),
                              _pad_cols(resp, 0, T - p.response_len, value)], dim=1)

        out["input_ids_BL"] = torch.cat([seq(p, "input_ids_BL", pad_token_id) for p in parts])
        out["attention_mask_BL"] = torch.cat([seq(p, "attention_mask_BL", 0) for p in parts])
        for name, value in (("response_ids_BT", pad_token_id), ("response_mask_BT", 0), ("eos_mask_BT", 0),
                            ("sampler_logprobs_BT", 0.0), ("model_logprobs_BT", 0.0)):
            out[name] = torch.cat([_pad_cols(getattr(p, name), 0, T - p.response_len, value) for p in parts])
        for name in ("prompt_index_B", "response_lengths_B", "finished_B"):
            out[name] = torch.cat([getattr(p, name) for p in parts])
        recs = [p.records_B for p in parts]
        out["records_B"] = None if any(r is None for r in recs) else [x for r in recs for x in r]
        vers = [p.policy_version_B for p in parts]
        out["policy_version_B"] = None if any(v is None for v in vers) else torch.cat(vers)
        if any(p.env_mask_BT is not None for p in parts):  # a single-turn part has no environment tokens
            out["env_mask_BT"] = torch.cat([_pad_cols(p.env_mask_BT if p.env_mask_BT is not None
                                                      else torch.zeros_like(p.eos_mask_BT), 0, T - p.response_len, 0)
                                            for p in parts])
        rew = [p.env_rewards_B for p in parts]
        out["env_rewards_B"] = None if any(r is None for r in rew) else torch.cat(rew)
        return RolloutBatch(**out)
