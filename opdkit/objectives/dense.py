"""Per-position computations over the vocabulary, chunked over valid positions.

The student's distribution at a position comes either from logits [B, T, V] or from final hidden states [B, T, H]
and the lm_head (weight [V, H]); in the second case no [B, T, V] tensor ever exists. Each chunk of at most
`chunk_size` valid positions is computed under activation checkpointing, so the tensors autograd keeps are the
chunk's inputs only and the [chunk, V] log-softmax is recomputed in backward: peak extra memory O(chunk x V).

Full-vocabulary OPD (seeds/004 "full-vocab", seeds/000 appendix): loss_t = D_f(p_t || q_t) summed over the whole
vocabulary. Teacher top-K (Revisiting OPD, seeds/003): D_f on the teacher's top-K support S, both distributions
renormalised on S; optionally with the sampled token added to S and/or the mass outside S as one tail category.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.divergences import LOGPROB_FLOOR, Divergence
from opdkit.objectives.signals import FullSignal, TopKSignal


@dataclass
class StudentSource:
    """Where student logits come from: `logits_BTV`, or `hidden_BTH` with `head_weight_VH` (+ bias)."""

    logits_BTV: Tensor | None = None
    hidden_BTH: Tensor | None = None
    head_weight_VH: Tensor | None = None
    head_bias_V: Tensor | None = None
    temperature: float = 1.0

    def rows_input(self) -> Tensor:
        return self.logits_BTV if self.logits_BTV is not None else self.hidden_BTH  # type: ignore[return-value]

    def logprobs(self, rows_NX: Tensor) -> Tensor:
        """Student log-probs [N, V] from N gathered rows of `rows_input()`."""
        logits = rows_NX
        if self.logits_BTV is None:
            logits = F.linear(rows_NX, self.head_weight_VH, self.head_bias_V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.log_softmax(logits, dim=-1)

    @property
    def shape_BT(self) -> tuple[int, int]:
        return tuple(self.rows_input().shape[:2])  # type: ignore[return-value]

    @property
    def vocab_size(self) -> int:
        if self.logits_BTV is not None:
            return int(self.logits_BTV.shape[-1])
        return int(self.head_weight_VH.shape[0])  # type: ignore[union-attr]


def entropy(logprobs_NV: Tensor) -> Tensor:
    lp = logprobs_NV.clamp(min=LOGPROB_FLOOR)
    return -(lp.exp() * lp).sum(-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, finite with finite gradients: positions with x >= -1e-6 (no mass left)
    get LOGPROB_FLOOR and zero gradient (double-where so no 0 * inf in backward)."""
    ok = x < -1e-6
    xs = torch.where(ok, x, torch.full_like(x, -1.0))
    val = torch.where(xs > -0.6931, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    return torch.where(ok, val, torch.full_like(x, LOGPROB_FLOOR))


def topk_categories(cfg: ObjectiveConfig, lp_NV: Tensor, t_lp_NK: Tensor, ids_NK: Tensor,
                    tokens_N: Tensor, t_sampled_N: Tensor | None) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the top-K categories, [N, C] each (C = K, +1 sampled, +1 tail)."""
    s_lp = lp_NV.gather(-1, ids_NK)
    t_lp = t_lp_NK.to(s_lp.dtype).clamp(min=LOGPROB_FLOOR)
    valid = torch.ones_like(s_lp, dtype=torch.bool)
    if cfg.topk_include_sampled:
        assert t_sampled_N is not None
        extra_ok = ~(ids_NK == tokens_N[:, None]).any(-1, keepdim=True)
        s_extra = lp_NV.gather(-1, tokens_N[:, None])
        t_extra = t_sampled_N[:, None].to(s_lp.dtype).clamp(min=LOGPROB_FLOOR)
        floor = torch.full_like(s_extra, LOGPROB_FLOOR)
        s_lp = torch.cat([s_lp, torch.where(extra_ok, s_extra, floor)], -1)
        t_lp = torch.cat([t_lp, torch.where(extra_ok, t_extra, floor)], -1)
        valid = torch.cat([valid, extra_ok], -1)
    if cfg.topk_tail:
        # Raw (not renormalised) probabilities on S plus one category for the rest: the C categories sum to 1.
        s_tail = _log1mexp(torch.logsumexp(s_lp, -1, keepdim=True).clamp(max=0.0))
        t_tail = _log1mexp(torch.logsumexp(t_lp, -1, keepdim=True).clamp(max=0.0))
        return torch.cat([s_lp, s_tail], -1), torch.cat([t_lp, t_tail], -1)
    # Renormalise both on S (invalid extra columns sit at LOGPROB_FLOOR: probability 0, no gradient).
    s_lp = s_lp - torch.logsumexp(s_lp, -1, keepdim=True)
    t_lp = t_lp - torch.logsumexp(t_lp, -1, keepdim=True)
    return torch.where(valid, s_lp, LOGPROB_FLOOR), torch.where(valid, t_lp, LOGPROB_FLOOR)


def chunked_positions(cfg: ObjectiveConfig, div: Divergence, student: StudentSource, tokens_BT: Tensor,
                      mask_BT: Tensor, teacher: FullSignal | TopKSignal | None, need_entropy: bool):
    """Run the per-position computation over the valid positions in chunks.

    Returns dict of [B, T] tensors (zeros at invalid positions):
      logp     student log-prob of the sampled token (with grad)
      div      per-position divergence for topk/full (with grad); absent for sampled
      ent_s    student entropy (detached) when need_entropy
      ent_t    teacher entropy (detached; full: exact, topk: on the renormalised support)
      kl       reverse KL(p || q) per position (detached; full: exact, topk: on the support)
    """
    B, T = tokens_BT.shape
    b_idx, t_idx = mask_BT.bool().nonzero(as_tuple=True)
    rows = student.rows_input()
    kind = None if teacher is None else teacher.kind
    names = ["logp"] + (["div", "ent_t", "kl"] if kind else []) + (["ent_s"] if need_entropy else [])
    out = {k: rows.new_zeros((B, T), dtype=torch.promote_types(rows.dtype, torch.float32)) for k in names}
    n = b_idx.numel()
    if n == 0:
        # Keep the graph connected so backward() works on an empty selection.
        anchor = 0.0 * rows.sum()
        for name in ("logp", "div"):
            if name in out:
                out[name] = out[name] + anchor
        return out

    def run(rows_NX: Tensor, tok_N: Tensor, bi: Tensor, ti: Tensor):
        lp = student.logprobs(rows_NX)
        res = [lp.gather(-1, tok_N[:, None]).squeeze(-1)]
        if kind == "full":
            tl = teacher.logprobs_chunk(bi, ti).to(lp.dtype)  # type: ignore[union-attr]
            res += [div.term(lp, tl).sum(-1), entropy(tl).detach(), _rkl(lp, tl).detach()]
        elif kind == "topk":
            t_sampled = None if teacher.sampled_logprobs_BT is None else teacher.sampled_logprobs_BT[bi, ti]
            s_c, t_c = topk_categories(cfg, lp, teacher.logprobs_BTK[bi, ti], teacher.ids_BTK[bi, ti],
                                       tok_N, t_sampled)
            res += [div.term(s_c, t_c).sum(-1), entropy(t_c).detach(), _rkl(s_c, t_c).detach()]
        if need_entropy:
            res.append(entropy(lp).detach())
        return tuple(res)

    pieces: list[tuple[Tensor, ...]] = []
    for start in range(0, n, cfg.chunk_size):
        bi, ti = b_idx[start:start + cfg.chunk_size], t_idx[start:start + cfg.chunk_size]
        chunk_rows = rows[bi, ti]
        tok = tokens_BT[bi, ti]
        if chunk_rows.requires_grad:
            pieces.append(checkpoint(run, chunk_rows, tok, bi, ti, use_reentrant=False))
        else:
            pieces.append(run(chunk_rows, tok, bi, ti))
    for i, name in enumerate(names):
        vals = torch.cat([p[i] for p in pieces])
        out[name] = out[name].index_put((b_idx, t_idx), vals.to(out[name].dtype))
    return out


def _rkl(lp: Tensor, lq: Tensor) -> Tensor:
    lp = lp.clamp(min=LOGPROB_FLOOR)
    return (lp.exp() * (lp - lq.clamp(min=LOGPROB_FLOOR))).sum(-1)
