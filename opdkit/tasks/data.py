"""Loading user datasets from local files: JSONL (or a JSON array) and ``datasets`` directories written by
``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.  Nothing is ever fetched from the Hugging Face Hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .base import SPLITS, Example, split_of

__all__ = ["DatasetError", "load_examples", "format_prompt"]


class DatasetError(ValueError):
    """A user dataset can't be read: the message names the file, the line (for JSONL) and the fix. `reason`:
    None, or "no_split" (a DatasetDict without the split asked for; `splits` lists its splits) or "empty_split"
    (no row falls in the split asked for; `n_rows` rows in all), so callers without a `split` knob can say what
    to change instead."""

    def __init__(self, message: str, *, reason: str | None = None, splits: list[str] | None = None,
                 n_rows: int | None = None):
        super().__init__(message)
        self.reason, self.splits, self.n_rows = reason, splits, n_rows


def _where(path: Path, loc: str) -> str:
    return f"{path} {loc}"


def _text(value: Any, field: str, path: Path, loc: str, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DatasetError(
        f"{_where(path, loc)}: field {field!r} ({what}) is {type(value).__name__}, expected a string; "
        f"fix the data or pass another {what}_field"
    )


def _messages(value: Any, field: str, path: Path, loc: str) -> list[dict[str, str]]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )
    if not ok:
        raise DatasetError(
            f"{_where(path, loc)}: field {field!r} must be a non-empty list of {{'role': str, 'content': str}} "
            f"messages; fix the data or pass another messages_field"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _row_to_example(
    row: Any,
    path: Path,
    loc: str,
    index: int,
    prompt_field: str,
    answer_field: str | None,
    completion_field: str | None,
    messages_field: str | None,
) -> Example:
    if not isinstance(row, dict):
        raise DatasetError(
            f"{_where(path, loc)}: expected a JSON object, got {type(row).__name__}; write one object per line"
        )

    def get(field: str, kwarg: str) -> Any:
        if field not in row:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise DatasetError(
                f"{_where(path, loc)}: missing field {field!r} (fields present: {present}); "
                f"add it or pass {kwarg}=<one of the present fields>"
            )
        return row[field]

    meta: dict[str, Any] = {"source": str(path), "index": index}
    if loc.startswith("line "):
        meta["line"] = int(loc[5:])
    completion = None
    if messages_field is not None:
        msgs = _messages(get(messages_field, "messages_field"), messages_field, path, loc)
        if msgs[-1]["role"] == "assistant" and len(msgs) > 1:
            if completion_field is None:
                completion = msgs[-1]["content"]
            msgs = msgs[:-1]
        meta["messages"] = msgs
        users = [m["content"] for m in msgs if m["role"] == "user"]
        prompt = users[-1] if users else msgs[-1]["content"]
    else:
        prompt = _text(get(prompt_field, "prompt_field"), prompt_field, path, loc, "prompt")
    answer = "" if answer_field is None else _text(get(answer_field, "answer_field"), answer_field, path, loc, "answer")
    if completion_field is not None:
        completion = _text(get(completion_field, "completion_field"), completion_field, path, loc, "completion")
    used = {prompt_field, answer_field, completion_field, messages_field}
    for key, value in row.items():  # the row's other plain fields (privileged context, a route key, ...)
        if key not in used and isinstance(value, (str, int, float, bool)):
            meta.setdefault(str(key), value)
    return Example(prompt=prompt, answer=answer, completion=completion, meta=meta)


def _jsonl_rows(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    if text.lstrip().startswith("["):  # maybe one JSON array of objects; if not, read it as JSONL
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            yield from ((f"item {i}", r) for i, r in enumerate(rows, start=1))
            return
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(raw)
        except json.JSONDecodeError as e:
            raise DatasetError(
                f"{path} line {lineno}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            ) from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _disk_rows(path: Path, split: str | None) -> tuple[Iterable[Any], bool]:
    """Rows of a saved dataset; the bool says whether ``split`` was used to pick a DatasetDict split."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in the train extra
        raise DatasetError(f"{path}: reading a saved dataset needs the 'datasets' package; pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure of the reader is a bad dataset directory
        raise DatasetError(f"{path}: not a readable datasets directory ({type(e).__name__}: {e}); "
                           f"write it with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in ds:
            raise DatasetError(
                f"{path}: a DatasetDict with splits {', '.join(names)}; pass split=<one of them>"
                + (f" (got {split!r})" if split is not None else ""), reason="no_split", splits=names
            )
        return ds[split], True
    return ds, False


def load_examples(
    path_or_name: str | os.PathLike,
    prompt_field: str = "prompt",
    answer_field: str | None = "answer",
    completion_field: str | None = None,
    messages_field: str | None = None,
    split: str | None = None,
) -> list[Example]:
    """Read a user dataset into :class:`Example` records.

    ``path_or_name``: a JSONL file (one object per line; blank lines skipped; a file holding one JSON array of
    objects is accepted too) or a directory written by ``datasets``' ``save_to_disk``.  Never touches the Hub.

    Fields: ``prompt_field`` gives the prompt text; or ``messages_field`` a chat (list of ``{role, content}``),
    whose final assistant message (if any) becomes the completion and the rest goes to ``meta["messages"]``
    (``prompt`` is then the last user message; see :func:`format_prompt`).  ``answer_field`` (``None``: no
    answers, ``answer=""``) and ``completion_field`` (a reference solution) are optional.  Numbers are turned
    into strings.

    ``split``: for a saved ``DatasetDict``, the split to read (may be omitted when there is only one).  Otherwise
    ``None`` reads everything and ``"train"`` / ``"heldout"`` keep the rows that the built-in hash rule
    (:func:`opdkit.tasks.split_of` on the prompt, task name ``"user"``) assigns to that split.

    Raises :class:`DatasetError` (a ``ValueError``) with a one-line message naming the file, the line and the
    fix; an empty dataset is an error.
    """
    path = Path(path_or_name).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{path}: no such file or directory; opdkit reads only local JSONL files or datasets saved with "
            f"save_to_disk (never the Hub) — download/save the data first"
        )
    if _is_saved_dataset(path):
        rows, used_split = _disk_rows(path, split)
        pairs: Iterable[tuple[str, Any]] = ((f"row {i}", r) for i, r in enumerate(rows))
    elif path.is_dir():
        raise DatasetError(
            f"{path}: a directory but not a saved dataset (no dataset_info.json / dataset_dict.json); "
            f"pass a .jsonl file or a directory written by save_to_disk"
        )
    else:
        used_split = False
        pairs = _jsonl_rows(path)
    if split is not None and not used_split and split not in SPLITS:
        raise DatasetError(f"{path}: unknown split {split!r}; use None (all rows) or one of {', '.join(SPLITS)}")

    examples = []
    n_rows = 0
    for index, (loc, row) in enumerate(pairs):
        n_rows += 1
        ex = _row_to_example(row, path, loc, index, prompt_field, answer_field, completion_field, messages_field)
        if split is not None and not used_split:
            ex.meta["split"] = split_of(ex.prompt, "user")
            if ex.meta["split"] != split:
                continue
        examples.append(ex)
    if n_rows == 0:
        raise DatasetError(f"{path}: the dataset is empty; it needs at least one example")
    if not examples:
        raise DatasetError(f"{path}: none of the {n_rows} examples falls in split {split!r}; use split=None",
                           reason="empty_split", n_rows=n_rows)
    return examples


def format_prompt(example: Example, tokenizer: Any = None) -> str:
    """The prompt text to feed a model: for a chat example (``meta["messages"]``) and a tokenizer with a chat
    template, the rendered template with the generation prompt; otherwise ``example.prompt``."""
    messages = example.meta.get("messages") if isinstance(example.meta, dict) else None
    if messages and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return example.prompt
