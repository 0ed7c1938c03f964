"""fxq.models.build with checkpoints: official and plain formats, strictness, readable errors."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

import fxq
from fxq.models import build


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_release_format_loads(tmp_path):
    """{"model": ..., "optimizer": ..., "args": Namespace, "epoch": ...} as the official training scripts save."""
    source = build("detr_tiny", pretrained=False)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}}, "epoch": 49,
                "args": argparse.Namespace(lr=1e-4, backbone="resnet50")}, path)
    loaded = build("detr_tiny", checkpoint=path)
    assert _same_weights(loaded, source)
    torch.manual_seed(1)
    other = build("detr_tiny", pretrained=False)
    assert not _same_weights(other, source), "random init must differ, or the test proves nothing"


def test_plain_and_ddp_state_dicts_load(tmp_path):
    source = build("detr_tiny")
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pth")
    assert _same_weights(build("detr_tiny", checkpoint=tmp_path / "plain.pth"), source)
    assert _same_weights(build("detr_tiny", checkpoint=tmp_path / "ddp.pth"), source)


def test_checkpoint_of_another_architecture_names_it(tmp_path):
    path = tmp_path / "deformable.pth"
    torch.save({"model": build("deformable_detr_tiny").state_dict()}, path)
    with pytest.raises(fxq.CheckpointError) as err:
        build("detr_tiny", checkpoint=path)
    message = str(err.value)
    assert "missing:" in message and "unexpected:" in message and "'deformable_detr_tiny'" in message
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in message


def test_wrong_shapes_are_listed(tmp_path):
    path = tmp_path / "classes.pth"
    small = build("detr_tiny", num_classes=7)
    logits = 7 + (small.head == "softmax")  # the no-object logit
    torch.save(small.state_dict(), path)
    with pytest.raises(fxq.CheckpointError, match=rf"wrong shape .*: 2 \(first: class_embed.weight \({logits}, 128\)"):
        build("detr_tiny", checkpoint=path)
    loaded = build("detr_tiny", checkpoint=path, num_classes=7)
    assert loaded.class_embed.out_features == logits


def test_missing_key_is_reported_with_count(tmp_path):
    state = build("detr_tiny").state_dict()
    del state["query_embed.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(fxq.CheckpointError, match=r"missing: 1 \(first: query_embed.weight\)"):
        build("detr_tiny", checkpoint=tmp_path / "partial.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("content", [b"not a checkpoint at all", pickle.dumps(_Evil())])
def test_non_checkpoints_are_refused(tmp_path, content, capsys):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(fxq.CheckpointError, match="not a readable PyTorch checkpoint"):
        build("detr_tiny", checkpoint=path)
    assert "code ran" not in capsys.readouterr().out


def test_checkpoint_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(fxq.CheckpointError, match="holds no state_dict"):
        build("detr_tiny", checkpoint=tmp_path / "meta.pth")


def test_missing_file_and_unknown_model():
    with pytest.raises(fxq.CheckpointError, match="does not exist"):
        build("detr_tiny", checkpoint="/nonexistent/x.pth")
    with pytest.raises(fxq.InputError, match=r"unknown model 'detr_r05'.*Did you mean detr_r50.*detr_tiny"):
        build("detr_r05")


def test_seeded_random_weights_are_the_same_on_every_call_and_follow_the_seed():
    torch.manual_seed(123)
    a = build("detr_tiny", pretrained=False, seed=5).state_dict()
    torch.manual_seed(456)
    b = build("detr_tiny", pretrained=False, seed=5).state_dict()
    c = build("detr_tiny", pretrained=False, seed=6).state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert any(not torch.equal(v, c[k]) for k, v in a.items())
