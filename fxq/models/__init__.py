"""The model zoo: DETR and Deformable DETR with ResNet backbones, in the official parameter layouts."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from fxq.models.checkpoint import check_compatible, read_state_dict
from fxq.models.embedded import embedded_weights
from fxq.models.zoo import CONFIGS, config_of, construct, model_names

__all__ = ["CONFIGS", "build", "embedded_weights", "model_names", "read_state_dict"]


def build(name: str, checkpoint: str | os.PathLike | None = None, strict: bool = True, pretrained: bool = True,
          seed: int | None = None, **overrides: Any) -> nn.Module:
    """The named model in eval mode, loaded from ``checkpoint``, else from fxq's embedded weights (the tiny
    models fxq trains itself, when ``pretrained`` and no configuration override is given), else random.

    ``checkpoint`` may be an official release file (``{"model": state_dict}``), a plain state_dict, or a Hugging
    Face Transformers folder or ``.safetensors`` file (its config.json sets the architecture); loading
    is strict by default. Keyword overrides change the configuration (e.g. ``num_classes=21``). ``seed``
    seeds torch's global generator before the weights are drawn, so random weights are the same on every call
    (without it they come from the global generator as it stands).
    """
    config_of(name)
    from fxq.models.hf_layout import build_transformers, is_transformers_checkpoint

    if checkpoint is not None and is_transformers_checkpoint(checkpoint):
        return build_transformers(checkpoint, name, strict=strict, seed=seed, **overrides)
    if checkpoint is None and pretrained and not overrides:
        checkpoint = embedded_weights(name)
    state = None if checkpoint is None else read_state_dict(checkpoint)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    model = construct(name, **overrides)
    if state is not None:
        if strict:
            check_compatible(model, state, os.fspath(checkpoint), name)
        model.load_state_dict(state, strict=strict)
    return model.eval()
