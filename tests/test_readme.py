"""The README's custom-loop example runs as written."""

import re
from pathlib import Path


def test_readme_loop_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 25
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all("loss=" in ln and "kl=" in ln for ln in out)
