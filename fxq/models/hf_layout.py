"""Hugging Face Transformers checkpoints of DETR and Deformable DETR (``DetrForObjectDetection``,
``DeformableDetrForObjectDetection``): a folder with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or a legacy ``pytorch_model.bin``), or a ``.safetensors`` file with its
``config.json`` beside it.

``config.json`` decides the fxq configuration (:mod:`fxq.models.hf_config`: classes, queries, layers, widths,
backbone, box refinement, two-stage) and
the weights are renamed to fxq's official layout: separate q/k/v projections become ``in_proj_weight``, the
Transformers ResNet (``embedder`` / ``encoder.stages``) and the timm ResNet of the published hub checkpoints
(``model.backbone.conv_encoder.model.*``, torchvision names) become ``backbone.0.body.*``, heads that
Transformers ties or stores once are filled in (two-stage: ``class_embed.N`` from ``model.decoder.class_embed.N``,
the encoder's head being the last N), and copies that fxq shares but the file holds with different values are
refused. Both the on-disk names (``conv_encoder``, ``out_proj``,
``fc1``) and the in-memory names of Transformers 5 (``backbone.model``, ``o_proj``, ``mlp.fc1``) are read.

safetensors files load without pickle; ``pytorch_model.bin`` loads with ``torch.load(weights_only=True)``.
Nothing here imports ``transformers``. The reverse, fxq weights as a Transformers folder, is
:mod:`fxq.models.hf_export`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxq.errors import CheckpointError, InputError
from fxq.models.hf_config import CONFIG_FILE, category_names, config_kwargs

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
SHOWN = 5
_HF_BACKBONE = "model.backbone.conv_encoder.model."
_FXQ_BODY = "backbone.0.body."


@dataclass
class TransformersCheckpoint:
    """A Transformers checkpoint read into fxq terms."""

    source: str
    architecture: str
    family: str
    kwargs: dict[str, Any]
    """fxq constructor keywords set by config.json."""
    category_names: dict[int, str]
    """class index -> name, from ``config.id2label``."""
    state: dict[str, torch.Tensor] = field(repr=False)
    """the weights in fxq's layout."""
    origin: dict[str, str] = field(repr=False, default_factory=dict)
    """fxq key -> the Transformers key(s) it came from."""


# ---------------------------------------------------------------------------------------------------- files


