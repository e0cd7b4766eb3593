"""The rollout seam: how the student's responses are produced (`Rollout`) and with which sampling settings
(`SamplingSpec`), the same for every backend.

    spec  = SamplingSpec(n=2, max_new_tokens=100, temperature=1.0, eos_ids=(2,), pad_id=0)
    batch = rollout.sample(prompt_ids, spec, records=records, generator=gen, seed=step_seed)
    rollout.load_weights(student, version=step + 1)      # after an optimizer step: no-op in process, vLLM: push

Backends, one file each: `hf.py` (HFRollout: the KV-cached HF decode loop in this process), `reference.py`
(ReferenceRollout: the dataset's reference responses, GKD's off-policy data), `vllm.py` (VLLMRollout: a vLLM
engine, colocated or a server, with weight pushes), `async_.py` (AsyncRollout: generation of the next steps
overlapped with training, bounded staleness).

Semantics every backend keeps (tested against each other): the processed distribution is temperature, then top-k,
then top-p (temperature 0 = greedy); a row stops at its first id in `eos_ids` (included, and counted in the
response) or after `max_new_tokens`; `masked_ids` are generated and attended but excluded from the loss mask;
`model_logprobs_BT` are the RAW model's log-probs of the sampled tokens (temperature 1: pi_old of the objective).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from opdkit.errors import UserError
from opdkit.rollout.batch import RolloutBatch


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    masked_ids: tuple[int, ...] = ()
    batch_size: int | None = None  # rows per generate call of an in-process backend (None: all)

    def __post_init__(self) -> None:
        if not self.eos_ids:
            raise ValueError("SamplingSpec needs at least one eos id")
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"SamplingSpec: n={self.n} and max_new_tokens={self.max_new_tokens} must be >= 1")

    def greedy(self, **kw) -> SamplingSpec:
        """The same spec at temperature 0, one sample (held-out evaluation)."""
        from dataclasses import replace

        return replace(self, temperature=0.0, top_p=1.0, top_k=0, n=1, **kw)


@runtime_checkable
class Rollout(Protocol):
    """A rollout backend. `sample(prompt_ids, spec, records=..., generator=..., seed=...)`: `spec.n` responses per
    prompt (prompt-major rows, `records_B` attached when records are given, `policy_version_B` = the weights
    version that sampled them); `load_weights(student, version)`: make the backend sample from the student's
    current weights; `stats()`: counters since the last call (weight-sync seconds, tokens/s); `close()`."""

    def sample(self, prompt_ids: Sequence[Sequence[int]], spec: SamplingSpec, *, records=None, generator=None,
               seed: int = 0) -> RolloutBatch: ...

    def load_weights(self, student, version: int) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


def stop_ids(model, tokenizer, masked_tokens: Sequence[str] = ()) -> tuple[list[int], int, list[int]]:
    """(eos ids, pad id, masked ids) every rollout and evaluation of `model` uses: the tokenizer's EOS plus the
    model's generation_config EOS ids (instruct models end turns with either), the pad id (the tokenizer's, else the
    smallest EOS), and the ids of `masked_tokens`. No EOS at all, or an unknown masked token -> UserError."""
    eos: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        if src is not None:
            eos.update(src if isinstance(src, (list, tuple)) else [src])
    if not eos:
        raise UserError("the tokenizer has no eos_token: responses could never end; use a tokenizer with one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    masked = []
    for t in masked_tokens:
        i = tokenizer.convert_tokens_to_ids(t)
        if i is None or i == tokenizer.unk_token_id:
            raise UserError(f"rollout.masked_tokens: {t!r} is not a token of the student's tokenizer")
        masked.append(int(i))
    return sorted(eos), int(pad), masked
