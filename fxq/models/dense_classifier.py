"""A detector's ResNet body with a per-location class head: the model ``fxq pretrain`` trains.

It plays the part ImageNet pretraining plays for DETR: the body learns to tell the categories apart before
the detector is trained on top of it. The state_dict keys of the body are the detector's (``backbone.0.body.*``),
so the saved tensors load with ``fxq train --backbone-from``.
"""

from __future__ import annotations

import torch
from torch import nn

from fxq.models.backbone import Backbone
from fxq.models.resnet import ResNetBody


class DenseClassifier(nn.Module):
    """Class logits [B, K, h, w] at every location of the body's last returned stage (a 1×1 convolution)."""

    def __init__(self, body: ResNetBody, num_classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Backbone(body))
        self.classifier = nn.Conv2d(body.channels[body.return_layers[-1]], num_classes, kernel_size=1)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` is accepted for the trainer's calling convention; padding is classified like any pixel."""
        return self.classifier(self.backbone[0](images)[-1])

    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The body's tensors under the detector's names (``backbone.0.body.*``)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("backbone.0.")}
