"""Hugging Face Transformers ``config.json`` of DETR and Deformable DETR in fxq terms: the architecture, the fxq
family and its constructor keywords (classes, queries, layers, widths, backbone, box refinement, two-stage);
settings fxq cannot build are refused by name (CheckpointError)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fxq.errors import CheckpointError

CONFIG_FILE = "config.json"
#: Transformers architectures fxq loads, and the fxq model family each becomes.
SUPPORTED = {"DetrForObjectDetection": "detr", "DeformableDetrForObjectDetection": "deformable_detr"}
#: The fxq backbone names for timm's ResNets (tags such as ``.a1_in1k`` are dropped).
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def _unsupported(source: str, field_name: str, value: Any, supported: str) -> CheckpointError:
    return CheckpointError(f"{source}: {field_name} = {value!r} is not supported by fxq ({supported})")


def architecture_of(config: Mapping[str, Any], source: str) -> str:
    """The Transformers architecture a config describes; CheckpointError naming it and the supported ones when
    fxq does not load it."""
    names = config.get("architectures") or []
    known = [n for n in names if n in SUPPORTED]
    if known:
        return known[0]
    named = ", ".join(names) or f"model_type {config.get('model_type')!r}"
    raise CheckpointError(f"{source} describes a {named} model; fxq loads only "
                          f"{' and '.join(SUPPORTED)} (Transformers DETR / Deformable DETR with detection heads)")


def config_kwargs(config: Mapping[str, Any], source: str = CONFIG_FILE) -> tuple[str, str, dict[str, Any]]:
    """(architecture, fxq family, fxq constructor keywords) for a Transformers DETR / Deformable DETR config."""
    architecture = architecture_of(config, source)
    family = SUPPORTED[architecture]
    for name, wanted in (("activation_function", "relu"), ("position_embedding_type", "sine")):
        if config.get(name, wanted) != wanted:
            raise _unsupported(source, name, config[name], f"only {wanted!r}")
    _same(config, source, "encoder_attention_heads", "decoder_attention_heads", 8)
    ffn_default = 2048 if family == "detr" else 1024
    _same(config, source, "encoder_ffn_dim", "decoder_ffn_dim", ffn_default)
    labels = category_names(config)
    kwargs: dict[str, Any] = {
        "hidden_dim": config.get("d_model", 256), "nheads": config.get("encoder_attention_heads", 8),
        "enc_layers": config.get("encoder_layers", 6), "dec_layers": config.get("decoder_layers", 6),
        "dim_feedforward": config.get("encoder_ffn_dim", ffn_default),
        "num_queries": config.get("num_queries", 100 if family == "detr" else 300),
        "num_classes": len(labels) if labels else config.get("num_labels", 91), "backbone_norm": "frozen_bn",
    }
    if family == "detr":
        kwargs["head"] = "softmax"
    else:
        kwargs.update(num_feature_levels=config.get("num_feature_levels", 4),
                      enc_n_points=config.get("encoder_n_points", 4), dec_n_points=config.get("decoder_n_points", 4),
                      with_box_refine=bool(config.get("with_box_refine", False)))
        kwargs.update(_two_stage_kwargs(config, source, kwargs["with_box_refine"]))
    kwargs.update(backbone_kwargs(config, family, kwargs.get("num_feature_levels", 1), source))
    return architecture, family, kwargs


def _two_stage_kwargs(config: Mapping[str, Any], source: str, with_box_refine: bool) -> dict[str, Any]:
    """``two_stage`` and, for two-stage, its query count (``two_stage_num_proposals``; Transformers ignores
    ``num_queries`` then)."""
    if not config.get("two_stage", False):
        return {"two_stage": False}
    if not with_box_refine:
        raise _unsupported(source, "with_box_refine", False, "two_stage = true needs with_box_refine = true, "
                           "as in Transformers and the official code")
    return {"two_stage": True, "num_queries": config.get("two_stage_num_proposals", 300)}


def _same(config: Mapping[str, Any], source: str, first: str, second: str, default: int) -> None:
    a, b = config.get(first, default), config.get(second, default)
    if a != b:
        raise CheckpointError(f"{source}: {first} = {a} but {second} = {b}; fxq's models use one value for both")


def backbone_kwargs(config: Mapping[str, Any], family: str, levels: int, source: str) -> dict[str, Any]:
    """fxq's ``backbone_name``, ``base_width`` and ``dilation`` for the config's backbone (Transformers' own
    ResNet or timm's); CheckpointError naming the field fxq cannot build."""
    backbone = config.get("backbone_config")
    if backbone is None:  # Transformers 4 configs: timm unless use_timm_backbone is false
        if not config.get("use_timm_backbone", True):
            raise CheckpointError(f"{source}: use_timm_backbone is false but backbone_config is missing; "
                                  "fxq needs the ResNetConfig of the backbone")
        backbone = {"model_type": "timm_backbone", "backbone": config.get("backbone") or "resnet50",
                    "out_indices": (config.get("backbone_kwargs") or {}).get("out_indices")}
    wanted = _wanted_stages(family, levels)
    model_type = backbone.get("model_type")
    if model_type == "resnet":
        return _hf_resnet_kwargs(backbone, config, wanted, source)
    if model_type == "timm_backbone":
        return _timm_kwargs(backbone, config, family, wanted, source)
    raise _unsupported(source, "backbone_config.model_type", model_type, "'resnet' or 'timm_backbone' with a ResNet")


def _wanted_stages(family: str, levels: int) -> list[int]:
    if family == "detr":
        return [4]
    return [2, 3, 4][-levels:] if levels < 3 else [2, 3, 4]


def _hf_resnet_kwargs(backbone: Mapping[str, Any], config: Mapping[str, Any], wanted: list[int],
                      source: str) -> dict[str, Any]:
    from fxq.models.resnet import RESNET_LAYOUTS, Bottleneck

    prefix = "backbone_config."
    for name, value in (("hidden_act", "relu"), ("downsample_in_first_stage", False),
                        ("downsample_in_bottleneck", False), ("num_channels", 3)):
        if backbone.get(name, value) != value:
            raise _unsupported(source, prefix + name, backbone[name], f"only {value!r}, as torchvision's ResNet")
    if config.get("dilation"):
        raise _unsupported(source, "dilation", True, "Transformers' own ResNet has no dilated stage")
    layer_type = backbone.get("layer_type", "bottleneck")
    depths = tuple(backbone.get("depths", (3, 4, 6, 3)))
    block_kind = "bottleneck" if layer_type == "bottleneck" else "basic"
    names = [n for n, (block, d) in RESNET_LAYOUTS.items()
             if d == depths and (block is Bottleneck) == (block_kind == "bottleneck")]
    if not names:
        raise _unsupported(source, prefix + "depths", list(depths), f"with layer_type {layer_type!r} fxq builds "
                           + ", ".join(f"{n} {list(d)}" for n, (block, d) in RESNET_LAYOUTS.items()
                                       if (block is Bottleneck) == (block_kind == "bottleneck")))
    width = backbone.get("embedding_size", 64)
    expansion = 4 if block_kind == "bottleneck" else 1
    sizes = [width * 2**i * expansion for i in range(4)]
    if list(backbone.get("hidden_sizes", sizes)) != sizes:
        raise _unsupported(source, prefix + "hidden_sizes", backbone["hidden_sizes"],
                           f"with embedding_size {width} fxq's ResNet has {sizes}")
    stages = backbone.get("out_indices") or [int(s.removeprefix("stage")) for s in backbone.get("out_features", [])]
    if stages and list(stages) != wanted:
        raise _unsupported(source, prefix + "out_indices", list(stages), f"this model takes stages {wanted}")
    return {"backbone_name": names[0], "base_width": width, "dilation": False}


def _timm_kwargs(backbone: Mapping[str, Any], config: Mapping[str, Any], family: str, wanted: list[int],
                 source: str) -> dict[str, Any]:
    name = str(backbone.get("backbone") or "resnet50").split(".")[0]
    if name not in TIMM_RESNETS:
        raise _unsupported(source, "backbone_config.backbone", backbone.get("backbone"),
                           f"timm ResNets {', '.join(TIMM_RESNETS)}")
    stages = backbone.get("out_indices")
    if stages and (list(stages)[-1:] != [4] if family == "detr" else list(stages) != wanted):
        raise _unsupported(source, "backbone_config.out_indices", list(stages), f"this model takes stages {wanted}")
    dilation = bool(config.get("dilation")) or backbone.get("output_stride") == 16
    if dilation and family != "detr":
        raise _unsupported(source, "dilation", True, "fxq dilates the backbone of DETR only")
    return {"backbone_name": name, "base_width": 64, "dilation": dilation}


def category_names(config: Mapping[str, Any]) -> dict[int, str]:
    """Class index -> name from ``config.id2label`` (empty when the config has none)."""
    return {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
