"""Typed configs for every entry point (train, sft, eval, compare): YAML file + `key=value` overrides -> dataclass.

A config is a (possibly nested) dataclass whose fields are made with `h(help, default=...)`; a field whose type is a
dataclass is a *section* (`objective.divergence=jsd`). `load_config` checks every key and type and turns every
problem, including the dataclasses' own `__post_init__` ValueErrors, into a one-line `UserError`. `--help` and
the docs' knob tables are made from the same fields by `opdkit.config_help`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import hashlib
import json
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from opdkit.errors import UserError, one_line

__all__ = [
    "h",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
    "config_hash",
    "type_name",
    "config_file_flag",
    "ALIASES_ATTR",
]

T = TypeVar("T")
_NoneType = type(None)
_NONE_WORDS = ("none", "None", "null", "Null", "NULL", "~")


def h(text: str, **kw):
    """A dataclass field with a help string (kw: default=... or default_factory=...)."""
    return dataclasses.field(metadata={"help": text}, **kw)


class _Mismatch(Exception):
    """Internal: a value does not fit a type annotation."""


# ----------------------------------------------------------------------------------------------------------- types


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _section_class(tp: Any) -> type | None:
    """The dataclass of a section field (`X` or `X | None`), else None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        dcs = [a for a in get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)]
        rest = [a for a in get_args(tp) if a is not _NoneType and a not in dcs]
        if len(dcs) == 1 and not rest:
            return dcs[0]
    return None


def _optional(tp: Any) -> bool:
    return _is_union(tp) and _NoneType in get_args(tp)


def type_name(tp: Any) -> str:
    """Readable name of a type annotation: `int`, `list[str]`, `float | None`, `one of a, b`."""
    if tp is _NoneType or tp is None:
        return "None"
    if tp is Any:
        return "any"
    if _is_union(tp):
        return " | ".join(type_name(a) for a in get_args(tp))
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin is not None:
        args = get_args(tp)
        base = getattr(origin, "__name__", str(origin))
        if origin in (Sequence, typing.Sequence):
            base = "list"
        if args:
            return f"{base}[{', '.join('...' if a is Ellipsis else type_name(a) for a in args)}]"
        return base
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return "one of " + ", ".join(str(m.value) for m in tp)
        if issubclass(tp, PurePath):
            return "path"
        return tp.__name__
    return str(tp)


def _coerce(value: Any, tp: Any, raw: str | None = None) -> Any:
    """`value` checked/converted to annotation `tp`; `raw` is the override's text (str fields keep it verbatim)."""
    if tp is Any or tp is object:
        return value
    if tp is _NoneType or tp is None:
        if value is None:
            return None
        raise _Mismatch
    if _is_union(tp):
        args = get_args(tp)
        if _NoneType in args and (value is None or (raw is not None and raw.strip() in _NONE_WORDS)):
            return None
        for a in args:
            if a is _NoneType:
                continue
            try:
                return _coerce(value, a, raw)
            except _Mismatch:
                continue
        raise _Mismatch
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        for a in args:
            if value == a and type(value) is type(a):
                return a
        if raw is not None and raw in [str(a) for a in args]:
            return next(a for a in args if str(a) == raw)
        raise _Mismatch
    if origin in (list, Sequence, typing.Sequence, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        elem = args[0] if args else Any
        items = [_coerce(v, elem) for v in value]
        return set(items) if origin is set else frozenset(items) if origin is frozenset else items
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                pass
            try:
                value = float(text)  # `1e3` is a string to YAML 1.1
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())  # YAML 1.1 reads `1e-4` as a string
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if raw is not None:
            return raw
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for m in tp:
            if value == m.value or value == m.name or value is m:
                return m
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation we do not understand: no check


