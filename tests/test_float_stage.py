"""Q-DETR's two-stage schedule (`fxq qat --float-stage N`): in stage 1 the student is the graph whose encoder and
decoder the policy leaves float (an independent path: the policy's module overrides), in stage 2 the fully
quantized one; a run resumed inside stage 1 ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from conftest import DATA
from test_qat_train import OPTIONS, RECIPE, _run, _sets, synth  # noqa: F401  (synth is a fixture)
from torch.utils.data import DataLoader, Subset

import fxq
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.errors import CheckpointError, InputError
from fxq.passes.float_stage import FloatStage
from fxq.passes.policy import DEFAULT_OVERRIDES
from fxq.passes.prepare_qat import prepare_qat
from fxq.ptq import float_graph
from fxq.qat import train_qat

SIZE = 96
FLOAT_TRANSFORMER = {**DEFAULT_OVERRIDES, "transformer.encoder*": None, "transformer.decoder*": None}


@pytest.fixture(scope="module")
def calib() -> DataLoader:
    ds = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(SIZE, SIZE))
    return DataLoader(Subset(ds, range(4)), batch_size=2, collate_fn=collate)


def _detections(gm, calib) -> dict:
    with torch.no_grad():
        return dict(gm(next(iter(calib))[0]))


@pytest.mark.parametrize("name", ["detr_tiny", "deformable_detr_tiny"])
def test_stage_one_is_the_graph_with_a_float_transformer_and_stage_two_the_quantized_one(calib, name):
    fgm = float_graph(fxq.models.build(name), (SIZE, SIZE))
    student = prepare_qat(fgm, calib, "4-4-8", init="minmax").gm
    quantized = _detections(student, calib)
    reference = _detections(prepare_qat(fgm, calib, "4-4-8", init="minmax", overrides=FLOAT_TRANSFORMER).gm, calib)
    stage = FloatStage(student, 3)
    for step, expected in ((0, reference), (2, reference), (3, quantized), (7, quantized)):
        stage(step)
        got = _detections(student, calib)
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(got[key], expected[key]), (step, key)
    assert not torch.equal(reference["pred_boxes"], quantized["pred_boxes"])  # the two stages differ
    stage(0)
    stage.quantize_all()
    assert torch.equal(_detections(student, calib)["pred_boxes"], quantized["pred_boxes"])


def test_a_graph_without_transformer_quantizers_is_refused(calib):
    fgm = float_graph(fxq.models.build("detr_tiny"), (SIZE, SIZE))
    gm = prepare_qat(fgm, calib, "4-4-8", init="minmax", overrides=FLOAT_TRANSFORMER).gm
    with pytest.raises(InputError, match="no quantizer under"):
        FloatStage(gm, 2)
    with pytest.raises(InputError, match="-1 steps"):
        FloatStage(gm, -1)


def test_resume_inside_the_float_stage_ends_bit_identical(synth, tmp_path):  # noqa: F811
    _run(synth, tmp_path / "plain", RECIPE)
    _run(synth, tmp_path / "full", RECIPE, float_stage=2)
    assert _run(synth, tmp_path / "cut", RECIPE, float_stage=2, stop_after=1) is None
    train, val = _sets(synth)
    with pytest.raises(CheckpointError, match="float_stage"):
        train_qat(RECIPE, train, val, {**OPTIONS, "float_stage": 3}, tmp_path / "cut", resume=True)
    train_qat(RECIPE, train, val, {**OPTIONS, "float_stage": 2}, tmp_path / "cut", resume=True)
    plain, full, cut = (torch.load(tmp_path / d / "qat_model.pt", weights_only=True) for d in ("plain", "full", "cut"))
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert not all(torch.equal(full[k], plain[k]) for k in full)  # the stage changed the training

