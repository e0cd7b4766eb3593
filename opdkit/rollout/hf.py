"""Student rollouts with a HF causal LM: a token-by-token loop over the model's forward with its KV cache.

Layout of a `RolloutBatch` (B rows = n_samples per prompt, prompt-major: row b comes from prompt_index_B[b]):

    column:      0 ........ P-1 | P ............ P+T-1
    input_ids:   pad pad prompt | r_0 r_1 ... EOS pad pad
    attention:    0   0    1    |  1   1  ...  1   0   0

Prompts are left-padded to a common length P (= `prompt_len`), responses start at column P and are right-padded
to T. Position ids come from the attention-mask cumsum (`position_ids_from_mask`), so left padding does not shift
positions: a left-padded row gives the same logits as the prompt run alone. After a row emits EOS it is fed pad
tokens with attention 0 (never seen again); the loop stops when every row has emitted EOS or after max_new_tokens.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch

from opdkit.models import accepts_kwarg
from opdkit.rollout.batch import RolloutBatch, left_pad, position_ids_from_mask
from opdkit.rollout.sampler import Sampler, filter_logits, inverse_cdf_sample


def _ids_tensor(ids: int | Iterable[int] | None, device) -> torch.Tensor:
    if ids is None:
        ids = ()
    elif isinstance(ids, int):
        ids = (ids,)
    return torch.as_tensor(sorted({int(i) for i in ids}), dtype=torch.long, device=device)


def _cache_of(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def _generate_rows(
    model, ids_BP, mask_BP, *, max_new_tokens, temperature, top_p, top_k, eos_B, pad_token_id, sampler, generator,
    prefill_kw,
):
    B = ids_BP.shape[0]
    attn_BL = mask_BP.clone()
    out = model(input_ids=ids_BP, attention_mask=attn_BL, position_ids=position_ids_from_mask(attn_BL),
                use_cache=True, **prefill_kw)
    # transformers >= 5.2x renamed the KV cache argument/output `past_key_values` -> `cache` (the old name warns)
    cache_kw = "cache" if accepts_kwarg(model, "cache") else "past_key_values"
    past = _cache_of(out)
    logits_BV = out.logits[:, -1, :]
    next_pos_B1 = attn_BL.sum(dim=-1, keepdim=True)
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BP.device)
    toks, alive, samp_lps, model_lps = [], [], [], []
    for t in range(max_new_tokens):
        logits_BV = logits_BV.float()
        filt_BV = filter_logits(logits_BV, temperature, top_p, top_k)
        samp_logp_BV = torch.log_softmax(filt_BV, dim=-1)
        probs_BV = samp_logp_BV.exp()
        if isinstance(generator, (list, tuple)):  # one generator per row: samples independent of the batching
            tok_B = torch.cat([sampler(probs_BV[i:i + 1], g) for i, g in enumerate(generator)]).to(torch.long)
        else:
            tok_B = sampler(probs_BV, generator).to(torch.long)
        alive_B = ~done_B
        tok_B = torch.where(alive_B, tok_B, torch.full_like(tok_B, pad_token_id))
        tok_B1 = tok_B.unsqueeze(-1)
        safe_B1 = tok_B1.clamp(max=logits_BV.shape[-1] - 1)
        zero = torch.zeros((), dtype=samp_logp_BV.dtype, device=samp_logp_BV.device)
        # where, not *: after EOS the pad id may have -inf log-prob under the filtered distribution
        samp_lps.append(torch.where(alive_B, samp_logp_BV.gather(-1, safe_B1).squeeze(-1), zero))
        # unfiltered (temperature 1, no top-k/top-p): the model's log-probs are the sampler's, computed once
        model_logp_BV = samp_logp_BV if filt_BV is logits_BV else torch.log_softmax(logits_BV, dim=-1)
        model_lps.append(torch.where(alive_B, model_logp_BV.gather(-1, safe_B1).squeeze(-1), zero))
        toks.append(tok_B)
        alive.append(alive_B)
        done_B = done_B | torch.isin(tok_B, eos_B)
        if bool(done_B.all()) or t == max_new_tokens - 1:
            break
        attn_BL = torch.cat([attn_BL, alive_B.long().unsqueeze(-1)], dim=-1)
        out = model(input_ids=tok_B1, attention_mask=attn_BL, position_ids=next_pos_B1, use_cache=True,
                    **{cache_kw: past})
        past = _cache_of(out)
        logits_BV = out.logits[:, -1, :]
        next_pos_B1 = next_pos_B1 + 1
    stack = lambda xs: torch.stack(xs, dim=1)  # noqa: E731
    return stack(toks), stack(alive), stack(samp_lps), stack(model_lps), done_B


def _pad_right(x_BT: torch.Tensor, T: int, value) -> torch.Tensor:
    if x_BT.shape[1] == T:
        return x_BT
    pad = torch.full((x_BT.shape[0], T - x_BT.shape[1]), value, dtype=x_BT.dtype, device=x_BT.device)
    return torch.cat([x_BT, pad], dim=1)


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n_samples: int = 1,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float | None = 1.0,
    top_k: int | None = None,
    eos_token_ids: int | Iterable[int],
    pad_token_id: int,
    masked_token_ids: Iterable[int] = (),
    sampler: Sampler = inverse_cdf_sample,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    batch_size: int | None = None,
) -> RolloutBatch:
    """Sample `n_samples` responses per prompt; returns a `RolloutBatch` (see the module docstring for the layout).

    Rows are prompt-major (prompt 0's n samples first). `batch_size` rows go through the model at once (None: all);
    every row is padded to the same P and T whatever the chunking. `sampler(probs_BV, generator)` draws from the
    processed distribution (temperature, then top-k, then top-p; temperature 0 = greedy). The model runs in eval
    mode under no_grad; its previous train/eval mode is restored afterwards. A seeded `generator` (on the model's
    device) makes the rollout deterministic; a list of generators, one per row (prompt-major, `n_samples` rows per
    prompt), makes every row's sample independent of which other rows share the batch (a prompt gives the same
    sample on any rank of a distributed run).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r} must be an integer >= 1")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if len(prompt_ids) == 0 or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    eos_B = _ids_tensor(eos_token_ids, device)
    if eos_B.numel() == 0:
        raise ValueError("generate needs at least one eos_token_id")
    masked = _ids_tensor(masked_token_ids, device)

    rows = [list(p) for p in prompt_ids for _ in range(n_samples)]
    prompt_index_B = torch.arange(len(prompt_ids), device=device).repeat_interleave(n_samples)
    P = max(len(r) for r in rows)
    ids_BP, mask_BP = left_pad(rows, pad_token_id, length=P, device=device)
    B = len(rows)
    bs = B if not batch_size else int(batch_size)
    prefill_kw = {"logits_to_keep": 1} if accepts_kwarg(model, "logits_to_keep") else {}

    was_training = model.training
    model.eval()
    try:
        parts = [
            _generate_rows(
                model, ids_BP[s:s + bs], mask_BP[s:s + bs], max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, eos_B=eos_B, pad_token_id=pad_token_id, sampler=sampler,
                generator=generator[s:s + bs] if isinstance(generator, (list, tuple)) else generator,
                prefill_kw=prefill_kw,
            )
            for s in range(0, B, bs)
        ]
    finally:
        model.train(was_training)

    T = max(p[0].shape[1] for p in parts)
    response_ids_BT = torch.cat([_pad_right(p[0], T, pad_token_id) for p in parts])
    eos_mask_BT = torch.cat([_pad_right(p[1], T, False) for p in parts]).long()
    sampler_logprobs_BT = torch.cat([_pad_right(p[2], T, 0.0) for p in parts])
    model_logprobs_BT = torch.cat([_pad_right(p[3], T, 0.0) for p in parts])
    finished_B = torch.cat([p[4] for p in parts])
    response_mask_BT = eos_mask_BT * (~torch.isin(response_ids_BT, masked)).long()
    return RolloutBatch(
        input_ids_BL=torch.cat([ids_BP, response_ids_BT], dim=1),
        attention_mask_BL=torch.cat([mask_BP, eos_mask_BT], dim=1),
        prompt_len=P,
        response_ids_BT=response_ids_BT,
        response_mask_BT=response_mask_BT,
        eos_mask_BT=eos_mask_BT,
        sampler_logprobs_BT=sampler_logprobs_BT,
        model_logprobs_BT=model_logprobs_BT,
        prompt_index_B=prompt_index_B,
        response_lengths_B=eos_mask_BT.sum(dim=-1),
        finished_B=finished_B,
    )


