"""Reading model checkpoints: official release files (``{"model": state_dict, ...}``) and plain state_dicts.

Files load with ``torch.load(weights_only=True)``; ``argparse.Namespace`` is allow-listed because the official
training checkpoints store their ``args`` as one.
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
    """The model state_dict stored in ``path`` (official ``{"model": ...}`` layout or a plain state_dict)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist (pass the path of a .pth file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for non-checkpoint files
        raise CheckpointError(
            f"{path!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "pass a file written by torch.save holding a state_dict or {'model': state_dict}") from None
    state = obj.get("model", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(obj)[:SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path!r} holds no state_dict (top level: {keys}); expected a mapping of tensors "
                              "or {'model': state_dict} as in the official DETR release files")
    return _strip_prefix(dict(state), "module.")


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
    raise CheckpointError(f"checkpoint {source!r} does not fit model {model_name!r}: " + "; ".join(parts)
                          + f". {hint[0].upper() + hint[1:]}, or pass strict=False.")


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
