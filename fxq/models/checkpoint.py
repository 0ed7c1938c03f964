"""Reading model checkpoints: official release files (``{"model": state_dict, ...}``), plain state_dicts,
``.safetensors`` files and Hugging Face Transformers folders (:mod:`fxq.models.hf_layout`).

Files load with ``torch.load(weights_only=True)``; ``argparse.Namespace`` is allow-listed because the official
training checkpoints store their ``args`` as one. safetensors files load without pickle.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import torch
from torch import nn

from fxq.errors import CheckpointError

SHOWN = 5


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state_dict stored in ``path`` (official ``{"model": ...}`` layout, a plain state_dict, a
    ``.safetensors`` file in fxq's layout, or a Transformers folder / ``.safetensors`` mapped to fxq's layout)."""
    from fxq.models import hf_layout

    path = os.fspath(path)
    if hf_layout.is_transformers_source(path):
        return _read_transformers_or_safetensors(path)
    if os.path.isdir(path):
        raise CheckpointError(f"folder {path!r} has no config.json: pass a Hugging Face Transformers model folder "
                              "(config.json + model.safetensors) or a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (pass the path of a .pth file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for non-checkpoint files
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "pass a file written by torch.save holding a state_dict or {'model': state_dict}") from None
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(obj)[:SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path!r} holds no state_dict (top level: {keys}); expected a mapping of tensors "
                              "or {'model': state_dict} as in the official DETR release files")
    return _strip_prefix(dict(state), "module.")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _read_transformers_or_safetensors(path: str) -> dict[str, torch.Tensor]:
    from fxq.models import hf_layout

    if hf_layout.is_transformers_checkpoint(path) or not os.path.isfile(path):
        return hf_layout.read_transformers(path).state
    return _strip_prefix(hf_layout.read_safetensors(path), "module.")


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, model_name: str) -> None:
    """Raise one CheckpointError listing missing, unexpected and wrong-shape keys, if there are any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        return
    parts = [f"{name}: {len(items)} (first: {', '.join(items[:SHOWN])})"
             for name, items in (("missing", missing), ("unexpected", unexpected),
                                 ("wrong shape (checkpoint vs model)", wrong)) if items]
    guess = guess_model(state)
    hint = f"it holds a {guess!r} model: build that one" if guess else "pick the model it was trained as"
    hint = _transformers_hint(source, model_name) or hint
    raise CheckpointError(f"checkpoint {source!r} does not fit model {model_name!r}: " + "; ".join(parts)
                          + f". {hint[0].upper() + hint[1:]}, or pass strict=False.")


def _transformers_hint(source: str, model_name: str) -> str | None:
    """For a Transformers checkpoint: the config.json settings the named zoo model does not share."""
    import inspect

    from fxq.models import hf_layout
    from fxq.models.zoo import CONFIGS, config_of

    if model_name not in CONFIGS or not hf_layout.is_transformers_source(source):
        return None
    try:
        checkpoint = hf_layout.read_transformers(source)
    except CheckpointError:
        return None
    from fxq.models.deformable_detr import DeformableDETR
    from fxq.models.detr import DETR

    family, named = config_of(model_name)
    classes = {"detr": DETR, "deformable_detr": DeformableDETR}
    defaults = {k: p.default for k, p in inspect.signature(classes[family]).parameters.items()}
    differ = {k: v for k, v in checkpoint.kwargs.items() if {**defaults, **named}.get(k) != v}
    settings = ", ".join(f"{k}={v!r}" for k, v in differ.items())
    return (f"its config.json sets {settings}, which {model_name!r} does not: load it with "
            "fxq.models.hf_layout.build_transformers (config.json decides the configuration) or pass those keywords")


def guess_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the zoo configuration whose state_dict keys and shapes equal ``state``'s, if any."""
    from fxq.models.zoo import construct, model_names

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in model_names():
        with torch.device("meta"):
            candidate = construct(name).state_dict()
        if {k: tuple(v.shape) for k, v in candidate.items()} == shapes:
            return name
    return None
