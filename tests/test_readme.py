"""The README's Python example runs as written (from the repository root, where ../shared lies beside it)."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def test_readme_ptq_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## PTQ in ten lines.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 12
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    ap = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= ap <= 1.0
