"""Bad command lines -> one line on stderr naming the cause, exit status 2, and nothing written.

Each case runs in-process (``fxq.cli.main``) on a tiny synthetic set; ``{data}``, ``{tmp}``, ``{file}`` (an
existing regular file), ``{empty}`` (an empty file), ``{nan}`` (a detr_tiny checkpoint with one NaN weight) and
``{bad}`` (a data folder with one undecodable image) are filled in per test.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from fxq.cli import main

D = ["--data", "{data}"]
TRAIN = ["train", "detr_tiny", *D, "--out", "{tmp}/run", "--size", "64", "--no-progress"]
PRETRAIN = ["pretrain", "detr_tiny", *D, "--out", "{tmp}/run", "--size", "64", "--no-progress"]
EVAL = ["eval", "--model", "detr_tiny", *D, "--size", "64", "--no-progress"]
EXPORT = ["export", "detr_tiny", "--calib", "{data}", "--size", "64", "64", "--out", "{tmp}/m.onnx"]
ALLOCATE = ["allocate", "detr_tiny", *D, "--size", "64", "--budget", "4"]

CASES = [
    # fxq train / pretrain: ranges, paths, data, run folders
    ("train-batch-0", [*TRAIN, "--batch-size", "0"], "--batch-size 0"),
    ("train-epochs-0", [*TRAIN, "--epochs", "0"], "--epochs 0"),
    ("train-threads-0", [*TRAIN, "--threads", "0"], "--threads 0"),
    ("train-stop-after-0", [*TRAIN, "--stop-after", "0"], "--stop-after 0"),
    ("train-negative-warmup", [*TRAIN, "--warmup", "-1"], "--warmup -1"),
    ("train-nan-lr", [*TRAIN, "--lr", "nan"], "--lr nan"),
    ("train-negative-clip", [*TRAIN, "--clip", "-1"], "--clip -1"),
    ("train-one-to-many-0", [*TRAIN, "--one-to-many", "0"], "--one-to-many 0"),
    ("train-query-groups-0", [*TRAIN, "--query-groups", "0"], "--query-groups 0: give 1"),
    ("train-size-too-small", [*TRAIN, "--size", "8"], "--size 8 is too small"),
    ("train-missing-data", ["train", "detr_tiny", "--data", "{tmp}/nowhere", "--out", "{tmp}/run"],
     "data folder {tmp}/nowhere does not exist"),
    ("train-data-is-file", ["train", "detr_tiny", "--data", "{file}", "--out", "{tmp}/run"], "is a file"),
    ("train-out-is-file", ["train", "detr_tiny", *D, "--out", "{file}"], "--out {file} is a file"),
    ("train-out-under-file", ["train", "detr_tiny", *D, "--out", "{file}/run"], "cannot be created"),
    ("train-batch-larger-than-set", [*TRAIN, "--batch-size", "64"], "--batch-size 64 is larger than the 4 images"),
    ("train-unknown-split", [*TRAIN, "--train-split", "test"], "instances_test.json does not exist"),
    ("train-resume-nothing", [*TRAIN, "--resume"], "holds no checkpoint.pt"),
    ("train-resume-and-overwrite", [*TRAIN, "--resume", "--overwrite"], "exclude each other"),
    ("train-missing-init", [*TRAIN, "--init", "{tmp}/none.pt"], "none.pt"),
    ("train-init-not-a-checkpoint", [*TRAIN, "--init", "{file}"], "not a readable PyTorch checkpoint"),
    ("train-init-empty", [*TRAIN, "--init", "{empty}"], "--init {empty} is an empty file"),
    ("train-backbone-empty", [*TRAIN, "--backbone-from", "{empty}"], "--backbone-from {empty} is an empty file"),
    ("train-unknown-model", ["train", "detr_huge", *D, "--out", "{tmp}/run"], "detr_huge"),
    ("train-undecodable-image", ["train", "detr_tiny", "--data", "{bad}", "--out", "{tmp}/run", "--size", "64"],
     "cannot be decoded"),
    ("pretrain-batch-0", [*PRETRAIN, "--batch-size", "0"], "--batch-size 0"),
    ("pretrain-out-is-file", ["pretrain", "detr_tiny", *D, "--out", "{file}"], "is a file"),
    # fxq eval
    ("eval-top-k-0", [*EVAL, "--top-k", "0"], "--top-k 0"),
    ("eval-batch-0", [*EVAL, "--batch-size", "0"], "--batch-size 0"),
    ("eval-size-too-small", [*EVAL, "--size", "4"], "--size 4 is too small"),
    ("eval-max-below-size", [*EVAL, "--max-size", "48"], "--max-size 48 is below --size 64"),
    ("eval-out-is-folder", [*EVAL, "--out", "{tmp}"], "is a folder"),
    ("eval-missing-predictions", ["eval", *D, "--predictions", "{tmp}/p.json"], "--predictions {tmp}/p.json"),
    ("eval-empty-checkpoint", [*EVAL, "--checkpoint", "{empty}"], "is an empty file"),
    ("eval-missing-data", ["eval", "--model", "detr_tiny", "--data", "{tmp}/nowhere"], "does not exist"),
    ("eval-nan-weights", [*EVAL, "--checkpoint", "{nan}"], "NaN/inf"),
    ("eval-undecodable-image", ["eval", "--model", "detr_tiny", "--data", "{bad}", "--split", "val",
                                "--size", "64", "--no-progress"], "cannot be decoded"),
    ("eval-critical-unknown", [*EVAL, "--critical", "unicorn"], "unicorn"),
    # fxq export
    ("export-opset-5", [*EXPORT, "--opset", "5"], "--opset 5 is not supported"),
    ("export-calib-batches-0", [*EXPORT, "--calib-batches", "0"], "--calib-batches 0"),
    ("export-batch-0", [*EXPORT, "--batch-size", "0"], "--batch-size 0"),
    ("export-size-too-small", ["export", "detr_tiny", "--calib", "{data}", "--size", "16", "16", "--out",
                               "{tmp}/m.onnx"], "too small"),
    ("export-out-is-folder", ["export", "detr_tiny", "--calib", "{data}", "--size", "64", "64", "--out", "{tmp}"],
     "is a folder"),
    ("export-json-under-file", [*EXPORT, "--json", "{file}/r.json"], "cannot be created"),
    ("export-bad-policy", [*EXPORT, "--policy", "W9A8"], "W9A8"),
    ("export-policy-and-allocation", [*EXPORT, "--policy", "W4A8", "--allocation", "{file}"], "not both"),
    ("export-missing-allocation", [*EXPORT, "--allocation", "{tmp}/none.json"], "--allocation"),
    ("export-allocation-not-analysis", [*EXPORT, "--allocation", "{file}"], "analysis"),
    ("export-no-calib", ["export", "detr_tiny", "--out", "{tmp}/m.onnx"], "--calib"),
    ("export-nan-weights", [*EXPORT, "--checkpoint", "{nan}"], "NaN/inf"),
    # fxq allocate
    ("allocate-latency-without-table", [*ALLOCATE, "--budget-kind", "latency"], "--latency-table"),
    ("allocate-critical-without-names", [*ALLOCATE, "--objective", "critical"], "--critical NAME"),
    ("allocate-zero-budget", [*ALLOCATE[:-1], "0"], "--budget 0"),
    ("allocate-candidate-0", [*ALLOCATE, "--candidates", "0", "8"], "--candidates 0 8"),
    ("allocate-images-0", [*ALLOCATE, "--images", "0"], "--images 0"),
    ("allocate-probes-0", [*ALLOCATE, "--probes", "0", "--method", "hutchinson"], "--probes 0"),
    ("allocate-plot-is-folder", [*ALLOCATE, "--plot", "{tmp}"], "is a folder"),
    ("allocate-missing-analysis", [*ALLOCATE, "--analysis", "{tmp}/a.json"], "--analysis"),
    # fxq bench, inspect, data
    ("bench-runs-0", ["bench", "detr_tiny", "--images", "{data}", "--runs", "0"], "--runs 0"),
    ("bench-json-is-folder", ["bench", "detr_tiny", "--images", "{data}", "--json", "{tmp}"], "is a folder"),
    ("bench-unknown-row", ["bench", "detr_tiny", "--images", "{data}", "--rows", "gpu"], "gpu"),
    ("inspect-json-is-folder", ["inspect", "detr_tiny", "--json", "{tmp}"], "is a folder"),
    ("inspect-size-too-small", ["inspect", "detr_tiny", "--size", "8", "8"], "too small"),
    ("synth-size-too-small", ["data", "synth", "--out", "{tmp}/s", "--size", "10"], "--size"),
    ("synth-out-is-file", ["data", "synth", "--out", "{file}"], "is a file"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The shared inputs of the cases: a tiny data set, a bad copy of it, a file, an empty file, a NaN model."""
    root = tmp_path_factory.mktemp("inputs")
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--seed", "2", "--train", "4", "--val", "2",
                 "--size", "64"]) == 0
    bad = root / "bad"
    shutil.copytree(data, bad)
    (bad / "train" / "000002.png").write_bytes(b"not a png at all")
    (bad / "val" / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "file.txt").write_text("a regular file\n")
    (root / "empty.pt").write_bytes(b"")
    from fxq.models import build

    state = build("detr_tiny").state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and k.endswith("weight"))
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    torch.save(state, root / "nan.pt")
    return {"data": str(data), "bad": str(bad), "file": str(root / "file.txt"), "empty": str(root / "empty.pt"),
            "nan": str(root / "nan.pt")}


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(argv, expected, inputs, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    values = {**inputs, "tmp": str(work)}
    args = [a.format(**values) for a in argv]
    before = snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not is_warning(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fxq {args[0]}: error: "), err
    assert expected.format(**values) in lines[0], err
    assert snapshot(tmp_path) == before, "a refused command wrote files"


def snapshot(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def is_warning(line: str) -> bool:
    """Python warnings other modules print (e.g. deprecations) are not fxq's error line."""
    return "Warning" in line or line.startswith(" ")


def test_an_unwritable_output_folder_is_refused_before_work(inputs, tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    argv = [a.format(**inputs, tmp=str(tmp_path)) for a in EXPORT[:-1]] + [str(locked / "m.onnx")]
    assert main(argv) == 2
    assert f"folder {locked} is not writable" in capsys.readouterr().err
    assert main(["train", "detr_tiny", "--data", inputs["data"], "--out", str(locked / "run")]) == 2
    assert f"{locked} is not writable" in capsys.readouterr().err and not any(locked.iterdir())
