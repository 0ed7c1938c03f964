"""Hugging Face Transformers DETR / Deformable DETR checkpoints load into fxq and compute what Transformers
computes, on a real image, with the hub forced offline; then trace, quantize and export as usual."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub are imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import DATA  # noqa: E402

import fxq  # noqa: E402
from fxq.data import CocoDetection, eval_transforms  # noqa: E402
from fxq.errors import CheckpointError, InputError  # noqa: E402
from fxq.models.hf_layout import build_transformers, read_transformers  # noqa: E402

TOLERANCE = 1e-4
LABELS = {i: f"category {i}" for i in range(91)}


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A real COCO image, resized (short side 160) and normalised as fxq's evaluation does."""
    data = CocoDetection.from_folder(DATA / "coco-val2017-fixture", transforms=eval_transforms(160, 224))
    return data[0][0][None]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may download."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise on every weight and statistic, so that zero-initialised heads and unit batch-norm
    statistics also carry information through the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.mul_(1 + 0.5 * torch.rand(tensor.shape, generator=gen))
            else:
                tensor.add_(0.02 * noise)


def _save(hf_model: torch.nn.Module, folder, image: torch.Tensor, seed: int) -> dict:
    _perturb(hf_model, seed)
    hf_model.eval().save_pretrained(folder)
    with torch.no_grad():
        out = hf_model(pixel_values=image)
    reference = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if getattr(out, "enc_outputs_class", None) is not None:  # two-stage: the encoder's proposals
        reference["enc_outputs"] = {"pred_logits": out.enc_outputs_class,
                                    "pred_boxes": out.enc_outputs_coord_logits.sigmoid()}
    return reference


def _resnet(**kwargs) -> transformers.ResNetConfig:
    return transformers.ResNetConfig(**kwargs)


@pytest.fixture(scope="module")
def detr(tmp_path_factory, image):
    """Full-size DETR-R50 (Transformers' own ResNet-50), 91 labels, random weights: (folder, its outputs)."""
    torch.manual_seed(0)
    config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, id2label=LABELS,
                                     backbone_config=_resnet(out_features=["stage4"]))
    folder = tmp_path_factory.mktemp("hf") / "detr"
    return folder, _save(transformers.DetrForObjectDetection(config), folder, image, 1)


@pytest.fixture(scope="module")
def deformable(tmp_path_factory, image):
    """Full-size Deformable DETR-R50 with iterative box refinement, 91 labels: (folder, its outputs)."""
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, id2label=LABELS, with_box_refine=True,
        backbone_config=_resnet(out_features=["stage2", "stage3", "stage4"]))
    folder = tmp_path_factory.mktemp("hf") / "deformable"
    return folder, _save(transformers.DeformableDetrForObjectDetection(config), folder, image, 2)


def _small_deformable_config(**extra) -> transformers.DeformableDetrConfig:
    """A reduced Deformable DETR: ResNet-18 of width 16, 2 levels, d_model 64, 2+2 layers, 20 queries."""
    backbone = _resnet(layer_type="basic", depths=[2, 2, 2, 2], embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                       out_features=["stage3", "stage4"])
    return transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, id2label=LABELS, backbone_config=backbone,
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=20, num_feature_levels=2, **extra)


@pytest.fixture(scope="module")
def small_deformable(tmp_path_factory, image):
    """A reduced single-stage Deformable DETR (ResNet-18 of width 16, 2 levels, d_model 64, no box
    refinement): (folder, its outputs, the Transformers model)."""
    torch.manual_seed(0)
    config = _small_deformable_config()
    folder = tmp_path_factory.mktemp("hf") / "small"
    model = transformers.DeformableDetrForObjectDetection(config)
    return folder, _save(model, folder, image, 3), model


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, image):
    """Full-size two-stage Deformable DETR-R50 (with box refinement, as Transformers requires), 300 proposals,
    91 labels: (folder, its outputs)."""
    torch.manual_seed(0)
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, id2label=LABELS, with_box_refine=True,
        two_stage=True, backbone_config=_resnet(out_features=["stage2", "stage3", "stage4"]))
    folder = tmp_path_factory.mktemp("hf") / "two_stage"
    return folder, _save(transformers.DeformableDetrForObjectDetection(config), folder, image, 5)


