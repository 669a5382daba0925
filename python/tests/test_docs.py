"""The training loop of docs/python.md works as written."""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_docs_training_loop(tmp_path, capsys):
    text = (ROOT / "docs" / "python.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "no python block in docs/python.md"
    code = blocks[0]
    assert len([l for l in code.splitlines() if l.strip()]) <= 16
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "docs/python.md", "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    m = re.search(r"loss ([\d.]+) accuracy ([\d.]+)", out)
    assert m and float(m.group(1)) < 0.69 and float(m.group(2)) > 0.5, out
    assert (tmp_path / "rm.safetensors").stat().st_size > 0
