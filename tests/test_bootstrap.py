"""Paired bootstrap over images (fxq.evaluation.bootstrap): replicates against COCOeval on resampled sets."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from fxq.errors import InputError
from fxq.evaluation import METRICS, bootstrap_metrics, category_mean, compare, evaluate, paired_bootstrap, resample
from fxq.evaluation.bootstrap import _base_eval, _Reaccumulate
from fxq.evaluation.coco_eval import _results_coco, _run_cocoeval

CATEGORIES = [
    {"id": 1, "name": "adult", "supercategory": "person"},
    {"id": 2, "name": "child", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 5, "name": "bus", "supercategory": "vehicle"},
]
PERSON = [1, 2]


def _ground_truth(images: int = 24, seed: int = 1) -> COCO:
    """Small and large boxes (every area range), some crowd boxes, some images without annotations."""
    rng = np.random.default_rng(seed)
    imgs, anns = [], []
    for i in range(images):
        image_id = 10 * i + 3  # sparse, not starting at 1
        imgs.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.jpg"})
        for _ in range(int(rng.integers(0, 5))):
            w, h = (float(v) for v in rng.uniform(8, 150, 2))
            x, y = float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 200 - h))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice([1, 2, 3, 5])),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.1)})
    coco = COCO()
    coco.dataset = {"images": imgs, "annotations": anns, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _detections(gt: COCO, jitter: float, seed: int) -> list[dict]:
    """Jittered ground truth (sometimes mislabelled) plus false positives; scores on a 0.1 grid (ties)."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        box = [x + rng.normal() * jitter * w, y + rng.normal() * jitter * h, w * (1 + jitter * rng.random()), h]
        label = ann["category_id"] if rng.random() > 0.2 else int(rng.choice([1, 2, 3, 5]))
        dets.append({"image_id": ann["image_id"], "category_id": label, "bbox": box,
                     "score": round(float(rng.random()), 1)})
    for image_id in gt.getImgIds():
        w, h = (float(v) for v in rng.uniform(10, 80, 2))
        dets.append({"image_id": image_id, "category_id": int(rng.choice([1, 2, 3, 5])),
                     "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), w, h],
                     "score": round(float(rng.random()), 1)})
    return dets


def _gt_detections(gt: COCO) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]


def _cocoeval_of(gt: COCO, dets: list[dict], draw_ids: list[int]):
    """The reference: plain COCOeval on the explicitly resampled ground truth and detections."""
    replica, replica_dets = resample(gt, dets, draw_ids)
    return _run_cocoeval(replica, _results_coco(replica, replica_dets), sorted(replica.getImgIds()))


@pytest.fixture(scope="module")
def gt() -> COCO:
    return _ground_truth()


def test_identity_draw_equals_evaluate_on_the_original(gt) -> None:
    dets = _detections(gt, 0.1, seed=2)
    ids = sorted(gt.getImgIds())[:20]
    ref = evaluate(gt, dets, PERSON, image_ids=ids)
    explicit = _cocoeval_of(gt, dets, ids)
    fast = _Reaccumulate(_base_eval(gt, dets, ids))(np.arange(len(ids)))
    for ev in (explicit, fast):
        assert {m: float(v) for m, v in zip(METRICS, ev.stats, strict=True)} == {m: ref[m] for m in METRICS}
    out = paired_bootstrap(gt, dets, dets, ids, ["AP", "AP50", "critical_mAP"], PERSON, reps=3)
    assert [out[m]["a"] for m in out] == [ref["AP"], ref["AP50"], ref["critical_mAP"]]


def test_reaccumulation_equals_cocoeval_on_resampled_sets(gt) -> None:
    dets = _detections(gt, 0.15, seed=3)
    ids = sorted(gt.getImgIds())
    fast = _Reaccumulate(_base_eval(gt, dets, ids))
    rng = np.random.default_rng(4)
    for size in (len(ids), len(ids), 7, 2 * len(ids)):
        draw = rng.integers(0, len(ids), size)
        ref, got = _cocoeval_of(gt, dets, [ids[j] for j in draw]), fast(draw)
        assert np.array_equal(ref.eval["precision"], got.eval["precision"])
        assert np.array_equal(ref.eval["recall"], got.eval["recall"])
        assert np.array_equal(ref.stats, got.stats)


def test_drawing_every_image_twice_keeps_ap(gt) -> None:
    dets = _detections(gt, 0.1, seed=5)
    ids = sorted(gt.getImgIds())
    once = evaluate(gt, dets)
    twice = np.repeat(np.arange(len(ids)), 2)
    explicit = _cocoeval_of(gt, dets, [ids[j] for j in twice])  # COCO AP itself is invariant to this
    fast = _Reaccumulate(_base_eval(gt, dets, ids))(twice)
    for ev in (explicit, fast):
        stats = dict(zip(METRICS, ev.stats, strict=True))
        for metric in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert stats[metric] == pytest.approx(once[metric], abs=1e-12), metric


