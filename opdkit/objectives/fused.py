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
the metrics from the same chunk's log-probs, and forms grad_hidden = G W and grad_W = G^T h from G = dLoss/dz in
the same pass when the caller announces the loss weights (else backward recomputes the chunk's logits once): no
[B, T, V] tensor, no autograd graph over V, five [chunk, V] buffers reused for every chunk (fresh ~65 MB temporaries per op were mapped and unmapped by glibc:
see docs/performance.md). Proven equal to the generic path in float64 (tests/objectives/test_fused.py).
"""

from __future__ import annotations

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
    weights: Tensor | None = None  # [N]: the caller's dLoss/d(divergence) per row up to one constant, if known


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


def _log_softmax_(z: Tensor, p: Tensor) -> None:
    """z <- log_softmax(z) and p <- exp(z), in place."""
    z.sub_(z.amax(-1, keepdim=True))
    torch.exp(z, out=p)
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    z.sub_(total.log_())


def _logits_(h: Tensor, W: Tensor, b: Tensor | None, temperature: float, out: Tensor) -> None:
    """out <- (h W^T + b) / temperature; W already in out's dtype."""
    torch.mm(h.to(out.dtype), W.t(), out=out)
    if b is not None:
        out.add_(b.to(out.dtype))
    if temperature != 1.0:
        out.div_(temperature)


def _teacher(spec: _Spec, lo: int, hi: int, out: Tensor, scratch: Tensor) -> bool:
    """Teacher log-probs of positions lo:hi, floored at LOGPROB_FLOOR (as `Divergence.term`), into `out`. True when
    `scratch` then holds the teacher's probabilities (from its log-softmax: the floor changes none of them, as
    exp(-1e4) is 0 in float32/64)."""
    bi, ti = spec.b_idx[lo:hi], spec.t_idx[lo:hi]
    sig = spec.teacher
    probs_ready = False
    if sig.logprobs_BTV is not None:
        lp = sig.logprobs_BTV
        flat, rows = lp.reshape(-1, lp.shape[-1]), bi * lp.shape[1] + ti
        if flat.dtype == out.dtype:
            torch.index_select(flat, 0, rows, out=out)
        else:
            out.copy_(flat.index_select(0, rows))
    elif sig.head_weight_VH.dtype == out.dtype:  # its logits straight into the buffer, as the student's
        _logits_(sig.hidden_BTH[bi, ti], sig.head_weight_VH, sig.head_bias_V, sig.temperature, out)
        _log_softmax_(out, scratch)
        probs_ready = True
    else:
        out.copy_(sig.logprobs_chunk(bi, ti))
    out.clamp_(min=LOGPROB_FLOOR)
    return probs_ready


def _dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise sum(a * b) [n], the product written into `scratch`."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _log_m(beta: float, s: Tensor, tp: Tensor, out: Tensor) -> Tensor:
    """out <- log m = log(beta t + (1 - beta) s) from the probabilities. Where m underflows to 0 both s and t do too
    (their terms are 0 either way): the log is taken at the smallest normal number instead of -inf."""
    torch.mul(s, 1.0 - beta, out=out).add_(tp, alpha=beta)
    return out.clamp_(min=torch.finfo(out.dtype).tiny).log_()


def _values(spec: _Spec, ls: Tensor, s: Tensor, lt: Tensor, w: Tensor, x: Tensor, g: Tensor | None,
            x_is_tp: bool = False):
    """(divergence, student entropy, teacher entropy, reverse KL) per row of one chunk, and with per-row loss weights
    g [n] also G = g * dD/dz [n, V] (z the tempered logits) in one of the scratch buffers w, x (None without g).
    ls, s, lt are only read; `x_is_tp`: x already holds exp(lt)."""
    ent_s = -_dot(s, ls, w)
    kl = -ent_s - _dot(s, lt, w)              # sum s (log s - log t)
    tp = x if x_is_tp else torch.exp(lt, out=x)   # teacher probabilities
    ent_t = -_dot(tp, lt, w)
    if spec.kind == "reverse_kl":             # dD/dz = s (log s - log t - D)
        G = None if g is None else torch.sub(ls, lt, out=w).sub_(kl[:, None]).mul_(s).mul_(g[:, None])
        return (kl, ent_s, ent_t, kl), G
    if spec.kind == "forward_kl":             # D = sum t (log t - log s), dD/dz = s sum(t) - t
        div = -ent_t - _dot(tp, ls, w)
        if g is None:
            return (div, ent_s, ent_t, kl), None
        total = tp.sum(-1, keepdim=True)
        return (div, ent_s, ent_t, kl), tp.neg_().addcmul_(s, total).mul_(g[:, None])
    lm = _log_m(spec.beta, s, tp, w)
    t_part = -ent_t - tp.mul_(lm).sum(-1)     # KL(t || m); x free again
    d = torch.sub(ls, lm, out=x)              # log s - log m
    s_part = _dot(s, d, w)                    # KL(s || m)
    div = spec.beta * t_part + (1.0 - spec.beta) * s_part
    # dD/dz = s (q - sum(s q)) with q = (1 - beta) (log s - log m): the terms through m cancel
    G = None if g is None else d.sub_(s_part[:, None]).mul_(s).mul_((1.0 - spec.beta) * g[:, None])
    return (div, ent_s, ent_t, kl), G


class _Grads:
    """grad_hidden [B, T, H] (zero off the selected positions), grad_W [V, H], grad_bias [V], accumulated chunk by
    chunk from G = dLoss/dlogits."""

    def __init__(self, h: Tensor, W: Tensor, b: Tensor | None, needs: tuple, Wc: Tensor, spec: _Spec) -> None:
        dtype, dev = Wc.dtype, h.device
        self.Wc, self.spec = Wc, spec
        self.h = torch.zeros(h.shape, dtype=dtype, device=dev) if needs[0] else None
        self.W = torch.zeros(W.shape, dtype=dtype, device=dev) if needs[1] else None
        self.b = torch.zeros(W.shape[0], dtype=dtype, device=dev) if (needs[2] and b is not None) else None

    def add(self, G: Tensor, h_chunk: Tensor, lo: int, hi: int) -> None:
        if self.h is not None:
            self.h[self.spec.b_idx[lo:hi], self.spec.t_idx[lo:hi]] = torch.mm(G, self.Wc)
        if self.W is not None:
            self.W.addmm_(G.t(), h_chunk.to(G.dtype))
        if self.b is not None:
            self.b.add_(G.sum(0))

    def result(self, h: Tensor, W: Tensor, b: Tensor | None, scale: float = 1.0) -> tuple:
        def out(g, like):
            return None if g is None else (g if scale == 1.0 else g.mul_(scale)).to(like.dtype)
        return out(self.h, h), out(self.W, W), None if b is None else out(self.b, b), None, None


def _proportional(g: Tensor, w: Tensor) -> float | None:
    """c with g == c * w to rounding, else None."""
    ww = float(w.double().square().sum())
    if ww == 0.0:
        return 0.0 if not bool(g.any()) else None
    c = float((g.double() * w.double()).sum()) / ww
    tol = 64 * torch.finfo(g.dtype).eps * float(g.abs().max())
    return c if float((g.double() - c * w.double()).abs().max()) <= tol else None


def _chunk(spec: _Spec, h_BTH: Tensor, Wc: Tensor, b: Tensor | None, buf: _Buffers, lo: int, hi: int):
    """Selected positions lo:hi: ((z, s, t, w, x), hidden states [hi - lo, H], teacher probs in x?) with z, s the
    student's log-probs and probs, t the teacher's log-probs, w and x scratch. The hidden states are gathered per
    chunk: no [N, H] copy of the inputs."""
    bufs = buf.view(hi - lo)
    h_c = h_BTH[spec.b_idx[lo:hi], spec.t_idx[lo:hi]]
    _logits_(h_c, Wc, b, spec.temperature, bufs[0])
    _log_softmax_(bufs[0], bufs[1])
    return bufs, h_c, _teacher(spec, lo, hi, bufs[2], bufs[4])


class _FusedFull(torch.autograd.Function):
    """(hidden [B, T, H], W [V, H], bias [V] | None, tokens [N]) -> per selected position (spec.b_idx, spec.t_idx):
    (log-prob of the token, divergence, entropies, KL), each [N].

    With spec.weights (the caller's per-row loss weights of the divergence, up to one constant) the gradient is
    computed in forward from the same chunk's buffers (Liger's fused-linear approach): backward only checks that the
    incoming gradient is those weights times a constant, with no gradient on the token log-prob, and scales. Any
    other incoming gradient (the OPD-RL hybrid's log-prob term, importance weights, entropy selection decided from
    this call's entropies) takes the recompute path: the chunk's logits again, then the same closed form."""

    @staticmethod
    def forward(ctx, h, W, b, tok, spec: _Spec):
        N, V = tok.shape[0], W.shape[0]
        dtype = torch.promote_types(h.dtype, torch.float32)
        c = min(spec.chunk, N)
        buf = _Buffers(c, V, dtype, h.device)
        out = [torch.empty(N, dtype=dtype, device=h.device) for _ in range(5)]
        ar = torch.arange(c, device=h.device)
        Wc = W.to(dtype)
        pre = None if spec.weights is None else _Grads(h, W, b, ctx.needs_input_grad, Wc, spec)
        for lo in range(0, N, c):
            hi = min(lo + c, N)
            (z, s, t, w, x), h_c, tp_ready = _chunk(spec, h, Wc, b, buf, lo, hi)
            out[0][lo:hi] = z[ar[:hi - lo], tok[lo:hi]]
            g = None if pre is None else spec.weights[lo:hi].to(dtype)
            vals, G = _values(spec, z, s, t, w, x, g, tp_ready)
            for i, v in enumerate(vals, start=1):
                out[i][lo:hi] = v
            if pre is not None:
                if spec.temperature != 1.0:
                    G.div_(spec.temperature)
                pre.add(G, h_c, lo, hi)
        ctx.save_for_backward(h, W, b, tok)
        ctx.spec, ctx.pre = spec, pre
        ctx.mark_non_differentiable(out[2], out[3], out[4])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_logp, g_div, *_metrics):
        h, W, b, tok = ctx.saved_tensors
        spec: _Spec = ctx.spec
        pre, ctx.pre = ctx.pre, None
        no_logp = g_logp is None or not bool(g_logp.any())
        if pre is not None and no_logp:
            scale = 0.0 if g_div is None else _proportional(g_div, spec.weights.to(g_div.dtype))
            if scale is not None:
                return pre.result(h, W, b, scale)
        return _recompute(spec, h, W, b, tok, g_logp, g_div, ctx.needs_input_grad)


