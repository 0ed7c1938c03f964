"""Post-processing and COCO evaluation (fxq.evaluation, ``fxq eval``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fxq.cli import main
from fxq.data import CocoDetection, collate, eval_transforms, resolve_categories
from fxq.errors import InputError
from fxq.evaluation import evaluate, evaluate_model, postprocess, to_coco_results
from fxq.objectives import box_xyxy_to_cxcywh

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
FIXTURE = DATA / "coco-val2017-fixture"
INSTANCES = FIXTURE / "annotations" / "instances_val2017.json"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="shared COCO fixture not present")


def _gt_as_detections(ann_file: Path) -> list[dict]:
    data = json.loads(ann_file.read_text())
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in data["annotations"]
        if not a["iscrowd"]
    ]


# --- (a) ground truth scored as detections ---


@needs_fixture
def test_ground_truth_gives_ap_one_on_real_fixture() -> None:
    critical = resolve_categories(INSTANCES, ["person", "vehicle"])
    m = evaluate(INSTANCES, _gt_as_detections(INSTANCES), critical_ids=critical)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert m[key] == pytest.approx(1.0), key
    assert m["critical_mAP"] == pytest.approx(1.0) and m["rest_mAP"] == pytest.approx(1.0)
    with_gt = [r for r in m["categories"] if r["num_gt"] > 0]
    assert len(with_gt) == 40 and all(r["AP"] == pytest.approx(1.0) for r in with_gt)
    assert len(m["no_gt_categories"]) == 40
    assert all(m["per_category"][name] == -1.0 for name in m["no_gt_categories"])
    assert m["num_images"] == 12
    json.dumps(m)  # JSON-serialisable


@needs_fixture
def test_no_detections_and_bad_inputs() -> None:
    m = evaluate(INSTANCES, [], critical_ids=[1])
    assert m["AP"] == 0.0 and m["critical_mAP"] == 0.0 and m["num_detections"] == 0
    with pytest.raises(InputError, match="image_id 7"):
        evaluate(INSTANCES, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(InputError, match=r"critical category ids \[12\]"):
        evaluate(INSTANCES, [], critical_ids=[12])
    with pytest.raises(InputError, match="lacks"):
        evaluate(INSTANCES, [{"image_id": 7, "bbox": [0, 0, 1, 1]}])


# --- (b) a case computed by hand ---


def _hand_case() -> tuple[dict, list[dict]]:
    """One 400x400 image. Category 1: GT A = [0, 0, 100, 100], GT B = [200, 0, 100, 100] (xywh, area 10⁴,
    "large").

    Detections of category 1, by score:
      d1 0.9 = A shifted 10 px right: IoU = 90·100 / (110·100) = 0.818 -> true positive for thresholds .50-.80
      d2 0.8 = [0, 250, 100, 100]: overlaps nothing -> always a false positive
      d3 0.7 = B shifted 20 px right: IoU = 80/120 = 0.667 -> true positive for thresholds .50-.65
    Category 2: one GT and an exact detection (AP 1). Category 3: no GT at all (AP -1, excluded).

    Precision/recall along the ranking (2 GT of category 1), with p_interp(r) = max precision at recall >= r
    sampled at the 101 recall points 0, .01, ..., 1:
      t in {.50, .55, .60, .65}: TP FP TP -> (P, R) = (1, .5), (.5, .5), (2/3, 1)
          p_interp = 1 for r <= .5 (51 points), 2/3 for .5 < r <= 1 (50 points) -> AP_t = (51 + 50·2/3) / 101
      t in {.70, .75, .80}:      TP FP FP -> recall stops at .5 -> p_interp = 1 on 51 points, 0 after
          -> AP_t = 51 / 101
      t in {.85, .90, .95}:      FP FP FP -> AP_t = 0
    AP(cat 1) = (4·(51 + 100/3) + 3·51) / (101·10) = 0.48548; AP50(cat 1) = 0.83498; AP75(cat 1) = 0.50495.
    """
    gt = {
        "images": [{"id": 1, "width": 400, "height": 400, "file_name": "1.png"}],
        "categories": [
            {"id": 1, "name": "one", "supercategory": "s"},
            {"id": 2, "name": "two", "supercategory": "s"},
            {"id": 3, "name": "three", "supercategory": "t"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "area": 1e4, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [200, 0, 100, 100], "area": 1e4, "iscrowd": 0},
            {
                "id": 3,
                "image_id": 1,
                "category_id": 2,
                "bbox": [50, 150, 100, 100],
                "area": 1e4,
                "iscrowd": 0,
            },
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 0, 100, 100], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [0, 250, 100, 100], "score": 0.8},
        {"image_id": 1, "category_id": 1, "bbox": [220, 0, 100, 100], "score": 0.7},
        {"image_id": 1, "category_id": 2, "bbox": [50, 150, 100, 100], "score": 0.6},
    ]
    return gt, dets


def test_hand_computed_ap(tmp_path: Path) -> None:
    gt, dets = _hand_case()
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(gt))
    ap1 = (4 * (51 + 50 * 2 / 3) + 3 * 51) / (101 * 10)
    ap50_1, ap75_1 = (51 + 50 * 2 / 3) / 101, 51 / 101
    m = evaluate(ann, dets, critical_ids=[1, 3])
    assert m["per_category"] == {"one": pytest.approx(ap1), "two": pytest.approx(1.0), "three": -1.0}
    assert m["AP"] == pytest.approx((ap1 + 1.0) / 2)
    assert m["AP50"] == pytest.approx((ap50_1 + 1.0) / 2)
    assert m["AP75"] == pytest.approx((ap75_1 + 1.0) / 2)
    assert m["APl"] == pytest.approx(m["AP"]) and m["APs"] == -1.0 and m["APm"] == -1.0
    assert m["critical_mAP"] == pytest.approx(ap1)  # category 3 has no GT: excluded
    assert m["rest_mAP"] == pytest.approx(1.0)
    assert m["no_gt_categories"] == ["three"]
    assert evaluate(ann, dets, critical_ids=[3])["critical_mAP"] is None


# --- (c) post-processing against numpy references ---


def _np_cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            b[..., 0] - b[..., 2] / 2,
            b[..., 1] - b[..., 3] / 2,
            b[..., 0] + b[..., 2] / 2,
            b[..., 1] + b[..., 3] / 2,
        ],
        axis=-1,
    )


def _outputs(batch: int, queries: int, classes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch, queries, classes, generator=g) * 3,
        "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1,
    }


def test_postprocess_softmax_matches_numpy() -> None:
    out = _outputs(2, 7, 6, seed=0)  # 5 classes + no-object
    sizes = torch.tensor([[480, 640], [300, 200]])
    res = postprocess(out, sizes, head="softmax")
    logits, boxes = out["pred_logits"].double().numpy(), out["pred_boxes"].double().numpy()
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    for b, (h, w) in enumerate(sizes.tolist()):
        classes = prob[b, :, :-1]
        np.testing.assert_allclose(res[b]["scores"].numpy(), classes.max(-1), rtol=1e-5)
        np.testing.assert_array_equal(res[b]["labels"].numpy(), classes.argmax(-1))
        ref = _np_cxcywh_to_xyxy(boxes[b]) * np.array([w, h, w, h])
        np.testing.assert_allclose(res[b]["boxes"].numpy(), ref, rtol=1e-5, atol=1e-3)
        assert res[b]["labels"].dtype == torch.int64


def test_postprocess_sigmoid_topk_matches_numpy() -> None:
    out = _outputs(2, 9, 4, seed=1)
    sizes = torch.tensor([[100, 50], [64, 128]])
    res = postprocess(out, sizes, head="sigmoid", top_k=10)
    logits, boxes = out["pred_logits"].double().numpy(), out["pred_boxes"].double().numpy()
    for b, (h, w) in enumerate(sizes.tolist()):
        prob = (1 / (1 + np.exp(-logits[b]))).reshape(-1)
        order = np.argsort(-prob)[:10]
        np.testing.assert_allclose(res[b]["scores"].numpy(), prob[order], rtol=1e-5)
        np.testing.assert_array_equal(res[b]["labels"].numpy(), order % 4)
        ref = _np_cxcywh_to_xyxy(boxes[b][order // 4]) * np.array([w, h, w, h])
        np.testing.assert_allclose(res[b]["boxes"].numpy(), ref, rtol=1e-5, atol=1e-3)
    assert len(postprocess(out, sizes, head="sigmoid", top_k=100)[0]["scores"]) == 9 * 4


def test_postprocess_rejects_bad_outputs() -> None:
    out = _outputs(1, 3, 4, seed=2)
    with pytest.raises(InputError, match="head"):
        postprocess(out, torch.tensor([[10, 10]]), head="softmax2")
    with pytest.raises(InputError, match="orig_sizes"):
        postprocess(out, torch.tensor([10, 10]))
    with pytest.raises(InputError, match="pred_boxes"):
        postprocess({"pred_logits": out["pred_logits"]}, torch.tensor([[10, 10]]))


def test_to_coco_results_xywh() -> None:
    res = [
        {
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([3]),
            "boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]),
        }
    ]
    assert to_coco_results(res, [42]) == [
        {"image_id": 42, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}
    ]


# --- evaluate_model with a model that outputs the ground truth ---


class _Oracle(torch.nn.Module):
    """Returns prepared outputs batch after batch (the ground truth as logits and boxes)."""

    def __init__(self, head: str, outputs: list[dict]):
        super().__init__()
        self.head, self.num_classes, self._outputs = head, 91, outputs
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict:
        assert images.dim() == 4 and mask.shape == (images.shape[0], *images.shape[-2:])
        return self._outputs.pop(0)


def _oracle_outputs(batches: list, head: str, queries: int = 100) -> list[dict]:
    outs = []
    for _, _, targets in batches:
        k = 92 if head == "softmax" else 91
        logits = torch.full((len(targets), queries, k), -10.0)
        boxes = torch.full((len(targets), queries, 4), 0.5)
        if head == "softmax":
            logits[:, :, -1] = 10.0
        for i, t in enumerate(targets):
            n = len(t["labels"])
            logits[i, torch.arange(n), t["labels"]] = 10.0
            if head == "softmax":
                logits[i, :n, -1] = -10.0
            boxes[i, :n] = t["boxes"]
        outs.append({"pred_logits": logits, "pred_boxes": boxes})
    return outs


@needs_fixture
@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_evaluate_model_with_oracle(head: str) -> None:
    ds = CocoDetection.from_folder(FIXTURE, transforms=eval_transforms(224))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate))
    model = _Oracle(head, _oracle_outputs(batches, head))
    m = evaluate_model(model, batches, ds.coco, critical_ids=[1], progress=False)
    assert m["AP"] > 0.97 and m["AP50"] == pytest.approx(1.0)  # boxes pass through a resize: tiny rounding
    assert m["critical_mAP"] > 0.97 and m["num_images"] == 12
    assert model.training  # restored
    with pytest.raises(InputError, match="model.head"):
        evaluate_model(torch.nn.Linear(1, 1), batches, ds.coco)


@needs_fixture
def test_evaluate_model_only_scores_images_seen() -> None:
    ds = CocoDetection.from_folder(FIXTURE, transforms=eval_transforms(128))
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate))[:1]
    m = evaluate_model(
        _Oracle("softmax", _oracle_outputs(batches, "softmax")), batches, INSTANCES, progress=False
    )
    assert m["num_images"] == 4 and m["AP50"] == pytest.approx(1.0)


def test_box_conversion_roundtrip() -> None:
    xyxy = torch.tensor([[1.0, 2.0, 5.0, 10.0]])
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), torch.tensor([[3.0, 6.0, 4.0, 8.0]]))


# --- CLI ---


@needs_fixture
def test_cli_eval_predictions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(_gt_as_detections(INSTANCES)))
    out = tmp_path / "metrics.json"
    argv = ["eval", "--ann", str(INSTANCES), "--predictions", str(preds), "--critical", "person", "vehicle"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "critical mAP" in printed and "person" in printed and "100.0" in printed
    m = json.loads(out.read_text())
    assert m["AP"] == pytest.approx(1.0) and m["critical_mAP"] == pytest.approx(1.0)
    assert m["critical_ids"] == list(range(1, 10))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert main(["eval", "--data", str(FIXTURE), "--split", "val2017", "--predictions", str(preds)]) == 0
    capsys.readouterr()


@needs_fixture
def test_cli_eval_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds = tmp_path / "preds.json"
    preds.write_text("[]")
    assert main(["eval", "--ann", str(INSTANCES), "--predictions", str(preds), "--critical", "persn"]) == 2
    assert "did you mean 'person'" in capsys.readouterr().err
    assert main(["eval", "--predictions", str(preds)]) == 2
    assert "--data" in capsys.readouterr().err
    out = tmp_path / "missing" / "m.json"
    assert main(["eval", "--ann", str(INSTANCES), "--predictions", str(preds), "--out", str(out)]) == 2
    assert not out.parent.exists()