def test_identical_detections_give_a_zero_width_interval(gt) -> None:
    dets = _detections(gt, 0.1, seed=6)
    out = paired_bootstrap(gt, dets, list(dets), metrics=["AP", "critical_mAP"], critical_ids=PERSON, reps=20)
    for row in out.values():
        assert row["diff"] == row["lo"] == row["hi"] == 0.0
        assert row["p_positive"] == 0.0 and row["reps"] == 20


def test_strictly_better_detections_give_an_interval_above_zero(gt) -> None:
    jittered, perfect = _detections(gt, 0.2, seed=7), _gt_detections(gt)
    names = [c["name"] for c in CATEGORIES[:2]]
    out = paired_bootstrap(gt, jittered, perfect, metrics={"AP": "AP", "AP50": "AP50", "person": category_mean(names)},
                           reps=30)
    for row in out.values():
        assert row["b"] == pytest.approx(1.0) and 0 < row["lo"] <= row["diff"] <= row["hi"]
        assert row["p_positive"] == 1.0
    reverse = paired_bootstrap(gt, perfect, jittered, reps=30)["AP"]
    assert reverse["hi"] < 0 and reverse["diff"] == pytest.approx(-out["AP"]["diff"], abs=1e-15)


def test_interval_matches_brute_force_replicates(gt) -> None:
    a, b = _detections(gt, 0.1, seed=8), _detections(gt, 0.05, seed=9)
    ids = sorted(gt.getImgIds())
    reps, seed = 6, 11
    draws = np.random.default_rng(seed).integers(0, len(ids), (reps, len(ids)))
    diffs = []
    for draw in draws:
        values = []
        for dets in (a, b):
            replica, replica_dets = resample(gt, dets, [ids[j] for j in draw])
            values.append(evaluate(replica, replica_dets, PERSON)["critical_mAP"])
        diffs.append(values[1] - values[0])
    out = paired_bootstrap(gt, a, b, ids, ["critical_mAP"], PERSON, reps=reps, seed=seed, level=0.8)["critical_mAP"]
    lo, hi = np.percentile(diffs, [10, 90])
    assert out["lo"] == pytest.approx(lo, abs=1e-12) and out["hi"] == pytest.approx(hi, abs=1e-12)
    assert out["p_positive"] == pytest.approx(np.mean(np.array(diffs) > 0))
    again = paired_bootstrap(gt, a, b, ids, ["critical_mAP"], PERSON, reps=reps, seed=seed, level=0.8)
    assert again["critical_mAP"] == out


def test_replicates_without_the_metric_are_left_out() -> None:
    gt = _ground_truth(images=4, seed=12)
    first = gt.dataset["images"][0]["id"]
    for ann in gt.dataset["annotations"]:  # person ground truth only in the first image
        ann["category_id"] = 1 if ann["image_id"] == first else 3
        ann["iscrowd"] = 0
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    assert first in {a["image_id"] for a in gt.dataset["annotations"]}
    dets = _detections(gt, 0.1, seed=13)
    out = paired_bootstrap(gt, dets, _gt_detections(gt), metrics=["critical_mAP"], critical_ids=PERSON, reps=40)
    assert 0 < out["critical_mAP"]["reps"] < 40


def test_bad_input_is_one_clear_error(gt) -> None:
    dets = _detections(gt, 0.1, seed=14)
    with pytest.raises(InputError, match="unknown metric 'mAP'"):
        paired_bootstrap(gt, dets, dets, metrics=["mAP"])
    with pytest.raises(InputError, match=r"image ids \[99999\] are not in the ground truth"):
        paired_bootstrap(gt, dets, dets, image_ids=[3, 99999])
    with pytest.raises(InputError, match="reps is 0"):
        paired_bootstrap(gt, dets, dets, reps=0)
    with pytest.raises(InputError, match="needs critical_ids"):
        paired_bootstrap(gt, dets, dets, metrics=["critical_mAP"])
    with pytest.raises(InputError, match="level is 95"):
        paired_bootstrap(gt, dets, dets, level=95)
    with pytest.raises(InputError, match=r"categories \['truck'\] are not in the ground truth"):
        paired_bootstrap(gt, dets, dets, metrics={"x": category_mean(["truck"])}, reps=1)
    with pytest.raises(InputError, match=r"image ids \[4\] are not in the ground truth"):
        resample(gt, dets, [3, 4])
    a = bootstrap_metrics(gt, dets, reps=3, seed=0)
    with pytest.raises(InputError, match="drawn differently"):
        compare(a, bootstrap_metrics(gt, dets, reps=3, seed=1))
