"""Fused full-vocabulary divergence: student hidden states -> lm_head -> log-softmax -> divergence, chunk by chunk.

The generic full-vocabulary path (`dense.chunked_positions`) evaluates p * f(q / p) with autograd over [chunk, V]
under activation checkpointing: several [chunk, V] temporaries in forward, all of them again in backward, and the
metrics (entropies, KL) as further full-vocabulary passes. This module computes the same per-position values with
the closed-form gradient with respect to the student's logits z (s = softmax(z) the student, t the teacher):

    reverse KL   D = sum s (log s - log t)                       dD/dz = s * (log s - log t - D)
    forward KL   D = sum t (log t - log s)                       dD/dz = s * sum(t) - t
    gen. JSD     D = b sum t (log t - log m) + (1-b) sum s (log s - log m),  m = b t + (1-b) s
                 dD/ds = (1-b) (log s - log m)  (the terms through m cancel)   dD/dz = s * (g - sum(s g))
    sampled-token log-prob  d log s_y / dz = onehot(y) - s

(the GKD / TRL `generalized_jsd_loss` convention of `divergences.jsd`). Forward runs one lm_head matmul per chunk and
the metrics from the same chunk's log-probs; backward recomputes the chunk's logits once and forms
grad_hidden = G W and grad_W = G^T h from G = dLoss/dz: no [B, T, V] tensor, no autograd graph over V, two
[chunk, V] buffers reused for every chunk (fresh ~65 MB temporaries per op were mapped and unmapped by glibc:
see docs/performance.md). Proven equal to the generic path in float64 (tests/objectives/test_fused.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.divergences import LOGPROB_FLOOR
from opdkit.objectives.signals import FullSignal

CLOSED_FORMS = ("reverse_kl", "forward_kl", "jsd")


def fused_supported(cfg: ObjectiveConfig) -> bool:
    """The objectives the fused path computes: the full estimator with reverse KL, forward KL or generalized JSD."""
    return cfg.estimator == "full" and cfg.divergence in CLOSED_FORMS


def _kind(cfg: ObjectiveConfig) -> tuple[str, float]:
    if cfg.divergence == "jsd":  # the endpoints are forward / reverse KL (divergences.jsd)
        if cfg.beta == 0.0:
            return "forward_kl", 0.0
        if cfg.beta == 1.0:
            return "reverse_kl", 0.0
        return "jsd", float(cfg.beta)
    return cfg.divergence, 0.0


@dataclass
class _Spec:
    kind: str
    beta: float
    temperature: float
    chunk: int
    teacher: FullSignal
    b_idx: Tensor
    t_idx: Tensor


# Work buffers hold at most this many elements each (16 MB in float32): chunks of a few [chunk, V] buffers stay
# in cache-sized pieces and, allocated once per call, are not mapped and unmapped by malloc for every operation.
MAX_CHUNK_ELEMENTS = 1 << 22


def chunk_rows(cfg_chunk: int, V: int) -> int:
    return max(1, min(cfg_chunk, MAX_CHUNK_ELEMENTS // max(V, 1)))


class _Buffers:
    """[chunk, V] work buffers reused for every chunk: z (student log-probs), s (student probs), t (teacher
    log-probs), w and x (scratch)."""

    def __init__(self, n: int, V: int, dtype: torch.dtype, device) -> None:
        self.z, self.s, self.t, self.w, self.x = (torch.empty(n, V, dtype=dtype, device=device) for _ in range(5))

    def view(self, n: int):
        return self.z[:n], self.s[:n], self.t[:n], self.w[:n], self.x[:n]


def _student(h: Tensor, W: Tensor, b: Tensor | None, temperature: float, z: Tensor, s: Tensor) -> None:
    """z <- log_softmax((h W^T + b) / temperature), s <- exp(z), in place in the given buffers."""
    torch.mm(h.to(z.dtype), W.to(z.dtype).t(), out=z)
    if b is not None:
        z.add_(b.to(z.dtype))
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(z.amax(-1, keepdim=True))
    torch.exp(z, out=s)
    total = s.sum(-1, keepdim=True)
    s.div_(total)
    z.sub_(total.log_())


def _teacher(spec: _Spec, lo: int, hi: int, out: Tensor) -> Tensor:
    """Teacher log-probs of positions lo:hi, floored at LOGPROB_FLOOR (as `Divergence.term`), into `out`."""
    bi, ti = spec.b_idx[lo:hi], spec.t_idx[lo:hi]
    sig = spec.teacher
    if sig.logprobs_BTV is not None:
        lp = sig.logprobs_BTV
        flat, rows = lp.reshape(-1, lp.shape[-1]), bi * lp.shape[1] + ti
        if flat.dtype == out.dtype:
            torch.index_select(flat, 0, rows, out=out)
        else:
            out.copy_(flat.index_select(0, rows))
    else:
        out.copy_(sig.logprobs_chunk(bi, ti))
    return out.clamp_(min=LOGPROB_FLOOR)


def _dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise sum(a * b) [n], the product written into `scratch`."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _log_m(beta: float, s: Tensor, tp: Tensor, out: Tensor) -> Tensor:
    """out <- log m = log(beta t + (1 - beta) s) from the probabilities. Where m underflows to 0 both s and t do too
    (their terms are 0 either way): the log is taken at the smallest normal number instead of -inf."""
    torch.mul(s, 1.0 - beta, out=out).add_(tp, alpha=beta)
    return out.clamp_(min=torch.finfo(out.dtype).tiny).log_()


def _values(spec: _Spec, ls: Tensor, s: Tensor, lt: Tensor, w: Tensor, x: Tensor):
    """(divergence, student entropy, teacher entropy, reverse KL) per row from one chunk; w, x are scratch."""
    ent_s = -_dot(s, ls, w)
    kl = -ent_s - _dot(s, lt, w)              # sum s (log s - log t)
    tp = torch.exp(lt, out=x)                 # teacher probabilities
    ent_t = -_dot(tp, lt, w)
    if spec.kind == "reverse_kl":
        return kl, ent_s, ent_t, kl
    if spec.kind == "forward_kl":
        return -ent_t - _dot(tp, ls, w), ent_s, ent_t, kl   # sum t (log t - log s)
    lm = _log_m(spec.beta, s, tp, w)
    t_part = -ent_t - tp.mul_(lm).sum(-1)     # KL(t || m)
    s_part = -ent_s - lm.mul_(s).sum(-1)      # KL(s || m)
    return spec.beta * t_part + (1.0 - spec.beta) * s_part, ent_s, ent_t, kl


def _grad_logits(spec: _Spec, ls: Tensor, s: Tensor, lt: Tensor, w: Tensor, x: Tensor, div: Tensor,
                 g_div: Tensor, g_logp: Tensor, tok: Tensor) -> Tensor:
    """w <- dLoss/dz for one chunk: g_div * dD/dz + g_logp * (onehot(tok) - s), divided by the temperature."""
    if spec.kind == "reverse_kl":
        torch.sub(ls, lt, out=w).sub_(div[:, None]).mul_(s)
    elif spec.kind == "forward_kl":
        torch.exp(lt, out=w)
        total = w.sum(-1, keepdim=True)
        w.neg_().addcmul_(s, total)
    else:
        lm = _log_m(spec.beta, s, torch.exp(lt, out=x), w)
        torch.sub(ls, lm, out=w).mul_(1.0 - spec.beta)
        w.sub_(_dot(s, w, x)[:, None]).mul_(s)
    w.mul_(g_div[:, None]).addcmul_(s, -g_logp[:, None])
    w[torch.arange(w.shape[0], device=w.device), tok] += g_logp
    if spec.temperature != 1.0:
        w.div_(spec.temperature)
    return w


class _FusedFull(torch.autograd.Function):
    """(hidden [N, H], W [V, H], bias [V] | None, tokens [N]) -> (log-prob of the token, divergence, entropies, KL)."""

    @staticmethod
    def forward(ctx, h, W, b, tok, spec: _Spec):
        N, V = h.shape[0], W.shape[0]
        dtype = torch.promote_types(h.dtype, torch.float32)
        c = min(spec.chunk, N)
        buf = _Buffers(c, V, dtype, h.device)
        out = [torch.empty(N, dtype=dtype, device=h.device) for _ in range(5)]
        ar = torch.arange(c, device=h.device)
        for lo in range(0, N, c):
            hi = min(lo + c, N)
            z, s, t, w, x = buf.view(hi - lo)
            _student(h[lo:hi], W, b, spec.temperature, z, s)
            _teacher(spec, lo, hi, t)
            out[0][lo:hi] = z[ar[:hi - lo], tok[lo:hi]]
            for i, v in enumerate(_values(spec, z, s, t, w, x), start=1):
                out[i][lo:hi] = v
        ctx.save_for_backward(h, W, b, tok, out[1].clone())
        ctx.spec = spec
        ctx.mark_non_differentiable(out[2], out[3], out[4])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_logp, g_div, *_metrics):
        h, W, b, tok, div = ctx.saved_tensors
        spec: _Spec = ctx.spec
        N, V = h.shape[0], W.shape[0]
        dtype = div.dtype
        g_logp = torch.zeros(N, dtype=dtype, device=h.device) if g_logp is None else g_logp.to(dtype)
        g_div = torch.zeros(N, dtype=dtype, device=h.device) if g_div is None else g_div.to(dtype)
        c = min(spec.chunk, N)
        buf = _Buffers(c, V, dtype, h.device)
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=dtype, device=W.device) if need_W else None
        grad_b = torch.zeros(V, dtype=dtype, device=W.device) if (need_b and b is not None) else None
        Wc = W.to(dtype)
        for lo in range(0, N, c):
            hi = min(lo + c, N)
            z, s, t, w, x = buf.view(hi - lo)
            _student(h[lo:hi], W, b, spec.temperature, z, s)
            _teacher(spec, lo, hi, t)
            G = _grad_logits(spec, z, s, t, w, x, div[lo:hi], g_div[lo:hi], g_logp[lo:hi], tok[lo:hi])
            if grad_h is not None:
                torch.mm(G, Wc, out=grad_h[lo:hi])
            if grad_W is not None:
                grad_W.addmm_(G.t(), h[lo:hi].to(dtype))
            if grad_b is not None:
                grad_b.add_(G.sum(0))
        return (None if grad_h is None else grad_h.to(h.dtype), None if grad_W is None else grad_W.to(W.dtype),
                None if grad_b is None else grad_b.to(b.dtype), None, None)


def fused_full_positions(cfg: ObjectiveConfig, hidden_BTH: Tensor, weight_VH: Tensor, bias_V: Tensor | None,
                         temperature: float, tokens_BT: Tensor, mask_BT: Tensor, teacher: FullSignal) -> dict:
    """`dense.chunked_positions` for the full estimator with a closed-form divergence, from hidden states: the same
    dict of [B, T] tensors (logp and div with gradient; ent_s, ent_t, kl detached), zeros where mask_BT is False."""
    if not fused_supported(cfg):
        raise ValueError(f"the fused update computes objective.estimator=full with divergence in "
                         f"{', '.join(CLOSED_FORMS)}; got estimator={cfg.estimator}, divergence={cfg.divergence} "
                         f"(set optim.fused_loss=off or auto)")
    kind, beta = _kind(cfg)
    B, T = tokens_BT.shape
    b_idx, t_idx = mask_BT.bool().nonzero(as_tuple=True)
    dtype = torch.promote_types(hidden_BTH.dtype, torch.float32)
    out = {k: hidden_BTH.new_zeros((B, T), dtype=dtype) for k in ("logp", "div", "ent_t", "kl", "ent_s")}
    if b_idx.numel() == 0:  # keep the graph connected so backward() works on an empty selection
        anchor = 0.0 * hidden_BTH.sum() + 0.0 * weight_VH.sum()
        out["logp"], out["div"] = out["logp"] + anchor, out["div"] + anchor
        return out
    spec = _Spec(kind, beta, float(temperature), chunk_rows(cfg.chunk_size, int(weight_VH.shape[0])), teacher,
                 b_idx, t_idx)
    logp, div, ent_s, ent_t, kl = _FusedFull.apply(hidden_BTH[b_idx, t_idx], weight_VH, bias_V,
                                                   tokens_BT[b_idx, t_idx], spec)
    for name, vals in zip(("logp", "div", "ent_s", "ent_t", "kl"), (logp, div, ent_s, ent_t, kl), strict=True):
        out[name] = out[name].index_put((b_idx, t_idx), vals.to(dtype))
    return out
