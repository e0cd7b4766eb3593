"""`--help` text and the docs' knob tables, generated from a typed config's fields and their help strings
(`opdkit.config.h`)."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from typing import Any, Iterator, get_type_hints

import yaml

from opdkit.config import _default_of, _fields, _plain, _section_class, key_aliases, type_name
from opdkit.errors import one_line


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str  # dotted
    type: str
    default: str  # YAML-style text, "(required)" when there is none
    help: str
    section: str  # dotted section path, "" for the top level


def _fmt_value(v: Any) -> str:
    v = _plain(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        try:
            plain = v != "" and v.strip() == v and yaml.safe_load(v) == v
        except yaml.YAMLError:
            plain = False
        return v if plain else json.dumps(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else (".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf"))
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _sections(cls: type, prefix: str = "", default: Any = None) -> Iterator[tuple[str, type, str, Any]]:
    """(dotted section path, class, help, default instance or None) for `cls` and every nested section, depth
    first. The default instance is the enclosing config's default for the section (a section's defaults can differ
    from its class's, e.g. TrainConfig's objective)."""
    yield prefix[:-1], cls, "", default
    hints = get_type_hints(cls)
    for name, f in _fields(cls).items():
        section = _section_class(hints[name])
        if section is not None:
            sub = getattr(default, name) if default is not None else _default_of(f)
            sub = sub if isinstance(sub, section) else None
            for path, c, hlp, d in _sections(section, prefix + name + ".", sub):
                yield path, c, (f.metadata.get("help", "") if path == prefix + name else hlp), d


def iter_knobs(cls: type) -> Iterator[Knob]:
    """Every knob (non-section field) of config `cls`, section by section (top level first)."""
    for path, c, _, inst in _sections(cls):
        hints = get_type_hints(c)
        prefix = path + "." if path else ""
        for name, f in _fields(c).items():
            if _section_class(hints[name]) is not None:
                continue
            if inst is not None:
                default = _fmt_value(getattr(inst, name))
            elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                default = _fmt_value(_default_of(f))
            else:
                default = "(required)"
            yield Knob(prefix + name, type_name(hints[name]), default, f.metadata.get("help", ""), path)


def _doc_line(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(f"{cls.__name__}("):  # dataclass-generated signature, not a description
        return ""
    return one_line(doc.strip().split("\n\n")[0]) if doc.strip() else ""


def help_text(cls: type, width: int = 100) -> str:
    """Every knob as `name (type, default: value)` plus its wrapped help string, section by section."""
    lines = ["Knobs: set them in the YAML config or as key=value overrides (dotted keys for sections, e.g. "
             "objective.divergence=jsd); values are parsed as YAML."]
    knobs = list(iter_knobs(cls))
    for path, c, hlp, _ in _sections(cls):
        own = [k for k in knobs if k.section == path]
        if not own:
            continue
        title = f"[{path}]" if path else "[top level]"
        desc = hlp or _doc_line(c)
        lines.append("")
        lines.append(f"{title} {desc}".rstrip() if len(title) + len(desc) < width else title)
        if len(title) + len(desc) >= width:
            lines.extend(textwrap.wrap(desc, width, initial_indent="  ", subsequent_indent="  "))
        for k in own:
            lines.append(f"  {k.name} ({k.type}, default: {k.default})")
            if k.help:
                lines.extend(textwrap.wrap(k.help, width, initial_indent="      ", subsequent_indent="      "))
    aliases = key_aliases(cls)
    if aliases:
        lines += ["", "[aliases] other names of knobs (the same knob; give one of them)"]
        lines += [f"  {a} = {t}" for a, t in aliases.items()]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(cls: type) -> str:
    """A Markdown table of every knob: `| knob | type | default | description |`."""
    rows = ["| knob | type | default | description |", "|---|---|---|---|"]
    for k in iter_knobs(cls):
        rows.append(f"| `{k.name}` | {_md(k.type)} | `{_md(k.default)}` | {_md(k.help)} |")
    return "\n".join(rows) + "\n"
