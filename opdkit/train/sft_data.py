"""The data of `opdkit sft`: each step's batch of (token ids, loss mask), derived only from (seed, step).

Sources (one per run):
- a built-in task: fresh train-split problems every step; a `perturbed_fraction` of them use the task's perturbed
  completion (one wrong step line, then the correct recovery), with the wrong line masked from the loss;
- a JSONL / save_to_disk dataset with prompt + completion fields: reshuffled every epoch (seeded);
- teacher samples: the prompts of either source, completed by another model (`samples_from`) with the rollout
  `generate`, on the fly at every step; the generated tokens (incl. EOS) are the targets and are counted.

A sequence is `prompt_to_ids(prompt)` (BOS + prompt, or the chat template) followed by the completion's tokens and
EOS; the loss mask is 1 on completion tokens (and EOS) only, 0 on the prompt, on a perturbed step line and on a tool
task's environment outputs (`meta["env_spans"]`: in the context, not targets).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

_MIX = 1_000_003


def mix_seed(*parts: int) -> int:
    """A non-negative int seed from integers (e.g. (seed, step, purpose)); distinct tuples give distinct seeds."""
    x = 0
    for p in parts:
        x = (x * _MIX + int(p) + 0x9E3779B1) % (2**61 - 1)
    return x


@dataclass
class Sequence_:
    ids: list[int]
    mask: list[int]  # 1 where ids[i] is a target (predicted from ids[:i])


def encode_pairs(tokenizer, prompts_ids: Sequence[list[int]], completions: Sequence[str],
                 error_spans: Sequence[tuple[int, int] | list[tuple[int, int]] | None] | None = None) -> list[Sequence_]:
    """Sequences prompt + completion + EOS; completion tokens overlapping an error span (character offsets into the
    completion; one span or a list of them, e.g. a tool task's environment outputs) get mask 0."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(completions), add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for i, (p_ids, c_ids) in enumerate(zip(prompts_ids, enc["input_ids"])):
        span = error_spans[i] if error_spans is not None else None
        mask = [1] * len(c_ids)
        for lo, hi in ([span] if isinstance(span, tuple) else span or []):
            for j, (a, b) in enumerate(enc["offset_mapping"][i]):
                if a < hi and b > lo:
                    mask[j] = 0
        out.append(Sequence_(list(p_ids) + list(c_ids) + [eos], [0] * len(p_ids) + mask + [1]))
    return out


def collate(seqs: Sequence[Sequence_], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids_BL, attention_mask_BL, target_mask_BL); target_mask[b, i] = 1 where token i is a
    loss target (predicted by the logits at column i - 1)."""
    L = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    tgt = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids)
        attn[b, :n] = 1
        tgt[b, :n] = torch.tensor(s.mask)
    tgt[:, 0] = 0  # the first token has no prediction
    return ids, attn, tgt


class StepData:
    """`batch(step) -> (list[Sequence_], info)` for one step; info: teacher_tokens (generated this step),
    perturbed (count). Everything derives from (seed, step), so a resumed run sees the same data."""

    def __init__(self, *, tokenizer, batch_size: int, seed: int, task=None, examples: list | None = None,
                 perturbed_fraction: float = 0.0, recovery: str = "resume", teacher=None,
                 sample_temperature: float = 1.0, sample_top_p: float = 1.0, max_new_tokens: int = 64):
        from opdkit.data.prompts import prompt_to_ids
        from opdkit.tasks import format_prompt

        self.tok = tokenizer
        self.B = int(batch_size)
        self.seed = int(seed)
        self.task = task
        self.examples = examples
        self.perturbed_fraction = float(perturbed_fraction)
        self.recovery = recovery
        self.teacher = teacher
        self.temperature = float(sample_temperature)
        self.top_p = float(sample_top_p)
        self.max_new_tokens = int(max_new_tokens)
        self._prompt_ids = lambda ex: prompt_to_ids(format_prompt(ex, tokenizer), tokenizer)
        self._perm_cache: dict[int, list[int]] = {}
        if examples is not None:
            self._cached_prompt_ids = [self._prompt_ids(ex) for ex in examples]

    # examples of a step -------------------------------------------------------------------------------------------
    def _dataset_indices(self, step: int) -> list[int]:
        n = len(self.examples)
        out = []
        for pos in range(step * self.B, (step + 1) * self.B):
            epoch, i = divmod(pos, n)
            if epoch not in self._perm_cache:
                perm = list(range(n))
                random.Random(mix_seed(self.seed, epoch, 7)).shuffle(perm)
                self._perm_cache = {epoch: perm}  # only the current epoch is kept
            out.append(self._perm_cache[epoch][i])
        return out

    def step_examples(self, step: int) -> tuple[list, list[list[int]]]:
        if self.task is not None:
            exs = self.task.sample("train", self.B, seed=mix_seed(self.seed, step, 1))
            return exs, [self._prompt_ids(ex) for ex in exs]
        idx = self._dataset_indices(step)
        return [self.examples[i] for i in idx], [self._cached_prompt_ids[i] for i in idx]

    # batches -------------------------------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[list[Sequence_], dict[str, Any]]:
        exs, prompts = self.step_examples(step)
        if self.teacher is not None:
            return self._teacher_batch(step, prompts)
        completions, spans, n_pert = [], [], 0
        rng = random.Random(mix_seed(self.seed, step, 2))
        for ex in exs:
            if self.task is not None and self.perturbed_fraction > 0 and rng.random() < self.perturbed_fraction:
                pert = self.task.perturb(ex, rng, recovery=self.recovery)
                completions.append(pert.completion)
                spans.append((pert.error_start, pert.error_end))
                n_pert += 1
            else:  # a tool task's reference transcript: the environment's outputs are context, not targets
                completions.append(ex.completion)
                spans.append([tuple(x) for x in ex.meta.get("env_spans", [])] if self.task is not None else None)
        return encode_pairs(self.tok, prompts, completions, spans), {"teacher_tokens": 0, "perturbed": n_pert}

    def _teacher_batch(self, step: int, prompts: list[list[int]]) -> tuple[list[Sequence_], dict[str, Any]]:
        from opdkit.rollout import generate

        eos = self.tok.eos_token_id
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos
        device = next(self.teacher.parameters()).device
        gen = torch.Generator(device=device).manual_seed(mix_seed(self.seed, step, 3))
        if self.task is not None and getattr(self.task, "multi_turn", False):  # tool task: the teacher's episodes
            from opdkit.rollout.base import SamplingSpec
            from opdkit.rollout.hf import HFRollout
            from opdkit.rollout.multiturn import MultiTurnRollout

            exs, _ = self.step_examples(step)
            spec = SamplingSpec(max_new_tokens=self.max_new_tokens, eos_ids=(eos,), pad_id=pad,
                                temperature=self.temperature, top_p=self.top_p)
            rb = MultiTurnRollout(HFRollout(self.teacher), self.task.make_env, self.tok,
                                  max_turns=self.task.max_turns).sample(prompts, spec, records=exs, generator=gen)
        else:
            rb = generate(self.teacher, prompts, n_samples=1, max_new_tokens=self.max_new_tokens,
                          temperature=self.temperature, top_p=self.top_p, eos_token_ids=eos, pad_token_id=pad,
                          generator=gen)
        seqs = []
        for b, p in enumerate(prompts):
            n = int(rb.eos_mask_BT[b].sum())
            resp = rb.response_ids_BT[b, :n].tolist()
            # targets: the teacher's own tokens (a tool task's environment outputs stay context)
            seqs.append(Sequence_(list(p) + resp, [0] * len(p) + rb.response_mask_BT[b, :n].tolist()))
        return seqs, {"teacher_tokens": int(rb.eos_mask_BT.sum()), "perturbed": 0,
                      "teacher_finished": float(rb.finished_B.float().mean())}
