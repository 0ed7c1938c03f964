"""ResNet-18/34/50/101 bodies with torchvision's state_dict names, FrozenBatchNorm2d and optional dilation.

Only the feature extractor is built (conv1 … layer4, no avgpool/fc), as DETR's ``backbone.0.body`` holds it.
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose weight, bias and running statistics are buffers (never trained).

    Its state_dict keys are torchvision's (weight, bias, running_mean, running_var); a checkpoint's
    ``num_batches_tracked`` is accepted and dropped. fxq traces it as a leaf so passes can fold it into the
    preceding convolution.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, shift) such that forward(x) = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


NORM_LAYERS: dict[str, type[nn.Module]] = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, width, stride, dilation)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width, 1, dilation)
        self.bn2 = norm(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided, torchvision v1.5) → 1×1 with a residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1, norm: type[nn.Module] = FrozenBatchNorm2d) -> None:
        super().__init__()
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = norm(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = norm(width)
        self.conv3 = _conv1x1(width, width * 4)
        self.bn3 = norm(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


class ResNetBody(nn.Module):
    """The convolutional body of a ResNet, returning the outputs of the requested stages (``layer1``…``layer4``).

    ``dilation=True`` replaces the stride of layer4 by dilation (DETR's DC5 variant).
    ``base_width`` scales every stage's width (64 for the standard networks; smaller for CPU-sized models).
    ``norm`` is ``"frozen_bn"`` (DETR's choice for ImageNet-pretrained backbones) or ``"bn"`` (trainable
    BatchNorm2d, for the tiny models fxq trains from scratch; same state_dict keys plus num_batches_tracked).
    """

    def __init__(self, name: str, return_layers: tuple[str, ...] = ("layer4",), dilation: bool = False,
                 base_width: int = 64, norm: str = "frozen_bn") -> None:
        super().__init__()
        block, depths = RESNET_LAYOUTS[name]
        self.return_layers = tuple(return_layers)
        self.inplanes, self._dilation, self._norm = base_width, 1, NORM_LAYERS[norm]
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, depth in enumerate(depths):
            stride = 1 if i == 0 else 2
            layer = self._make_layer(block, base_width * 2**i, depth, stride, dilate=dilation and i == 3)
            self.add_module(f"layer{i + 1}", layer)
        self.channels = {f"layer{i + 1}": base_width * 2**i * block.expansion for i in range(4)}

    def _make_layer(self, block: type[nn.Module], width: int, depth: int, stride: int,
                    dilate: bool) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != width * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, width * block.expansion, stride),
                                       self._norm(width * block.expansion))
        blocks = [block(self.inplanes, width, stride, downsample, previous_dilation, self._norm)]
        self.inplanes = width * block.expansion
        blocks += [block(self.inplanes, width, dilation=self._dilation, norm=self._norm) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name in self.return_layers:
                outs.append(x)
        return outs
