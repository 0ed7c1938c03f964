"""copy_backbone: a detector's ResNet taken from another trained detector, everything else untouched."""

from __future__ import annotations

import pytest
import torch

import fxq
from fxq.models import build
from fxq.models.transfer import copy_backbone


def test_backbone_comes_from_the_source_and_nothing_else_changes(tmp_path):
    torch.manual_seed(0)
    source = build("deformable_detr_tiny", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "source.pt")
    torch.manual_seed(1)
    target = build("detr_tiny", pretrained=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    copied = copy_backbone(target, tmp_path / "source.pt")
    after, src = target.state_dict(), source.state_dict()
    backbone = [k for k in after if k.startswith("backbone.0.")]
    assert copied == len(backbone) > 100
    assert all(torch.equal(after[k], src[k]) for k in backbone)
    assert any(not torch.equal(after[k], before[k]) for k in backbone)
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("backbone.0."))


def test_a_different_backbone_is_one_error_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    state = build("deformable_detr_tiny", pretrained=False).state_dict()
    state["backbone.0.body.layer1.0.conv1.weight"] = torch.zeros(5, 5, 3, 3)
    torch.save(state, tmp_path / "other.pt")
    target = build("detr_tiny", pretrained=False)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(fxq.InputError, match=r"layer1\.0\.conv1\.weight.*shape \(5, 5, 3, 3\).*same ResNet"):
        copy_backbone(target, tmp_path / "other.pt")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    del state["backbone.0.body.conv1.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(fxq.InputError, match=r"no 'backbone\.0\.body\.conv1\.weight'"):
        copy_backbone(target, tmp_path / "partial.pt")
