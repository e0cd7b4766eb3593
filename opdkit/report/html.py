"""One self-contained HTML report (inline CSS, images embedded as base64 data URIs, no external assets) and Markdown
tables for results.md.

`write_html(path, title, sections, images, tables)`: sections are (heading, text) pairs where text is HTML (when it
starts with "<") or a small Markdown subset: paragraphs, `-`/`*` and `1.` lists, `code`, **bold**, *italic*,
[links](url), fenced code blocks, pipe tables and `###` sub-headings.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --accent: #2f6fb0; --bg: #ffffff; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 32px 28px 64px; }
h1 { font-size: 28px; margin: 0 0 8px; letter-spacing: -0.01em; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
p, ul, ol { margin: 8px 0 12px; }
li { margin: 3px 0; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { font: 13px/1.4 SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; background: var(--soft);
  padding: 1px 5px; border-radius: 4px; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 12px 14px;
  overflow-x: auto; } pre code { background: none; padding: 0; }
nav { color: var(--muted); font-size: 13px; margin-bottom: 18px; }
nav a { margin-right: 14px; }
.table-wrap { overflow-x: auto; margin: 10px 0 18px; }
table { border-collapse: collapse; font-size: 14px; min-width: 50%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 6px; }
th, td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: var(--soft); font-weight: 600; border-bottom: 2px solid var(--line); }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:hover { background: #fafbfd; }
figure { margin: 18px 0 26px; }
figure img { display: block; width: 100%; max-width: 900px; height: auto; border: 1px solid var(--line);
  border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


# ----------------------------------------------------------------------------------------------------------- cells


def _fmt_cell(v: Any) -> str:
    """A table cell as text: floats with 4 significant digits, None as an em dash."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numeric_columns(n: int, rows: Sequence[Sequence[Any]]) -> list[bool]:
    """Columns whose cells are all numbers (or None), with at least one number: right-aligned."""
    return [any(i < len(r) and _is_num(r[i]) for r in rows)
            and all(_is_num(r[i]) or r[i] is None for r in rows if i < len(r)) for i in range(n)]


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, floats to 4 significant digits, `|` escaped)."""
    def cell(v: Any) -> str:
        return _fmt_cell(v).replace("|", "\\|").replace("\n", " ")

    n = len(header)
    numeric = _numeric_columns(n, rows)
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if numeric[i] else "---" for i in range(n)) + "|"]
    for r in rows:
        r = list(r) + [""] * (n - len(r))
        lines.append("| " + " | ".join(cell(v) for v in r[:n]) + " |")
    return "\n".join(lines) + "\n"


def _html_table(caption: str, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    n = len(header)
    numeric = _numeric_columns(n, rows)
    head = "".join(f'<th class="num">{html.escape(_fmt_cell(h))}</th>' if numeric[i] else
                   f"<th>{html.escape(_fmt_cell(h))}</th>" for i, h in enumerate(header))
    body = []
    for r in rows:
        r = list(r) + [""] * (n - len(r))
        tds = "".join(f'<td class="num">{html.escape(_fmt_cell(v))}</td>' if _is_num(v) else
                      f"<td>{html.escape(_fmt_cell(v))}</td>" for v in r[:n])
        body.append(f"<tr>{tds}</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return (f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            f"</tbody></table></div>")


# ----------------------------------------------------------------------------------------------------------- markdown

_INLINE = [
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def _inline(text: str) -> str:
    """Escape, then render `code`, **bold**, *italic* and [links](url) (code spans are left untouched)."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=False)
        for pat, rep in _INLINE:
            s = pat.sub(rep, s)
        out.append(s)
    return "".join(out)


def _split_row(line: str) -> list[str]:
    s = line.strip().strip("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", s)]


def markdown_to_html(text: str) -> str:
    """A small Markdown subset to HTML (see the module doc). Text starting with "<" is returned as it is."""
    if text.lstrip().startswith("<"):
        return text
    lines = text.splitlines()
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(p.strip() for p in para))}</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        st = line.strip()
        if st.startswith("```"):
            flush()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:j]))}</code></pre>")
            i = j + 1
            continue
        if not st:
            flush()
            i += 1
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", st)
        if m:
            flush()
            level = min(6, len(m.group(1)) + 2)  # '#' inside a section is below the section's <h2>
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
            continue
        if st.startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|?\s*:?-{2,}", lines[i + 1]):
            flush()
            header = _split_row(st)
            j = i + 2
            rows = []
            while j < len(lines) and lines[j].strip().startswith("|"):
                rows.append(_split_row(lines[j]))
                j += 1
            head = "".join(f"<th>{_inline(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                       f"</table></div>")
            i = j
            continue
        m = re.match(r"^([-*]|\d+[.)])\s+", st)
        if m:
            flush()
            tag = "ol" if m.group(1)[0].isdigit() else "ul"
            items: list[str] = []
            while i < len(lines):
                st = lines[i].strip()
                m = re.match(r"^([-*]|\d+[.)])\s+(.*)$", st)
                if m:
                    items.append(m.group(2))
                elif st and items and lines[i].startswith((" ", "\t")):
                    items[-1] += " " + st  # continuation line
                else:
                    break
                i += 1
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(it)}</li>" for it in items) + f"</{tag}>")
            continue
        para.append(line)
        i += 1
    flush()
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------- html


def _slug(text: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    slug, k = base, 2
    while slug in used:
        slug, k = f"{base}-{k}", k + 1
    used.add(slug)
    return slug


def image_data_uri(path: str | os.PathLike) -> str:
    """`data:<mime>;base64,...` for an image file (PNG unless the suffix says otherwise)."""
    p = Path(path)
    mime = _MIME.get(p.suffix.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def write_html(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]] = (),
               images: Mapping[str, str | os.PathLike] | None = None,
               tables: Sequence[tuple[str, Sequence[Any], Sequence[Sequence[Any]]]] = ()) -> Path:
    """Write ONE self-contained HTML file: the title, a contents line, the text `sections` (heading, Markdown-ish
    text or HTML), the `tables` (caption, header, rows) under "Results", then the `images` ({caption: png path},
    embedded as base64) under "Figures". Returns the path."""
    images = dict(images or {})
    used: set[str] = set()
    body: list[str] = []
    toc: list[tuple[str, str]] = []
    for heading, text in sections:
        sid = _slug(heading, used)
        toc.append((sid, heading))
        body.append(f'<section id="{sid}"><h2>{html.escape(heading)}</h2>\n{markdown_to_html(text)}</section>')
    if tables:
        sid = _slug("results", used)
        toc.append((sid, "Results"))
        parts = [_html_table(cap, header, rows) for cap, header, rows in tables]
        body.append(f'<section id="{sid}"><h2>Results</h2>\n' + "\n".join(parts) + "</section>")
    if images:
        sid = _slug("figures", used)
        toc.append((sid, "Figures"))
        figs = []
        for cap, img in images.items():
            alt = html.escape(cap, quote=True)
            figs.append(f'<figure><img src="{image_data_uri(img)}" alt="{alt}">'
                        f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        body.append(f'<section id="{sid}"><h2>Figures</h2>\n' + "\n".join(figs) + "</section>")
    nav = ""
    if len(toc) > 1:
        nav = "<nav>" + "".join(f'<a href="#{sid}">{html.escape(h)}</a>' for sid, h in toc) + "</nav>"
    doc = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
           f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
           f"<h1>{html.escape(title)}</h1>\n{nav}\n" + "\n".join(body) +
           "\n<footer>Generated by opdkit.</footer>\n</main>\n</body>\n</html>\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out
