"""`fxq train` and `fxq pipeline` end to end on a small synthetic set."""

from __future__ import annotations

import json

import torch

from fxq.cli import main
from fxq.models import build


def test_train_writes_weights_and_metrics_that_load(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "96"]) == 0
    assert main(["train", "detr_tiny", "--data", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "4",
                 "--size", "96", "--warmup", "1", "--no-progress", "--backbone-from", "deformable_detr_tiny"]) == 0
    assert json.loads((run / "config.json").read_text())["argv"]["backbone_from"] == "deformable_detr_tiny"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["num_images"] == 4 and 0.0 <= metrics["AP"] <= 1.0
    trained = build("detr_tiny", checkpoint=run / "model.pt")
    saved = torch.load(run / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in trained.state_dict().items())


def test_pipeline_reports_float_and_quantized_rows(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", "--out", str(out), "--val-images", "6", "--calib-images", "4", "--policy", "W8A8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["graph"] for r in summary["rows"]][:2] == ["fp32 (FX graph)", "W8A8 minmax"]
    assert "W8A8 minmax" in capsys.readouterr().out


def test_pipeline_rejects_bad_policy_before_work(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "p"), "--policy", "W9A8"]) == 2
    assert "W9A8" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_train_rejects_a_missing_backbone_source_before_reading_data(tmp_path, capsys):
    args = ["train", "detr_tiny", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"),
            "--backbone-from", str(tmp_path / "missing.pt")]
    assert main(args) == 2
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_same_train_command_gives_the_same_weights_and_the_seed_changes_them(tmp_path):
    from fxq.models import read_state_dict

    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--seed", "3", "--train", "8", "--val", "4", "--size", "64"]) == 0
    states = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        args = ["train", "detr_tiny", "--data", str(data), "--out", str(tmp_path / name), "--batch-size", "4",
                "--size", "64", "--stop-after", "1", "--seed", seed, "--no-progress"]
        assert main(args) == 0
        states.append(read_state_dict(tmp_path / name / "checkpoint.pt"))
    assert states[0].keys() == states[1].keys() and all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    assert any(not torch.equal(v, states[2][k]) for k, v in states[0].items() if k.startswith("transformer."))
