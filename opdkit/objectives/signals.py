"""Teacher signals: what the teacher hands the objective, and nothing more.

Each objective declares the kind of signal it needs (`ObjectiveConfig.teacher_signal`), and the teacher computes
exactly that (verl's `trainer/distillation/losses.py` does the same): a sampled-token objective never makes the
teacher materialise a [B, T, V] tensor.

Alignment convention used everywhere in opdkit.objectives: position t of every [B, T, ...] tensor refers to the
same response token `tokens_BT[b, t]`; the student / teacher distributions at position t are the next-token
distributions that produced that token (i.e. the caller has already shifted logits by one against the input ids).

- `SampledSignal`  kind "sampled": teacher log-prob of the sampled token, [B, T].
- `TopKSignal`     kind "topk":    teacher's top-K log-probs and their ids, [B, T, K] (log-probs under the teacher's
                                   full distribution, not renormalised), plus the sampled token's teacher log-prob
                                   [B, T] when the objective includes the sampled token in the support.
- `FullSignal`     kind "full":    either full teacher log-probs [B, T, V] (small V only), or the teacher's final
                                   hidden states [B, T, H] and its lm_head weight [V, H] so that log-probs are
                                   computed chunk by chunk inside the loss (peak memory O(chunk x V)).

Every signal has `rows(idx)` (the rows of a batch) and `cat(parts)` (rows joined, shorter T right-padded with 0,
the value of masked positions), so a router or a cache can split a batch between teachers and join the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGNAL_KINDS = ("sampled", "topk", "full")


def _rows(x: torch.Tensor | None, idx) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(idx, slice):
        idx = torch.as_tensor(idx, device=x.device)
    return x[idx]


def _cat_padded(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenate [B_i, T_i, ...] tensors along B, right-padding T with zeros; None if any is None."""
    if any(x is None for x in xs):
        return None
    T = max(int(x.shape[1]) for x in xs)
    padded = []
    for x in xs:
        if x.shape[1] < T:
            x = torch.cat([x, x.new_zeros((x.shape[0], T - x.shape[1], *x.shape[2:]))], dim=1)
        padded.append(x)
    return torch.cat(padded)


def _check_same_kind(parts) -> None:
    if not parts:
        raise ValueError("cat needs at least one signal")
    kinds = {type(p) for p in parts}
    if len(kinds) > 1:
        raise ValueError(f"cannot join signals of different kinds: {sorted(k.__name__ for k in kinds)}")


@dataclass
class SampledSignal:
    logprobs_BT: torch.Tensor

    kind = "sampled"

    def shape_BT(self) -> tuple[int, int]:
        return tuple(self.logprobs_BT.shape[:2])  # type: ignore[return-value]

    def rows(self, idx) -> SampledSignal:
        return SampledSignal(_rows(self.logprobs_BT, idx))

    @staticmethod
    def cat(parts: list[SampledSignal]) -> SampledSignal:
        _check_same_kind(parts)
        return SampledSignal(_cat_padded([p.logprobs_BT for p in parts]))


@dataclass
class TopKSignal:
    logprobs_BTK: torch.Tensor
    ids_BTK: torch.Tensor
    sampled_logprobs_BT: torch.Tensor | None = None

    kind = "topk"

    def shape_BT(self) -> tuple[int, int]:
        return tuple(self.logprobs_BTK.shape[:2])  # type: ignore[return-value]

    def rows(self, idx) -> TopKSignal:
        return TopKSignal(_rows(self.logprobs_BTK, idx), _rows(self.ids_BTK, idx), _rows(self.sampled_logprobs_BT, idx))

    @staticmethod
    def cat(parts: list[TopKSignal]) -> TopKSignal:
        _check_same_kind(parts)
        if len({int(p.ids_BTK.shape[-1]) for p in parts}) > 1:
            raise ValueError("cannot join top-K signals of different K")
        return TopKSignal(_cat_padded([p.logprobs_BTK for p in parts]), _cat_padded([p.ids_BTK for p in parts]),
                          _cat_padded([p.sampled_logprobs_BT for p in parts]))


@dataclass
class FullSignal:
    logprobs_BTV: torch.Tensor | None = None
    hidden_BTH: torch.Tensor | None = None
    head_weight_VH: torch.Tensor | None = None
    head_bias_V: torch.Tensor | None = None
    temperature: float = 1.0

    kind = "full"

    def shape_BT(self) -> tuple[int, int]:
        src = self.logprobs_BTV if self.logprobs_BTV is not None else self.hidden_BTH
        if src is None:
            raise ValueError("FullSignal: give either logprobs_BTV or hidden_BTH + head_weight_VH")
        return tuple(src.shape[:2])  # type: ignore[return-value]

    def vocab_size(self) -> int:
        if self.logprobs_BTV is not None:
            return int(self.logprobs_BTV.shape[-1])
        if self.head_weight_VH is None:
            raise ValueError("FullSignal: hidden_BTH given without head_weight_VH")
        return int(self.head_weight_VH.shape[0])

    def logprobs_chunk(self, b_idx: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
        """Teacher log-probs [N, V] at the N positions (b_idx[i], t_idx[i]); no gradient."""
        with torch.no_grad():
            if self.logprobs_BTV is not None:
                return self.logprobs_BTV[b_idx, t_idx]
            if self.hidden_BTH is None or self.head_weight_VH is None:
                raise ValueError("FullSignal: give either logprobs_BTV or hidden_BTH + head_weight_VH")
            h = self.hidden_BTH[b_idx, t_idx]
            logits = torch.nn.functional.linear(h, self.head_weight_VH, self.head_bias_V)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            return torch.log_softmax(logits / self.temperature, dim=-1)

    def rows(self, idx) -> FullSignal:
        return FullSignal(_rows(self.logprobs_BTV, idx), _rows(self.hidden_BTH, idx), self.head_weight_VH,
                          self.head_bias_V, self.temperature)

    @staticmethod
    def cat(parts: list[FullSignal]) -> FullSignal:
        """Rows joined. Hidden-state signals of the same head (one teacher) stay hidden states; anything else (several
        teachers' heads) is materialised as log-probs [B, T, V] (one row at a time per part)."""
        _check_same_kind(parts)
        if len({p.vocab_size() for p in parts}) > 1:
            raise ValueError("cannot join full signals over different vocabularies")
        first = parts[0]
        same_head = all(p.logprobs_BTV is None and p.head_weight_VH is first.head_weight_VH and
                        p.head_bias_V is first.head_bias_V and p.temperature == first.temperature for p in parts)
        if same_head:
            return FullSignal(hidden_BTH=_cat_padded([p.hidden_BTH for p in parts]), head_weight_VH=first.head_weight_VH,
                              head_bias_V=first.head_bias_V, temperature=first.temperature)
        return FullSignal(logprobs_BTV=_cat_padded([p.dense_logprobs() for p in parts]))

    def dense_logprobs(self) -> torch.Tensor:
        """Teacher log-probs [B, T, V] (materialised from hidden states when needed)."""
        if self.logprobs_BTV is not None:
            return self.logprobs_BTV
        B, T = self.shape_BT()
        b, t = torch.meshgrid(torch.arange(B), torch.arange(T), indexing="ij")
        return self.logprobs_chunk(b.reshape(-1), t.reshape(-1)).reshape(B, T, -1)


TeacherSignal = SampledSignal | TopKSignal | FullSignal
