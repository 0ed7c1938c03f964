"""QAT end to end: `fxq.qat.train_qat` / `fxq qat` trains the traced quantized graph, resumes bit-identically, and
`fxq export --qat` lowers the learned quantizers so that onnxruntime gives the QAT graph's detections."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fxq.cli import main
from fxq.data import CocoDetection, eval_transforms, write_synthetic
from fxq.errors import InputError
from fxq.qat import QATRecipe, load_run, train_qat
from fxq.quant import FakeQuantizer

SIZE = 64
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-fixture"
OPTIONS = {"calib_images": 4, "epochs": 1, "steps": 4, "batch_size": 2, "lr": 1e-4, "lr_backbone": 1e-5,
           "lr_quant": 1e-2, "weight_decay": 1e-4, "clip": 0.1, "schedule": "cosine", "warmup": 1, "seed": 0,
           "ckpt_every": 0, "no_progress": True}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, seed=1, train=12, val=4, size=SIZE)
    return root


def _sets(root: Path):
    train = CocoDetection.from_folder(root, "train", transforms=eval_transforms(SIZE))
    val = CocoDetection.from_folder(root, "val", transforms=eval_transforms(SIZE))
    return train, val


def _run(root: Path, out: Path, recipe: QATRecipe, **options):
    train, val = _sets(root)
    return train_qat(recipe, train, val, {**OPTIONS, **options}, out)


RECIPE = QATRecipe("detr_tiny", policy="4-4-8", init="minmax", size=SIZE)


def test_qat_moves_weights_and_scales_and_writes_a_loadable_run(synth, tmp_path):
    result = _run(synth, tmp_path / "run", RECIPE, critical=["person"], fisher_reg=1e-3, distill="kd")
    assert result is not None and 0 <= result["eval"]["AP"] <= 1
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4
    for term in ("loss_det", "kd.class", "kd.bbox", "kd.giou", "fisher_trace", "loss_fisher", "lr_quantizer"):
        assert all(np.isfinite(r[term]) for r in log), term
    recipe, student = load_run(tmp_path / "run")
    assert recipe == RECIPE
    initial = QATRecipe("detr_tiny", policy="4-4-8", init="minmax", size=SIZE)
    from fxq.qat import teacher_graph

    float_state = teacher_graph(initial).state_dict()
    state = student.state_dict()
    moved = [k for k in float_state if not torch.equal(float_state[k], state[k])]
    assert len(moved) > 10  # the weights were trained
    scales = {k: v for k, v in state.items() if k.endswith(".scale")}
    assert scales and all((v > 0).all() for v in scales.values())


def test_resume_ends_bit_identical(synth, tmp_path):
    _run(synth, tmp_path / "full", RECIPE)
    assert _run(synth, tmp_path / "cut", RECIPE, stop_after=2) is None
    train, val = _sets(synth)
    train_qat(RECIPE, train, val, OPTIONS, tmp_path / "cut", resume=True)
    full = torch.load(tmp_path / "full" / "qat_model.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "qat_model.pt", weights_only=True)
    assert full.keys() == cut.keys()
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_resume_with_another_configuration_names_it_and_writes_nothing(synth, tmp_path):
    _run(synth, tmp_path / "run", RECIPE, stop_after=1)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    train, val = _sets(synth)
    with pytest.raises(Exception, match="lr"):
        train_qat(RECIPE, train, val, {**OPTIONS, "lr": 3e-4}, tmp_path / "run", resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


def _onnx_vs_graph(student, onnx_path: Path, images: list[torch.Tensor]):
    from fxq.backends import OrtSession

    session = OrtSession(onnx_path, optimization="disable", threads=1)
    for image in images:
        with torch.no_grad():
            ref = student(image[None])
        got = session.run(image[None])
        yield ref, got


def test_export_uses_the_learned_quantizers_and_matches_on_real_images(synth, tmp_path):
    import onnx
    from onnx import numpy_helper

    run = tmp_path / "run"
    _run(synth, run, RECIPE, steps=3, lr_quant=5e-2)
    _, student = load_run(run)
    learned = [q for q in student.modules() if isinstance(q, FakeQuantizer)]
    fractional = [q for q in learned if isinstance(q.zero_point, torch.nn.Parameter)
                  and not torch.equal(q.zero_point, torch.round(q.zero_point))]
    assert fractional, "the zero-points should have left the integers after training"
    out = tmp_path / "qat.onnx"
    assert main(["export", "--qat", str(run), "--out", str(out)]) == 0
    model = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = {float(v) for v in inits.values() if v.dtype == np.float32 and v.size == 1}
    for q in learned:  # every learned per-tensor scale is exported exactly
        if q.axis is None:
            assert float(q.scale.detach()) in scales, q.name
    data = CocoDetection.from_folder(FIXTURE, transforms=eval_transforms(SIZE, SIZE * 2))
    images = [data[i][0] for i in range(4)]
    for ref, got in _onnx_vs_graph(student, out, images):
        logits, boxes = ref["pred_logits"], ref["pred_boxes"]
        assert (got["pred_logits"] - logits).abs().max() < 1e-3
        assert (got["pred_boxes"] - boxes).abs().max() < 1e-4
        top_ref = logits.sigmoid().flatten(1).topk(10).indices
        top_got = got["pred_logits"].sigmoid().flatten(1).topk(10).indices
        assert torch.equal(top_ref, top_got)  # the same detections after post-processing


def test_cli_bad_input_is_refused_before_work(synth, tmp_path, capsys):
    base = ["qat", "detr_tiny", "--data", str(synth), "--policy", "4-4-8", "--size", str(SIZE)]
    cases = {
        "λ must be >= 0": ["--fisher-reg", "-1", "--out", str(tmp_path / "a")],
        "needs --critical": ["--fisher-reg", "1e-3", "--out", str(tmp_path / "b")],
        "closest|unknown|Did you mean|not a category": ["--fisher-reg", "1e-3", "--critical", "persn",
                                                        "--out", str(tmp_path / "c")],
        "--fisher-every 4 needs --fisher-reg": ["--fisher-every", "4", "--out", str(tmp_path / "d")],
        "--fisher-every 0: give at least 1|fisher-every": ["--fisher-reg", "1e-3", "--critical", "person",
                                                           "--fisher-every", "0", "--out", str(tmp_path / "e")],
        "--float-stage 0|float-stage": ["--float-stage", "-1", "--out", str(tmp_path / "f")],
        "lasts the whole run of 4 steps": ["--float-stage", "4", "--steps", "4", "--batch-size", "2",
                                           "--out", str(tmp_path / "g")],
    }
    for message, extra in cases.items():
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert any(m in err for m in message.split("|")), err
    assert not any((tmp_path / d).exists() for d in "abcdefg")


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_run(tmp_path)


# ---------------------------------------------------------------- torchrun, 2 processes

def test_torchrun_two_processes_match_one_process(synth, tmp_path):
    """QAT with the Fisher-trace regularizer on 2 gloo processes equals 1 process on the same global batch: the
    regularizer is the trace of the *global* minibatch gradient (fxq.objectives.fisher_reg), and the averaged
    gradient (its norm is logged) is the one-process gradient. Compared over one step: AdamW's first step moves
    every weight by about ±lr whatever the gradient's size, so float-noise gradients may flip a few signs, and
    after that 4-bit roundings flip and the runs separate as any two quantized trainings would."""
    import os
    import subprocess
    import sys

    options = {"steps": 1, "batch_size": 4, "critical": ["person"], "fisher_reg": 1e-3}
    worker = Path(__file__).with_name("qat_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(synth), str(tmp_path / "two"), json.dumps({**OPTIONS, **options})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _run(synth, tmp_path / "one", RECIPE, **options)
    logs = {r: json.loads((tmp_path / r / "log.jsonl").read_text().splitlines()[0]) for r in ("one", "two")}
    for term in ("loss", "loss_det", "fisher_trace", "loss_fisher", "grad_norm"):
        assert logs["two"][term] == pytest.approx(logs["one"][term], rel=1e-5), term
    one, two = (torch.load(tmp_path / r / "qat_model.pt", weights_only=True) for r in ("one", "two"))
    initial = torch.load(tmp_path / "two" / "initial.pt", weights_only=True)
    assert sum(not torch.equal(one[k], initial[k]) for k in one) > 10
    differing = total = 0
    for k in one:
        lr = OPTIONS["lr_quant"] if k.endswith((".scale", ".zero_point")) else OPTIONS["lr"]
        diff = (one[k] - two[k]).abs()
        assert diff.max() <= 2 * lr + 1e-6, k
        differing, total = differing + int((diff > 1e-6).sum()), total + diff.numel()
    assert differing / total < 0.01
