"""Saved QAT runs keep loading: the quantizer names of a traced student (they come from FX node names) equal those
of a run saved by an earlier fxq."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import DATA
from torch.utils.data import DataLoader, Subset

import fxq
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.passes.prepare_qat import prepare_qat
from fxq.ptq import float_graph


def test_a_deformable_qat_state_saved_by_an_earlier_fxq_still_fits():
    """Quantizer names come from the traced graph's node names: a model change that adds a node renames them and
    saved runs stop loading. The reference is the key list of a run saved before this check existed."""
    saved = json.loads((Path(__file__).parent / "data" / "qat_state_keys.json").read_text())["deformable_detr_tiny"]
    fgm = float_graph(fxq.models.build("deformable_detr_tiny"), (160, 160))
    ds = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 160))
    student = prepare_qat(fgm, DataLoader(Subset(ds, range(2)), batch_size=2, collate_fn=collate), "4-4-8",
                          init="minmax").gm
    assert sorted(k for k in student.state_dict() if k.startswith("fxq_q.")) == saved
