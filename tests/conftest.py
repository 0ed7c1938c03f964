"""Shared test helpers: paths of the real data and the official reference layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
REFERENCE = DATA / "reference"


def reference_layout(name: str) -> dict:
    """The official state_dict layout of ``name`` from ../shared/data/reference."""
    return json.loads((REFERENCE / f"{name}.state_dict.json").read_text())


# One intra-op thread per test process: the suite runs in 2 xdist workers (pyproject addopts), and torch's
# threads oversubscribe a loaded 2-core machine badly (a tiny forward went from 0.1 s to 14 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
