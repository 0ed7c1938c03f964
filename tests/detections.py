"""Shared check for ORT-vs-PyTorch parity tests: the same top-k detections after post-processing."""

from __future__ import annotations

import torch

TOP_K, BOX_PX, SCORE_TOL = 10, 1.5, 3e-3


def _top(result: dict[str, torch.Tensor], k: int):
    order = result["scores"].argsort(descending=True)[:k]
    return result["scores"][order], result["labels"][order], result["boxes"][order]


def assert_same_detections(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Top-k detections agree: each reference detection has an ORT one with the same label, a box within
    BOX_PX pixels and a score within SCORE_TOL; only near-ties at the top-k boundary may swap."""
    r_scores, r_labels, r_boxes = _top(ref, TOP_K)
    g_scores, g_labels, g_boxes = _top(got, TOP_K)
    used: set[int] = set()
    for score, label, box in zip(r_scores, r_labels, r_boxes, strict=True):
        close = [j for j in range(len(g_scores)) if j not in used and g_labels[j] == label
                 and (g_boxes[j] - box).abs().max() <= BOX_PX]
        if not close:
            assert score - r_scores[-1] <= SCORE_TOL, "a confident detection has no ORT counterpart"
            continue
        j = min(close, key=lambda c: abs(g_scores[c] - score))
        used.add(j)
        assert abs(g_scores[j] - score) <= SCORE_TOL
