"""``fxq bench`` and its parts: timing statistics, profile parsing, the latency table's FX node names, the CLI
on detr_tiny with every row (tiny N: the numbers are not looked at, only that they exist), and bad input."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from conftest import DATA

import fxq
from fxq.backends import available_providers
from fxq.backends.openvino_session import openvino_version
from fxq.bench.suite import OPENVINO_ROWS, ROWS, bench_images
from fxq.bench.timing import NodeTime, fx_node_ms, latency_table, node_times, time_calls, time_onnx
from fxq.cli import main
from fxq.passes.allocate import load_latency_table
from fxq.passes.insert_quant import insert_quantizers
from fxq.passes.policy import annotate_policy
from fxq.ptq import float_graph

FIXTURE = DATA / "coco-val2017-fixture"
SIZE = 96
#: Every row this machine can run (the OpenVINO rows need the openvino package, openvino-nncf also nncf).
RUNNABLE = [r for r in ROWS if (openvino_version() is not None or r not in OPENVINO_ROWS)
            and (r != "openvino-nncf" or importlib.util.find_spec("nncf") is not None)]


def test_time_calls_statistics():
    calls = []
    timing = time_calls(lambda: calls.append(1), warmup=2, runs=7)
    assert len(calls) == 9 and timing.runs == 7 and timing.warmup == 2
    assert 0 <= timing.min_ms <= timing.median_ms <= timing.p90_ms
    with pytest.raises(fxq.InputError, match="runs"):
        time_calls(lambda: None, runs=0)


def test_node_times_leave_out_the_warmup(tmp_path):
    events = [{"cat": "Session", "name": "model_loading_uri", "dur": 999}]
    for run, dur in enumerate([100, 10, 12]):  # warm-up run first
        events += [{"cat": "Node", "name": "conv_token_3_kernel_time", "dur": dur * 1000,
                    "args": {"op_name": "QLinearConv"}},
                   {"cat": "Node", "name": "add_kernel_time", "dur": 1000 * (run + 1), "args": {"op_name": "Add"}},
                   {"cat": "Node", "name": "add_fence_before", "dur": 5}]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    rows = {r.node: r for r in node_times(path, runs=2, warmup=1)}
    assert set(rows) == {"conv", "add"}  # the NHWC transformer's _token_ suffix is stripped
    assert rows["conv"].ms == pytest.approx(11.0) and rows["conv"].op == "QLinearConv"
    assert rows["add"].ms == pytest.approx(2.5)


def test_latency_table_keeps_nodes_measured_at_every_width():
    per_bits = {4: fx_node_ms([NodeTime("a", "QLinearConv", 1.0), NodeTime("a/bias", "Add", 0.5),
                               NodeTime("b", "MatMul", 2.0)], {"a": "conv_a", "a/bias": "conv_a", "b": "lin_b"}),
                8: {"conv_a": 1.2}}
    assert latency_table(per_bits) == {"conv_a": {4: 1.5, 8: 1.2}}


def test_bench_images_are_real_images_padded_to_the_size():
    images = bench_images(FIXTURE, (64, 80), 3)
    assert images.shape == (3, 3, 64, 80)
    assert images.abs().sum() > 0 and images.std() > 0.1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One `fxq bench detr_tiny` run with every row and the latency table."""
    folder = tmp_path_factory.mktemp("bench")
    args = ["bench", "detr_tiny", "--images", str(FIXTURE), "--size", str(SIZE), str(SIZE), "--threads", "1",
            "--warmup", "2", "--runs", "3", "--calib-images", "2", "--profile-runs", "1", "--rows", *RUNNABLE,
            "--work-dir", str(folder / "models"), "--json", str(folder / "bench.json"),
            "--markdown", str(folder / "bench.md"), "--latency-table", str(folder / "latency.json"), "--quiet"]
    assert main(args) == 0
    return folder


