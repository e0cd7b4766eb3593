"""The update's matmul FLOPs (what an ideal implementation must compute) and this machine's fp32 matmul rate.

One update step of `opdkit train` runs the student forward over every sequence of the batch (B sequences of L =
prompt + response tokens) and keeps the logits of the T + 1 last positions (`logits_to_keep`), then backward. Counted
(2 FLOPs per multiply-add):

    per layer and token: 2 x (the layer's linear weights: q, k, v, o, gate, up, down)
    per layer and sequence: attention scores Q K^T and their product with V, 2 x 2 x L^2 x heads x head_dim (dense,
        as eager / SDPA compute it on CPU)
    output layer: 2 x hidden x vocab per kept position (B x (T + 1))
    backward = 2 x forward (gradients of the weights and of the activations); x ppo_epochs

The divergence itself (elementwise over [N, V]) and the optimizer are not matmuls and are left out: the ratio
achieved / peak says how close the update is to pure matmul speed.
"""

from __future__ import annotations

import time


def layer_linear_params(config) -> int:
    """Weights of one Llama-style decoder layer's linear maps (q, k, v, o projections and the gated MLP)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    return h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * config.intermediate_size


def forward_flops(config, batch: int, seq_len: int, kept: int) -> int:
    """Matmul FLOPs of one forward of `batch` sequences of `seq_len` tokens, logits at `kept` positions each."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    per_seq = (seq_len * layers * 2 * layer_linear_params(config) + layers * 4 * seq_len * seq_len * heads * hd
               + kept * 2 * h * config.vocab_size)
    return batch * per_seq


def update_flops(config, batch: int, seq_len: int, response_len: int, epochs: int = 1) -> int:
    """Matmul FLOPs of one update: forward + backward (2x forward) of the student, logits at response_len + 1
    positions (opdkit's `logits_to_keep`), `epochs` passes."""
    return 3 * forward_flops(config, batch, seq_len, response_len + 1) * epochs


def matmul_rate(m: int, k: int, n: int, min_seconds: float = 0.2, repeats: int = 3) -> float:
    """FLOP/s of a float32 `torch.mm` of [m, k] x [k, n] on this process's threads: the best of `repeats` timings,
    each of at least `min_seconds` (best-of, since other processes may share the cores)."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up (allocations, kernel selection)
    best = 0.0
    for _ in range(repeats):
        n_calls, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            n_calls += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, 2.0 * m * k * n * n_calls / dt)
    return best


def matmul_peak(config, batch: int, response_len: int) -> dict:
    """This machine's fp32 matmul rate measured now: the update's output-layer shape ([B (T+1), hidden] x
    [hidden, vocab]) and a square 1024 matmul; `peak` is the faster of the two."""
    shapes = {"lm_head": (batch * (response_len + 1), config.hidden_size, config.vocab_size),
              "square_1024": (1024, 1024, 1024)}
    rates = {name: matmul_rate(*shape) for name, shape in shapes.items()}
    return {"rates": rates, "shapes": {k: list(v) for k, v in shapes.items()}, "peak": max(rates.values())}
