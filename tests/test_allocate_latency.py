"""Latency-budgeted allocation: candidate 32 keeps a node float, the table's rest of the model counts in the budget,
a table from another machine warns, and a budget below the fastest achievable is refused (against brute force)."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from test_allocate import WEIGHT, Chain

import fxq
from fxq.machine import machine_name
from fxq.passes.allocate import allocate_bits, load_latency_table
from fxq.quant import QSpec

CANDIDATES = (8, 32)


@pytest.fixture()
def chain():
    torch.manual_seed(0)
    return fxq.trace(Chain(), torch.randn(1, 3, 8, 8))


def setup(gm, rng: np.random.Generator) -> tuple[dict, dict]:
    """Random 8-bit sensitivities (0 when float) and latencies (float slower) on every node; b and b_1 share b."""
    omega, latency = {}, {}
    for name in WEIGHT:
        node = next(n for n in gm.graph.nodes if n.name == name)
        omega[name] = omega["b"] if name == "b_1" else {8: float(rng.uniform(0.1, 1.0)), 32: 0.0}
        fast = float(rng.uniform(0.1, 1.0))
        latency[name] = {8: fast, 32: fast + float(rng.uniform(0.1, 1.0))}
        node.meta["fxq.qspec"] = QSpec(w_bits=8, a_bits=8, w_observer="minmax")
        node.meta["fxq.sensitivity"] = dict(omega[name])
    return omega, latency


def brute_force(omega: dict, latency: dict, rest: float, budget: float) -> tuple[float, dict]:
    """min Σ Ω over every assignment with b == b_1 and rest + Σ latency <= budget."""
    weights = sorted(set(WEIGHT.values()))
    best = (float("inf"), {})
    for combo in itertools.product(CANDIDATES, repeat=len(weights)):
        bits = {node: dict(zip(weights, combo, strict=True))[w] for node, w in WEIGHT.items()}
        used = rest + sum(latency[n][b] for n, b in bits.items())
        value = sum(omega[n][b] for n, b in bits.items() if n != "b_1")  # one shared weight counts once
        if used <= budget and value < best[0]:
            best = (value, bits)
    return best


def write_table(path, latency: dict, rest: float, machine: str) -> None:
    path.write_text(json.dumps({"nodes": latency, "rest_ms": rest, "machine": machine}))


def test_float_candidate_and_rest_match_brute_force(chain, tmp_path):
    rng = np.random.default_rng(0)
    omega, latency = setup(chain, rng)
    rest = 3.5
    write_table(tmp_path / "t.json", latency, rest, machine_name())
    fastest = rest + sum(row[8] for row in latency.values())
    slowest = rest + sum(row[32] for row in latency.values())
    for budget in np.linspace(fastest, slowest, 6):
        expected, bits = brute_force(omega, latency, rest, budget)
        gm = fxq.trace(Chain(), torch.randn(1, 3, 8, 8))
        setup(gm, np.random.default_rng(0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same machine: no warning
            info = allocate_bits(gm, CANDIDATES, float(budget), "latency", latency_table=tmp_path / "t.json").info
        assert info["objective_value"] == pytest.approx(expected, abs=1e-9)
        chosen = info["bits"]
        assert info["used"] == pytest.approx(rest + sum(latency[n][b] for n, b in chosen.items()), rel=1e-9)
        assert info["used"] <= budget * (1 + 1e-9)
        for node in gm.graph.nodes:  # float: no qspec left (weight and input activations float); else 8 bits
            if node.name in chosen:
                spec = node.meta.get("fxq.qspec")
                assert (spec is None) if chosen[node.name] == 32 else (spec.w_bits == 8)
    assert sum(b == 32 for b in bits.values()) == len(WEIGHT)  # the slowest budget affords every node float


def test_budget_below_the_fastest_names_it(chain):
    omega, latency = setup(chain, np.random.default_rng(1))
    table = {"nodes": latency, "rest_ms": 2.0}
    fastest = 2.0 + sum(row[8] for row in latency.values())
    with pytest.raises(fxq.InputError, match=r"fastest achievable") as err:
        allocate_bits(chain, CANDIDATES, fastest * 0.9, "latency", latency_table=load_latency_table(table))
    assert f"{fastest:.6g}" in str(err.value)


def test_table_from_another_machine_warns_and_a_missing_node_is_named(chain, tmp_path):
    _, latency = setup(chain, np.random.default_rng(2))
    write_table(tmp_path / "other.json", latency, 1.0, "Some Other CPU, 64 CPUs")
    with pytest.warns(UserWarning, match="measured on 'Some Other CPU, 64 CPUs'"):
        table = load_latency_table(tmp_path / "other.json")
    assert table.rest_ms == 1.0 and table.nodes["conv"] == latency["conv"]
    del latency["c"]
    write_table(tmp_path / "missing.json", latency, 1.0, machine_name())
    with pytest.raises(fxq.InputError, match="no latency for node 'c'"):
        allocate_bits(chain, CANDIDATES, 100.0, "latency", latency_table=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"nodes": {"conv": 3}}))
    with pytest.raises(fxq.InputError, match="not {node: {bits: ms}}"):
        load_latency_table(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(fxq.InputError, match="a JSON list"):
        load_latency_table(tmp_path / "list.json")


def test_pipeline_frontier_counts_the_rest(chain):
    """fxq pipeline's frontier.json: uniform points and the frontier's top budget are whole-model latencies."""
    from fxq.cli.pipeline_analysis import _frontier, _uniform
    from fxq.passes.allocate import build_problem

    _, latency = setup(chain, np.random.default_rng(3))
    problem = build_problem(chain, CANDIDATES, "latency", {"nodes": latency, "rest_ms": 2.5})
    for bits, point in _uniform(problem).items():
        assert point["used"] == pytest.approx(2.5 + sum(row[int(bits)] for row in latency.values()))
    points = _frontier(chain, problem)
    assert points[0]["used"] == pytest.approx(2.5 + sum(row[8] for row in latency.values()))
    assert points[-1]["budget"] == pytest.approx(2.5 + sum(row[32] for row in latency.values()))