@pytest.fixture(scope="module")
def small_two_stage(tmp_path_factory, image):
    """A reduced two-stage Deformable DETR (as ``small_deformable``, with box refinement and 15 proposals;
    ``num_queries`` 20, which two-stage ignores): (folder, its outputs, the Transformers model)."""
    torch.manual_seed(0)
    config = _small_deformable_config(with_box_refine=True, two_stage=True, two_stage_num_proposals=15)
    folder = tmp_path_factory.mktemp("hf") / "small_two_stage"
    model = transformers.DeformableDetrForObjectDetection(config)
    return folder, _save(model, folder, image, 4), model


def _max_diff(model: torch.nn.Module, image: torch.Tensor, reference: dict) -> dict[str, float]:
    """max |Δ| per output (the encoder's proposals too, when the reference has them)."""
    with torch.no_grad():
        out = model(image)
    pairs = [(key, out[key], reference[key]) for key in ("pred_logits", "pred_boxes")]
    if "enc_outputs" in reference:
        pairs += [(f"enc_{key}", out["enc_outputs"][key], reference["enc_outputs"][key])
                  for key in ("pred_logits", "pred_boxes")]
    diffs = {}
    for key, mine, theirs in pairs:
        assert mine.shape == theirs.shape, key
        diffs[key] = (mine - theirs).abs().max().item()
    return diffs


def _assert_close(model: torch.nn.Module, image: torch.Tensor, reference: dict) -> None:
    for key, diff in _max_diff(model, image, reference).items():
        assert diff <= TOLERANCE, key


def test_hub_is_forced_offline():
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_detr_folder_and_file_match_transformers(detr, image):
    folder, reference = detr
    for source in (folder, folder / "model.safetensors"):
        model = fxq.models.build("detr_r50", checkpoint=source)
        _assert_close(model, image, reference)


def test_deformable_box_refine_matches_transformers(deformable, image):
    folder, reference = deformable
    model = build_transformers(folder, "deformable_detr_r50")
    assert model.with_box_refine and model.num_queries == 300
    _assert_close(model, image, reference)
    assert model.category_names == LABELS
    _assert_close(fxq.models.build("deformable_detr_r50_box_refine", checkpoint=folder), image, reference)


def test_reduced_config_sets_the_model(small_deformable, image):
    folder, reference, _ = small_deformable
    model = build_transformers(folder)
    assert (model.num_feature_levels, model.num_queries, model.with_box_refine) == (2, 20, False)
    assert model.transformer.d_model == 64 and len(model.transformer.decoder.layers) == 2
    _assert_close(model, image, reference)


def test_two_stage_matches_transformers(two_stage, image):
    """Encoder proposals, top-300 selection, proposal queries and the decoder's boxes and logits as Transformers
    computes them; the zoo's two-stage model takes the checkpoint as is."""
    folder, reference = two_stage
    model = fxq.models.build("deformable_detr_r50_two_stage", checkpoint=folder)
    assert model.two_stage and model.with_box_refine and model.num_queries == 300
    assert not hasattr(model, "query_embed") and len(model.class_embed) == 7 and "enc_outputs" in reference
    _assert_close(model, image, reference)


def test_reduced_two_stage_takes_the_proposal_count(small_two_stage, image):
    folder, reference, _ = small_two_stage
    model = build_transformers(folder)
    assert (model.two_stage, model.num_queries, model.transformer.two_stage_num_proposals) == (True, 15, 15)
    _assert_close(model, image, reference)


def test_two_stage_untied_copies_are_refused(small_two_stage, tmp_path):
    """fxq shares each head with its decoder copy (official layout); a file whose copies differ is refused."""
    folder = _copy(small_two_stage[0], tmp_path)
    state = safetensors_torch.load_file(folder / "model.safetensors")
    assert "class_embed.1.weight" not in state  # tied to model.decoder.class_embed.1 and stored once
    state["class_embed.1.weight"] = state["model.decoder.class_embed.1.weight"] + 1
    state["class_embed.1.bias"] = state["model.decoder.class_embed.1.bias"].clone()
    safetensors_torch.save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.decoder.class_embed.1.weight and class_embed.1.weight differ"):
        build_transformers(folder)


