"""AdamW with DETR's parameter groups: ``main`` (lr), ``backbone`` (names containing "backbone", lr_backbone)
and, for a quantization-aware run, ``quantizer`` (the learnable scales and zero-points of fake quantizers,
names under ``fxq_q.``, at ``lr_quant`` and without weight decay, which would pull scales towards zero)."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW

from fxq.errors import InputError
from fxq.roles import QUANT_ROOT
from fxq.train.config import TrainConfig

QUANTIZER_PREFIX = f"{QUANT_ROOT}."


def _group_of(name: str) -> str:
    if name.startswith(QUANTIZER_PREFIX) or f".{QUANTIZER_PREFIX}" in name:
        return "quantizer"
    return "backbone" if "backbone" in name else "main"


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """AdamW over the trainable parameters in groups ``main``, ``backbone`` and ``quantizer`` (empty ones left out)."""
    params: dict[str, list] = {"main": [], "backbone": [], "quantizer": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            params[_group_of(name)].append(param)
    lr_quant = cfg.lr if cfg.lr_quant is None else cfg.lr_quant
    settings = {"main": (cfg.lr, cfg.weight_decay), "backbone": (cfg.lr_backbone, cfg.weight_decay),
                "quantizer": (lr_quant, 0.0)}
    groups = [{"params": p, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
              for g, p in params.items() if p]
    if not groups:
        raise InputError("the model has no trainable parameters; unfreeze some (requires_grad=True)")
    return AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
