"""Batching images of different sizes: zero-padding at the bottom/right and a padding mask (DETR's
NestedTensor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_images(
    images: Sequence[torch.Tensor], size_divisibility: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [3, H, W] tensors into ``(images [B, 3, Hmax, Wmax], mask [B, Hmax, Wmax])``; mask True =
    padding.

    With ``size_divisibility`` > 1, Hmax and Wmax are rounded up to a multiple of it.
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    hmax = max(int(im.shape[-2]) for im in images)
    wmax = max(int(im.shape[-1]) for im in images)
    if size_divisibility > 1:
        hmax = -(-hmax // size_divisibility) * size_divisibility
        wmax = -(-wmax // size_divisibility) * size_divisibility
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], hmax, wmax))
    mask = torch.ones((len(images), hmax, wmax), dtype=torch.bool, device=first.device)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        batch[i, :, :h, :w] = im
        mask[i, :h, :w] = False
    return batch, mask


def collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """DataLoader ``collate_fn``: (image, target) pairs -> ``(images, mask, targets)`` with padding mask."""
    images, targets = zip(*batch, strict=True)
    padded, mask = pad_images(images)
    return padded, mask, list(targets)


class PadCollate:
    """Like :func:`collate`, padding to a multiple of ``size_divisibility`` (picklable for workers)."""

    def __init__(self, size_divisibility: int = 1):
        self.size_divisibility = size_divisibility

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, dict]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        images, targets = zip(*batch, strict=True)
        padded, mask = pad_images(images, self.size_divisibility)
        return padded, mask, list(targets)
