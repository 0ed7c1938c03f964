"""PassManager: readable names for passes with options, fresh infos per run, failures that name the pass."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult

import fxq
from fxq.errors import FxqError, InputError
from fxq.passes import (
    PassError,
    PassManager,
    PassResult,
    annotate_policy,
    calibrate,
    fold_batchnorm,
    insert_quantizers,
    remove_dropout,
)
from fxq.passes.pass_manager import pass_name


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(images)))))


def _graph():
    torch.manual_seed(0)
    model = _Small().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return fxq.trace(model, torch.randn(1, 3, 8, 8))


CALIB = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def _ptq_passes(loader=CALIB):
    return [remove_dropout, fold_batchnorm, functools.partial(annotate_policy, policy="W4A8"), insert_quantizers,
            functools.partial(calibrate, loader=loader, progress=False)]


def test_partial_passes_run_as_the_passes_called_by_hand_and_are_named_with_their_options():
    gm, by_hand = _graph(), _graph()
    result = PassManager(_ptq_passes())(gm)
    remove_dropout(by_hand)
    fold_batchnorm(by_hand)
    annotate_policy(by_hand, "W4A8")
    insert_quantizers(by_hand)
    calibrate(by_hand, CALIB, progress=False)
    images = torch.randn(2, 3, 8, 8)
    assert result.modified and result.gm is gm
    assert torch.equal(gm(images), by_hand(images))
    names = [name for name, _ in result.info["passes"]]
    assert names == ["remove_dropout", "fold_batchnorm", "annotate_policy(policy='W4A8')", "insert_quantizers",
                     "calibrate(loader=list, progress=False)"]
    assert result.info["passes"][-1][1] == calibrate(copy.deepcopy(by_hand), CALIB, progress=False).info


def test_every_run_reports_only_its_own_passes():
    manager = PassManager([remove_dropout, fold_batchnorm])
    first = manager(_graph()).info["passes"]
    second = manager(_graph()).info["passes"]
    assert [n for n, _ in first] == [n for n, _ in second] == ["remove_dropout", "fold_batchnorm"]
    assert not hasattr(manager, "infos")


def test_a_failing_pass_is_named_with_the_passes_before_it_and_the_cause_chained():
    with pytest.raises(PassError) as caught:
        PassManager(_ptq_passes(loader=[]))(_graph())
    err = caught.value
    assert isinstance(err, FxqError) and isinstance(err.__cause__, InputError)
    assert err.pass_name == "calibrate(loader=[], progress=False)"  # short plain values are shown
    assert err.completed == ["remove_dropout", "fold_batchnorm", "annotate_policy(policy='W4A8')",
                             "insert_quantizers"]
    message = str(err)
    assert "'calibrate(loader=[], progress=False)'" in message and "insert_quantizers" in message
    assert "yielded no batches" in message  # the original message is kept


def _breaks_the_graph(gm):
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes["images"].append(nodes["relu"])  # relu now comes before the conv it reads
    return PassResult(gm, True)


def _returns_nothing(gm):
    return None


@pytest.mark.parametrize("bad, cause", [(_breaks_the_graph, RuntimeError), (_returns_nothing, TypeError)])
def test_an_invalid_graph_or_result_is_blamed_on_the_pass_that_made_it(bad, cause):
    with pytest.raises(PassError, match=rf"pass '{bad.__name__}' failed after \['remove_dropout'\]") as caught:
        PassManager([remove_dropout, bad])(_graph())
    assert isinstance(caught.value.__cause__, cause) and caught.value.completed == ["remove_dropout"]


class _Scale:
    """A pass object with an option and a name."""

    name = "scale_head"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, gm):
        with torch.no_grad():
            gm.get_submodule("head").weight.mul_(self.factor)
        return PassResult(gm, False, {"factor": self.factor})


class _TorchStyle(PassBase):
    """A torch.fx infra pass: replaces relu by sigmoid and returns torch's PassResult."""

    def call(self, graph_module):
        for node in graph_module.graph.nodes:
            if node.target is torch.relu:
                node.target = torch.sigmoid
        return TorchPassResult(graph_module, True)


def test_pass_objects_and_torch_infra_passes():
    gm = _graph()
    reference = copy.deepcopy(gm)
    images = torch.randn(1, 3, 8, 8)
    result = PassManager([_Scale(2.0), _TorchStyle()])(gm)
    assert result.info["passes"] == [("scale_head", {"factor": 2.0}), ("_TorchStyle", {})]
    assert result.modified and "sigmoid" in gm.code  # recompiled after the torch pass changed the graph
    with torch.no_grad():
        x = torch.sigmoid(reference.bn(reference.conv(images)))
        expected = nn.functional.conv2d(x, 2 * reference.head.weight, reference.head.bias)
    assert torch.allclose(gm(images), expected, atol=1e-6)


def test_names_of_plain_values_and_of_objects():
    assert pass_name(functools.partial(annotate_policy, "W8A8", a_observer="mse")) == \
        "annotate_policy('W8A8', a_observer='mse')"
    assert pass_name(functools.partial(calibrate, loader=torch.utils.data.DataLoader(CALIB))) == \
        "calibrate(loader=DataLoader)"