def test_two_stage_config_disagreeing_with_weights(small_two_stage, small_deformable, tmp_path):
    folder = _copy(small_two_stage[0], tmp_path)
    _edit_config(folder, two_stage=False)
    with pytest.raises(CheckpointError, match="two_stage = False but the weights hold the two-stage modules"):
        build_transformers(folder)
    single = tmp_path / "single"
    shutil.copytree(small_deformable[0], single)
    _edit_config(single, two_stage=True, with_box_refine=True)
    with pytest.raises(CheckpointError, match="two_stage = True but the weights lack the two-stage modules"):
        build_transformers(single)


def test_transformers5_in_memory_names_load(small_deformable, image, tmp_path):
    """A state_dict as Transformers 5 names it in memory (``backbone.model``, ``o_proj``, ``mlp.fc1``)."""
    folder, reference, hf_model = small_deformable
    state = {k: v.clone() for k, v in hf_model.state_dict().items()}
    assert any(".o_proj." in k for k in state) and any(".mlp.fc1." in k for k in state)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    safetensors_torch.save_file(state, tmp_path / "weights.safetensors")
    _assert_close(build_transformers(tmp_path / "weights.safetensors"), image, reference)


def _timm_names() -> dict[str, str]:
    """Transformers ResNet key -> timm key, from the two libraries' module definitions: timm's ResNet uses
    torchvision's names (``conv1``, ``bn1``, ``layerN.M.convK/bnK``, ``downsample.0/1``) and Transformers'
    ``DetrConvEncoder`` keeps timm's model as ``conv_encoder.model``. Written out here, independently of
    fxq's mapping."""
    names = {"embedder.embedder.convolution": "conv1", "embedder.embedder.normalization": "bn1"}
    for stage, depth in enumerate((3, 4, 6, 3)):
        for block in range(depth):
            hf, timm = f"encoder.stages.{stage}.layers.{block}.", f"layer{stage + 1}.{block}."
            names[hf + "shortcut.convolution"] = timm + "downsample.0"
            names[hf + "shortcut.normalization"] = timm + "downsample.1"
            for conv in range(3):
                names[hf + f"layer.{conv}.convolution"] = timm + f"conv{conv + 1}"
                names[hf + f"layer.{conv}.normalization"] = timm + f"bn{conv + 1}"
    return names


