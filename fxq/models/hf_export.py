"""fxq weights as a Hugging Face Transformers folder (``config.json`` + ``model.safetensors``): the reverse of
:mod:`fxq.models.hf_layout`, with the same key tables. ``save_transformers`` refuses what Transformers cannot
hold (named)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxq.errors import InputError
from fxq.models.hf_config import CONFIG_FILE, SUPPORTED
from fxq.models.hf_layout import (
    _DECODER_DEFORM,
    _DECODER_DETR,
    _ENCODER_DEFORM,
    _ENCODER_DETR,
    _FXQ_BODY,
    _HF_BACKBONE,
    _TWO_STAGE_MODULES,
    WEIGHT_FILES,
)


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _hf_resnet_key(name: str) -> str:
    """Transformers ResNet name (below ``model``) of a torchvision ResNet key."""
    if m := re.fullmatch(r"(conv1|bn1)\.(\w+)", name):
        return ("embedder.embedder.convolution." if m[1] == "conv1" else "embedder.embedder.normalization.") + m[2]
    if m := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", name):
        kind = "convolution" if m[3] == "0" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{kind}.{m[4]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", name)
    if m is None:
        raise InputError(f"backbone tensor {name!r} has no Transformers ResNet name")
    kind = "convolution" if m[3] == "conv" else "normalization"
    return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}.{kind}.{m[5]}"


def transformers_key(name: str, family: str) -> str:
    """The Transformers (on-disk) key of one fxq key; ``in_proj_*`` keys map to their ``{q,k,v}_proj`` stem."""
    if name.startswith(_FXQ_BODY):
        return _HF_BACKBONE + _hf_resnet_key(name[len(_FXQ_BODY):])
    if m := re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
        part, index, module, kind = m.groups()
        tables = {("detr", "encoder"): _ENCODER_DETR, ("detr", "decoder"): _DECODER_DETR,
                  ("deformable_detr", "encoder"): _ENCODER_DEFORM, ("deformable_detr", "decoder"): _DECODER_DEFORM}
        return f"model.{part}.layers.{index}.{_inverse(tables[family, part])[module]}.{kind}"
    if m := re.fullmatch(r"transformer\.(encoder|decoder)\.layers\.(\d+)\.(\w+)\.in_proj_(weight|bias)", name):
        part, index, attn, kind = m.groups()
        return f"model.{part}.layers.{index}.{'encoder_attn' if attn == 'multihead_attn' else attn}.{{}}_proj.{kind}"
    if name == "transformer.level_embed":
        return "model.level_embed"
    heads = ({"input_proj.": "model.input_projection.", "query_embed.": "model.query_position_embeddings.",
              "class_embed.": "class_labels_classifier.", "bbox_embed.": "bbox_predictor.",
              "transformer.decoder.norm.": "model.decoder.layernorm."} if family == "detr" else
             {"input_proj.": "model.input_proj.", "query_embed.": "model.query_position_embeddings.",
              "transformer.reference_points.": "model.reference_points.", "class_embed.": "class_embed.",
              "bbox_embed.": "bbox_embed.", "transformer.decoder.bbox_embed.": "model.decoder.bbox_embed.",
              "transformer.decoder.class_embed.": "model.decoder.class_embed.",
              **{f"transformer.{m}.": f"model.{m}." for m in _TWO_STAGE_MODULES}})
    for fxq, hf in sorted(heads.items(), key=lambda item: -len(item[0])):
        if name.startswith(fxq):
            return hf + name[len(fxq):]
    raise InputError(f"fxq tensor {name!r} has no Transformers name")


def transformers_config(model: nn.Module, category_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The Transformers config.json of an fxq DETR (softmax head) or Deformable DETR (single- or two-stage)."""
    from fxq.models.deformable_detr import DeformableDETR
    from fxq.models.detr import DETR

    deformable = isinstance(model, DeformableDETR)
    if not deformable and not (isinstance(model, DETR) and model.head == "softmax"):
        raise InputError(f"{type(model).__name__} (head {getattr(model, 'head', None)!r}) has no Transformers "
                         "form: export a DETR with the softmax head or a Deformable DETR")
    body = model.backbone[0].body
    if any(isinstance(m, nn.Conv2d) and m.dilation != (1, 1) for m in body.modules()):
        raise InputError("a dilated (DC5) backbone has no Transformers-ResNet form; export an undilated model")
    transformer = model.transformer
    layer = transformer.encoder.layers[0]
    width, basic = body.conv1.out_channels, not hasattr(body.layer1[0], "conv3")
    expansion = 1 if basic else 4
    if transformer.d_model % 32 and deformable:
        raise InputError(f"d_model {transformer.d_model} is not a multiple of 32, Transformers' GroupNorm groups")
    names = dict(category_names or getattr(model, "category_names", None) or {})
    config: dict[str, Any] = {
        "architectures": ["DeformableDetrForObjectDetection" if deformable else "DetrForObjectDetection"],
        "model_type": "deformable_detr" if deformable else "detr", "d_model": transformer.d_model,
        "encoder_layers": len(transformer.encoder.layers), "decoder_layers": len(transformer.decoder.layers),
        "encoder_attention_heads": transformer.nhead, "decoder_attention_heads": transformer.nhead,
        "encoder_ffn_dim": layer.linear1.out_features, "decoder_ffn_dim": layer.linear1.out_features,
        "num_queries": model.num_queries, "activation_function": "relu", "position_embedding_type": "sine",
        "id2label": {str(i): names.get(i, f"LABEL_{i}") for i in range(model.num_classes)},
        "label2id": {names.get(i, f"LABEL_{i}"): i for i in range(model.num_classes)},
        "use_timm_backbone": False, "use_pretrained_backbone": False, "dilation": False,
        "backbone_config": {
            "model_type": "resnet", "embedding_size": width, "layer_type": "basic" if basic else "bottleneck",
            "hidden_sizes": [width * 2**i * expansion for i in range(4)],
            "depths": [len(getattr(body, f"layer{i}")) for i in range(1, 5)],
            "out_features": [n.replace("layer", "stage") for n in body.return_layers]},
    }
    if deformable:
        two_stage = bool(getattr(model, "two_stage", False))
        config.update(num_feature_levels=model.num_feature_levels, with_box_refine=model.with_box_refine,
                      two_stage=two_stage, tie_word_embeddings=not model.with_box_refine,
                      encoder_n_points=layer.self_attn.n_points,
                      decoder_n_points=transformer.decoder.layers[0].cross_attn.n_points)
        if two_stage:  # Transformers decodes two_stage_num_proposals queries and ignores num_queries
            config["two_stage_num_proposals"] = model.num_queries
    return config


def save_transformers(model: nn.Module, folder: str | os.PathLike,
                      category_names: Mapping[int, str] | None = None) -> Path:
    """Write an fxq DETR / Deformable DETR as a Transformers folder (``config.json``, ``model.safetensors``)
    that ``from_pretrained`` loads; returns the folder. ``category_names``: class index -> name for
    ``id2label`` (default: the model's ``category_names``, else ``LABEL_i``)."""
    from safetensors.torch import save_file

    config = transformers_config(model, category_names)
    family = SUPPORTED[config["architectures"][0]]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        key = transformers_key(name, family)
        if "{}" in key:
            for part, chunk in zip("qkv", tensor.chunk(3), strict=True):
                tensors[key.format(part)] = chunk.clone()
        else:
            tensors[key] = tensor.detach().clone()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHT_FILES[0], metadata={"format": "pt"})
    return folder
