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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SIGNAL_KINDS = ("sampled", "topk", "full")


@dataclass
class SampledSignal:
    logprobs_BT: torch.Tensor

    kind = "sampled"

    def shape_BT(self) -> tuple[int, int]:
        return tuple(self.logprobs_BT.shape[:2])  # type: ignore[return-value]


@dataclass
class TopKSignal:
    logprobs_BTK: torch.Tensor
    ids_BTK: torch.Tensor
    sampled_logprobs_BT: torch.Tensor | None = None

    kind = "topk"

    def shape_BT(self) -> tuple[int, int]:
        return tuple(self.logprobs_BTK.shape[:2])  # type: ignore[return-value]


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


TeacherSignal = SampledSignal | TopKSignal | FullSignal
