"""Generated documentation is current: the knob tables in docs/ match the config dataclasses."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_knob_tables_are_current():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path in (ROOT / "docs").glob("*.md"):
        text = path.read_text()
        assert gen.render(text) == text, f"{path.name} is stale: run python scripts/gen_docs.py"
    assert "objective.divergence" in (ROOT / "docs" / "train.md").read_text()