# ----------------------------------------------------------------------------------------------------------- loading


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_key(cls: type, key: str, prefix: str) -> UserError:
    valid = list(_fields(cls))
    close = [prefix + c for c in difflib.get_close_matches(key, valid, n=1, cutoff=0.6)]
    if not close:  # a knob of a nested section given without its section (`lr` for `optim.lr`)?
        from opdkit.config_help import iter_knobs  # (config_help builds on this module)

        close = [prefix + k.name for k in iter_knobs(cls) if k.name.rsplit(".", 1)[-1] == key][:1]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"section {prefix[:-1]!r}" if prefix else "the top level"
    return UserError(f"unknown config key {prefix + key!r}{hint}; valid keys in {where}: {', '.join(valid)}")


def _prefix_message(cls: type, path: str, message: str) -> str:
    """A section's own validation message, prefixed with the section path (`objective.beta=2 must be ...`)."""
    msg = one_line(message)
    if not path:
        return msg
    comps = path.split(".")
    for i in range(len(comps)):
        if msg.startswith(".".join(comps[i:]) + "."):  # the message already names (the tail of) its section
            return ".".join(comps[:i]) + ("." if i else "") + msg
    first = re.match(r"\w+", msg)
    if first and first.group(0) in _fields(cls):
        return f"{path}.{msg}"
    return f"{path}: {msg}"


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _build(cls: type[T], data: Mapping, prefix: str, raws: dict[str, str], base: Any = None) -> T:
    """`cls(**data)` with type checks. `base`: the instance whose values fill the keys `data` leaves out — the
    enclosing config's default for this section (e.g. TrainConfig's objective defaults to estimator=full), so that
    overriding one key of a section keeps the section's other defaults instead of falling back to the class's."""
    if not isinstance(data, Mapping):
        raise UserError(f"config section {prefix[:-1] or 'top level'!r} must be a mapping, got {data!r}")
    fields = _fields(cls)
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(cls, str(key), prefix)
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        full = prefix + name
        if name not in data:
            if base is not None:
                kwargs[name] = copy.deepcopy(getattr(base, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"missing required config key {full!r} ({type_name(hints[name])})")
            continue
        tp, value = hints[name], data[name]
        section = _section_class(tp)
        if section is not None and not isinstance(value, section):
            if value is None and _optional(tp):
                kwargs[name] = None
            elif isinstance(value, Mapping):
                sub = getattr(base, name) if base is not None else _default_of(f)
                sub = sub if isinstance(sub, section) else None
                kwargs[name] = _build(section, value, full + ".", raws, sub)
            else:
                raise UserError(f"config key {full!r} is a section: expected a mapping of its keys, got {value!r}")
            continue
        try:
            kwargs[name] = _coerce(value, tp, raws.get(full))
        except _Mismatch:
            raise UserError(
                f"config key {full!r}: expected {type_name(tp)}, got {value!r} ({type(value).__name__})"
            ) from None
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise UserError(_prefix_message(cls, prefix[:-1], str(exc))) from exc


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    """`key=value` strings -> (dotted key, YAML-parsed value, raw text). No `=` or an empty key -> UserError."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} is not key=value (e.g. objective.divergence=jsd, lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, value, raw))
    return out


def _set_path(cls: type, data: dict, key: str, value: Any) -> None:
    """data[a][b][c] = value for key `a.b.c`, checking every component against the config classes."""
    parts = key.split(".")
    node, node_cls, prefix = data, cls, ""
    for part in parts[:-1]:
        fields = _fields(node_cls)
        if part not in fields:
            raise _unknown_key(node_cls, part, prefix)
        section = _section_class(get_type_hints(node_cls)[part])
        if section is None:
            raise UserError(f"config key {prefix + part!r} is not a section, so {key!r} does not exist")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, node_cls, prefix = node[part], section, prefix + part + "."
    if parts[-1] not in _fields(node_cls):
        raise _unknown_key(node_cls, parts[-1], prefix)
    node[parts[-1]] = value


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse YAML config {p}: {one_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {p}: {one_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys, got a {type(data).__name__}")
    return data


ALIASES_ATTR = "KEY_ALIASES"  # a config class's {alias dotted key: knob dotted key} (e.g. data.jsonl -> data.prompts)


def key_aliases(cls: type) -> dict[str, str]:
    """The key aliases of config class `cls` (its `KEY_ALIASES` class attribute; {} when it has none)."""
    return dict(getattr(cls, ALIASES_ATTR, None) or {})


def _alias_key(key: str, aliases: Mapping[str, str]) -> str:
    for alias, target in aliases.items():
        if key == alias or key.startswith(alias + "."):
            return target + key[len(alias):]
    return key


def _apply_aliases(data: dict, aliases: Mapping[str, str], where: str) -> dict:
    """A YAML mapping with every alias key moved to its knob (nested: `{data: {jsonl: x}}` -> `{data: {prompts:
    x}}`); an alias given next to its knob -> UserError."""
    for alias, target in aliases.items():
        parts, node, chain = alias.split("."), data, []
        for part in parts[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                node = None
                break
            chain.append((node, part))
            node = nxt
        if not isinstance(node, dict) or parts[-1] not in node:
            continue
        value = node.pop(parts[-1])
        for parent, part in reversed(chain):  # drop the sections the move emptied (`data: {}` of eval's data.jsonl)
            if parent[part] == {}:
                del parent[part]
        tparts, tnode = target.split("."), data
        for part in tparts[:-1]:
            if not isinstance(tnode.get(part), dict):
                tnode[part] = {}
            tnode = tnode[part]
        if tparts[-1] in tnode:
            raise UserError(f"{where}: {alias!r} is another name of {target!r}; give only one of them")
        tnode[tparts[-1]] = value
    return data


def config_file_flag(args: Sequence[str]) -> list[str]:
    """`--config FILE` / `--config=FILE` as the first arguments -> `FILE` (the config file is the first argument:
    both spellings are accepted); `--config` without a file -> UserError."""
    args = list(args)
    if args and args[0] == "--config":
        if len(args) < 2 or "=" in args[1]:
            raise UserError("--config needs a file: give the config file as the first argument (opdkit <command> "
                            "config.yaml key=value ...)")
        return args[1:]
    if args and args[0].startswith("--config="):
        return [args[0][len("--config="):], *args[1:]]
    return args


def load_config(cls: type[T], yaml_path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Config `cls` from an optional YAML file plus `key=value` overrides (dotted keys for sections), applied in order.

    Values are parsed with yaml.safe_load and checked/coerced against the field annotations. Every problem (missing
    or unparseable file, unknown key, wrong type, a section's own validation) raises a one-line UserError. Keys in
    `cls.KEY_ALIASES` (file or overrides) are read as the knob they name.
    """
    aliases = key_aliases(cls)
    data = _read_yaml(yaml_path) if yaml_path is not None else {}
    if aliases:
        data = _apply_aliases(data, aliases, f"config file {yaml_path}")
    raws: dict[str, str] = {}
    for key, value, raw in parse_overrides(overrides):
        key = _alias_key(key, aliases)
        _set_path(cls, data, key, value)
        for k in [k for k in raws if k == key or k.startswith(key + ".")]:
            del raws[k]
        raws[key] = raw
    return _build(cls, data, "", raws)


# ----------------------------------------------------------------------------------------------------------- dumping


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    return value


def config_to_dict(cfg: Any) -> dict:
    """The resolved config as plain YAML/JSON types (nested dicts for sections; tuples -> lists, paths -> str)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_config(cfg: Any, path: str | os.PathLike, header: str | None = None) -> Path:
    """Write the resolved config as YAML (atomically); `header` lines become `# ` comments. Round-trips."""
    p = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=None)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def config_hash(cfg: Any, exclude: Sequence[str] = ()) -> str:
    """Stable 16-hex-digit hash of the resolved config (a dataclass or its dict), without the dotted keys in `exclude`
    (e.g. `("resume", "overwrite", "max_steps")`, knobs that may change between a run and its resumption)."""
    d = json.loads(json.dumps(cfg if isinstance(cfg, Mapping) else config_to_dict(cfg), default=str))
    for key in exclude:
        node, parts = d, key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
