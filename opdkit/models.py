"""Loading student / teacher models, checking that they can be distilled into each other, LoRA.

- `load_causal_lm(spec)`: a local HF model directory, a `.gguf` file (dequantized once, then cached as safetensors),
  or a config (dict / PretrainedConfig) for a randomly initialised model. Never contacts a model hub.
- `check_compatible(student_tok, teacher_tok, student_model, teacher_model)`: before any compute, check that both
  distributions are over the same token ids (vocab, special tokens, chat template, output dims); a mismatch raises
  ONE-line UserError naming what differs.
- `apply_lora(model, r, alpha, dropout, target_modules)`: peft LoRA adapters.
- `tiny_tokenizer()` / `tiny_llama()`: a char-level tokenizer and a tiny random Llama for tests and smoke runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from opdkit.errors import UserError

log = logging.getLogger(__name__)

GGUF_CACHE_ENV = "OPDKIT_GGUF_CACHE"

# transformers' model construction is not thread-safe: `from_pretrained` swaps `PreTrainedModel.tie_weights` for a
# no-op and puts it back afterwards (transformers.initialization.no_tie_weights), so two threads loading at once can
# restore the no-op for good and every later tied model keeps a meta `lm_head`. Every opdkit load (e.g. `opdkit
# compare` evaluating runs in a thread pool) holds this lock.
MODEL_LOAD_LOCK = threading.RLock()


# ----------------------------------------------------------------------------------------------------------------------
# dtypes

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (x86 AVX512-BF16 or AMX-BF16 in the Linux cpuinfo flags).

    Without these units oneDNN emulates bf16 and a bf16 forward can be several times slower than fp32, so "auto"
    dtypes only pick bf16 when this is true. Unknown (no /proc/cpuinfo, e.g. macOS): False.
    """
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return any(f in flags for f in NATIVE_BF16_FLAGS)
    return False


def resolve_dtype(name: str) -> torch.dtype:
    """float32 / bfloat16, or auto: bfloat16 where the hardware does bf16 natively (a CUDA GPU that supports it, or
    a CPU with AVX512-BF16 / AMX), float32 elsewhere."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float64":
        return torch.float64
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    raise ValueError(f"dtype {name!r} is not one of auto, float32, bfloat16, float64")


# ----------------------------------------------------------------------------------------------------------------------
# loading


def load_error(what: str, path: str | os.PathLike, exc: BaseException) -> UserError:
    """A one-line UserError for a model / tokenizer / config that transformers could not load from `path`, naming
    the file at fault when it can tell, and the fix."""
    from opdkit.errors import one_line

    p = Path(path)
    msg = one_line(exc)
    low = msg.lower()
    if "trust_remote_code" in low or "custom code" in low:
        return UserError(f"{what} {p} needs its own Python code (its config.json has an auto_map): opdkit runs "
                         "code from a model dir only with model.trust_remote_code=true (only for a model you trust)")
    if "not a valid json" in low or isinstance(exc, json.JSONDecodeError):
        return UserError(f"{what} {p}: {p / 'config.json' if p.is_dir() else p} is not valid JSON "
                         f"({msg[:160]}); fix: restore the file or re-save the model with save_pretrained")
    if "no file named" in low or "does not appear to have a file named" in low:
        return UserError(f"{what} {p} has no weights file (model.safetensors or pytorch_model.bin); fix: copy the "
                         "complete model dir or re-save it with save_pretrained")
    if type(exc).__name__ == "SafetensorError" or "safetensor" in low or "deserializ" in low:
        return UserError(f"{what} {p}: its weights cannot be read ({msg[:160]}): a truncated or corrupt file; fix: "
                         "copy the complete model dir again or re-save it")
    if "does not recognize this architecture" in low or "unrecognized model" in low or "model_type" in low:
        return UserError(f"{what} {p}: its config.json names a model type this transformers does not know "
                         f"({msg[:200]}); fix: a model dir of a supported architecture, or upgrade transformers")
    return UserError(f"cannot load {what} {p}: {type(exc).__name__}: {msg[:300]}; fix: check the files of {p} "
                     "(re-save it with save_pretrained)")


# What transformers raises for a bad model dir (unreadable or invalid files, unknown architectures, missing code).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError, AttributeError, EOFError)


def _load_tokenizer(path: str | os.PathLike, *, trust_remote_code: bool, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(str(path), **kw)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception for a corrupt file
        raise load_error("tokenizer", path, exc) from None


def from_pretrained(path: str | os.PathLike, what: str = "model", **kw):
    """`AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw)`; a bad model dir -> UserError."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kw)
    except LOAD_ERRORS as exc:
        raise load_error(what, path, exc) from None
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError derives from Exception only
        if type(exc).__name__ != "SafetensorError":
            raise
        raise load_error(what, path, exc) from None


