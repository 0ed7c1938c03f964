"""Property tests (hypothesis): box operations against float64 brute force, the detection transforms' geometry,
and the allocation MILP against enumeration of every choice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fxq.data.transforms import crop, hflip, resize, resized_shape
from fxq.objectives.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

side = st.floats(0.01, 1.0)
corner = st.floats(0.0, 1.0)
box = st.tuples(corner, corner, side, side).map(lambda b: (b[0], b[1], b[0] + b[2], b[1] + b[3]))
boxes = st.lists(box, min_size=1, max_size=5)


def iou_giou_64(a, b) -> tuple[float, float]:
    """IoU and generalized IoU of two (x0, y0, x1, y1) boxes, in float64, from the definitions."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


@SETTINGS
@given(boxes, boxes)
def test_iou_and_giou_equal_their_float64_definitions(first, second):
    a, b = torch.tensor(first, dtype=torch.float32), torch.tensor(second, dtype=torch.float32)
    iou, _ = box_iou(a, b)
    giou = generalized_box_iou(a, b)
    want = np.array([[iou_giou_64(x, y) for y in second] for x in first])
    np.testing.assert_allclose(iou.numpy(), want[..., 0], atol=2e-5)
    np.testing.assert_allclose(giou.numpy(), want[..., 1], atol=2e-5)
    assert torch.all(giou <= iou + 1e-6) and torch.all(giou >= -1 - 1e-6)
    pairs = min(len(first), len(second))
    np.testing.assert_allclose(elementwise_generalized_box_iou(a[:pairs], b[:pairs]).numpy(),
                               np.diagonal(want[..., 1])[:pairs], atol=2e-5)


@SETTINGS
@given(boxes)
def test_a_box_has_iou_one_with_itself_and_the_formats_round_trip(first):
    a = torch.tensor(first, dtype=torch.float64)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(a)), a)
    iou, _ = box_iou(a, a)
    torch.testing.assert_close(torch.diagonal(iou), torch.ones(len(first), dtype=torch.float64))


@SETTINGS
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(32, 1000), st.one_of(st.none(), st.integers(0, 3000)))
def test_resized_shape_keeps_the_aspect_and_never_passes_max_size(width, height, size, extra):
    max_size = None if extra is None else size + extra
    h, w = resized_shape(width, height, size, max_size)
    if max_size is not None:
        assert max(h, w) <= max_size
    short, long = (h, w) if height <= width else (w, h)
    if max_size is None or max(width, height) / min(width, height) * size <= max_size:
        assert short == size
    # truncation of the longer side: within one pixel of the exact proportion
    assert abs(long - short * max(width, height) / min(width, height)) < 1 + max(width, height) / min(width, height)


image_size = st.tuples(st.integers(8, 64), st.integers(8, 64))


@st.composite
def image_and_boxes(draw):
    w, h = draw(image_size)
    n = draw(st.integers(0, 4))
    out = []
    for _ in range(n):
        x0, y0 = draw(st.floats(0, w - 1)), draw(st.floats(0, h - 1))
        out.append((x0, y0, draw(st.floats(x0 + 0.5, w)), draw(st.floats(y0 + 0.5, h))))
    return w, h, torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def target_of(b: torch.Tensor) -> dict:
    wh = b[:, 2:] - b[:, :2]
    return {"boxes": b, "labels": torch.arange(len(b)), "area": wh[:, 0] * wh[:, 1],
            "iscrowd": torch.zeros(len(b), dtype=torch.int64)}


@SETTINGS
@given(image_and_boxes())
def test_flipping_twice_is_the_identity(sample):
    w, h, b = sample
    image = Image.new("RGB", (w, h))
    once_image, once = hflip(image, target_of(b))
    assert torch.all(once["boxes"][:, 0] <= once["boxes"][:, 2])
    _, twice = hflip(once_image, once)
    torch.testing.assert_close(twice["boxes"], b)


@SETTINGS
@given(image_and_boxes(), st.data())
def test_crop_keeps_exactly_the_intersections_of_the_boxes_with_the_window(sample, data):
    w, h, b = sample
    cw, ch = data.draw(st.integers(1, w)), data.draw(st.integers(1, h))
    left, top = data.draw(st.integers(0, w - cw)), data.draw(st.integers(0, h - ch))
    image, out = crop(Image.new("RGB", (w, h)), target_of(b), top, left, ch, cw)
    assert image.size == (cw, ch)
    expected, labels = [], []
    for i, (x0, y0, x1, y1) in enumerate(b.double().tolist()):
        ix0, iy0 = max(x0, left) - left, max(y0, top) - top
        ix1, iy1 = min(x1, left + cw) - left, min(y1, top + ch) - top
        if ix1 > ix0 and iy1 > iy0:
            expected.append((ix0, iy0, ix1, iy1))
            labels.append(i)
    assert out["labels"].tolist() == labels
    torch.testing.assert_close(out["boxes"], torch.tensor(expected, dtype=torch.float32).reshape(-1, 4),
                               atol=1e-4, rtol=0)
    wh = out["boxes"][:, 2:] - out["boxes"][:, :2]
    torch.testing.assert_close(out["area"], wh[:, 0] * wh[:, 1])


@SETTINGS
@given(image_and_boxes(), st.integers(32, 200), st.integers(0, 200))
def test_resize_scales_the_boxes_with_the_image(sample, size, extra):
    w, h, b = sample
    image, out = resize(Image.new("RGB", (w, h)), target_of(b), size, size + extra)
    scale = torch.tensor([image.width / w, image.height / h] * 2)
    torch.testing.assert_close(out["boxes"], b * scale)
    assert max(image.size) <= size + extra
    assert out["size"].tolist() == [image.height, image.width]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_the_allocation_milp_finds_the_optimum_of_every_small_instance(data):
    from fxq.errors import InputError
    from fxq.passes.allocate import solve_mckp

    groups, choices = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    ints = st.integers(0, 20)
    cost = np.array(data.draw(st.lists(st.lists(ints, min_size=choices, max_size=choices), min_size=groups,
                                       max_size=groups)), dtype=float)
    resource = np.array(data.draw(st.lists(st.lists(ints, min_size=choices, max_size=choices), min_size=groups,
                                           max_size=groups)), dtype=float)
    floor, top = resource.min(axis=1).sum(), resource.max(axis=1).sum()
    capacity = float(data.draw(st.integers(int(floor) - 2, int(top) + 1)))
    feasible = [c for c in itertools.product(range(choices), repeat=groups)
                if resource[np.arange(groups), c].sum() <= capacity]
    if not feasible:
        with pytest.raises(InputError, match="infeasible"):
            solve_mckp(cost, resource, capacity)
        return
    best = min(cost[np.arange(groups), c].sum() for c in feasible)
    choice = solve_mckp(cost, resource, capacity)
    assert resource[np.arange(groups), choice].sum() <= capacity
    assert cost[np.arange(groups), choice].sum() == best
