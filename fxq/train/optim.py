"""AdamW with DETR's two parameter groups: the backbone (names containing "backbone") at ``lr_backbone``."""

from __future__ import annotations

from torch import nn
from torch.optim import AdamW

from fxq.errors import InputError
from fxq.train.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> AdamW:
    """AdamW over the trainable parameters, in groups ``main`` (lr) and ``backbone`` (lr_backbone)."""
    main, backbone = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (backbone if "backbone" in name else main).append(param)
    groups = [
        {"params": params, "lr": lr, "name": name}
        for name, params, lr in (("main", main, cfg.lr), ("backbone", backbone, cfg.lr_backbone))
        if params
    ]
    if not groups:
        raise InputError("the model has no trainable parameters; unfreeze some (requires_grad=True)")
    return AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
