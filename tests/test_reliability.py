"""Run folders are never overwritten or half-written, Ctrl-C ends cleanly, tall images are capped, bad boxes and
images are reported, and NaN weights or outputs name their first tensor or module."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from argparse import Namespace

import pytest
import torch
from conftest import ROOT
from PIL import Image

from fxq.cli import main
from fxq.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 4 + 2 image synthetic set at 64 px."""
    root = tmp_path_factory.mktemp("data") / "synth"
    assert main(["data", "synth", "--out", str(root), "--seed", "5", "--train", "4", "--val", "2",
                 "--size", "64"]) == 0
    return root


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def train_args(data, run, *extra: str) -> list[str]:
    return ["train", "detr_tiny", "--data", str(data), "--out", str(run), "--size", "64", "--batch-size", "4",
            "--warmup", "0", "--no-progress", *extra]


def test_a_finished_run_is_refused_a_changed_resume_changes_nothing_and_overwrite_replaces_it(data, tmp_path,
                                                                                               capsys):
    run = tmp_path / "run"
    assert main(train_args(data, run)) == 0
    finished = files(run)
    assert {"model.pt", "eval.json", "checkpoint.pt", "config.json", "log.jsonl"} <= finished.keys()

    assert main(train_args(data, run)) == 2
    assert "holds another run" in capsys.readouterr().err and files(run) == finished
    assert main(train_args(data, run, "--resume", "--lr", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 (the run has 0.0002)" in err and files(run) == finished

    assert main(train_args(data, run, "--overwrite", "--epochs", "2", "--stop-after", "1")) == 0
    replaced = files(run)
    assert "model.pt" not in replaced and "eval.json" not in replaced, "stale outputs of the old run stayed"
    assert json.loads(replaced["config.json"])["argv"]["epochs"] == 2
    # a resume may change how the run is executed (--stop-after, --no-progress), not what it computes
    assert main(train_args(data, run, "--epochs", "2", "--resume")) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2 and (run / "model.pt").is_file()
    assert json.loads((run / "config.json").read_text()) == json.loads(replaced["config.json"])


def test_a_refused_start_writes_no_run_folder(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(data, run, "--batch-size", "5")) == 2
    assert "larger than the 4 images" in capsys.readouterr().err and not run.exists()


def test_skip_bad_images_leaves_them_out_and_says_how_many(data, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    (bad / "train" / "000003.png").write_bytes(b"GIF89a but not really")
    args = train_args(bad, tmp_path / "run", "--batch-size", "2", "--stop-after", "1")
    assert main(args) == 2
    assert "000003.png cannot be decoded" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main([*args, "--skip-bad-images"]) == 0
    assert "skipped 1 of 4 images of split 'train'" in capsys.readouterr().err


def test_sigint_prints_one_line_exits_130_and_leaves_a_resumable_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    code = "import sys; from fxq.cli import main; sys.exit(main(sys.argv[1:]))"
    args = train_args(data, run, "--batch-size", "2", "--epochs", "1000", "--ckpt-every", "1", "--threads", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # xdist workers ignore SIGINT and a child inherits that: restore the default, as in a terminal
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoint.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "checkpoint.pt").is_file(), proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "interrupted" in lines[0] and "--resume" in lines[0]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "a temp file was left behind"
    assert load_checkpoint(run / "checkpoint.pt")["step"] >= 1


def test_a_tall_image_is_capped_on_its_longer_side_in_training_and_evaluation(tmp_path):
    from fxq.cli.train import datasets
    from fxq.data.transforms import default_max_size

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.new("RGB", (16, 2000), (200, 40, 40)).save(tmp_path / split / "tall.png")
    ann = {"images": [{"id": 1, "file_name": "tall.png", "width": 16, "height": 2000}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 100, 10, 800], "area": 8000,
                            "iscrowd": 0}],
           "categories": [{"id": 1, "name": "bar", "supercategory": "shape"}]}
    (tmp_path / "annotations").mkdir()
    for split in ("train", "val"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    cap = default_max_size(160)
    for augment in ("flip", "detr"):
        args = Namespace(data=str(tmp_path), train_split="train", val_split="val", size=160, augment=augment,
                         seed=0, skip_bad_images=False)
        train_set, val_set = datasets(args)
        for dataset in (train_set, val_set):
            for epoch in range(3):
                dataset.set_epoch(epoch)
                image, target = dataset[0]
                assert max(image.shape[-2:]) <= cap, (augment, tuple(image.shape))
                if augment == "flip" or dataset is val_set:  # (DETR's random crop changes the aspect ratio)
                    assert min(image.shape[-2:]) <= 16 * cap / 2000 + 1, tuple(image.shape)
                assert torch.all(target["boxes"] >= 0) and torch.all(target["boxes"] <= 1)


def test_boxes_without_width_or_height_are_dropped_with_a_count(tmp_path):
    from fxq.data.coco import coco_from_dict

    def ann(i, bbox):
        return {"id": i, "image_id": 1, "category_id": 1, "bbox": bbox, "area": 1.0, "iscrowd": 0}

    data = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 50}],
            "annotations": [ann(1, [1, 1, 10, 10]), ann(2, [20, 20, -5, 10]), ann(3, [5, 5, 10, 0]),
                            ann(4, [30, 30, 5, 5])],
            "categories": [{"id": 1, "name": "x"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = coco_from_dict(data, "test.json")
    assert sorted(coco.anns) == [1, 4]
    messages = [str(w.message) for w in caught]
    assert any("dropped 2 of 4 annotations" in m and "annotation 2" in m for m in messages), messages


@pytest.mark.parametrize("bbox", [[1, 2, 3], [0, 0, float("nan"), 4], "1 2 3 4", [0, 0, True, 3]])
def test_a_malformed_bbox_is_an_error_naming_the_annotation(bbox):
    from fxq.data.coco import coco_from_dict
    from fxq.errors import InputError

    data = {"images": [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": bbox}],
            "categories": [{"id": 1, "name": "x"}]}
    with pytest.raises(InputError, match="annotation 7 has bbox"):
        coco_from_dict(data)


def test_non_finite_outputs_name_the_first_module_that_produced_them(data, tmp_path, capsys):
    from fxq.models import build

    model = build("detr_tiny")
    state = model.state_dict()
    bn = next(k for k in state if k.endswith("running_mean"))  # a buffer: the weight check cannot see it
    state[bn] = torch.full_like(state[bn], float("nan"))
    torch.save(state, tmp_path / "nan_buffer.pt")
    args = ["eval", "--model", "detr_tiny", "--checkpoint", str(tmp_path / "nan_buffer.pt"), "--data", str(data),
            "--size", "64", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    module = bn.removesuffix(".running_mean")
    assert "'pred_logits'" in err and f"first module with a non-finite output is {module!r}" in err, err


def test_export_leaves_no_onnx_file_when_the_outputs_are_not_finite(data, tmp_path, capsys, monkeypatch):
    from fxq.cli import export
    from fxq.errors import InputError

    def refuse(out, example):
        raise InputError("outputs are NaN")

    monkeypatch.setattr(export, "_check_outputs", refuse)
    out = tmp_path / "m.onnx"
    args = ["export", "detr_tiny", "--calib", str(data), "--size", "64", "64", "--out", str(out),
            "--calib-batches", "1"]
    assert main(args) == 2
    assert "outputs are NaN" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.onnx.data").exists()


def test_the_export_output_check_names_a_non_finite_onnx_output(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from fxq.cli.export import _check_outputs
    from fxq.errors import InputError

    # y = x / x: NaN on the zero image the check feeds, finite elsewhere
    graph = helper.make_graph([helper.make_node("Div", ["images", "images"], ["pred_boxes"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, [1, 3, 4, 4])])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InputError, match=r"output 'pred_boxes' holds 48 NaN/inf of 48 values"):
        _check_outputs(str(path), torch.zeros(1, 3, 4, 4))
    _check_outputs(str(path), torch.ones(1, 3, 4, 4))


def test_eval_counts_the_dropped_boxes_in_a_warning_and_scores_without_them(data, tmp_path):
    import shutil

    gt = tmp_path / "gt"
    shutil.copytree(data, gt)
    ann_file = gt / "annotations" / "instances_val.json"
    ann = json.loads(ann_file.read_text())
    good = [dict(a) for a in ann["annotations"]]
    ann["annotations"].append({**good[0], "id": 999, "bbox": [10, 10, -4, 8]})
    ann_file.write_text(json.dumps(ann))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in good]
    (tmp_path / "p.json").write_text(json.dumps(perfect))
    out = tmp_path / "m.json"
    with pytest.warns(UserWarning, match=f"dropped 1 of {len(good) + 1} annotations .*annotation 999"):
        assert main(["eval", "--data", str(gt), "--split", "val", "--predictions", str(tmp_path / "p.json"),
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["AP"] == pytest.approx(1.0)  # the empty box is no missed ground truth


def test_the_command_line_prints_a_warning_as_one_line():
    from fxq.cli import _one_line_warning

    text = _one_line_warning(UserWarning("dropped 2 of 9 annotations"), UserWarning, "coco.py", 46)
    assert text == "fxq: UserWarning: dropped 2 of 9 annotations\n"


@pytest.mark.parametrize("writer", ["checkpoint", "write_atomic"])
def test_ctrl_c_during_a_write_takes_effect_once_the_file_is_complete(tmp_path, monkeypatch, writer):
    import fxq.io
    import fxq.train.checkpoint as checkpoint

    real_save = torch.save

    def save_after_ctrl_c(obj, f):
        os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_after_ctrl_c)
    # xdist workers ignore SIGINT: install Python's default handler, as in a terminal, for this test
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _write_during_ctrl_c(tmp_path, writer, checkpoint, fxq.io)
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_during_ctrl_c(tmp_path, writer, checkpoint, io) -> None:
    path = tmp_path / "out.pt"
    state = {"w": torch.arange(6.0)}
    with pytest.raises(KeyboardInterrupt):
        if writer == "checkpoint":
            checkpoint.save_checkpoint(path, {"model": state})
        else:
            io.write_atomic(path, lambda f: torch.save(state, f), mode="wb")
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]
    loaded = load_checkpoint(path)["model"] if writer == "checkpoint" else torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"], state["w"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_under_torchrun_only_rank_0_checks_and_commits_the_run_folder(tmp_path, monkeypatch):
    from fxq.errors import InputError
    from fxq.train.run_folder import claim_run_folder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"argv": {"lr": 1}}\n')
    with pytest.raises(InputError, match="holds another run"):
        claim_run_folder(run, {"lr": 2})
    monkeypatch.setenv("RANK", "1")  # rank 0 may already have committed its config.json: not another run
    folder = claim_run_folder(run, {"lr": 2})
    folder.commit(main=False)
    assert (run / "config.json").read_text() == '{"argv": {"lr": 1}}\n'
