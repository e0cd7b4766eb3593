"""Teacher scoring with a HF causal LM: one no-grad forward over prompt + response, returning ONLY the signal the
objective declared (`opdkit.objectives.signals`), for the response positions.

Alignment: response token t sits at column P + t of the input (P = prompt_len, prompts left-padded); the teacher
distribution that scores it is the one at column P - 1 + t.

Memory: the decoder's final hidden states [B, L, H] are computed once (the base model, without the lm_head);
log-probs are then computed chunk by chunk over the valid response positions, `chunk_size` positions at a time, so
the peak extra memory is O(chunk_size x V), never [B, T, V]:
  - "sampled": SampledSignal(logprobs_BT) - teacher log-prob of each response token;
  - "topk":    TopKSignal(logprobs_BTK, ids_BTK[, sampled_logprobs_BT when need_sampled]);
  - "full":    FullSignal(hidden_BTH, head_weight_VH, head_bias_V, temperature): the loss computes log-probs in
               chunks itself. The weight is the live lm_head weight (not a copy): consume the signal before an
               optimizer step changes it (matters when the live student is its own teacher).
Positions with response_mask 0 get log-prob 0 and id 0 (finite, so masked losses stay finite).

The hidden-state path assumes logits = lm_head(last_hidden_state) (true for Llama/Qwen/Mistral/SmolLM: the final
norm is inside the base model). Models that scale or soft-cap logits after the head (Gemma-2, Cohere, ...) break
that; a one-off probe on a tiny slice (per model object) detects it, and such models fall back to the model's own
logits for the response positions ([B, T, V]; "full" then returns FullSignal(logprobs_BTV=...)).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from opdkit.errors import UserError
from opdkit.models import accepts_kwarg
from opdkit.objectives.signals import SIGNAL_KINDS, FullSignal, SampledSignal, TopKSignal
from opdkit.rollout.batch import RolloutBatch, left_pad, position_ids_from_mask
from opdkit.teacher.base import TeacherRequest

_HEAD_OK: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
PROBE_TOKENS = 4


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder(model):
    """The base model (final hidden states, no lm_head), or None when there is no separate one."""
    base = _unwrap(model)
    dec = base.get_decoder() if hasattr(base, "get_decoder") else None
    return None if dec is None or dec is base else dec


def _hidden(dec, input_ids_BL, attention_mask_BL, position_ids_BL) -> torch.Tensor:
    out = dec(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_matches_logits(model, input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor) -> bool:
    """Whether logits == F.linear(last_hidden_state, lm_head.weight, lm_head.bias) for this model (cached per model
    object after one probe on <= PROBE_TOKENS real tokens of the first row)."""
    if model in _HEAD_OK:
        return _HEAD_OK[model]
    dec, head = _decoder(model), _unwrap(model).get_output_embeddings()
    ok = False
    if dec is not None and head is not None and getattr(head, "weight", None) is not None:
        ids = input_ids_BL[0][attention_mask_BL[0].bool()][:PROBE_TOKENS].unsqueeze(0)
        mask = torch.ones_like(ids)
        pos = position_ids_from_mask(mask)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float()
        mine = F.linear(_hidden(dec, ids, mask, pos), head.weight, getattr(head, "bias", None)).float()
        tol = 1e-4 + 1e-3 * logits.abs().max().item()
        ok = mine.shape == logits.shape and torch.allclose(mine, logits, rtol=1e-3, atol=tol)
    _HEAD_OK[model] = ok
    return ok


def _fallback_logits(model, input_ids_BL, attention_mask_BL, position_ids_BL, P: int, T: int) -> torch.Tensor:
    """The model's own logits at columns P-1 .. P+T-2 ([B, T, V]); only for models whose head is not a plain linear
    map of the last hidden state."""
    kw = {"logits_to_keep": input_ids_BL.shape[1] - (P - 1)} if accepts_kwarg(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL,
                use_cache=False, **kw)
    logits = out.logits
    start = (P - 1) - (input_ids_BL.shape[1] - logits.shape[1])
    return logits[:, start:start + T]


@torch.no_grad()
def score(
    model,
    input_ids_BL: torch.Tensor,
    attention_mask_BL: torch.Tensor,
    prompt_len: int,
    response_ids_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    signal: str,
    top_k: int | None = None,
    need_sampled: bool = False,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_size: int | None = None,
) -> SampledSignal | TopKSignal | FullSignal:
    """Teacher signal `signal` ("sampled" | "topk" | "full") for the response positions; see the module docstring.

    input_ids_BL / attention_mask_BL: the teacher's input (prompt left-padded to `prompt_len` + response); for a
    plain teacher that is the rollout's own `input_ids_BL`, for a privileged self-teacher `build_teacher_inputs`.
    top_k: K for "topk". need_sampled: "topk" also returns the sampled token's log-prob. temperature: the
    teacher's logits are divided by it. chunk_size: positions per lm_head call. vocab_size: restrict the
    distribution to the first vocab_size ids (padded lm_head, see `opdkit.models.check_compatible`).
    The model runs in eval mode under no_grad; its train/eval mode is restored afterwards.
    """
    if signal not in SIGNAL_KINDS:
        raise ValueError(f"signal={signal!r} is not one of {', '.join(SIGNAL_KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    B, T = response_ids_BT.shape
    L, P = input_ids_BL.shape[1], int(prompt_len)
    if input_ids_BL.shape[0] != B or P < 1 or P + T > L:
        raise ValueError(f"inputs [{input_ids_BL.shape[0]}, {L}] with prompt_len {P} cannot hold responses [{B}, {T}]")
    valid_BT = response_mask_BT.bool()
    if bool(((input_ids_BL[:, P:P + T] != response_ids_BT) & valid_BT).any()):
        raise ValueError("input_ids_BL[:, prompt_len:] does not hold response_ids_BT (misaligned teacher inputs)")

    was_training = model.training
    model.eval()
    try:
        pos_BL = position_ids_from_mask(attention_mask_BL)
        head = _unwrap(model).get_output_embeddings()
        V_head = int(head.weight.shape[0]) if head is not None else None
        if vocab_size is not None and V_head is not None and vocab_size > V_head:
            raise UserError(f"vocab_size={vocab_size} exceeds the teacher's output dim {V_head}")
        use_hidden = head_matches_logits(model, input_ids_BL, attention_mask_BL)
        if use_hidden:
            hidden_BTH = _hidden(_decoder(model), input_ids_BL, attention_mask_BL, pos_BL)[:, P - 1:P - 1 + T]
            sliced = vocab_size is not None and vocab_size != V_head
            W_VH = head.weight[:vocab_size] if sliced else head.weight
            bias = getattr(head, "bias", None)
            bias_V = bias[:vocab_size] if (sliced and bias is not None) else bias
            if signal == "full":
                return FullSignal(hidden_BTH=hidden_BTH.contiguous(), head_weight_VH=W_VH.detach(),
                                  head_bias_V=None if bias_V is None else bias_V.detach(), temperature=temperature)

            def logits_at(b_N, t_N):
                h_NH = hidden_BTH[b_N, t_N]
                return F.linear(h_NH, W_VH, bias_V) if sliced else head(h_NH)
        else:
            logits_BTV = _fallback_logits(model, input_ids_BL, attention_mask_BL, pos_BL, P, T)
            if vocab_size is not None:
                logits_BTV = logits_BTV[..., :vocab_size]
            if signal == "full":
                lp = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
                return FullSignal(logprobs_BTV=lp, temperature=temperature)

            def logits_at(b_N, t_N):
                return logits_BTV[b_N, t_N]

        V = int(W_VH.shape[0]) if use_hidden else int(logits_BTV.shape[-1])
        if signal == "topk" and (not isinstance(top_k, int) or not 1 <= top_k <= V):
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, {V}] for the topk signal")
        want_sampled = signal == "sampled" or need_sampled
        b_N, t_N = valid_BT.nonzero(as_tuple=True)
        dev = hidden_BTH.device if use_hidden else logits_BTV.device
        sampled_BT = torch.zeros(B, T, dtype=torch.float32, device=dev) if want_sampled else None
        if signal == "topk":
            lp_BTK = torch.zeros(B, T, top_k, dtype=torch.float32, device=dev)
            ids_BTK = torch.zeros(B, T, top_k, dtype=torch.long, device=dev)
        for s in range(0, b_N.numel(), chunk_size):
            bc, tc = b_N[s:s + chunk_size], t_N[s:s + chunk_size]
            logp_CV = torch.log_softmax(logits_at(bc, tc).float() / temperature, dim=-1)
            if want_sampled:
                tok_C1 = response_ids_BT[bc, tc].to(logp_CV.device).unsqueeze(-1)
                sampled_BT[bc, tc] = logp_CV.gather(-1, tok_C1).squeeze(-1)
            if signal == "topk":
                vals_CK, idx_CK = logp_CV.topk(top_k, dim=-1)
                lp_BTK[bc, tc] = vals_CK
                ids_BTK[bc, tc] = idx_CK
            del logp_CV
        if signal == "sampled":
            return SampledSignal(logprobs_BT=sampled_BT)
        return TopKSignal(logprobs_BTK=lp_BTK, ids_BTK=ids_BTK, sampled_logprobs_BT=sampled_BT)
    finally:
        model.train(was_training)


def score_rollout(model, rollout, **kw) -> SampledSignal | TopKSignal | FullSignal:
    """`score` on a `RolloutBatch` with the rollout's own inputs (teacher shares the student's prompt)."""
    return score(model, rollout.input_ids_BL, rollout.attention_mask_BL, rollout.prompt_len, rollout.response_ids_BT,
                 rollout.response_mask_BT, **kw)


def score_any(model, *args, **kw):
    """`score` for a model that may be sharded with FSDP2 (under torchrun): its parameters are gathered for the
    call (a collective: every rank scores once per step), and a full signal gets its own copy of the lm_head (the
    gathered one is freed when the model reshards)."""
    from opdkit.fsdp import is_sharded, unsharded

    if not is_sharded(model):
        return score(model, *args, **kw)
    with unsharded(model):
        sig = score(model, *args, **kw)
        if isinstance(sig, FullSignal) and sig.head_weight_VH is not None:
            sig.head_weight_VH = sig.head_weight_VH.detach().clone()
            sig.head_bias_V = None if sig.head_bias_V is None else sig.head_bias_V.detach().clone()
    return sig


def _model_identity(model) -> str:
    """Name, config and a fingerprint of the weights of a HF model (for cache keys): the model's own path and the
    size/mtime of its weight files when it was loaded from disk, else a hash of every parameter."""
    import hashlib
    import json
    import os

    base = _unwrap(model)
    cfg = base.config.to_dict() if hasattr(base, "config") else {}
    cfg.pop("_name_or_path", None)
    src = getattr(base.config, "_name_or_path", "") if hasattr(base, "config") else ""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    files = []
    if src and os.path.isdir(src):
        files = sorted(f for f in os.listdir(src) if f.endswith((".safetensors", ".bin")))
    if files:
        for f in files:
            st = os.stat(os.path.join(src, f))
            h.update(f"{os.path.abspath(os.path.join(src, f))}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        for name, p in base.state_dict().items():
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    return f"hf:{type(base).__name__}:{dtype}:{h.hexdigest()[:20]}"


def _full_head(model, request: TeacherRequest):
    """(lm_head weight, bias, temperature) with which `score` hands out a hidden-state FullSignal for `request`, or
    None when this model's logits are not a plain linear map of its last hidden state (then `score` returns
    log-probs)."""
    probe = torch.zeros(1, PROBE_TOKENS, dtype=torch.long)  # any ids: the probe compares two ways to the same logits
    if not head_matches_logits(model, probe, torch.ones_like(probe)):
        return None
    head = _unwrap(model).get_output_embeddings()
    V = request.vocab_size
    W, bias = head.weight, getattr(head, "bias", None)
    if V is not None and V != int(W.shape[0]):
        W, bias = W[:V], (None if bias is None else bias[:V])
    return W.detach(), (None if bias is None else bias.detach()), request.temperature


class HFTeacher:
    """A Hugging Face causal LM in this process, scoring the rollout's own prompt + response (`score`). Serves every
    signal kind; `full` hands the objective the teacher's hidden states and lm_head (chunked, never [B, T, V])."""

    kinds = frozenset(SIGNAL_KINDS)

    def __init__(self, model, name: str = "hf"):
        self.model = model
        self.name = name
        self._identity: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def score(self, batch: RolloutBatch, request: TeacherRequest):
        return score_any(self.model, batch.input_ids_BL, batch.attention_mask_BL, batch.prompt_len,
                         batch.response_ids_BT, batch.response_mask_BT, **request.score_kwargs())

    def full_head(self, request: TeacherRequest):
        return _full_head(self.model, request)

    def identity(self) -> str | None:
        if self._identity is None:
            self._identity = _model_identity(self.model)
        return self._identity

    def describe(self) -> str:
        return f"{self.name} ({str(self.dtype).removeprefix('torch.')})"

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