def test_bench_json_has_every_row(bench):
    result = json.loads((bench / "bench.json").read_text())
    assert [r["name"] for r in result["rows"]] == RUNNABLE
    for row in result["rows"]:
        assert row["runs"] == 3 and row["warmup"] == 2
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["speedup_vs_ort_fp32"] > 0
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["torch"]["file_bytes"] is None
    assert rows["fxq-mixed"]["file_bytes"] < 0.6 * rows["fxq-int8"]["file_bytes"]
    assert rows["fxq-int8"]["kernels"]["QLinearConv"] > rows["fxq-int8-plain"]["kernels"].get("QLinearConv", 0)
    assert rows["ort-qoperator"]["kernels"]["QLinearConv"] > 0
    assert set(result["profiles"]) == set(RUNNABLE) - {"torch", *OPENVINO_ROWS}  # OpenVINO rows: timed only
    if "openvino-fxq-int8" in rows:
        assert rows["openvino-fxq-int8"]["runtime"] == "openvino"
        assert rows["openvino-fxq-int8"]["kernels"]["Convolution/u8"] > 0
        floats = result["lowering"]["openvino-fxq-int8"]["float_nodes"]  # u8 attention matmuls run in fp32 there
        assert floats and all(name.startswith("attention_") for name in floats)
        assert result["openvino"] and result["rounds"] == 5
    if "openvino-nncf" in rows:  # NNCF's IR: OpenVINO runs its convolutions in int8, from a smaller file
        assert rows["openvino-nncf"]["file"].endswith(".xml")
        assert rows["openvino-nncf"]["kernels"]["Convolution/u8"] > 0
        assert rows["openvino-nncf"]["file_bytes"] < 0.5 * rows["ort-fp32"]["file_bytes"]
    assert all(p["top_nodes"] and p["by_op"] for p in result["profiles"].values())
    assert result["lowering"]["fxq-int8"]["float_nodes"] == []
    assert result["latency_table"] == str(bench / "latency.json")


def test_bench_markdown_lists_every_row(bench):
    text = (bench / "bench.md").read_text()
    assert all(f"| {name} |" in text for name in RUNNABLE)
    assert "p10 ms" in text and "median ms" in text and "file MB" in text and "QLinearConv" in text


def test_latency_table_names_fx_nodes_of_the_quantized_graph(bench):
    model = load_latency_table(bench / "latency.json")
    table = model.nodes
    gm = copy.deepcopy(float_graph(fxq.models.build("detr_tiny", pretrained=False), (SIZE, SIZE)))
    annotate_policy(gm, "W4A8")
    insert_quantizers(gm)
    weighted = {n.name for n in gm.graph.nodes if (n.meta.get("fxq.quantized_inputs") or {}).get("weight")}
    assert table and set(table) <= weighted
    # the stem too (the table pins no node to 8 bits); the float export's nodes are found by their weights
    assert len(table) >= 0.9 * len(weighted)
    assert all(set(row) == {4, 8, 32} and all(ms >= 0 for ms in row.values()) for row in table.values())
    recorded = json.loads((bench / "latency.json").read_text())
    assert model.machine == recorded["machine"] and recorded["model"] == "detr_tiny" and recorded["policy"] == "W8A8"
    # the rest is what each timed quantized file takes beyond its profiled nodes
    for bits in (4, 8):
        timed = recorded["timed_ms"][str(bits)]
        assert model.rest_ms[bits] == pytest.approx(max(timed - sum(r[bits] for r in table.values()), 0), abs=1e-2)
    assert all(k > 0 for k in recorded["profile_scale"].values()) and set(recorded["timed_ms"]) == {"4", "8", "32"}
    assert model.rest_for((8, 32)) == model.rest_ms[8] and model.rest_for((4, 8)) == max(model.rest_ms.values())


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_missing_provider_is_one_clear_error(provider, tmp_path, capsys):
    if provider in available_providers():
        pytest.skip(f"{provider} is installed here")
    code = main(["bench", "detr_tiny", "--images", str(FIXTURE), "--size", "64", "64", "--provider", provider,
                 "--rows", "ort-fp32", "--work-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "not available" in err and "available: cpu" in err


def test_not_an_onnx_model_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("not a protobuf")
    with pytest.raises(fxq.InputError, match="is not an ONNX model") as err:
        time_onnx(bad, torch.zeros(1, 3, 64, 64))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args, message", [(["--rows", "tflite"], "unknown bench row"),
                                           (["--runs", "0"], "--runs 0"),
                                           (["--images", "/nonexistent"], "not a folder"),
                                           (["--latency-bits", "1", "8"], "32 to keep a node float"),
                                           (["--latency-bits", "32"], "add a quantized width")])
