"""Capture and restore the global RNG states (torch, numpy, python) as tensors and plain types.

Plain types keep checkpoints loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """The current torch, numpy and python global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "python": {
            "version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng(state: dict) -> None:
    """Set the global RNGs to a state returned by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    """Seed the torch, numpy and python global RNGs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
