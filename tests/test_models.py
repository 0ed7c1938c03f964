"""The zoo's models against the official layouts and independent references."""

from __future__ import annotations

import pytest
import torch
from conftest import reference_layout
from torch import nn

import fxq
from fxq.models import build
from fxq.models.attention import MultiheadAttention
from fxq.models.resnet import FrozenBatchNorm2d, ResNetBody


def _layout(model: nn.Module) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", ["detr_r50", "detr_r50_dc5", "detr_r101"])
def test_detr_state_dict_equals_official_layout(name):
    ref = reference_layout(name)
    with torch.device("meta"):
        model = build(name)
    assert _layout(model) == ref["keys"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]


def test_attention_equals_torch_multihead_attention():
    ours = MultiheadAttention(64, 4).eval()
    nn.init.normal_(ours.in_proj_bias)
    nn.init.normal_(ours.out_proj.bias)
    ref = nn.MultiheadAttention(64, 4).eval()
    ref.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(7, 3, 64), torch.randn(11, 3, 64), torch.randn(11, 3, 64)
    mask = torch.zeros(3, 11, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad():
        expected = ref(q, k, v, key_padding_mask=mask, need_weights=False)[0]
        assert torch.allclose(ours(q, k, v, mask), expected, atol=1e-6)
        assert torch.allclose(ours(q, k, v), ref(q, k, v, need_weights=False)[0], atol=1e-6)


def test_frozen_batchnorm_equals_eval_batchnorm():
    bn = nn.BatchNorm2d(8).eval()
    for t in (bn.weight, bn.bias, bn.running_mean):
        nn.init.normal_(t)
    bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-6)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnet_strides_and_channels(name, channels):
    body = ResNetBody(name, ("layer2", "layer3", "layer4"), base_width=8 if name == "resnet50" else 16)
    feats = body(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 12), (4, 6), (2, 3)]
    assert feats[-1].shape[1] == channels // (8 if name == "resnet50" else 4)


def test_dilated_last_stage_keeps_stride_16():
    plain = ResNetBody("resnet18", base_width=8)
    dc5 = ResNetBody("resnet18", dilation=True, base_width=8)
    dc5.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert plain(x)[0].shape[-2:] == (2, 2)
    assert dc5(x)[0].shape[-2:] == (4, 4)
    assert dc5.layer4[1].conv1.dilation == (2, 2)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_detr_outputs_and_aux(head):
    model = build("detr_tiny", pretrained=False, head=head)
    out = model(torch.randn(2, 3, 96, 128))
    q, k = model.num_queries, model.num_classes + (head == "softmax")
    assert model.head == head
    assert out["pred_logits"].shape == (2, q, k) and out["pred_boxes"].shape == (2, q, 4)
    assert len(out["aux_outputs"]) == len(model.transformer.decoder.layers) - 1
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()


def test_sigmoid_head_starts_at_the_focal_prior():
    """The sigmoid head's bias starts every class at probability 0.01, as the focal loss assumes."""
    model = build("detr_tiny", pretrained=False, head="sigmoid")
    assert torch.allclose(model.class_embed.bias.sigmoid(), torch.full_like(model.class_embed.bias, 0.01))


def test_unknown_head_is_one_error():
    with pytest.raises(fxq.InputError, match="unknown head 'softmax2'"):
        build("detr_tiny", pretrained=False, head="softmax2")


def test_no_mask_equals_all_false_mask():
    """mask=None (shape-only positional encoding, no masking ops) equals an explicit all-valid mask."""
    model = build("detr_tiny")
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        a = model(images)
        b = model(images, torch.zeros(2, 96, 128, dtype=torch.bool))
    assert torch.allclose(a["pred_logits"], b["pred_logits"], atol=1e-5)
    assert torch.allclose(a["pred_boxes"], b["pred_boxes"], atol=1e-6)


def _same_outputs(a: dict, b: dict) -> bool:
    keys = ("pred_logits", "pred_boxes")
    return all(torch.allclose(a[k], b[k], atol=1e-5) for k in keys) and all(
        torch.allclose(x[k], y[k], atol=1e-5) for x, y in zip(a["aux_outputs"], b["aux_outputs"], strict=True)
        for k in keys)


def test_query_groups_decode_independently_and_only_the_first_runs_in_eval():
    """Each group of Group DETR equals a group-free DETR whose queries are that group's (same seed, same other
    weights): no group sees another; eval mode runs the first group alone."""
    grouped = build("detr_tiny", seed=3, query_groups=3, dropout=0.0).train()
    plain = build("detr_tiny", seed=3, dropout=0.0).train()
    shared = {k: v for k, v in grouped.state_dict().items() if not k.startswith("group_query_embed.")}
    assert all(torch.equal(v, shared[k]) for k, v in plain.state_dict().items())
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = grouped(images)
        assert len(out["group_outputs"]) == 2
        assert _same_outputs(out, plain(images))
        extra = grouped.group_query_embed.weight.reshape(2, plain.num_queries, -1)
        for group, queries in zip(out["group_outputs"], extra, strict=True):
            plain.query_embed.weight.copy_(queries)
            assert _same_outputs(group, plain(images))
        plain.load_state_dict(shared)
        grouped.eval(), plain.eval()
        evaluated = grouped(images)
        assert "group_outputs" not in evaluated and _same_outputs(evaluated, plain(images))
