"""A detector's ResNet body with dense per-location heads: the model ``fxq pretrain`` trains.

It plays the part ImageNet pretraining plays for DETR, with boxes: the body learns to name each object and to
see where it is and how large (CenterNet-like heads on the body's last stage) before the detector is trained
on top of it. The body's state_dict keys are the detector's (``backbone.0.body.*``), so the saved tensors load
with ``fxq train --backbone-from``.
"""

from __future__ import annotations

import torch
from torch import nn

from fxq.models.backbone import Backbone
from fxq.models.resnet import ResNetBody


class CentrePretrainer(nn.Module):
    """``class_map`` [B, K, h, w]: class logits; ``box_map`` [B, 3, h, w]: an object-centre logit and the
    box's (w, h) relative to the image, as logits of a sigmoid; both 1×1 convolutions of the last stage."""

    def __init__(self, body: ResNetBody, num_classes: int) -> None:
        super().__init__()
        channels = body.channels[body.return_layers[-1]]
        self.backbone = nn.Sequential(Backbone(body))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.box = nn.Conv2d(channels, 3, kernel_size=1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``mask`` is accepted for the trainer's calling convention; padding is read like any pixel."""
        features = self.backbone[0](images)[-1]
        return {"class_map": self.classifier(features), "box_map": self.box(features)}

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The body's tensors under the detector's names (``backbone.0.body.*``)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("backbone.0.")}