def test_timm_backbone_layout_of_the_hub_checkpoints(detr, image, tmp_path):
    """The published hub layout: timm ResNet-50 under ``model.backbone.conv_encoder.model``, a Transformers 4
    config (``use_timm_backbone``, ``backbone``, no ``backbone_config``)."""
    folder, reference = detr
    prefix = "model.backbone.conv_encoder.model."
    names = _timm_names()
    state = {}
    for key, value in safetensors_torch.load_file(folder / "model.safetensors").items():
        if key.startswith(prefix):
            module, leaf = key[len(prefix):].rsplit(".", 1)
            key = prefix + names[module] + "." + leaf
        state[key] = value
    state[prefix + "bn1.num_batches_tracked"] = torch.tensor(0)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config.pop("backbone_config")
    config.update(use_timm_backbone=True, backbone="resnet50", dilation=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_close(fxq.models.build("detr_r50", checkpoint=tmp_path), image, reference)
    config["dilation"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_transformers(tmp_path).kwargs["dilation"] is True


def test_fxq_layout_safetensors_loads(tmp_path, image):
    model = fxq.models.build("deformable_detr_tiny")
    safetensors_torch.save_file({k: v.clone() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    loaded = fxq.models.build("deformable_detr_tiny", checkpoint=tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(image)["pred_boxes"], model(image)["pred_boxes"])


# ---------------------------------------------------------------------------------------------- bad input


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def test_other_architecture_is_named(small_deformable, tmp_path):
    folder = _copy(small_deformable[0], tmp_path)
    _edit_config(folder, architectures=["YolosForObjectDetection"], model_type="yolos")
    with pytest.raises(CheckpointError, match="YolosForObjectDetection.*DetrForObjectDetection and "
                                              "DeformableDetrForObjectDetection"):
        build_transformers(folder)


def test_config_disagreeing_with_weights_names_the_field(small_deformable, tmp_path):
    folder = _copy(small_deformable[0], tmp_path)
    _edit_config(folder, decoder_layers=3)
    with pytest.raises(CheckpointError, match="decoder_layers = 3 but the weights hold 2"):
        build_transformers(folder)
    _edit_config(folder, decoder_layers=2, num_queries=30)
    with pytest.raises(CheckpointError, match="num_queries = 30 but the weights hold 20"):
        build_transformers(folder)


def test_unsupported_settings_are_named(small_deformable, tmp_path):
    folder = _copy(small_deformable[0], tmp_path)
    _edit_config(folder, two_stage=True)  # Transformers' config refuses this too
    with pytest.raises(CheckpointError, match="with_box_refine = False .*two_stage = true needs with_box_refine"):
        build_transformers(folder)
    _edit_config(folder, two_stage=False, encoder_attention_heads=8)
    with pytest.raises(CheckpointError, match="encoder_attention_heads = 8 but decoder_attention_heads = 4"):
        build_transformers(folder)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_missing_or_extra_keys(small_deformable, tmp_path, change):
    folder = _copy(small_deformable[0], tmp_path)
    state = safetensors_torch.load_file(folder / "model.safetensors")
    if change == "missing":
        del state["model.decoder.layers.1.self_attn.k_proj.weight"]
        expected = r"missing \(fxq names\): 1 \(first: transformer.decoder.layers.1.self_attn.in_proj_weight"
    else:
        state["model.decoder.extra_head.weight"] = torch.zeros(3)
        expected = r"unexpected \(Transformers names\): 1 \(first: model.decoder.extra_head.weight"
    safetensors_torch.save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=expected):
        build_transformers(folder)


def test_family_and_config_mismatch_with_the_named_model(small_deformable, detr):
    with pytest.raises(InputError, match="DeformableDetrForObjectDetection.*not 'detr_r50'"):
        build_transformers(small_deformable[0], "detr_r50")
    with pytest.raises(InputError, match="DeformableDetrForObjectDetection.*not 'detr_r50'"):
        fxq.models.build("detr_r50", checkpoint=small_deformable[0])


def test_build_takes_the_configuration_from_config_json(small_deformable):
    model = fxq.models.build("deformable_detr_r50", checkpoint=small_deformable[0])
    assert model.num_queries == json.loads((small_deformable[0] / "config.json").read_text())["num_queries"]


def test_safetensors_without_config(small_deformable, tmp_path):
    shutil.copy(small_deformable[0] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json beside it"):
        fxq.models.build("deformable_detr_r50", checkpoint=tmp_path / "model.safetensors")


# ------------------------------------------------------------------------------- trace, quantize, export


def test_trace_quantize_export(small_deformable, image, tmp_path):
    from fxq.backends import OrtSession, lower_to_onnx
    from fxq.ptq import float_graph, quantize_ptq

    model = build_transformers(small_deformable[0], aux_loss=False)
    size = tuple(image.shape[-2:])
    float_gm = float_graph(model, size)
    with torch.no_grad():
        reference, traced = model(image), float_gm(image)
    assert (traced["pred_boxes"] - reference["pred_boxes"]).abs().max() <= TOLERANCE
    gm = quantize_ptq(float_gm, [image], "W8A8", "minmax", progress=False)
    with torch.no_grad():
        fake = gm(image)
    assert (fake["pred_boxes"] - reference["pred_boxes"]).abs().max() < 0.05
    lower_to_onnx(gm, image, tmp_path / "m.onnx")
    ort = OrtSession(tmp_path / "m.onnx", threads=1, optimization="disable").run(image)
    assert (ort["pred_boxes"] - fake["pred_boxes"]).abs().max() < 1e-3


def _set_distance(a: dict, b: dict, key: str = "pred_boxes") -> float:
    """max |Δ| between two sets of detections, each matched to its nearest in the other (queries of two-stage
    come in top-k order, which near-equal proposal scores may swap)."""
    d = (a[key][0][:, None] - b[key][0][None]).abs().amax(-1)
    return max(d.min(1).values.max().item(), d.min(0).values.max().item())


def test_two_stage_trace_quantize_export(small_two_stage, image, tmp_path):
    """Top-k and gather trace, quantize and lower like any node. The proposal scorer ``transformer.enc_output``
    stays float here (as the class/box heads and the sampling geometry do by default): with it at 8 bits the
    rounding decides which proposals survive the top-k, and fake-quant vs onnxruntime is no longer comparable."""
    from fxq.backends import OrtSession, lower_to_onnx
    from fxq.passes.policy import DEFAULT_OVERRIDES
    from fxq.ptq import float_graph, quantize_ptq

    model = build_transformers(small_two_stage[0], aux_loss=False)
    float_gm = float_graph(model, tuple(image.shape[-2:]))
    assert any(n.target is torch.topk for n in float_gm.graph.nodes)
    with torch.no_grad():
        reference, traced = model(image), float_gm(image)
    for key in ("pred_logits", "pred_boxes"):
        assert (traced[key] - reference[key]).abs().max() <= TOLERANCE
    overrides = {**DEFAULT_OVERRIDES, "transformer.enc_output": None}
    gm = quantize_ptq(float_gm, [image], "W8A8", "minmax", overrides=overrides, progress=False)
    with torch.no_grad():
        fake = gm(image)
    assert _set_distance(fake, reference) < 0.05
    lower_to_onnx(gm, image, tmp_path / "m.onnx")
    ort = OrtSession(tmp_path / "m.onnx", threads=1, optimization="disable").run(image)
    assert _set_distance(ort, fake) < 1e-3


# ----------------------------------------------------------------------------------- fxq -> Transformers


@pytest.mark.parametrize("name", ["deformable_detr_tiny", "detr_small", "two_stage_small"])
def test_save_transformers_loads_in_transformers(name, image, tmp_path):
    """fxq weights written as a Transformers folder: ``from_pretrained`` computes fxq's outputs, and fxq reads
    the folder back."""
    from fxq.models.hf_export import save_transformers

    if name == "detr_small":
        model = fxq.models.build("detr_r50", seed=0, backbone_name="resnet18", base_width=16, hidden_dim=64,
                                 nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=10)
    elif name == "two_stage_small":
        model = fxq.models.build("deformable_detr_r50_two_stage", seed=0, backbone_name="resnet18", base_width=16,
                                 hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128,
                                 num_queries=15, num_feature_levels=2)
        _perturb(model, 6)  # off the zero-initialised box heads
    else:
        model = fxq.models.build(name)  # the embedded, trained weights
    names = {i: f"name {i}" for i in range(model.num_classes)}
    save_transformers(model, tmp_path / "hf", names)
    hf_model = transformers.AutoModelForObjectDetection.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.id2label == names
    assert getattr(hf_model.config, "two_stage", False) == (name == "two_stage_small")
    with torch.no_grad():
        out = hf_model(pixel_values=image)
    _assert_close(model, image, {"pred_logits": out.logits, "pred_boxes": out.pred_boxes})
    back = build_transformers(tmp_path / "hf")
    assert back.category_names == names
    _assert_close(back, image, {"pred_logits": out.logits, "pred_boxes": out.pred_boxes})


def test_save_transformers_refuses_what_transformers_cannot_hold(tmp_path):
    from fxq.models.hf_export import save_transformers

    with pytest.raises(InputError, match="softmax head"):
        save_transformers(fxq.models.build("detr_tiny"), tmp_path)


def test_category_names_compare_with_the_annotation_file():
    """config.id2label against the real fixture's categories: COCO names agree, shifted ids are reported."""
    from fxq.data.categories import category_names
    from fxq.models.hf_layout import category_disagreements

    coco = category_names(DATA / "coco-val2017-fixture" / "annotations" / "instances_val2017.json")
    model_names = {i: "N/A" for i in range(91)} | coco
    assert category_disagreements(model_names, coco) == []
    shifted = {i - 1: n for i, n in coco.items()}
    problems = category_disagreements(shifted, coco)
    assert problems and f"category 1 is {coco[1]!r} in the annotations but {coco[2]!r} in the model" in problems


def test_unreadable_safetensors(tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        fxq.models.build("detr_tiny", checkpoint=tmp_path / "broken.safetensors")


def test_sharded_folder_loads(small_deformable, image, tmp_path):
    _, reference, hf_model = small_deformable
    hf_model.save_pretrained(tmp_path, max_shard_size="500KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _assert_close(build_transformers(tmp_path), image, reference)
