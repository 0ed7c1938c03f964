"""Float64 reference of multi-scale deformable attention's sampling core and its random test inputs, shared by
the tests of the fast and the int8 sampling cores."""

from __future__ import annotations

import torch


def bilinear_reference(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """Σ_l Σ_p a · bilinear(value_l, location) in float64, from the definition: pixel x = loc·W − 0.5, the four
    integer neighbours weighted by (1 − |x − xi|)(1 − |y − yi|), neighbours outside the map read 0."""
    batch, _, heads, dim = value.shape
    queries = locations.shape[1]
    out = torch.zeros(batch, queries, heads, dim, dtype=torch.float64)
    n = torch.arange(batch)[:, None, None, None]
    m = torch.arange(heads)[None, None, :, None]
    maps = value.double().split([h * w for h, w in shapes], dim=1)
    for level, (h, w) in enumerate(shapes):
        grid = maps[level].reshape(batch, h, w, heads, dim)
        x = locations[:, :, :, level, :, 0].double() * w - 0.5
        y = locations[:, :, :, level, :, 1].double() * h - 0.5
        a = weights[:, :, :, level].double()
        for xi in (x.floor(), x.floor() + 1):
            for yi in (y.floor(), y.floor() + 1):
                inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
                corner = (1 - (x - xi).abs()) * (1 - (y - yi).abs()) * inside * a
                sample = grid[n, yi.clamp(0, h - 1).long(), xi.clamp(0, w - 1).long(), m]
                out += (corner[..., None] * sample).sum(3)
    return out.reshape(batch, queries, heads * dim)


def random_inputs(batch: int, shapes: list[tuple[int, int]], heads: int, dim: int, points: int, queries: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """value N(0, 1); locations in [-0.6, 1.6] with some exactly on 0, 1, the pixel centres' edge and far out;
    attention weights softmax over levels × points."""
    g = torch.Generator().manual_seed(seed)
    levels = len(shapes)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dim, generator=g)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g) * 2.2 - 0.6
    flat = locations.view(-1)
    specials = torch.tensor([0.0, 1.0, -3.0, 4.5, 0.5, -1e-7, 1 + 1e-7])
    picks = torch.randint(0, flat.numel(), (flat.numel() // 5,), generator=g)
    flat[picks] = specials[torch.randint(0, len(specials), picks.shape, generator=g)]
    logits = torch.randn(batch, queries, heads, levels * points, generator=g)
    weights = logits.softmax(-1).view(batch, queries, heads, levels, points)
    return value, locations, weights