def test_bad_arguments(args, message, tmp_path, capsys):
    code = main(["bench", "detr_tiny", "--images", str(FIXTURE), "--size", "64", "64", "--quiet",
                 "--work-dir", str(tmp_path), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_float_export_nodes_map_to_their_fx_nodes(tmp_path):
    """Every conv / linear of the float export maps to one FX node, and the exporter's scope name of the ONNX
    node (``/gm/<module>[_k]/Conv``) ends that FX module's path: an independent record of the same fact."""
    import re

    import onnx

    from fxq.backends.lower_qdq import lower_to_onnx
    from fxq.backends.node_map import float_node_names
    from fxq.passes.weights import weight_nodes, weight_of

    gm = float_graph(fxq.models.build("detr_tiny"), (64, 64))
    lower_to_onnx(gm, torch.zeros(1, 3, 64, 64), tmp_path / "fp32.onnx", opset=17)
    weights = {n.name: weight_of(gm, n) for n, _ in weight_nodes(gm)}
    mapping = float_node_names(onnx.load(str(tmp_path / "fp32.onnx")), weights)
    targets = {n.name: str(n.target) for n, _ in weight_nodes(gm) if n.op == "call_module"}
    assert set(mapping.values()) == {n.name for n, _ in weight_nodes(gm)}  # detr_tiny shares no weight
    checked = 0
    for onnx_name, fx_name in mapping.items():
        scope = re.fullmatch(r"/gm/(.+?)(?:_\d+)?/(Conv|MatMul|Gemm)", onnx_name)
        if scope and fx_name in targets:
            assert ("." + targets[fx_name]).endswith("." + scope.group(1)), (onnx_name, fx_name)
            checked += 1
    assert checked >= 0.8 * len(targets)


def test_allocate_within_the_measured_latency_budget(bench, tmp_path, capsys):
    """`fxq allocate --budget-kind latency` on the bench's table: within budget (rest included), some nodes kept
    float once the budget allows it; a budget below the fastest achievable is refused, naming it."""
    from fxq.data import write_synthetic

    write_synthetic(tmp_path / "synth", seed=0, train=2, val=1, size=SIZE)
    recorded = json.loads((bench / "latency.json").read_text())
    rest = recorded["rest_ms"]["8"]
    fastest = rest + sum(min(r["8"], r["32"]) for r in recorded["nodes"].values())
    slowest = rest + sum(max(r["8"], r["32"]) for r in recorded["nodes"].values())
    base = ["allocate", "detr_tiny", "--data", str(tmp_path / "synth"), "--size", str(SIZE), "--images", "2",
            "--batch-size", "1", "--candidates", "8", "32", "--budget-kind", "latency", "--latency-table",
            str(bench / "latency.json"), "--no-progress"]
    budget = (fastest + slowest) / 2
    assert main([*base, "--budget", str(budget), "--out", str(tmp_path / "a.json")]) == 0
    saved = json.loads((tmp_path / "a.json").read_text())
    summary, bits = saved["allocation"], saved["allocation"]["bits"]
    assert set(bits) == set(recorded["nodes"]) and summary["used"] <= budget * (1 + 1e-9)
    assert summary["used"] == pytest.approx(
        rest + sum(recorded["nodes"][n][str(b)] for n, b in bits.items()), rel=1e-6)
    assert 0 < sum(b == 32 for b in bits.values()) < len(bits)
    kept = {n for n, record in saved["nodes"].items() if "fxq.qspec" in record}  # a float node saves no qspec
    assert {n for n, b in bits.items() if b == 8} <= kept and not {n for n, b in bits.items() if b == 32} & kept
    capsys.readouterr()
    assert main([*base, "--budget", str(fastest * 0.5)]) == 2
    assert "fastest achievable" in capsys.readouterr().err