def _recompute(spec: _Spec, h, W, b, tok, g_logp, g_div, needs: tuple) -> tuple:
    """The backward that recomputes each chunk: dLoss/dz = g_div * dD/dz + g_logp * (onehot(tok) - s)."""
    N, V = tok.shape[0], W.shape[0]
    dtype = torch.promote_types(h.dtype, torch.float32)
    g_logp = torch.zeros(N, dtype=dtype, device=h.device) if g_logp is None else g_logp.to(dtype)
    g_div = torch.zeros(N, dtype=dtype, device=h.device) if g_div is None else g_div.to(dtype)
    c = min(spec.chunk, N)
    buf = _Buffers(c, V, dtype, h.device)
    Wc = W.to(dtype)
    grads = _Grads(h, W, b, needs, Wc, spec)
    for lo in range(0, N, c):
        hi = min(lo + c, N)
        (z, s, t, w, x), h_c, tp_ready = _chunk(spec, h, Wc, b, buf, lo, hi)
        _, G = _values(spec, z, s, t, w, x, g_div[lo:hi], tp_ready)
        gl = g_logp[lo:hi]
        G.addcmul_(s, -gl[:, None])
        G[torch.arange(hi - lo, device=G.device), tok[lo:hi]] += gl
        if spec.temperature != 1.0:
            G.div_(spec.temperature)
        grads.add(G, h_c, lo, hi)
    return grads.result(h, W, b)


