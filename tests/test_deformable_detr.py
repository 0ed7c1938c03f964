"""Deformable DETR: official layout, FX tracing at other sizes and with masks, deformable-attention numerics, MACs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from fxq.errors import InputError
from fxq.models.deformable_detr import DeformableDETR
from fxq.models.ms_deform_attn import MSDeformAttn, direction_grid, ms_deform_attn_core

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "reference"
TINY = dict(backbone_name="resnet18", base_width=16, hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
            dim_feedforward=128, num_queries=50, num_classes=21, num_feature_levels=3)


def _layout(model: torch.nn.Module) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every non-backbone parameter off its (often zero or constant) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone"):
                std = 0.1 if "sampling_offsets" in name else 0.02
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def _tiny(seed: int = 0, **overrides) -> DeformableDETR:
    torch.manual_seed(seed)
    return _perturb(DeformableDETR(**{**TINY, **overrides}), seed).eval()


def _padded_batch(batch: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images; image i > 0 is padded (zeros) to the right and bottom, as DETR's collate does."""
    images = torch.randn(batch, 3, height, width)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(1, batch):
        h, w = height - 24 * i, width - 40 * i
        mask[i, h:, :] = True
        mask[i, :, w:] = True
    return images.masked_fill(mask[:, None], 0.0), mask


def _max_diff(a: dict, b: dict) -> float:
    diffs = [(a[k] - b[k]).abs().max().item() for k in ("pred_logits", "pred_boxes")]
    for aux_a, aux_b in zip(a.get("aux_outputs", []), b.get("aux_outputs", []), strict=True):
        diffs.append(_max_diff(aux_a, aux_b))
    return max(diffs)


# ---------------------------------------------------------------- official layout


@pytest.mark.parametrize(("refine", "two_stage", "name"), [(False, False, "deformable_detr_r50"),
                                                           (True, False, "deformable_detr_r50_box_refine"),
                                                           (True, True, "deformable_detr_r50_two_stage")])
def test_state_dict_matches_official(refine: bool, two_stage: bool, name: str) -> None:
    reference = json.loads((REFERENCE / f"{name}.state_dict.json").read_text())
    model = DeformableDETR(with_box_refine=refine, two_stage=two_stage)
    assert _layout(model) == reference["keys"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]
    model.load_state_dict(model.state_dict(), strict=True)  # repeated keys of the shared heads load too


