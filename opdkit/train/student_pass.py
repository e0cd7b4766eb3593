"""The student's forward pass for the update: logits [B, T, V] for the generic objective path, or final hidden
states + the lm_head for the fused full-vocabulary path (objectives/fused.py), which never builds [B, T, V].

optim.fused_loss: auto (the default) takes the fused path where it is exact and pays: a closed-form objective
(full estimator; reverse KL, forward KL, generalized JSD), a plain Linear lm_head on a model family whose logits are
lm_head(final hidden state), one process, and a vocabulary of at least FUSED_MIN_VOCAB. The fused path is faster
from small vocabularies on (objective alone, B 8 x T 64, JSD: 7 vs 16 ms at V = 512, 30 vs 60 ms at V = 2048); the
threshold keeps toy vocabularies such as the embedded default's (V = 20) on the generic path, so their documented
runs stay bitwise what they were. on: the fused path or
a one-line error saying why not; off: the generic path.
"""

from __future__ import annotations

import torch

from opdkit.objectives.config import ObjectiveConfig
from opdkit.objectives.fused import CLOSED_FORMS, fused_supported

FUSED_MIN_VOCAB = 256
# Families whose CausalLM forward is exactly lm_head(decoder(...).last_hidden_state): no logit soft-capping or
# scaling (Gemma 2, Cohere, Granite scale them) that the fused path would miss.
FUSED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _head(model) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def why_not_fused(obj: ObjectiveConfig, model, distributed: bool) -> str | None:
    """None if the fused path computes this objective for this model exactly, else the reason in a few words."""
    if not fused_supported(obj):
        return (f"it computes objective.estimator=full with divergence in {', '.join(CLOSED_FORMS)} (got "
                f"estimator={obj.estimator}, divergence={obj.divergence})")
    if distributed:
        return "not under torchrun yet (FSDP2 shards the lm_head)"
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in FUSED_MODEL_TYPES:
        return f"model_type {mtype!r} is not one of {', '.join(FUSED_MODEL_TYPES)}"
    head = _head(model)
    if type(head) is not torch.nn.Linear:  # a LoRA-wrapped head has extra terms
        return f"the lm_head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if not callable(getattr(model, "get_decoder", None)):
        return "the model has no get_decoder()"
    return None


def use_fused(setting: str, obj: ObjectiveConfig, model, distributed: bool) -> bool:
    """Resolve optim.fused_loss (auto | on | off) for this objective and model; `on` that cannot be honoured raises."""
    if setting == "off":
        return False
    reason = why_not_fused(obj, model, distributed)
    if setting == "on":
        if reason:
            raise ValueError(f"optim.fused_loss=on: the fused update cannot run here: {reason}; "
                             f"use optim.fused_loss=auto or off")
        return True
    return reason is None and int(_head(model).weight.shape[0]) >= FUSED_MIN_VOCAB


def student_inputs(model, input_ids_BL, attention_mask_BL, position_ids_BL, T: int, fused: bool) -> dict:
    """Keyword arguments for `opd_per_token_loss`: column L-T-1+t predicts response token t."""
    if not fused:
        out = model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=position_ids_BL,
                    logits_to_keep=T + 1)
        return {"logits_BTV": out.logits[:, :-1]}
    hidden = model.get_decoder()(input_ids=input_ids_BL, attention_mask=attention_mask_BL,
                                 position_ids=position_ids_BL).last_hidden_state
    head = _head(model)
    return {"hidden_BTH": hidden[:, -(T + 1):-1], "lm_head_weight_VH": head.weight, "lm_head_bias_V": head.bias}