def fused_full_positions(cfg: ObjectiveConfig, hidden_BTH: Tensor, weight_VH: Tensor, bias_V: Tensor | None,
                         temperature: float, tokens_BT: Tensor, mask_BT: Tensor, teacher: FullSignal,
                         loss_weights_BT: Tensor | None = None) -> dict:
    """`dense.chunked_positions` for the full estimator with a closed-form divergence, from hidden states: the same
    dict of [B, T] tensors (logp and div with gradient; ent_s, ent_t, kl detached), zeros where mask_BT is False.

    `loss_weights_BT`: what the caller's loss will multiply each position's divergence by, up to one constant factor
    (e.g. the mask for a token mean), if it knows it now. The gradient is then computed during this forward, with no
    recompute in backward; a backward whose incoming gradient turns out otherwise recomputes, so a wrong guess costs
    time, never correctness."""
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
    if loss_weights_BT is not None and torch.is_grad_enabled():
        spec.weights = loss_weights_BT.detach()[b_idx, t_idx]
    logp, div, ent_s, ent_t, kl = _FusedFull.apply(hidden_BTH, weight_VH, bias_V, tokens_BT[b_idx, t_idx], spec)
    for name, vals in zip(("logp", "div", "ent_s", "ent_t", "kl"), (logp, div, ent_s, ent_t, kl), strict=True):
        out[name] = out[name].index_put((b_idx, t_idx), vals.to(dtype))
    return out
