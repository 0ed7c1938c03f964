"""DetPTQ: per-layer choice of p by ODOL against the float graph's pseudo targets."""

from __future__ import annotations

import copy

import pytest
import torch

import fxq
from fxq.passes.detptq import detptq, pseudo_targets
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import annotate_policy
from fxq.passes.remove_dropout import remove_dropout


def _graphs(observer: str = "lp:2"):
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build("detr_tiny"), torch.randn(1, 3, 64, 64))
    remove_dropout(gm)
    fold_batchnorm(gm)
    reference = copy.deepcopy(gm)
    annotate_policy(gm, "W4A4", a_observer=observer, w_observer=observer)
    insert_quantizers(gm)
    return gm, reference


def test_pseudo_targets_keep_confident_queries_only():
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]]])  # 2 classes + no-object
    boxes = torch.rand(1, 2, 4)
    (t,) = pseudo_targets({"pred_logits": logits, "pred_boxes": boxes}, "softmax", 0.5)
    assert t["labels"].tolist() == [0] and torch.equal(t["boxes"], boxes[0, :1])
    (s,) = pseudo_targets({"pred_logits": logits, "pred_boxes": boxes}, "sigmoid", 0.9)
    assert s["labels"].tolist() == [0, 2]


def test_detptq_never_worse_than_best_uniform_p():
    gm, reference = _graphs()
    batches = [(torch.randn(2, 3, 64, 64), None, [])]
    info = detptq(gm, batches, reference, candidates=(1.0, 4.0), num_batches=1, score_threshold=0.02,
                  num_clip_ratios=10, progress=False).info
    assert info["final_odol"] <= min(info["uniform_odol"].values()) + 1e-6
    layers = [n for n in gm.graph.nodes if "fxq.detptq" in n.meta]
    assert len(layers) == info["layers"] > 50
    assert all(n.meta["fxq.detptq"]["p"] in (1.0, 4.0) for n in layers)
    methods = {n.meta["fxq.calib"]["method"] for n in gm.graph.nodes if "fxq.calib" in n.meta}
    assert methods <= {"lp:1.0", "lp:4.0"}


def test_detptq_needs_lp_observers():
    gm, reference = _graphs(observer="minmax")
    with pytest.raises(fxq.InputError, match='a_observer="lp:2"'):
        detptq(gm, [torch.randn(1, 3, 64, 64)], reference, progress=False)
