"""Paired bootstrap over images for differences of COCO box metrics between two detection lists.

A replicate draws ``n`` of the ``n`` evaluated images with replacement, the same draw for both lists (paired).
It stands for the ground truth :func:`resample` builds: every drawn copy is a distinct image (ids 1..n in draw
order, its annotations copied under new ids) and both detection lists follow their images. COCOeval's
per-image matching of a copy only depends on that image's annotations and detections, so each list is matched
once (on the identity draw) and a replicate re-runs pycocotools' ``accumulate``/``summarize`` on the drawn
copies' per-image results, in draw order; ``tests/test_bootstrap.py`` checks that this equals COCOeval run on
:func:`resample`'s ground truth, number for number.

:func:`bootstrap_metrics` gives one list's replicate values; the draws depend only on the image ids, the number
of replicates and the seed, so any two lists' results pair up (:func:`compare`) without re-evaluating either;
:func:`paired_bootstrap` does both for two lists.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fxq.data.coco import load_coco
from fxq.errors import InputError
from fxq.evaluation.coco_eval import (
    METRICS,
    Detections,
    GroundTruth,
    _check_critical,
    _check_detections,
    _load_detections,
    _mean_ap,
    _per_category_ap,
    _results_coco,
    _run_cocoeval,
)

#: Metric names :func:`paired_bootstrap` knows (besides callables).
METRIC_NAMES = (*METRICS, "critical_mAP", "rest_mAP")

MetricFn = Callable[[Mapping], float | None]


def paired_bootstrap(
    gt: GroundTruth,
    dets_a: Detections,
    dets_b: Detections,
    image_ids: Iterable[int] | None = None,
    metrics: Sequence[str] | Mapping[str, str | MetricFn] = ("AP",),
    critical_ids: Iterable[int] | None = None,
    reps: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict]:
    """Per metric: ``a`` and ``b`` (the metric of each list on ``image_ids``), ``diff`` = b − a, the
    percentile interval ``lo``, ``hi`` at ``level`` of the paired-bootstrap distribution of the difference,
    ``p_positive`` (the fraction of replicates with b − a > 0), ``reps`` (replicates where the metric is
    defined for both) and ``level``. The arguments are those of :func:`bootstrap_metrics`."""
    _check_level(level)
    a, b = (bootstrap_metrics(gt, d, image_ids, metrics, critical_ids, reps, seed) for d in (dets_a, dets_b))
    return compare(a, b, level)


def bootstrap_metrics(
    gt: GroundTruth,
    detections: Detections,
    image_ids: Iterable[int] | None = None,
    metrics: Sequence[str] | Mapping[str, str | MetricFn] = ("AP",),
    critical_ids: Iterable[int] | None = None,
    reps: int = 200,
    seed: int = 0,
) -> dict:
    """``point`` (metric -> value of ``detections`` on ``image_ids``, :func:`fxq.evaluation.evaluate`'s
    numbers) and ``replicates`` (metric -> ``reps`` values, NaN where undefined), plus the ``images``,
    ``reps`` and ``seed`` that fix the draws: two results with the same ones are paired (:func:`compare`).

    ``metrics`` are names from :data:`METRIC_NAMES` or a mapping of output names to names or callables; a
    callable gets a replicate's summary (the METRICS keys, ``critical_mAP``, ``rest_mAP`` and
    ``per_category`` name -> AP, -1 without ground truth, as :func:`fxq.evaluation.evaluate`) and returns a
    number (None or < 0: undefined). ``image_ids`` default to all images of ``gt``. Replicate r is
    :func:`resample` of the sorted image ids at positions ``numpy.random.default_rng(seed).integers(0, n,
    (reps, n))[r]`` (n images).
    """
    coco = gt if isinstance(gt, COCO) else load_coco(gt)
    critical = _check_critical(coco, critical_ids)
    fns = _metric_fns(metrics, critical)
    images = sorted(coco.getImgIds()) if image_ids is None else sorted({int(i) for i in image_ids})
    if not images:
        raise InputError("no images to resample: pass a non-empty image_ids (or a ground truth with images)")
    if isinstance(reps, bool) or int(reps) != reps or reps < 1:
        raise InputError(f"reps is {reps!r}: the bootstrap needs a whole number of replicates, at least 1")
    dets = _load_detections(detections)
    _check_detections(coco, dets, images)
    base = _base_eval(coco, dets, images)
    point = _metric_values(coco, base, critical, fns)
    for name, value in point.items():
        if not _defined(value):
            raise InputError(f"metric {name!r} is undefined on these images (no ground truth it counts): "
                             "choose another metric or images that have such ground truth")
    again = _Reaccumulate(base)
    draws = np.random.default_rng(seed).integers(0, len(images), size=(int(reps), len(images)))
    values = [_metric_values(coco, again(draw), critical, fns) for draw in draws]
    replicates = {name: np.array([v[name] if _defined(v[name]) else np.nan for v in values]) for name in fns}
    return {"point": point, "replicates": replicates, "images": images, "reps": int(reps), "seed": seed}


def compare(a: Mapping, b: Mapping, level: float = 0.95) -> dict[str, dict]:
    """The paired differences b − a of two :func:`bootstrap_metrics` results with the same draws, per metric
    of both, as :func:`paired_bootstrap` returns them."""
    _check_level(level)
    if (a["images"], a["reps"], a["seed"]) != (b["images"], b["reps"], b["seed"]):
        raise InputError("the two bootstrap results were drawn differently: compute both with the same ground "
                         "truth, image_ids, reps and seed")
    names = [name for name in a["point"] if name in b["point"]]
    if not names:
        raise InputError("the two bootstrap results share no metric: compute both with the same metrics")
    out = {}
    for name in names:
        diffs = b["replicates"][name] - a["replicates"][name]
        out[name] = _interval(a["point"][name], b["point"][name], diffs[~np.isnan(diffs)], level)
    return out


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise InputError(f"level is {level!r}: pass the interval's coverage in (0, 1), e.g. 0.95")


def category_mean(names: Iterable[str]) -> MetricFn:
    """A metric for :func:`bootstrap_metrics`: the mean AP over the named categories that have ground truth."""
    chosen = list(names)
    if not chosen:
        raise InputError("category_mean needs at least one category name")

    def mean_ap(summary: Mapping) -> float | None:
        unknown = [n for n in chosen if n not in summary["per_category"]]
        if unknown:
            raise InputError(f"categories {unknown} are not in the ground truth: use its category names")
        values = [summary["per_category"][n] for n in chosen if summary["per_category"][n] >= 0]
        return float(np.mean(values)) if values else None

    return mean_ap


def resample(gt: COCO, detections: Sequence[dict], draw: Sequence[int]) -> tuple[COCO, list[dict]]:
    """The ground truth and detections of a draw (original image ids, repeats allowed): copy t of the draw
    is image t + 1, with its annotations (new ids 1..) and its detections (in their original order)."""
    unknown = sorted({int(i) for i in draw} - set(gt.imgs))
    if unknown:
        raise InputError(f"image ids {unknown[:5]} are not in the ground truth: draw ids from its 'images'")
    by_image: dict[int, list[dict]] = {}
    for det in detections:
        by_image.setdefault(det["image_id"], []).append(det)
    images, anns, dets = [], [], []
    for t, image_id in enumerate(draw):
        new_id = t + 1
        images.append({**gt.imgs[image_id], "id": new_id})
        for ann in gt.imgToAnns.get(image_id, []):
            anns.append({**copy.deepcopy(ann), "id": len(anns) + 1, "image_id": new_id})
        dets += [{**det, "image_id": new_id} for det in by_image.get(image_id, [])]
    replica = COCO()
    replica.dataset = {"images": images, "annotations": anns, "categories": copy.deepcopy(gt.dataset["categories"])}
    with contextlib.redirect_stdout(io.StringIO()):
        replica.createIndex()
    return replica, dets


def _metric_fns(metrics: Sequence[str] | Mapping[str, str | MetricFn], critical: set[int] | None
                ) -> dict[str, MetricFn]:
    items = metrics.items() if isinstance(metrics, Mapping) else [(m, m) for m in metrics]
    fns: dict[str, MetricFn] = {}
    for out, metric in items:
        if callable(metric):
            fns[str(out)] = metric
            continue
        if metric not in METRIC_NAMES:
            raise InputError(f"unknown metric {metric!r}: use one of {list(METRIC_NAMES)} or a callable")
        if metric in ("critical_mAP", "rest_mAP") and critical is None:
            raise InputError(f"metric {metric!r} needs critical_ids: pass the critical category ids")
        fns[str(out)] = lambda summary, key=metric: summary[key]
    if not fns:
        raise InputError("no metrics asked for: pass names such as ('AP', 'AP50') or callables")
    return fns


def _base_eval(gt: COCO, dets: list[dict], images: list[int]) -> COCOeval:
    """COCOeval of the identity draw; its per-image results are what replicates re-accumulate."""
    replica, replica_dets = resample(gt, dets, images)
    return _run_cocoeval(replica, _results_coco(replica, replica_dets), list(range(1, len(images) + 1)))


class _Reaccumulate:
    """pycocotools' ``accumulate`` of a base COCOeval's per-image results re-drawn in a given order, vectorised:
    per (category, area, maxDets) the images' detections are concatenated in draw order, stably sorted by
    score and turned into the same interpolated precision and recall as ``COCOeval.accumulate``."""

    def __init__(self, base: COCOeval) -> None:
        p = base.params
        self.base, self.n = base, len(p.imgIds)
        self.shape = (len(p.iouThrs), len(p.recThrs), len(p.catIds), len(p.areaRng), len(p.maxDets))
        self.rec_thrs = p.recThrs
        self.blocks = {(k, a, m): self._block(k * self.shape[3] + a, max_det)
                       for k in range(self.shape[2]) for a in range(self.shape[3])
                       for m, max_det in enumerate(p.maxDets)}

    def _block(self, block: int, max_det: int) -> dict | None:
        entries = self.base.evalImgs[block * self.n : (block + 1) * self.n]
        npig = np.array([0 if e is None else int(np.count_nonzero(e["gtIgnore"] == 0)) for e in entries])
        if not npig.any():
            return None
        t = self.shape[0]
        found = [e for e in entries if e is not None]
        lengths = np.array([0 if e is None else len(e["dtScores"][:max_det]) for e in entries])
        match = np.concatenate([np.zeros((t, 0), bool)] + [e["dtMatches"][:, :max_det] != 0 for e in found], 1)
        ignore = np.concatenate([np.zeros((t, 0), bool)] + [e["dtIgnore"][:, :max_det] != 0 for e in found], 1)
        scores = np.concatenate([np.zeros(0)] + [np.asarray(e["dtScores"][:max_det], float) for e in found])
        return {"npig": npig, "lengths": lengths, "starts": np.cumsum(lengths) - lengths, "scores": scores,
                "tp": match & ~ignore, "fp": ~match & ~ignore}

    def __call__(self, draw: np.ndarray) -> COCOeval:
        """A COCOeval whose ``eval`` and ``stats`` are those of COCOeval on :func:`resample` of ``draw``
        (positions into the base's images)."""
        precision, recall = -np.ones(self.shape), -np.ones(self.shape[:1] + self.shape[2:])
        for (k, a, m), block in self.blocks.items():
            if block is None or not block["npig"][draw].sum():
                continue
            q, r = self._curve(block, draw)
            precision[:, :, k, a, m], recall[:, k, a, m] = q, r
        ev = copy.copy(self.base)
        ev.eval = {"params": ev.params, "counts": list(self.shape), "precision": precision, "recall": recall}
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        return ev

    def _curve(self, block: dict, draw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lengths = block["lengths"][draw]
        offsets = np.repeat(block["starts"][draw] - (np.cumsum(lengths) - lengths), lengths)
        index = np.arange(int(lengths.sum())) + offsets
        order = index[np.argsort(-block["scores"][index], kind="mergesort")]
        tp = np.cumsum(block["tp"][:, order], axis=1).astype(float)
        fp = np.cumsum(block["fp"][:, order], axis=1).astype(float)
        nd, npig = len(order), int(block["npig"][draw].sum())
        if not nd:
            return np.zeros(self.shape[:2]), np.zeros(self.shape[0])
        rc = tp / npig
        pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
        q = np.zeros(self.shape[:2])
        for t in range(self.shape[0]):
            inds = np.searchsorted(rc[t], self.rec_thrs, side="left")
            inside = inds < nd
            q[t, inside] = pr[t, inds[inside]]
        return q, rc[:, -1]


def _metric_values(gt: COCO, ev: COCOeval, critical: set[int] | None, fns: Mapping[str, MetricFn]) -> dict:
    summary = _summary(gt, ev, critical)
    return {name: fn(summary) for name, fn in fns.items()}


def _summary(gt: COCO, ev: COCOeval, critical: set[int] | None) -> dict:
    per_id = _per_category_ap(ev)
    out: dict = {name: float(v) for name, v in zip(METRICS, ev.stats, strict=True)}
    out["per_category"] = {gt.cats[cid]["name"]: ap for cid, ap in per_id.items()}
    out["critical_mAP"] = _mean_ap(per_id, critical, inside=True)
    out["rest_mAP"] = _mean_ap(per_id, critical, inside=False)
    return out


def _defined(value: float | None) -> bool:
    return value is not None and value >= 0


def _interval(a: float, b: float, diffs: np.ndarray, level: float) -> dict:
    out = {"a": float(a), "b": float(b), "diff": float(b - a), "lo": None, "hi": None, "p_positive": None,
           "reps": len(diffs), "level": level}
    if len(diffs):
        lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
        out.update(lo=float(lo), hi=float(hi), p_positive=float(np.mean(diffs > 0)))
    return out
