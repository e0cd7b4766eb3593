"""`ReferenceRollout`: the dataset's reference responses as a RolloutBatch (GKD's fixed data, Agarwal et al. 2024:
with probability 1 - lambda a step trains on them instead of the student's samples).

The responses are the records' `meta["completion"]`, tokenized, cut to `max_new_tokens - 1` and ended with EOS;
`model_logprobs_BT` (pi_old) come from the student teacher-forced on them, so every objective applies unchanged.
"""

from __future__ import annotations

import torch

from opdkit.rollout.batch import RolloutBatch, left_pad
from opdkit.rollout.hf import teacher_forced_logprobs


class ReferenceRollout:
    def __init__(self, student, tokenizer):
        self.model, self.tokenizer = student, tokenizer
        self.version = 0

    @torch.no_grad()
    def sample(self, prompt_ids, spec, *, records=None, generator=None, seed: int = 0) -> RolloutBatch:
        if records is None or any(r.meta.get("completion") is None for r in records):
            raise ValueError("ReferenceRollout needs records with meta['completion'] (data.completion_field)")
        eos = spec.eos_ids[0]
        resp = [self.tokenizer.encode(r.meta["completion"], add_special_tokens=False)[: spec.max_new_tokens - 1]
                + [eos] for r in records]
        T = max(len(x) for x in resp)
        ids_BP, pmask_BP = left_pad(prompt_ids, spec.pad_id)
        resp_BT = torch.full((len(resp), T), spec.pad_id, dtype=torch.long)
        eos_BT = torch.zeros(len(resp), T, dtype=torch.long)
        for b, x in enumerate(resp):
            resp_BT[b, : len(x)] = torch.tensor(x)
            eos_BT[b, : len(x)] = 1
        ids, att = torch.cat([ids_BP, resp_BT], 1), torch.cat([pmask_BP, eos_BT], 1)
        keep = eos_BT.bool() & ~torch.isin(resp_BT, torch.tensor(list(spec.masked_ids), dtype=torch.long))
        zeros = torch.zeros(len(resp), T)
        batch = RolloutBatch(ids, att, int(ids_BP.shape[1]), resp_BT, keep.long(), eos_BT, zeros, zeros,
                             torch.arange(len(resp)), eos_BT.sum(-1), torch.ones(len(resp), dtype=torch.bool),
                             policy_version_B=torch.full((len(resp),), self.version, dtype=torch.long))
        lp = teacher_forced_logprobs(self.model, batch)  # pi_old: the student teacher-forced on the references
        batch.sampler_logprobs_BT, batch.model_logprobs_BT = lp, lp
        return batch.with_records(records)

    def load_weights(self, student, version: int) -> None:
        self.model, self.version = student, int(version)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass
