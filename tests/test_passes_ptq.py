"""PTQ passes on real traced models: folding, policy, quantizer insertion and calibration."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DATA
from torch.utils.data import DataLoader

import fxq
from fxq.data import CocoDetection, collate, eval_transforms
from fxq.passes.calibrate import calibrate
from fxq.passes.fold_bn import fold_batchnorm
from fxq.passes.insert_quant import insert_quantizers, quantizers
from fxq.passes.pass_manager import PassManager
from fxq.passes.policy import annotate_policy, quantizable_nodes
from fxq.passes.remove_dropout import remove_dropout
from fxq.quant import QSpec


@pytest.fixture(scope="module")
def loader():
    ds = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(128, 160))
    return DataLoader(ds, batch_size=4, collate_fn=collate)


def _float_graph(name: str = "detr_tiny") -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = fxq.models.build(name)
    for m in model.modules():  # non-trivial batch-norm statistics so folding is really exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    gm = fxq.trace(model, torch.randn(1, 3, 128, 128))
    PassManager([remove_dropout, fold_batchnorm])(gm)
    return model, gm


@pytest.mark.parametrize("name", ["detr_tiny", "deformable_detr_tiny"])
def test_folding_and_dropout_removal_keep_the_model(name):
    model, gm = _float_graph(name)
    roles = [n.meta["fxq.role"] for n in gm.graph.nodes]
    assert "batchnorm" not in roles and "dropout" not in roles
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        eager, folded = model(x), gm(x)
    assert torch.allclose(folded["pred_logits"], eager["pred_logits"], atol=1e-4)
    assert torch.allclose(folded["pred_boxes"], eager["pred_boxes"], atol=1e-5)
    assert model.backbone[0].body.bn1.running_mean.abs().sum() > 0, "the user's model must stay unfolded"


def test_policy_and_overrides():
    _, gm = _float_graph()
    info = annotate_policy(gm, "4-4-8").info
    specs = {n.meta["fxq.module"]: n.meta.get("fxq.qspec") for n in quantizable_nodes(gm)}
    assert specs["class_embed"] is None and specs["bbox_embed.layers.0"] is None
    assert specs["backbone.0.body.conv1"].w_bits == 8
    att = [n.meta["fxq.qspec"] for n in gm.graph.nodes if n.meta["fxq.role"] == "attn_qk"]
    assert att and all(s.attn_bits == 8 and s.w_bits == 4 and s.a_bits == 4 for s in att)
    assert info["float"] == sum(1 for s in specs.values() if s is None)
    annotate_policy(gm, "W8A8", overrides={"transformer.*": None})
    assert not any("fxq.qspec" in n.meta for n in gm.graph.nodes if n.meta["fxq.module"].startswith("transformer"))


@pytest.mark.parametrize("policy", ["W8A8", "W4A4", "4-4-8", "W2A8"])
def test_disabled_quantizers_equal_the_float_graph_exactly(policy, loader):
    _, gm = _float_graph()
    reference = copy.deepcopy(gm)
    annotate_policy(gm, policy)
    insert_quantizers(gm)
    calibrate(gm, loader, num_batches=1, progress=False)
    for q in quantizers(gm).values():
        q.disable()
    images = next(iter(loader))[0]
    with torch.no_grad():
        a, b = reference(images), gm(images)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert set(reference.state_dict()) <= set(gm.state_dict()), "parameter names must not change"


def test_every_annotated_node_reads_quantized_inputs(loader):
    _, gm = _float_graph()
    annotate_policy(gm, "W4A8")
    counts = insert_quantizers(gm).info
    for node in gm.graph.nodes:
        spec = node.meta.get("fxq.qspec")
        if spec is None:
            continue
        attention = node.meta["fxq.role"] in ("attn_qk", "attn_av")
        operands = node.args[:2] if attention else node.args[:1]
        assert all(a.meta["fxq.role"] == "quantize" for a in operands), node.name
        if not attention:
            assert node.args[1].meta["fxq.quantizer"]["kind"] == "weight"
            assert gm.get_submodule(node.args[1].target).bits == 4 or node.meta["fxq.module"].endswith("conv1")
    # q, k of one self-attention read the same tensor (src + pos): one shared activation quantizer.
    qk = [n for n in gm.graph.nodes if n.meta["fxq.module"] == "transformer.encoder.layers.0.self_attn"
          and n.meta["fxq.role"] == "linear"]
    assert qk[0].args[0] is qk[1].args[0] and qk[2].args[0] is not qk[0].args[0]
    assert counts["activation"] < sum(1 for n in gm.graph.nodes if "fxq.qspec" in n.meta)


def test_quantization_error_shrinks_with_bits(loader):
    errors = []
    images = next(iter(loader))[0]
    for policy in ("W4A4", "W8A8"):
        _, gm = _float_graph()
        reference = copy.deepcopy(gm)
        annotate_policy(gm, policy)
        insert_quantizers(gm)
        calibrate(gm, loader, progress=False)
        with torch.no_grad():
            errors.append((gm(images)["pred_boxes"] - reference(images)["pred_boxes"]).abs().mean().item())
    assert errors[1] < errors[0] / 4, errors


def test_calibration_is_deterministic_and_recorded(loader):
    results = []
    for _ in range(2):
        _, gm = _float_graph()
        annotate_policy(gm, "W4A8", a_observer="mse")
        insert_quantizers(gm)
        calibrate(gm, loader, progress=False)
        results.append({n.name: n.meta["fxq.calib"] for n in gm.graph.nodes if "fxq.calib" in n.meta})
    assert results[0] == results[1] and len(results[0]) > 50
    assert {c["method"] for c in results[0].values()} == {"minmax", "mse"}


def test_empty_loader_and_nan_activations_are_named(loader):
    _, gm = _float_graph()
    annotate_policy(gm, "W8A8")
    insert_quantizers(gm)
    with pytest.raises(fxq.InputError, match="yielded no batches"):
        calibrate(gm, [], progress=False)
    bad = torch.full((1, 3, 128, 128), float("nan"))
    with pytest.raises(fxq.InputError, match="images"):
        calibrate(gm, [bad], progress=False)


def test_calibrate_without_quantizers_says_what_to_run():
    _, gm = _float_graph()
    with pytest.raises(fxq.InputError, match="annotate_policy and insert_quantizers"):
        calibrate(gm, [torch.randn(1, 3, 64, 64)], progress=False)


class _TwoReaders(torch.nn.Module):
    """One tensor (``relu``) read by two 1x1 convs: the case where quantizer sharing must tell settings apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.left = torch.nn.Conv2d(4, 2, 1)
        self.right = torch.nn.Conv2d(4, 2, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(images))
        return self.left(h) + self.right(h)


@pytest.mark.parametrize("field, left, right", [("a_symmetric", False, True), ("a_observer", "minmax", "mse")])
def test_readers_differing_in_one_setting_get_their_own_quantizers(field, left, right):
    torch.manual_seed(0)
    model = _TwoReaders().eval()
    images = torch.randn(2, 3, 8, 8)
    gm = fxq.trace(model, images)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, value in (("left", left), ("right", right)):
        nodes[name].meta["fxq.qspec"] = QSpec(w_bits=None, a_bits=8, **{field: value})
    insert_quantizers(gm)
    calibrate(gm, [images, torch.randn(2, 3, 8, 8)], progress=False)

    readers = {name: nodes[name].args[0] for name in ("left", "right")}
    assert all(r.op == "call_module" and r.args[0].name == "relu" for r in readers.values())
    q = {name: gm.get_submodule(r.target) for name, r in readers.items()}
    assert readers["left"].target != readers["right"].target and q["left"] is not q["right"]
    attr = "symmetric" if field == "a_symmetric" else "method"
    assert (getattr(q["left"], attr), getattr(q["right"], attr)) == (left, right)
    children = dict(gm.get_submodule("fxq_q").named_children())
    assert {r.target.split(".", 1)[1] for r in readers.values()} <= set(children) and len(children) == 2
    second = readers["right"].target
    assert ("_sym_" in second) if field == "a_symmetric" else second.endswith("_mse")
    # both are used: the graph computes left(q_left(h)) + right(q_right(h)) with each reader's own quantizer
    with torch.no_grad():
        h = torch.relu(model.stem(images))
        expected = model.left(q["left"](h)) + model.right(q["right"](h))
        assert torch.allclose(gm(images), expected, atol=1e-6)
        if field == "a_symmetric":
            assert not torch.equal(q["left"](h), q["right"](h))
