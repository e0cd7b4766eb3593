"""`RoutedTeacher`: several teachers, each any backend, chosen per prompt by a route key (multi-teacher OPD).

    opdkit train data.prompts=task:addition+arith_chain \
        teacher.routes='{addition: runs/t_add/final, arith_chain: runs/t_chain/final}'

DeepSeek-V4 consolidates specialist models into one by multi-teacher on-policy distillation: every prompt is scored
by the teacher of its domain. Here the key of a row is its prompt's route key (`data.route_field` of a JSONL row;
for built-in tasks the task name); '*' names the teacher of every other key. Each group of rows is scored by its
teacher and the signals are joined back in the batch's row order, so the objective sees one batch. Every teacher
passes the student's tokenizer check, and all must serve the objective's signal. Per-teacher metrics each step:
rows, scored tokens and the k1 estimate of the reverse KL on that teacher's tokens (`route/<key>/...`).
"""

from __future__ import annotations

from typing import Callable

import torch

from opdkit.errors import RunFailed, UserError
from opdkit.objectives.signals import FullSignal, SampledSignal, TopKSignal
from opdkit.rollout.batch import RolloutBatch
from opdkit.teacher.base import TeacherRequest, check_serves

FALLBACK = "*"


class RoutedTeacher:
    def __init__(self, teachers: dict[str, object], key_of: Callable[[object], str | None]):
        if not teachers:
            raise UserError("teacher.routes is empty")
        self.teachers, self.key_of = dict(teachers), key_of
        self.kinds = frozenset.intersection(*[frozenset(t.kinds) for t in self.teachers.values()])
        self._stats: dict[str, float] = {}

    def route(self, record) -> str:
        key = self.key_of(record)
        if key in self.teachers:
            return key
        if FALLBACK in self.teachers:
            return FALLBACK
        raise RunFailed(f"no teacher for route key {key!r}: teacher.routes has {', '.join(sorted(self.teachers))}; "
                        f"add it or a '{FALLBACK}' route")

    def check_keys(self, records) -> None:
        """UserError (before training) when a prompt's key has no teacher."""
        try:
            for r in records:
                self.route(r)
        except RunFailed as e:
            raise UserError(str(e)) from None

    def validate(self, request: TeacherRequest) -> None:
        for key, t in self.teachers.items():
            check_serves(t, request, what=f"the teacher of route {key!r}")

    def score(self, batch: RolloutBatch, request: TeacherRequest):
        if batch.records_B is None:
            raise ValueError("RoutedTeacher needs the batch's records (RolloutBatch.with_records) to route rows")
        keys = [self.route(r) for r in batch.records_B]
        order, parts = [], []
        for key in sorted(set(keys)):
            idx = [b for b, k in enumerate(keys) if k == key]
            sub = batch.rows(idx)
            sig = self.teachers[key].score(sub, request)
            self._account(key, sub, sig)
            order += idx
            parts.append(sig)
        joined = type(parts[0]).cat(parts)  # sub-batches keep the batch's T, so the parts line up
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return joined.rows(inverse)

    def _account(self, key: str, sub: RolloutBatch, sig) -> None:
        m = sub.response_mask_BT.bool()
        n = int(m.sum())
        s = self._stats
        s[f"route/{key}/rows"] = s.get(f"route/{key}/rows", 0) + sub.batch_size
        s[f"route/{key}/tokens"] = s.get(f"route/{key}/tokens", 0) + n
        t_lp = _sampled_logprobs(sig, sub)
        if t_lp is not None and n:
            # k1 estimate of KL(student || teacher) on this teacher's tokens (Schulman, "Approximating KL divergence")
            kl = float((sub.model_logprobs_BT.double() - t_lp.double())[m].sum())
            s[f"_klsum/{key}"] = s.get(f"_klsum/{key}", 0.0) + kl

    def identity(self) -> str | None:
        ids = {k: t.identity() for k, t in sorted(self.teachers.items())}
        return None if any(v is None for v in ids.values()) else "route:" + repr(ids)

    def describe(self) -> str:
        return "routed: " + ", ".join(f"{k} -> {t.describe()}" for k, t in sorted(self.teachers.items()))

    def close(self) -> None:
        for t in self.teachers.values():
            t.close()

    def stats(self) -> dict:
        out: dict = {}
        for t in self.teachers.values():
            # Several routes' backends report the same counters (two server: routes both count teacher/requests):
            # they are summed, not overwritten by whichever teacher came last. The inner backends here are hf and
            # server, whose stats are all additive counters (a cache wraps the routed teacher, not its routes).
            for k, v in t.stats().items():
                out[k] = out[k] + v if k in out and isinstance(v, (int, float)) else v
        for k, v in self._stats.items():
            if k.startswith("_klsum/"):
                key = k.split("/", 1)[1]
                n = self._stats.get(f"route/{key}/tokens", 0)
                out[f"route/{key}/kl"] = v / n if n else 0.0
            else:
                out[k] = v
        self._stats = {}
        return out


def _sampled_logprobs(sig, sub: RolloutBatch) -> torch.Tensor | None:
    """The teacher's log-prob of each sampled token, where the signal has it (sampled, top-K with the sampled token,
    full) — for the per-teacher KL."""
    if isinstance(sig, SampledSignal):
        return sig.logprobs_BT
    if isinstance(sig, TopKSignal):
        return sig.sampled_logprobs_BT
    if isinstance(sig, FullSignal):
        m = sub.response_mask_BT.bool()
        b, t = m.nonzero(as_tuple=True)
        out = torch.zeros(m.shape, dtype=torch.float32)
        if b.numel():
            lp = sig.logprobs_chunk(b, t)
            out[b, t] = lp.gather(-1, sub.response_ids_BT[b, t][:, None]).squeeze(-1).float()
        return out
    return None

