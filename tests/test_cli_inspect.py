"""`fxq inspect` end to end through the console entry point."""

from __future__ import annotations

import json

from fxq.cli import main


def test_inspect_detr_r50_prints_official_size(capsys, tmp_path):
    out_json = tmp_path / "r50.json"
    assert main(["inspect", "detr_r50", "--size", "512", "512", "--json", str(out_json)]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[2] == "41,524,768" and total[3] == "24.971"
    saved = json.loads(out_json.read_text())
    assert saved["roles"]["attn_qk"]["nodes"] == 18
    assert sum(r["params"] for r in saved["roles"].values()) == 41524768


def test_inspect_errors_exit_2(capsys):
    assert main(["inspect", "detr_r5"]) == 2
    assert "unknown model 'detr_r5'" in capsys.readouterr().err
    assert main(["inspect", "detr_tiny", "--size", "16", "16"]) == 2
