"""fxq.trace: traced equals eager, node annotations, untraceable code and bad input."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxq
from fxq.models import build

SIZES = [(512, 512), (640, 800)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detr_r50", "detr_r101", "deformable_detr_r50"])
def test_traced_equals_eager_at_two_sizes(name):
    """A graph traced at 512x512 matches eager there and at 640x800 (batch 2, random weights)."""
    model = build(name)
    gm = fxq.trace(model, torch.randn(1, 3, *SIZES[0]))
    with torch.no_grad():
        for size in SIZES:
            x = torch.randn(2, 3, *size)
            assert _max_diff(gm(x), model(x)) <= 1e-5, (name, size)


@pytest.mark.parametrize("name", ["detr_tiny", "deformable_detr_tiny"])
def test_traced_with_mask_equals_eager(name):
    model = build(name)
    images = torch.randn(2, 3, 128, 160)
    mask = torch.zeros(2, 128, 160, dtype=torch.bool)
    mask[1, :, 96:] = True
    mask[1, 100:, :] = True
    gm = fxq.trace(model, (images, mask), aux=True)
    with torch.no_grad():
        eager, traced = model(images, mask), gm(images, mask)
    assert _max_diff(traced, eager) <= 1e-5
    assert len(traced["aux_outputs"]) == len(eager["aux_outputs"]) > 0
    for a, b in zip(traced["aux_outputs"], eager["aux_outputs"], strict=True):
        assert _max_diff(a, b) <= 1e-5


def test_aux_outputs_only_on_request():
    model = build("detr_tiny")
    gm = fxq.trace(model, torch.randn(1, 3, 64, 64))
    assert set(gm(torch.randn(1, 3, 64, 64))) == {"pred_logits", "pred_boxes"}
    assert model.aux_loss, "tracing must not change the model"


@pytest.fixture(scope="module")
def detr_r50_graph():
    model = build("detr_r50")
    return model, fxq.trace(model, torch.randn(1, 3, 512, 512))


def test_every_node_is_annotated(detr_r50_graph):
    _, gm = detr_r50_graph
    for node in gm.graph.nodes:
        for key in ("fxq.module", "fxq.role", "fxq.shape", "fxq.params", "fxq.macs"):
            assert key in node.meta, (node.name, key)
    roles = collections.Counter(n.meta["fxq.role"] for n in gm.graph.nodes)
    # 6 encoder self-attn + 6 decoder self-attn + 6 decoder cross-attn, each as primitives.
    assert roles["attn_qk"] == roles["attn_av"] == roles["softmax"] == 18
    assert roles["conv"] == 53 + 1  # ResNet-50 convolutions + input_proj
    qkv = [n for n in gm.graph.nodes if n.meta["fxq.module"] == "transformer.encoder.layers.0.self_attn"
           and n.meta["fxq.role"] == "linear"]
    assert [n.meta["fxq.weight"] for n in qkv] == [
        f"transformer.encoder.layers.0.self_attn.in_proj_weight[{a}:{b}]" for a, b in ((0, 256), (256, 512),
                                                                                       (512, 768))]


def test_params_and_macs_against_independent_counts(detr_r50_graph):
    model, gm = detr_r50_graph
    assert sum(n.meta["fxq.params"] for n in gm.graph.nodes) == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 512, 512))
    assert sum(n.meta["fxq.macs"] for n in gm.graph.nodes) == counter.get_total_flops() // 2
    assert abs(sum(n.meta["fxq.macs"] for n in gm.graph.nodes) / 1e9 - 24.97) < 0.01  # official count


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # the line the error must show
            return self.conv(x)
        return x


class _Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.gate = _DataDependent()

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        return {"pred_logits": self.gate(self.stem(images))}


def test_untraceable_module_is_named_with_its_source_line():
    with pytest.raises(fxq.TraceError) as err:
        fxq.trace(_Detector(), torch.randn(1, 3, 8, 8))
    message = str(err.value)
    assert "'gate'" in message and "_DataDependent" in message
    assert "if x.mean() > 0:" in message and "test_tracing.py" in message
    assert "leaf_modules=['gate']" in message


def test_declared_leaf_traces():
    model = _Detector()
    gm = fxq.trace(model, torch.randn(1, 3, 8, 8), leaf_modules=["gate"])
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(gm(x)["pred_logits"], model(x)["pred_logits"])
    assert any(n.op == "call_module" and n.target == "gate" for n in gm.graph.nodes)


@pytest.mark.parametrize("bad,needle", [
    (torch.randn(3, 64, 64), "rank 4"),
    (torch.randn(1, 1, 64, 64), "3 (RGB) channels"),
    (torch.randn(1, 4, 64, 64), "3 (RGB) channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating point"),
    ((torch.randn(1, 3, 64, 64), torch.zeros(1, 32, 32, dtype=torch.bool)), "mask must be a bool tensor"),
])
def test_bad_images_raise_one_clear_error(bad, needle):
    with pytest.raises(fxq.InputError) as err:
        fxq.trace(build("detr_tiny"), bad)
    assert needle in str(err.value)