def test_official_head_initialisation() -> None:
    plain, refine = DeformableDETR(**TINY), DeformableDETR(**TINY, with_box_refine=True)
    prior = -math.log((1 - 0.01) / 0.01)
    assert all(m is plain.class_embed[0] for m in plain.class_embed)
    assert all(m is plain.bbox_embed[0] for m in plain.bbox_embed)
    assert plain.transformer.decoder.bbox_embed is None
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    assert refine.bbox_embed[0] is not refine.bbox_embed[1] and refine.class_embed[0] is not refine.class_embed[1]
    for model in (plain, refine):
        for head in model.class_embed:
            torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
        for head in model.bbox_embed:
            assert not head.layers[-1].weight.any()
        for proj in model.input_proj:
            assert not proj[0].bias.any()
        attn = model.transformer.encoder.layers[0].self_attn
        assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
        torch.testing.assert_close(attn.sampling_offsets.bias, direction_grid(4, 3, 4).flatten())
    torch.testing.assert_close(plain.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    torch.testing.assert_close(refine.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    assert not refine.bbox_embed[1].layers[-1].bias.any()
    assert refine.head == "sigmoid" and refine.num_classes == 21 and refine.aux_loss


def test_direction_grid_is_official() -> None:
    grid = direction_grid(8, 4, 4)
    assert grid.shape == (8, 4, 4, 2)
    torch.testing.assert_close(grid[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # head 0 points along +x
    torch.testing.assert_close(grid[2, 3, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)  # head 2 along +y
    torch.testing.assert_close(grid[1, 2, 0], torch.tensor([1.0, 1.0]))  # 45°: both coordinates scaled to 1


# ---------------------------------------------------------------- deformable attention numerics


def _bilinear(value: torch.Tensor, h: int, w: int, x: float, y: float) -> torch.Tensor:
    """Sample value [h·w, D] at normalised (x, y) with align_corners=False and zeros outside."""
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value.shape[-1], dtype=value.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * value[yy * w + xx]
    return out


def _reference_core(value, shapes, locations, weights) -> torch.Tensor:
    n_batch, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:level]) for level in range(n_levels)]
    out = torch.zeros(n_batch, n_queries, n_heads, head_dim, dtype=torch.float64)
    for n in range(n_batch):
        for q in range(n_queries):
            for m in range(n_heads):
                for level, (h, w) in enumerate(shapes):
                    level_value = value[n, starts[level]:starts[level] + h * w, m]
                    for p in range(n_points):
                        x, y = locations[n, q, m, level, p].tolist()
                        out[n, q, m] += weights[n, q, m, level, p] * _bilinear(level_value, h, w, x, y)
    return out.reshape(n_batch, n_queries, n_heads * head_dim)


def test_core_matches_per_point_bilinear_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 5)]
    value = torch.randn(2, 22, 2, 3, generator=gen, dtype=torch.float64)
    locations = torch.rand(2, 3, 2, 2, 2, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # some outside
    weights = torch.rand(2, 3, 2, 2, 2, generator=gen, dtype=torch.float64)
    out = ms_deform_attn_core(value, shapes, locations, weights)
    torch.testing.assert_close(out, _reference_core(value, shapes, locations, weights), rtol=0, atol=1e-12)


@pytest.mark.parametrize("box_reference", [False, True])
def test_msdeformattn_matches_reference(box_reference: bool) -> None:
    torch.manual_seed(0)
    shapes, n_points, d_model, n_heads = [(3, 4), (2, 5)], 2, 8, 2
    attn = _perturb(MSDeformAttn(d_model, n_levels=2, n_heads=n_heads, n_points=n_points)).double()
    query = torch.randn(2, 3, d_model, dtype=torch.float64)
    memory = torch.randn(2, 22, d_model, dtype=torch.float64)
    reference = torch.rand(2, 3, 2, 4 if box_reference else 2, dtype=torch.float64)
    mask = torch.zeros(2, 22, dtype=torch.bool)
    mask[1, 9:12] = True
    out = attn(query, reference, memory, shapes, mask, box_reference=box_reference)

    value = attn.value_proj(memory).masked_fill(mask[..., None], 0.0).reshape(2, 22, n_heads, -1)
    offsets = attn.sampling_offsets(query).reshape(2, 3, n_heads, 2, n_points, 2)
    weights = attn.attention_weights(query).reshape(2, 3, n_heads, -1).softmax(-1).reshape(2, 3, n_heads, 2, -1)
    locations = torch.empty_like(offsets)
    for n, q, m, level, p in torch.cartesian_prod(*(torch.arange(k) for k in offsets.shape[:5])).tolist():
        ref, off = reference[n, q, level], offsets[n, q, m, level, p]
        h, w = shapes[level]
        if box_reference:
            locations[n, q, m, level, p] = ref[:2] + off / n_points * ref[2:] / 2
        else:
            locations[n, q, m, level, p] = ref + off / torch.tensor([w, h], dtype=torch.float64)
    expected = attn.output_proj(_reference_core(value, shapes, locations, weights))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- tracing


@pytest.mark.parametrize("refine", [False, True])
def test_traced_graph_matches_eager_at_other_sizes(refine: bool) -> None:
    model = _tiny(with_box_refine=refine)
    graph = torch.fx.symbolic_trace(model, concrete_args={"mask": None})
    placeholders = [n.target for n in graph.graph.nodes if n.op == "placeholder"]
    assert placeholders[0] == "images" and not any(n.target == "masked_fill" for n in graph.graph.nodes)
    with torch.no_grad():
        for shape in ((2, 3, 160, 160), (1, 3, 192, 256)):
            images = torch.randn(shape)
            assert _max_diff(graph(images), model(images)) <= 1e-5


def test_traced_graph_with_mask_matches_eager_on_padded_batches() -> None:
    model = _tiny(with_box_refine=True)
    graph = torch.fx.symbolic_trace(model)
    assert [n.target for n in graph.graph.nodes if n.op == "placeholder"] == ["images", "mask"]
    with torch.no_grad():
        for height, width in ((160, 160), (192, 256)):
            images, mask = _padded_batch(2, height, width)
            eager = model(images, mask)
            assert _max_diff(graph(images, mask), eager) <= 1e-5
            assert _max_diff(model(images), eager) > 1e-3  # the mask does change the result


def test_two_stage_traced_graph_matches_eager() -> None:
    """Without a mask at other sizes (the proposal grid follows the input), and with a mask on padded batches."""
    model = _tiny(with_box_refine=True, two_stage=True)
    graph = torch.fx.symbolic_trace(model, concrete_args={"mask": None})
    assert any(n.target is torch.topk for n in graph.graph.nodes)
    masked_graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        for shape in ((2, 3, 160, 160), (1, 3, 192, 256)):
            images = torch.randn(shape)
            out = model(images)
            assert out["enc_outputs"]["pred_boxes"].shape[1] == sum(
                math.ceil(shape[2] / s) * math.ceil(shape[3] / s) for s in (8, 16, 32))
            assert _max_diff(graph(images), out) <= 1e-5
        images, mask = _padded_batch(2, 192, 256)
        eager = model(images, mask)
        assert _max_diff(masked_graph(images, mask), eager) <= 1e-5
        assert _max_diff(model(images), eager) > 1e-3


def test_two_stage_proposals() -> None:
    """Official proposals: cell centres, size 0.05·2^level, +inf outside (0.01, 0.99) and at padding."""
    from fxq.models.deformable_transformer import encoder_proposals

    logits, usable = encoder_proposals([(4, 6), (2, 3)], None, torch.device("cpu"))
    boxes = logits.sigmoid()
    assert logits.shape == (1, 24 + 6, 4) and usable.shape == (1, 30, 1)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.5 / 6, 0.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(boxes[0, 24 + 5], torch.tensor([2.5 / 3, 1.5 / 2, 0.1, 0.1]))
    assert usable.all() and torch.isfinite(logits).all()
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[:, :, 3:] = True  # the right half is padding: centres are normalised by the valid width 3
    logits, usable = encoder_proposals([(4, 6)], [mask], torch.device("cpu"))
    assert usable[0, :, 0].tolist() == (~mask).flatten().tolist()
    torch.testing.assert_close(logits[0, 1].sigmoid(), torch.tensor([1.5 / 3, 0.5 / 4, 0.05, 0.05]))
    assert torch.isinf(logits[0, 3]).all()
    far = encoder_proposals([(2, 2)] * 6, None, torch.device("cpu"))[1]
    assert far[0, :20].all() and not far[0, 20:].any()  # size 0.05·2^5 = 1.6 ≥ 0.99 at the sixth level


def test_two_stage_heads_and_gradients() -> None:
    """One more head (the encoder's, shared with the decoder as in the official code); every parameter learns
    once the encoder's proposals enter the loss, and the decoder's references are detached from them."""
    model = _tiny(with_box_refine=True, two_stage=True).train()
    assert len(model.class_embed) == 3 and model.transformer.decoder.class_embed is model.class_embed
    assert not hasattr(model, "query_embed") and not hasattr(model.transformer, "reference_points")
    out = model(*_padded_batch(2, 160, 160))
    assert out["pred_boxes"].shape == (2, 50, 4) and out["enc_outputs"]["pred_logits"].shape[-1] == 21
    loss = sum(o["pred_logits"].sum() + o["pred_boxes"].sum() for o in [out, out["enc_outputs"], *out["aux_outputs"]])
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    model.zero_grad()
    model(torch.randn(1, 3, 128, 128))["pred_boxes"].sum().backward()
    assert all(p.grad is None for p in model.transformer.enc_output.parameters())


def test_two_stage_refuses_what_it_cannot_build() -> None:
    with pytest.raises(ValueError, match="two_stage=True needs with_box_refine=True"):
        DeformableDETR(**TINY, two_stage=True)
    model = _tiny(with_box_refine=True, two_stage=True)
    with pytest.raises(InputError, match="keeps 50 proposals but the image gives only 21 encoder tokens"):
        model(torch.randn(1, 3, 32, 32))


def test_two_stage_official_checkpoint_loads(tmp_path) -> None:
    """An official-layout release file (``{"model": state_dict}``, no ``query_embed``) loads strictly into the
    zoo's two-stage model, and the official R50 layout is recognised as it."""
    import fxq
    from fxq.models.checkpoint import guess_model

    model = _tiny(with_box_refine=True, two_stage=True)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    loaded = fxq.models.build("deformable_detr_r50_two_stage", checkpoint=tmp_path / "checkpoint.pth",
                              **TINY)
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        assert _max_diff(loaded(images), model(images)) == 0
    with torch.device("meta"):
        official = DeformableDETR(with_box_refine=True, two_stage=True).state_dict()
    assert guess_model(official) == "deformable_detr_r50_two_stage"


def test_no_mask_equals_all_false_mask() -> None:
    model = _tiny()
    images = torch.randn(2, 3, 160, 192)
    with torch.no_grad():
        unmasked = model(images)
        masked = model(images, torch.zeros(2, 160, 192, dtype=torch.bool))
    assert _max_diff(unmasked, masked) <= 1e-6


@pytest.mark.slow
def test_r50_traced_graph_matches_eager() -> None:
    torch.manual_seed(0)
    model = _perturb(DeformableDETR()).eval()
    graph = torch.fx.symbolic_trace(model, concrete_args={"mask": None})
    images = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        assert _max_diff(graph(images), model(images)) <= 1e-5


# ---------------------------------------------------------------- outputs, gradients, cost


def test_tiny_forward_backward_reaches_every_parameter() -> None:
    model = _tiny(with_box_refine=True).train()
    images, mask = _padded_batch(4, 160, 160)
    out = model(images, mask)
    assert out["pred_logits"].shape == (4, 50, 21) and out["pred_boxes"].shape == (4, 50, 4)
    assert len(out["aux_outputs"]) == 1
    boxes = torch.cat([out["pred_boxes"]] + [aux["pred_boxes"] for aux in out["aux_outputs"]])
    assert ((boxes > 0) & (boxes < 1)).all()
    loss = out["pred_logits"].sum() + boxes.sum() + sum(aux["pred_logits"].sum() for aux in out["aux_outputs"])
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize(("levels", "dilation"), [(1, False), (2, False), (4, True)])
def test_other_level_counts(levels: int, dilation: bool) -> None:
    model = _tiny(num_feature_levels=levels, dilation=dilation)
    assert len(model.input_proj) == levels
    graph = torch.fx.symbolic_trace(model, concrete_args={"mask": None})
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = model(images)
        assert out["pred_boxes"].shape == (1, 50, 4)
        assert _max_diff(graph(images), out) <= 1e-5


def test_box_refinement_detaches_references() -> None:
    model = _tiny(with_box_refine=True, aux_loss=False)
    out = model(torch.randn(1, 3, 128, 128))
    assert set(out) == {"pred_logits", "pred_boxes"}
    out["pred_boxes"].sum().backward()
    # the first layer's box head only moves the (detached) reference of the second layer
    assert all(p.grad is None for p in model.bbox_embed[0].parameters())
    assert all(p.grad is not None for p in model.bbox_embed[1].parameters())


def test_official_macs_at_512() -> None:
    with torch.device("meta"):
        model = DeformableDETR().eval()
        images = torch.empty(1, 3, 512, 512)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    assert counter.get_total_flops() / 2 == pytest.approx(51.6e9, rel=5e-3)


# ---------------------------------------------------------------- static-shape ONNX export


def test_cell_grid_equals_the_official_linspace() -> None:
    from fxq.models.deformable_transformer import _cells

    for n in range(1, 257):
        assert torch.equal(_cells(n, torch.device("cpu")), torch.linspace(0, n - 1, n, dtype=torch.float32))
        assert torch.equal(_cells(n, torch.device("cpu"), 0.5), torch.linspace(0.5, n - 0.5, n, dtype=torch.float32))


@pytest.mark.parametrize("two_stage", [False, True])
def test_static_shape_onnx_runs_in_onnxruntime_and_matches(tmp_path, two_stage: bool) -> None:
    """`fxq export --static`: fixed shapes fold the reference-point grids into constants, which must stay float32
    (a float64 constant there made onnxruntime refuse the file: LayerNormalization bound to double and float)."""
    from fxq.backends import OrtSession, lower_to_onnx
    from fxq.ptq import float_graph

    model = _tiny(with_box_refine=two_stage, two_stage=two_stage)
    graph = float_graph(model, (128, 160))
    images = torch.randn(1, 3, 128, 160)
    lower_to_onnx(graph, images, tmp_path / "static.onnx", dynamic=False)
    got = OrtSession(tmp_path / "static.onnx", threads=1).run(images)
    with torch.no_grad():
        ref = graph(images)
    assert max((got[k] - ref[k]).abs().max().item() for k in ("pred_logits", "pred_boxes")) <= 1e-4