class SelfTeacher:
    """OPSD (on-policy self-distillation): the student's own weights — frozen at the start (`live=False`) or the
    live student (`live=True`) — with privileged context (e.g. the reference solution) in the TEACHER's prompt only;
    it scores the student's response tokens in that context. Needs the batch's per-row records (`records_B`)."""

    kinds = frozenset(SIGNAL_KINDS)

    def __init__(self, model, tokenizer, template: str, *, live: bool, pad_token_id: int,
                 use_chat_template: bool | None = None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.live, self.use_chat_template, self.pad_token_id = live, use_chat_template, int(pad_token_id)
        self._identity: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def teacher_inputs(self, batch: RolloutBatch) -> "TeacherInputs":
        from opdkit.data.prompts import prompt_to_ids, teacher_prompt_text

        if batch.records_B is None:
            raise ValueError("SelfTeacher needs the batch's records (RolloutBatch.with_records) for its privileged "
                             "prompts")
        prompts = [prompt_to_ids(teacher_prompt_text(r, self.template), self.tokenizer,
                                 use_chat_template=self.use_chat_template) for r in batch.records_B]
        return build_teacher_inputs(prompts, batch.response_ids_BT, batch.eos_mask_BT, pad_token_id=self.pad_token_id)

    def row_inputs(self, batch: RolloutBatch) -> list[list[int]]:
        """The token ids this teacher attends per row (its privileged prompt + the response): the cache key."""
        ti = self.teacher_inputs(batch)
        return [[t for t, a in zip(ids, att) if a] for ids, att in
                zip(ti.input_ids_BL.tolist(), ti.attention_mask_BL.tolist(), strict=True)]

    def full_head(self, request: TeacherRequest):
        return _full_head(self.model, request)

    def score(self, batch: RolloutBatch, request: TeacherRequest):
        ti = self.teacher_inputs(batch)
        return score_any(self.model, ti.input_ids_BL, ti.attention_mask_BL, ti.prompt_len, batch.response_ids_BT,
                         batch.response_mask_BT, **request.score_kwargs())

    def identity(self) -> str | None:
        if self.live:  # its scores change with every optimizer step: never cached
            return None
        if self._identity is None:
            import hashlib

            t = hashlib.sha256(f"{self.template}|{self.use_chat_template}".encode()).hexdigest()[:12]
            self._identity = f"self:{_model_identity(self.model)}:{t}"
        return self._identity

    def describe(self) -> str:
        return f"{'self_live' if self.live else 'self'} ({str(self.dtype).removeprefix('torch.')})"

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------------------------------
# self-distillation (OPSD): the teacher sees a privileged prompt, scores the student's response tokens


@dataclass
class TeacherInputs:
    input_ids_BL: torch.Tensor  # teacher prompt left-padded to prompt_len + the student's response tokens
    attention_mask_BL: torch.Tensor
    prompt_len: int


def build_teacher_inputs(
    teacher_prompt_ids: Sequence[Sequence[int]],
    response_ids_BT: torch.Tensor,
    response_attention_BT: torch.Tensor,
    *,
    pad_token_id: int,
    prompt_index_B: torch.Tensor | Sequence[int] | None = None,
) -> TeacherInputs:
    """Teacher input batch: row b = teacher_prompt_ids[prompt_index_B[b]] (or [b] when prompt_index_B is None),
    left-padded to the longest teacher prompt P', followed by the same response tokens, so response token t is at
    column P' + t for the teacher as it is at P + t for the student.

    response_attention_BT: which response tokens are attended (the rollout's `eos_mask_BT`, i.e. up to and including
    EOS; user-masked tokens such as <think> are still attended). Score with `score(teacher, ti.input_ids_BL,
    ti.attention_mask_BL, ti.prompt_len, rollout.response_ids_BT, rollout.response_mask_BT, ...)`.
    """
    B = response_ids_BT.shape[0]
    if prompt_index_B is None:
        if len(teacher_prompt_ids) != B:
            raise ValueError(f"{len(teacher_prompt_ids)} teacher prompts for {B} rows; pass prompt_index_B")
        rows = list(teacher_prompt_ids)
    else:
        idx = [int(i) for i in (prompt_index_B.tolist() if torch.is_tensor(prompt_index_B) else prompt_index_B)]
        if len(idx) != B:
            raise ValueError(f"prompt_index_B has {len(idx)} entries for {B} rows")
        rows = [teacher_prompt_ids[i] for i in idx]
    if any(len(r) == 0 for r in rows):
        raise ValueError("empty teacher prompt")
    ids_BP, mask_BP = left_pad(rows, pad_token_id, device=response_ids_BT.device)
    return TeacherInputs(
        input_ids_BL=torch.cat([ids_BP, response_ids_BT.long()], dim=1),
        attention_mask_BL=torch.cat([mask_BP, response_attention_BT.long()], dim=1),
        prompt_len=int(ids_BP.shape[1]),
    )


def frozen_copy(model):
    """A frozen teacher from the student's current weights: deep copy, requires_grad False, eval mode."""
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()