class HFRollout:
    """The student itself, in this process: `generate` with its KV cache (no weights to push). `sampler` draws from
    the processed distribution (temperature 0 always uses the greedy argmax)."""

    def __init__(self, model, sampler: Sampler = inverse_cdf_sample, *, snapshot: bool = False):
        # snapshot: sample from a frozen copy that load_weights refreshes (asynchronous OPD: the trainer changes the
        # live student while this samples the next step)
        self.snapshot = snapshot
        self.model = copy.deepcopy(model).eval() if snapshot else model
        self.sampler = sampler
        self.version = 0

    def sample(self, prompt_ids, spec, *, records=None, generator=None, seed: int = 0) -> RolloutBatch:
        from opdkit.rollout.sampler import greedy_sample

        batch = generate(self.model, prompt_ids, n_samples=spec.n, max_new_tokens=spec.max_new_tokens,
                         temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k or None,
                         eos_token_ids=list(spec.eos_ids), pad_token_id=spec.pad_id, masked_token_ids=spec.masked_ids,
                         sampler=greedy_sample if spec.temperature == 0 else self.sampler, generator=generator,
                         batch_size=spec.batch_size)
        batch.policy_version_B = torch.full((batch.batch_size,), self.version, dtype=torch.long)
        return batch.with_records(records) if records is not None else batch

    def load_weights(self, student, version: int) -> None:
        if self.snapshot:
            with torch.no_grad():
                self.model.load_state_dict(student.state_dict())
        else:
            self.model = student  # the same module: nothing to copy
        self.version = int(version)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


@torch.no_grad()
def teacher_forced_logprobs(model, batch: RolloutBatch) -> torch.Tensor:
    """The log-probs [B, T] (float32, 0 after EOS) `model` gives the batch's response tokens, teacher-forced: pi_old
    of reference responses, or the current policy's of rows an older policy sampled."""
    T = batch.response_len
    was = model.training
    model.eval()
    try:
        logits = model(input_ids=batch.input_ids_BL, attention_mask=batch.attention_mask_BL,
                       position_ids=batch.position_ids_BL(), logits_to_keep=T + 1).logits[:, :-1].float()
    finally:
        model.train(was)
    return torch.log_softmax(logits, -1).gather(-1, batch.response_ids_BT[..., None]).squeeze(-1) * batch.eos_mask_BT
