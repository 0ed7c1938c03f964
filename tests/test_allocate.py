"""Bit allocation MILP against brute force, tie groups, budgets, infeasibility, Pareto frontier and the report."""

from __future__ import annotations

import itertools
import math
import re

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

import fxq
from fxq.passes.allocate import allocate_bits, pareto_frontier, solve_mckp
from fxq.passes.fisher import fisher_traces
from fxq.passes.policy import annotate_policy
from fxq.passes.report import allocation_table, plot_allocation
from fxq.passes.tie_groups import PARAM, attention_groups, graph_view, shared_weight_groups
from fxq.quant import QSpec

CANDIDATES = (2, 4, 8)
KINDS = ("avg_bits", "size_bytes", "bops", "latency")


class Chain(nn.Module):
    """conv -> a -> b -> b (same module twice: one shared weight) -> c -> d -> e; 7 nodes, 6 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 5)
        self.d, self.e = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.b(self.a(self.conv(images).mean((2, 3))))
        return self.e(self.d(self.c(self.b(torch.relu(x)))))


# independent facts about Chain at 1x3x8x8: weight per node, weight elements, multiply-accumulates
WEIGHT = {"conv": "conv", "a": "a", "b": "b", "b_1": "b", "c": "c", "d": "d", "e": "e"}
NUMEL = {"conv": 4 * 3 * 9, "a": 24, "b": 36, "c": 30, "d": 35, "e": 21}
MACS = {"conv": 8 * 8 * 4 * 27, "a": 24, "b": 36, "b_1": 36, "c": 30, "d": 35, "e": 21}


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    return fxq.trace(Chain(), torch.randn(1, 3, 8, 8))


def randomise(gm, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """Random a_bits, sensitivities (equal for the shared weight) and latencies on every node."""
    omega, a_bits, latency = {}, {}, {}
    for name in WEIGHT:
        node = next(n for n in gm.graph.nodes if n.name == name)
        a_bits[name] = [8, 4, None][rng.integers(3)]
        if name == "b_1":
            omega[name] = omega["b"]
        else:
            omega[name] = {b: float(rng.uniform(0.1, 1.0) * 4.0 ** (-math.log2(b)) * rng.uniform(0.5, 2)) for b in
                           CANDIDATES}
        latency[name] = {b: float(rng.uniform(0.1, 2.0)) for b in CANDIDATES}
        node.meta.pop("fxq.fisher", None)
        node.meta["fxq.qspec"] = QSpec(w_bits=8, a_bits=a_bits[name], w_observer="minmax")
        node.meta["fxq.sensitivity"] = dict(omega[name])
    return omega, a_bits, latency


def resource(kind: str, assign: dict, a_bits: dict, latency: dict) -> float:
    weights = {WEIGHT[n]: assign[n] for n in assign}  # tied shared weight: one entry
    if kind == "avg_bits":
        return sum(NUMEL[w] * b for w, b in weights.items()) / sum(NUMEL.values())
    if kind == "size_bytes":
        return sum(NUMEL[w] * b / 8 for w, b in weights.items())
    if kind == "bops":
        return sum(MACS[n] * b * (a_bits[n] or 32) for n, b in assign.items())
    return sum(latency[n][b] for n, b in assign.items())


def brute_force(kind, omega, a_bits, latency, ties, budget):
    """(best objective, its resource, smallest feasible budget) over every assignment respecting the ties."""
    names = list(WEIGHT)
    best, best_used, floor = math.inf, None, math.inf
    for combo in itertools.product(CANDIDATES, repeat=len(names)):
        assign = dict(zip(names, combo, strict=True))
        if any(len({assign[n] for n in group}) > 1 for group in ties):
            continue
        used = resource(kind, assign, a_bits, latency)
        floor = min(floor, used)
        if used <= budget:
            cost = sum(omega[n][b] for n, b in assign.items() if n != "b_1")
            if cost < best:
                best, best_used = cost, used
    return best, best_used, floor


@pytest.mark.parametrize("kind", KINDS)
def test_ilp_equals_brute_force_and_honours_budget_and_ties(chain, kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for trial in range(6):
        omega, a_bits, latency = randomise(chain, rng)
        ties = [["b", "b_1"]] + ([["conv", "d"]] if trial % 2 else [])
        _, _, floor = brute_force(kind, omega, a_bits, latency, ties, math.inf)
        high = max(resource(kind, dict.fromkeys(WEIGHT, b), a_bits, latency) for b in CANDIDATES)
        budget = float(rng.uniform(floor, max(high, floor * 1.01))) if trial else floor  # trial 0: tightest
        expected, _, _ = brute_force(kind, omega, a_bits, latency, ties, budget)
        info = allocate_bits(chain, CANDIDATES, budget, kind, latency_table=latency,
                             tie_groups=ties[1:] or None).info
        bits = {n.name: n.meta["fxq.qspec"].w_bits for n in chain.graph.nodes if n.name in WEIGHT}
        assert info["objective_value"] == pytest.approx(expected, rel=1e-9), (kind, trial)
        used = resource(kind, bits, a_bits, latency)
        assert used <= budget * (1 + 1e-9) and info["used"] == pytest.approx(used, rel=1e-9)
        assert info["min_budget"] == pytest.approx(floor, rel=1e-12)
        assert all(len({bits[n] for n in group}) == 1 for group in ties)
        assert {n.name: n.meta["fxq.qspec"].a_bits for n in chain.graph.nodes if n.name in WEIGHT} == a_bits


@pytest.mark.parametrize("kind", KINDS)
def test_infeasible_budget_reports_the_smallest_feasible_one(chain, kind):
    rng = np.random.default_rng(10 + KINDS.index(kind))
    omega, a_bits, latency = randomise(chain, rng)
    ties = [["b", "b_1"], ["a", "e"]]
    _, _, floor = brute_force(kind, omega, a_bits, latency, ties, -math.inf)
    with pytest.raises(fxq.InputError, match="smallest feasible budget is") as err:
        allocate_bits(chain, CANDIDATES, floor * 0.97, kind, latency_table=latency, tie_groups=ties[1:])
    reported = float(re.search(r"smallest feasible budget is ([0-9.e+-]+)", str(err.value)).group(1))
    assert reported == pytest.approx(floor, rel=1e-5)
    allocate_bits(chain, CANDIDATES, floor, kind, latency_table=latency, tie_groups=ties[1:])  # exactly: feasible


def test_solve_mckp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(40):
        g, b = 6, 3
        cost, res = rng.uniform(0, 1, (g, b)), rng.uniform(0, 1, (g, b))
        cap = float(rng.uniform(res.min(1).sum(), res.max(1).sum()))
        best = min((sum(cost[i, c] for i, c in enumerate(combo)), combo)
                   for combo in itertools.product(range(b), repeat=g)
                   if sum(res[i, c] for i, c in enumerate(combo)) <= cap)
        choice = solve_mckp(cost, res, cap)
        assert cost[np.arange(g), choice].sum() == pytest.approx(best[0], rel=1e-9)
        assert res[np.arange(g), choice].sum() <= cap * (1 + 1e-9)
    with pytest.raises(fxq.InputError, match="smallest feasible one is"):
        solve_mckp(np.ones((2, 2)), np.ones((2, 2)), 1.5)


def test_pareto_frontier_is_monotone_and_skips_infeasible_budgets(chain):
    omega, a_bits, latency = randomise(chain, np.random.default_rng(3))
    points = pareto_frontier(chain, [1.0, 8.0, 3.0, 2.0, 5.0, 4.0], CANDIDATES, "avg_bits")
    assert [p[0] for p in points] == [2.0, 3.0, 4.0, 5.0, 8.0]
    values = [p[1] for p in points]
    assert all(x >= y - 1e-15 for x, y in zip(values, values[1:], strict=False))
    for budget, value, bits in points:
        expected, _, _ = brute_force("avg_bits", omega, a_bits, latency, [["b", "b_1"]], budget)
        assert value == pytest.approx(expected, rel=1e-9) and set(bits) == set(WEIGHT)
    assert all(n.meta["fxq.qspec"].w_bits == 8 for n in chain.graph.nodes if n.name in WEIGHT), "no qspec change"


def test_argument_errors(chain):
    randomise(chain, np.random.default_rng(4))
    with pytest.raises(fxq.InputError, match="budget_kind"):
        allocate_bits(chain, CANDIDATES, 4.0, "flops")
    with pytest.raises(fxq.InputError, match="candidate bit-widths"):
        allocate_bits(chain, (1, 4), 4.0)
    with pytest.raises(fxq.InputError, match="no latency for node 'conv'"):
        allocate_bits(chain, CANDIDATES, 4.0, "latency", latency_table={})
    with pytest.raises(fxq.InputError, match="needs latency_table"):
        allocate_bits(chain, CANDIDATES, 4.0, "latency")
    with pytest.raises(fxq.InputError, match="not being allocated"):
        allocate_bits(chain, CANDIDATES, 4.0, tie_groups=[["a", "images"]])
    chain.graph.find_nodes(op="call_module", target="e")[0].meta.pop("fxq.qspec")
    allocate_bits(chain, CANDIDATES, 4.0, tie_groups=[["e"]])  # a group of float nodes only: nothing to tie
    assert "fxq.qspec" not in chain.graph.find_nodes(op="call_module", target="e")[0].meta
    next(n for n in chain.graph.nodes if n.name == "c").meta.pop("fxq.sensitivity")
    with pytest.raises(fxq.InputError, match=r"node 'c'.*fisher_traces"):
        allocate_bits(chain, CANDIDATES, 4.0)
    for node in chain.graph.nodes:
        node.meta.pop("fxq.qspec", None)
    with pytest.raises(fxq.InputError, match="annotate_policy"):
        allocate_bits(chain, CANDIDATES, 4.0)


def test_tie_groups_on_detr_attention():
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build("detr_tiny"), torch.randn(1, 3, 64, 64))
    view = graph_view(gm)
    assert isinstance(view, nx.DiGraph) and nx.is_directed_acyclic_graph(view)
    groups = attention_groups(gm)
    assert len(groups) == 2 + 2 * 3  # encoder self-attention x2, decoder self + cross attention x3
    weights = {n.name: n.meta.get("fxq.weight") for n in gm.graph.nodes}
    for group in groups:
        params = {weights[name].split("[")[0] for name in group}
        assert len(group) == 3 and len(params) == 1 and params.pop().endswith("in_proj_weight")
        assert len({weights[name] for name in group}) == 3, "q, k and v rows"
        for name in group:
            param_vertices = [u for u in view.predecessors(name) if u.startswith(PARAM)]
            assert param_vertices == [PARAM + weights[name].split("[")[0]]
    assert all(len(g) == 1 for g in shared_weight_groups(gm))


def test_allocation_on_detr_with_fisher_report_and_plot(tmp_path):
    torch.manual_seed(0)
    gm = fxq.trace(fxq.models.build("detr_tiny"), torch.randn(1, 3, 64, 64))
    annotate_policy(gm, "W8A8")
    g = torch.Generator().manual_seed(0)
    targets = [{"labels": torch.randint(0, 25, (2,), generator=g), "boxes": torch.rand(2, 4, generator=g) * 0.3 + 0.3}
               for _ in range(2)]
    fisher_traces(gm, [(torch.randn(2, 3, 64, 64, generator=g), None, targets)], progress=False)
    ties = attention_groups(gm)
    info = allocate_bits(gm, (4, 8), 5.0, tie_groups=ties).info
    numel = {}  # node -> (chosen bits, weight elements); q/k/v read a third of in_proj_weight each
    for n in gm.graph.nodes:
        if n.meta.get("fxq.qspec") is not None and n.meta["fxq.role"] in ("conv", "linear"):
            name, sliced = n.meta["fxq.weight"].split("[")[0], "[" in n.meta["fxq.weight"]
            numel[n.name] = (n.meta["fxq.qspec"].w_bits, gm.get_parameter(name).numel() // (3 if sliced else 1))
    average = sum(b * k for b, k in numel.values()) / sum(k for _, k in numel.values())
    assert average <= 5.0 + 1e-9 and average == pytest.approx(info["used"], rel=1e-12)
    assert {b for b, _ in numel.values()} == {4, 8}
    for group in ties:
        assert len({numel[n][0] for n in group}) == 1
    heads = [n for n in gm.graph.nodes if n.meta.get("fxq.module", "").startswith(("class_embed", "bbox_embed"))]
    assert heads and all("fxq.qspec" not in n.meta for n in heads), "float nodes stay float"
    table = allocation_table(gm)
    assert "backbone_0_body_conv1" in table and "float" in table and "avg_bits budget 5" in table
    path = tmp_path / "alloc.png"
    plot_allocation(gm, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_allocates_saves_and_reloads(tmp_path, capsys):
    from fxq.cli import main
    from fxq.data import write_synthetic

    write_synthetic(tmp_path / "synth", seed=0, train=1, val=2, size=64)
    out, plot = tmp_path / "analysis.json", tmp_path / "alloc.png"
    common = ["allocate", "detr_tiny", "--size", "64", "--candidates", "4", "8", "--no-progress"]
    assert main([*common, "--data", str(tmp_path / "synth"), "--split", "val", "--images", "2", "--budget", "6",
                 "--tie-qkv", "--out", str(out), "--plot", str(plot)]) == 0
    assert out.is_file() and plot.read_bytes()[:4] == b"\x89PNG"
    assert "avg_bits budget 6" in capsys.readouterr().out
    assert main([*common, "--analysis", str(out), "--budget", "3"]) == 2
    assert "smallest feasible budget is 4" in capsys.readouterr().err


def test_uniform_objective_weights_every_layer_one(chain):
    """``uniform``: Ω is the quantization error alone, i.e. the Fisher-weighted Ω divided by the Fisher trace."""
    from fxq.passes.sensitivity import weight_sensitivity

    rng = np.random.default_rng(7)
    nodes = [n for n in chain.graph.nodes if n.name in NUMEL]
    for node in nodes:
        node.meta["fxq.qspec"] = QSpec(w_bits=8, a_bits=8, w_observer="minmax")
        node.meta["fxq.fisher"] = {"overall": float(rng.uniform(0.5, 3.0))}
    weight_sensitivity(chain, CANDIDATES, "overall", nodes)
    weighted = {n.name: dict(n.meta["fxq.sensitivity"]) for n in nodes}
    weight_sensitivity(chain, CANDIDATES, "uniform", nodes)
    for node in nodes:
        fisher = node.meta["fxq.fisher"]["overall"]
        assert node.meta["fxq.sensitivity"] == pytest.approx({b: v / fisher for b, v in weighted[node.name].items()})
    for node in nodes:
        node.meta.pop("fxq.fisher")


def test_cli_exports_an_allocation_at_its_bits(tmp_path, capsys):
    """`fxq export --allocation`: every weight the allocation puts at 4 bits is stored as INT4 in the ONNX file,
    every 8-bit one as INT8; another model's allocation is refused naming a node."""
    import json

    import onnx

    from fxq.cli import main
    from fxq.data import write_synthetic

    write_synthetic(tmp_path / "synth", seed=0, train=2, val=2, size=64)
    analysis, onnx_path = tmp_path / "analysis.json", tmp_path / "m.onnx"
    assert main(["allocate", "detr_tiny", "--size", "64", "--candidates", "4", "8", "--no-progress", "--data",
                 str(tmp_path / "synth"), "--split", "val", "--images", "2", "--budget", "6",
                 "--out", str(analysis)]) == 0
    chosen = {name: r["fxq.qspec"]["w_bits"] for name, r in json.loads(analysis.read_text())["nodes"].items()
              if "fxq.sensitivity" in r and r["fxq.qspec"]["w_bits"]}  # the allocated conv/linear weights
    assert {4, 8} <= set(chosen.values())
    export = ["export", "--calib", str(tmp_path / "synth"), "--size", "64", "64", "--out", str(onnx_path)]
    assert main([*export[:1], "detr_tiny", *export[1:], "--allocation", str(analysis)]) == 0
    graph = onnx.load(onnx_path).graph
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    types = [i.data_type for i in graph.initializer if i.name in dequantized]  # weights, not zero points
    expected = {bits: sum(1 for b in chosen.values() if b == bits) for bits in (4, 8)}
    assert types.count(onnx.TensorProto.INT4) == expected[4]
    assert types.count(onnx.TensorProto.INT8) == expected[8]
    capsys.readouterr()
    other = tmp_path / "other.onnx"
    assert main(["export", "deformable_detr_tiny", *export[1:-1], str(other), "--allocation", str(analysis)]) == 2
    assert "does not match this graph: node" in capsys.readouterr().err and not other.exists()