def is_transformers_source(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a Transformers ``config.json``, or a ``.safetensors`` file."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG_FILE).is_file()) or path.suffix == ".safetensors"


def is_transformers_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Transformers folder, or a ``.safetensors`` file with Transformers key names (only
    the file's header is read)."""
    path = Path(path)
    if path.is_dir():
        return (path / CONFIG_FILE).is_file()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(os.fspath(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:  # unreadable files are reported by the reader that follows
        return False
    return looks_like_transformers(dict.fromkeys(keys))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file (no pickle involved)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"reading {os.fspath(path)!r} needs the safetensors package: "
                              "pip install safetensors") from None
    try:
        return load_file(os.fspath(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable safetensors file ({exc}); pass the "
                              "model.safetensors written by save_pretrained") from None


def looks_like_transformers(state: Mapping[str, Any]) -> bool:
    """Whether a state_dict uses Transformers' DETR names rather than fxq's."""
    return any(k.startswith(("model.", "class_labels_classifier.", "bbox_predictor.")) for k in state)


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    single, index, legacy = (folder / name for name in WEIGHT_FILES)
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    if legacy.is_file():
        return dict(torch.load(legacy, map_location="cpu", weights_only=True))
    raise CheckpointError(f"{os.fspath(folder)!r} has a {CONFIG_FILE} but no weights: expected one of "
                          f"{', '.join(WEIGHT_FILES)} (save the model with save_pretrained)")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{os.fspath(path)!r} is not a readable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{os.fspath(path)!r} holds no JSON object: pass a Transformers config.json")
    return config


def read_transformers(path: str | os.PathLike) -> TransformersCheckpoint:
    """A Transformers folder (or a ``.safetensors`` file with ``config.json`` beside it) in fxq terms; one
    CheckpointError naming the field or the keys when the config is unsupported or disagrees with the weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not exist (pass a Transformers model folder "
                              "or its model.safetensors)")
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{os.fspath(path)!r} has no {CONFIG_FILE} beside it: a Transformers checkpoint "
                              "needs the config.json that save_pretrained writes with it")
    config = _read_config(config_path)
    hf_state = _weights_of(folder) if path.is_dir() else read_safetensors(path)
    architecture, family, kwargs = config_kwargs(config, os.fspath(config_path))
    check_config_against_weights(config, kwargs, family, hf_state, os.fspath(path))
    state, origin, unused = to_fxq(hf_state, family, kwargs)
    checkpoint = TransformersCheckpoint(os.fspath(path), architecture, family, kwargs, category_names(config),
                                        state, origin)
    _check_strict(checkpoint, unused)
    return checkpoint


def category_disagreements(model_names: Mapping[int, str], annotation_names: Mapping[int, str]) -> list[str]:
    """Where a model's class names (``config.id2label``) and an annotation file's categories (id -> name) name
    the same id differently, or the model has no class for an annotated id; Transformers' placeholder names
    (``N/A``, ``LABEL_i``) are not compared. Empty when they agree."""
    out = []
    for cid, name in sorted(annotation_names.items()):
        mine = model_names.get(cid)
        if mine is None:
            out.append(f"category {cid} ({name!r}) has no class in the model")
        elif mine != "N/A" and mine != f"LABEL_{cid}" and mine.lower() != name.lower():
            out.append(f"category {cid} is {name!r} in the annotations but {mine!r} in the model")
    return out


# ------------------------------------------------------------------------------------------------ key names

_V5_NAMES = ((re.compile(r"^model\.backbone\.model\."), _HF_BACKBONE), (re.compile(r"\.o_proj\."), ".out_proj."),
             (re.compile(r"(layers\.\d+)\.mlp\.fc(\d)\."), r"\1.fc\2."))

_ENCODER_DETR = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2",
                 "self_attn.out_proj": "self_attn.out_proj"}
_DECODER_DETR = {"self_attn_layer_norm": "norm1", "encoder_attn_layer_norm": "norm2", "fc1": "linear1",
                 "fc2": "linear2", "final_layer_norm": "norm3", "self_attn.out_proj": "self_attn.out_proj",
                 "encoder_attn.out_proj": "multihead_attn.out_proj"}
_DEFORM_ATTN = ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
_ENCODER_DEFORM = {"self_attn_layer_norm": "norm1", "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2",
                   **{f"self_attn.{p}": f"self_attn.{p}" for p in _DEFORM_ATTN}}
_DECODER_DEFORM = {"encoder_attn_layer_norm": "norm1", "self_attn_layer_norm": "norm2", "fc1": "linear1",
                   "fc2": "linear2", "final_layer_norm": "norm3", "self_attn.out_proj": "self_attn.out_proj",
                   **{f"encoder_attn.{p}": f"cross_attn.{p}" for p in _DEFORM_ATTN}}
#: The two-stage modules of Deformable DETR, named alike in both layouts (below ``model`` / ``transformer``).
_TWO_STAGE_MODULES = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
_QKV = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.([qkv])_proj\.(weight|bias)$")
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def canonical_name(key: str) -> str:
    """A Transformers key in its on-disk spelling (Transformers 5's in-memory names renamed back)."""
    for pattern, replacement in _V5_NAMES:
        key = pattern.sub(replacement, key)
    return key


def _hf_resnet_name(rest: str) -> str | None:
    """torchvision name of a Transformers ResNet key (below ``model``), or None."""
    if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", rest):
        return ("conv1." if m[1] == "convolution" else "bn1.") + m[2]
    if m := re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.shortcut\.(convolution|normalization)\.(\w+)",
                         rest):
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'convolution' else 1}.{m[4]}"
    if m := re.fullmatch(r"encoder\.stages\.(\d)\.layers\.(\d+)\.layer\.(\d)\.(convolution|normalization)\.(\w+)",
                         rest):
        kind = "conv" if m[4] == "convolution" else "bn"
        return f"layer{int(m[1]) + 1}.{m[2]}.{kind}{int(m[3]) + 1}.{m[5]}"
    return None


def _timm_name(rest: str) -> str | None:
    ok = re.fullmatch(r"(conv1|bn1|layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample\.[01]))\.\w+", rest)
    return rest if ok else None


def _backbone_name(key: str) -> str | None:
    rest = key[len(_HF_BACKBONE):]
    name = _hf_resnet_name(rest) if rest.startswith(("embedder.", "encoder.")) else _timm_name(rest)
    return None if name is None else _FXQ_BODY + name


def _head_name(key: str, family: str) -> str | None:
    if family == "detr":
        table = {"model.input_projection.": "input_proj.", "model.query_position_embeddings.": "query_embed.",
                 "class_labels_classifier.": "class_embed.", "bbox_predictor.": "bbox_embed.",
                 "model.decoder.layernorm.": "transformer.decoder.norm."}
    else:
        table = {"model.input_proj.": "input_proj.", "model.query_position_embeddings.": "query_embed.",
                 "model.reference_points.": "transformer.reference_points.", "class_embed.": "class_embed.",
                 "bbox_embed.": "bbox_embed.", "model.decoder.bbox_embed.": "transformer.decoder.bbox_embed.",
                 **{f"model.{m}.": f"transformer.{m}." for m in _TWO_STAGE_MODULES},
                 "model.decoder.class_embed.": "transformer.decoder.class_embed."}
        if key == "model.level_embed":
            return "transformer.level_embed"
    for hf, fxq in table.items():
        if key.startswith(hf):
            return fxq + key[len(hf):]
    return None


def fxq_name(key: str, family: str) -> str | None:
    """fxq's name for one Transformers key (on-disk spelling; q/k/v projections excluded), or None."""
    if key.startswith(_HF_BACKBONE):
        return _backbone_name(key)
    if m := _LAYER.match(key):
        part, index, module, kind = m.groups()
        tables = {("detr", "encoder"): _ENCODER_DETR, ("detr", "decoder"): _DECODER_DETR,
                  ("deformable_detr", "encoder"): _ENCODER_DEFORM, ("deformable_detr", "decoder"): _DECODER_DEFORM}
        target = tables[family, part].get(module)
        return None if target is None else f"transformer.{part}.layers.{index}.{target}.{kind}"
    return _head_name(key, family)


def to_fxq(hf_state: Mapping[str, torch.Tensor], family: str, kwargs: Mapping[str, Any]
           ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(fxq state_dict, fxq key -> Transformers key(s), Transformers keys with no fxq place) for a Transformers
    state_dict of ``family``."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unused: list[str] = []
    for raw, tensor in hf_state.items():
        key = canonical_name(raw)
        if key.endswith(".num_batches_tracked") and key.startswith(_HF_BACKBONE):
            continue  # frozen batch norm keeps no counter
        if m := _QKV.match(key):
            part, index, attn, which, kind = m.groups()
            target = "multihead_attn" if attn == "encoder_attn" else "self_attn"
            if family == "deformable_detr" and (part, attn) != ("decoder", "self_attn"):
                unused.append(raw)
                continue
            name = f"transformer.{part}.layers.{index}.{target}.in_proj_{kind}"
            qkv.setdefault(name, {})[which] = tensor
            origin[name] = key.replace(f".{which}_proj.", ".{q,k,v}_proj.")
            continue
        name = fxq_name(key, family)
        if name is None:
            unused.append(raw)
        else:
            state[name], origin[name] = tensor, raw
    for name, parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            state[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    _fill_tied_heads(state, origin, family, kwargs)
    return state, origin, unused


def _fill_tied_heads(state: dict[str, torch.Tensor], origin: dict[str, str], family: str,
                     kwargs: Mapping[str, Any]) -> None:
    """Heads Transformers stores once: per-layer class heads tied to the first (two-stage: to the decoder's
    copies), box heads shared with the decoder (box refinement) or with the first layer's (no refinement)."""
    if family != "deformable_detr":
        return
    refine, two_stage = kwargs["with_box_refine"], kwargs.get("two_stage", False)
    sources: list[tuple[str, Callable[[int], str]]]
    if two_stage:
        sources = [("class_embed.{}.", lambda i: f"transformer.decoder.class_embed.{i}."),
                   ("transformer.decoder.class_embed.{}.", lambda i: f"class_embed.{i}.")]
    else:
        sources = [("class_embed.{}.", lambda i: "class_embed.0.")]
    if refine:
        sources += [("bbox_embed.{}.", lambda i: f"transformer.decoder.bbox_embed.{i}."),
                    ("transformer.decoder.bbox_embed.{}.", lambda i: f"bbox_embed.{i}.")]
    else:
        sources += [("bbox_embed.{}.", lambda i: "bbox_embed.0.")]
    for pattern, source_of in sources:
        for layer in range(kwargs["dec_layers"] + int(two_stage)):
            target, source = pattern.format(layer), source_of(layer)
            if any(k.startswith(target) for k in state):
                continue
            for key in [k for k in state if k.startswith(source)]:
                state[target + key[len(source):]] = state[key]
                origin[target + key[len(source):]] = origin[key]


# ----------------------------------------------------------------------------------------------- checking


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {m[1] for k in state if (m := re.match(pattern, canonical_name(k)))}
    return len(found)


def _rows(state: Mapping[str, torch.Tensor], *keys: str) -> int | None:
    by_name = {canonical_name(k): v for k, v in state.items()}
    for key in keys:
        if key in by_name:
            return int(by_name[key].shape[0])
    return None


def check_config_against_weights(config: Mapping[str, Any], kwargs: Mapping[str, Any], family: str,
                                 hf_state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming the first config.json field whose value the weights contradict."""
    detr = family == "detr"
    classes = _rows(hf_state, *(["class_labels_classifier.bias"] if detr else
                                ["class_embed.0.bias", "model.decoder.class_embed.0.bias"]))
    queries = _rows(hf_state, "model.query_position_embeddings.weight")
    facts = [
        ("encoder_layers", kwargs["enc_layers"], _count(hf_state, r"^model\.encoder\.layers\.(\d+)\.")),
        ("decoder_layers", kwargs["dec_layers"], _count(hf_state, r"^model\.decoder\.layers\.(\d+)\.")),
        ("num_queries", kwargs["num_queries"], queries),
        ("d_model", kwargs["hidden_dim"], _rows(hf_state, "model.encoder.layers.0.self_attn_layer_norm.weight")),
        ("encoder_ffn_dim", kwargs["dim_feedforward"], _rows(hf_state, "model.encoder.layers.0.fc1.bias")),
        ("id2label (number of labels)", kwargs["num_classes"],
         None if classes is None else classes - (1 if detr else 0)),
    ]
    if not detr:
        facts += [("num_feature_levels", kwargs["num_feature_levels"], _rows(hf_state, "model.level_embed")),
                  ("with_box_refine", kwargs["with_box_refine"],
                   any(canonical_name(k).startswith("model.decoder.bbox_embed.") for k in hf_state))]
        _check_two_stage(kwargs["two_stage"], hf_state, source)
    for name, configured, found in facts:
        if found not in (None, 0) and found != configured:
            raise CheckpointError(f"{source}: config.json says {name} = {configured!r} but the weights hold "
                                  f"{found!r}: the config does not belong to these weights (fix {name} or pass "
                                  "the folder the weights were saved in)")


def _check_two_stage(configured: bool, hf_state: Mapping[str, torch.Tensor], source: str) -> None:
    """CheckpointError when config.json's ``two_stage`` and the presence of the two-stage modules disagree."""
    found = "model.enc_output.weight" in map(canonical_name, hf_state)
    if configured != found:
        raise CheckpointError(f"{source}: config.json says two_stage = {configured} but the weights "
                              f"{'hold' if found else 'lack'} the two-stage modules (model.enc_output, "
                              "model.pos_trans): fix two_stage or pass the folder the weights were saved in")


def _check_strict(checkpoint: TransformersCheckpoint, unused: list[str]) -> None:
    """CheckpointError listing Transformers keys fxq has no place for and fxq tensors the file lacks."""
    from fxq.models.zoo import FAMILIES

    with torch.device("meta"):
        model = FAMILIES[checkpoint.family](**checkpoint.kwargs)
    expected = model.state_dict()
    state = checkpoint.state
    missing = [k for k in expected if k not in state]
    extra = unused + [checkpoint.origin.get(k, k) for k in state if k not in expected]
    wrong = [f"{checkpoint.origin.get(k, k)} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or extra or wrong):
        _check_shared(checkpoint, model)
        return
    parts = [f"{name}: {len(items)} (first: {', '.join(items[:SHOWN])})"
             for name, items in (("missing (fxq names)", missing), ("unexpected (Transformers names)", extra),
                                 ("wrong shape (checkpoint vs config)", wrong)) if items]
    raise CheckpointError(f"Transformers checkpoint {checkpoint.source!r} ({checkpoint.architecture}) does not "
                          "match its config.json: " + "; ".join(parts)
                          + ". Pass the folder save_pretrained wrote, unchanged.")


def _check_shared(checkpoint: TransformersCheckpoint, model: nn.Module) -> None:
    """CheckpointError naming two Transformers keys that hold different values where fxq's model (the official
    layout) has one shared tensor, e.g. a two-stage head and its decoder copy saved untied."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    state, origin = checkpoint.state, checkpoint.origin
    for group in names.values():
        first = group[0]
        for other in group[1:]:
            if state[other] is not state[first] and not torch.equal(state[other], state[first]):
                raise CheckpointError(
                    f"Transformers checkpoint {checkpoint.source!r}: {origin.get(first, first)} and "
                    f"{origin.get(other, other)} differ, but fxq's {checkpoint.family} (the official layout) has "
                    "one tensor for both: fxq cannot hold untied copies of a head (a model saved with "
                    "tie_word_embeddings = false whose copies diverged); pass a checkpoint whose copies are equal")


# ------------------------------------------------------------------------------------------------- building


def build_transformers(path: str | os.PathLike, name: str | None = None, strict: bool = True,
                       seed: int | None = None, **overrides: Any) -> nn.Module:
    """The fxq model a Transformers checkpoint describes, in eval mode, with its weights loaded and
    ``category_names`` (class index -> name from ``config.id2label``) set on it.

    ``name``: a zoo name whose family (DETR or Deformable DETR) must be the checkpoint's; config.json sets every
    other hyperparameter. Keyword overrides change settings that do not touch the weights (e.g. ``aux_loss``).
    """
    from fxq.models.zoo import FAMILIES, config_of

    checkpoint = read_transformers(path)
    if name is not None and config_of(name)[0] != checkpoint.family:
        raise InputError(f"{os.fspath(path)!r} holds a {checkpoint.architecture}; build it as a "
                         f"{checkpoint.family} model (e.g. {checkpoint.family}_r50), not {name!r}")
    if seed is not None:
        torch.manual_seed(seed)
    model = FAMILIES[checkpoint.family](**{**checkpoint.kwargs, **overrides})
    if strict:
        from fxq.models.checkpoint import check_compatible

        check_compatible(model, checkpoint.state, checkpoint.source, name or checkpoint.family)
    model.load_state_dict(checkpoint.state, strict=strict)
    model.category_names = checkpoint.category_names
    return model.eval()
