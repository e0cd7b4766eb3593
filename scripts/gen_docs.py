"""Regenerate the knob tables in docs/ from the config dataclasses (tests/test_docs.py checks they are current).

CPU: python scripts/gen_docs.py     (no GPU needed; 1-GPU / N-GPU: same command)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opdkit.config_help import markdown_table  # noqa: E402
from opdkit.train.config import TrainConfig  # noqa: E402

BEGIN, END = "<!-- knobs:{name}:begin -->", "<!-- knobs:{name}:end -->"


def tables() -> dict[str, str]:
    from opdkit.diagnostics import DetectorConfig

    out = {"train": markdown_table(TrainConfig), "diagnostics": markdown_table(DetectorConfig)}
    try:
        from opdkit.train.sft import SFTConfig

        out["sft"] = markdown_table(SFTConfig)
    except ImportError:
        pass
    return out


def render(text: str) -> str:
    for name, table in tables().items():
        b, e = BEGIN.format(name=name), END.format(name=name)
        if b in text:
            text = re.sub(re.escape(b) + ".*?" + re.escape(e), lambda _: f"{b}\n{table}\n{e}", text, flags=re.S)
    return text


def main() -> int:
    for path in (ROOT / "docs").glob("*.md"):
        old = path.read_text()
        new = render(old)
        if new != old:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