def gguf_cache_path(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> Path:
    """Where the dequantized safetensors copy of `gguf_path` lives: <root>/<stem>-<size>-<hash of mtime+abs path>.

    root: `cache_root`, else $OPDKIT_GGUF_CACHE, else ~/.cache/opdkit/gguf. A changed file (size or mtime) gets a new
    entry, so a stale copy is never used.
    """
    p = Path(gguf_path).expanduser().resolve()
    st = p.stat()
    h = hashlib.sha1(f"{p}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_root or os.environ.get(GGUF_CACHE_ENV) or Path.home() / ".cache" / "opdkit" / "gguf")
    return root.expanduser() / f"{p.stem}-{st.st_size}-{h}"


def _is_complete_cache(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / ".opdkit_complete").is_file()


def _strip_quantizer(model) -> None:
    """A GGUF-loaded model carries its (non-serializable) GGUF quantizer; after dequantization it is a plain model.
    `save_pretrained` refuses it until the quantizer and `config.quantization_config` are gone."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in getattr(model, "__dict__", {}):
            delattr(model, attr)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


def _load_gguf(path: Path, *, dtype, trust_remote_code: bool, gguf_cache_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    cache = gguf_cache_path(path, gguf_cache_dir)
    if _is_complete_cache(cache):
        log.info("loading dequantized copy of %s from %s", path, cache)
        model = from_pretrained(cache, "model (dequantised GGUF cache)", dtype=dtype,
                                trust_remote_code=trust_remote_code)
        tok = tokenizer if tokenizer is not None else _load_tokenizer(cache, trust_remote_code=trust_remote_code)
        return model, tok

    log.info("dequantizing %s (slow once; cached at %s)", path, cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
        tok = _load_tokenizer(path.parent, trust_remote_code=trust_remote_code, gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot load GGUF file {path}: {exc}; fix: give a GGUF of a supported architecture") from exc
    _strip_quantizer(model)
    check_finite(model, str(path))
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".opdkit_complete").write_text(str(path) + "\n")
        if cache.exists():  # an incomplete or concurrent copy
            shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    except OSError as exc:  # cache is an optimisation: a read-only home must not stop the run
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("could not cache dequantized GGUF at %s: %s", cache, exc)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model, (tokenizer if tokenizer is not None else tok)


def _locked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with MODEL_LOAD_LOCK:
            return fn(*args, **kwargs)
    return wrapper


@_locked
def load_causal_lm(
    spec: str | os.PathLike | dict | Any,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    gguf_cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)`. Nothing is fetched from a hub.

    spec:
      - a local directory with a HF model (config.json + safetensors) and its tokenizer;
      - a path to a `.gguf` file: dequantized by transformers (slow), then a safetensors copy is cached under
        `gguf_cache_dir` (default ~/.cache/opdkit/gguf/<stem>-<size>-<hash>) and later loads read that copy;
      - a dict (with "model_type") or a `PretrainedConfig`: a randomly initialised model; `tokenizer` is then
        required (a tokenizer object or a local tokenizer directory).
    tokenizer: overrides the tokenizer that would be loaded with the model (object or local path).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(tokenizer, (str, os.PathLike)):
        tp = Path(tokenizer).expanduser()
        if not tp.exists():
            raise UserError(f"tokenizer path {tp} does not exist; fix: give a local tokenizer directory")
        tokenizer = _load_tokenizer(tp, trust_remote_code=trust_remote_code)

    if isinstance(spec, (dict, PretrainedConfig)):
        if isinstance(spec, dict):
            kw = dict(spec)
            model_type = kw.pop("model_type", None)
            if not model_type:
                raise UserError("model config dict has no 'model_type'; fix: add e.g. model_type: llama")
            try:
                config = AutoConfig.for_model(model_type, **kw)
            except ValueError as exc:
                raise UserError(f"model config: {exc}") from exc
        else:
            config = spec
        if tokenizer is None:
            raise UserError("a model built from a config needs a tokenizer; fix: pass tokenizer=<dir or object>")
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except LOAD_ERRORS as exc:
            raise UserError(f"model config ({getattr(config, 'model_type', '?')}): cannot build a model from it: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
        return model, tokenizer

    if not isinstance(spec, (str, os.PathLike)):
        raise UserError(f"model spec must be a path or a config dict, got {type(spec).__name__}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model path {path} does not exist; fix: give a local model directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model path {path} is a file but not a .gguf; fix: give a model directory or a .gguf file")
        return _load_gguf(path, dtype=dtype, trust_remote_code=trust_remote_code, gguf_cache_dir=gguf_cache_dir,
                          tokenizer=tokenizer)
    if not (path / "config.json").is_file():
        raise UserError(f"model directory {path} has no config.json; fix: give a directory saved by save_pretrained")
    model = from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    check_finite(model, str(path))
    if tokenizer is None:
        tokenizer = _load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def check_finite(model, where: str) -> None:
    """UserError naming the first parameter of `model` that holds NaN or inf (weights loaded from `where`):
    training from, or distilling towards, non-finite weights only spreads NaN."""
    for name, t in model.named_parameters():
        if t.is_floating_point() and t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise UserError(f"model {where}: weight {name} holds NaN/inf; fix: use a model with finite weights "
                            "(an earlier checkpoint)")


def accepts_kwarg(model, name: str) -> bool:
    """Whether `model.forward` (of the base model, for a peft wrapper) takes keyword `name` (e.g. logits_to_keep)."""
    import inspect

    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


# ----------------------------------------------------------------------------------------------------------------------
# compatibility

_SPECIAL_ATTRS = ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id")


def _special_tokens(tok) -> dict[str, Any]:
    out: dict[str, Any] = {a: getattr(tok, a, None) for a in _SPECIAL_ATTRS}
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    out["special_tokens"] = sorted(
        (i, str(getattr(t, "content", t))) for i, t in decoder.items() if getattr(t, "special", True)
    )
    return out


def _output_dim(model) -> int | None:
    if model is None:
        return None
    head = model.get_output_embeddings()
    return None if head is None else int(head.weight.shape[0])


def _vocab_diff(s_vocab: dict[str, int], t_vocab: dict[str, int]) -> str | None:
    if s_vocab == t_vocab:
        return None
    only_s = [k for k in s_vocab if k not in t_vocab]
    only_t = [k for k in t_vocab if k not in s_vocab]
    moved = [k for k in s_vocab if k in t_vocab and s_vocab[k] != t_vocab[k]]
    parts = []
    if moved:
        k = moved[0]
        parts.append(f"{len(moved)} tokens map to different ids (e.g. {k!r} teacher={t_vocab[k]} student={s_vocab[k]})")
    if only_t:
        parts.append(f"{len(only_t)} tokens only in teacher (e.g. {only_t[0]!r})")
    if only_s:
        parts.append(f"{len(only_s)} tokens only in student (e.g. {only_s[0]!r})")
    return "vocab: " + ", ".join(parts)


def check_compatible(
    student_tok,
    teacher_tok,
    student_model=None,
    teacher_model=None,
    *,
    check_chat_template: bool = True,
    allow_padded_head: bool = False,
) -> int:
    """Check that student and teacher distributions are over the same token ids; returns the common vocab size V.

    Compared (teacher first, student second in the message): len(tokenizer), the full token->id mapping, the
    pad/eos/bos/unk ids and every added special token, the chat template (unless `check_chat_template=False`) and
    the models' output dims (lm_head rows). Any difference raises UserError with one line listing all of them.

    Output dims: lm_heads are often padded past len(tokenizer) (e.g. 151936 vs 152064 rows in one family, both >
    len(tokenizer)). By default opdkit requires EQUAL output dims (then V = that dim). With
    `allow_padded_head=True`, differing dims that are both >= len(tokenizer) are accepted and V = len(tokenizer): the
    caller must then restrict both distributions to the first V ids (the padded rows are never real tokens), e.g.
    `teacher.score(..., vocab_size=V)` and the same slice on the student logits.
    """
    diffs: list[str] = []
    n_s, n_t = len(student_tok), len(teacher_tok)
    if n_s != n_t:
        diffs.append(f"len(tokenizer) teacher={n_t} student={n_s}")
    vd = _vocab_diff(student_tok.get_vocab(), teacher_tok.get_vocab())
    if vd:
        diffs.append(vd)
    s_sp, t_sp = _special_tokens(student_tok), _special_tokens(teacher_tok)
    for key in _SPECIAL_ATTRS:
        if s_sp[key] != t_sp[key]:
            diffs.append(f"{key} teacher={t_sp[key]} student={s_sp[key]}")
    if s_sp["special_tokens"] != t_sp["special_tokens"]:
        s_set, t_set = set(s_sp["special_tokens"]), set(t_sp["special_tokens"])
        ex = sorted(t_set - s_set)[:1] or sorted(s_set - t_set)[:1]
        diffs.append(
            f"special tokens differ ({len(t_set - s_set)} only in teacher, {len(s_set - t_set)} only in student, "
            f"e.g. id {ex[0][0]} {ex[0][1]!r})"
        )
    if check_chat_template:
        s_ct = getattr(student_tok, "chat_template", None)
        t_ct = getattr(teacher_tok, "chat_template", None)
        if s_ct != t_ct:
            desc = lambda c: "none" if not c else f"{len(c)} chars"  # noqa: E731
            diffs.append(f"chat_template teacher={desc(t_ct)} student={desc(s_ct)}")
    d_s, d_t = _output_dim(student_model), _output_dim(teacher_model)
    vocab = d_s if d_s is not None else (d_t if d_t is not None else n_s)
    if d_s is not None and d_t is not None and d_s != d_t:
        if allow_padded_head and min(d_s, d_t) >= max(n_s, n_t):
            vocab = n_s
        else:
            hint = " (padded lm_head; pass allow_padded_head=True to restrict both to the first len(tokenizer) ids)"
            diffs.append(f"output dims teacher={d_t} student={d_s}" + (hint if min(d_s, d_t) >= max(n_s, n_t) else ""))
    for name, d in (("teacher", d_t), ("student", d_s)):
        if d is not None and d < n_s:
            diffs.append(f"{name} output dim {d} < len(tokenizer) {n_s}")
    if diffs:
        raise UserError("teacher/student mismatch: " + "; ".join(diffs) + "; fix: use models with the same tokenizer")
    return int(vocab)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA


def apply_lora(
    model,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
):
    """Wrap `model` with peft LoRA adapters (only adapter weights trainable); returns the PeftModel.

    target_modules: module-name suffixes (e.g. ["q_proj", "v_proj"]) or "all-linear" (every Linear except lm_head).
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or r < 1:
        raise UserError(f"lora r={r!r} must be an integer >= 1")
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"lora dropout={dropout!r} must be in [0, 1)")
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=tm, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise UserError(f"lora target_modules={tm!r}: {exc}".split("\n")[0]) from exc


# ----------------------------------------------------------------------------------------------------------------------
# tiny models for tests and smoke runs

TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 +-=.?"


def tiny_tokenizer(
    alphabet: str = TINY_ALPHABET, *, extra_special: Sequence[str] = (), chat_template: str | None = None
):
    """A char-level `PreTrainedTokenizerFast`: ids 0..3 = <pad>, <s>, </s>, <unk>, then `extra_special` tokens,
    then one id per character of `alphabet`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_special]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=list(extra_special) or None,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_llama(vocab_size: int = 48, *, seed: int = 0, **overrides):
    """A 2-layer random `LlamaForCausalLM` (hidden 32, GQA 4/2 heads), fp32, eval mode, eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = kw.get("attn_implementation", "eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()
