"""The registry of every ``fxq.*`` metadata key: on graph nodes (``node.meta``) and on graphs (``gm.meta``).

Each key is declared once, here, with its value type, the ONE module that writes it, the modules that read it
and what it means; :func:`get` / :func:`put` / :func:`drop` read and write it. tests/test_meta.py scans the
sources and fails on an undeclared key, on a write outside the declared writer and on a stale reader list.

Two writes outside a key's writer are part of the contract:

- the structural keys (:data:`STRUCTURAL`: role, module, shape, params, macs) describe every node; the trace
  writes them, and a pass that inserts a node gives it them with :func:`annotate_inserted`;
- keys declared ``saved`` go into analysis files and are restored from them by :data:`RESTORER` (which is
  not listed among their readers).

Adding a key is one :func:`declare` call. This module imports only the standard library and torch, so that
every layer (front-end, passes, backends) can use it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Literal, TypedDict, TypeVar

import torch.fx

from fxq.errors import InputError

if TYPE_CHECKING:
    from fxq.quant.qspec import QSpec

T = TypeVar("T")
Holder = torch.fx.Node | torch.fx.GraphModule

#: The module that saves the ``saved`` keys to analysis files and restores them.
RESTORER = "fxq.passes.analysis_io"


class _Traced(TypedDict):
    takes_mask: bool


class ModelInfo(_Traced, total=False):
    """What a traced model declared, and whether its graph takes a padding mask."""

    head: str
    num_classes: int
    num_queries: int


class QuantizerRecord(TypedDict):
    """A fake-quantizer node: what it quantizes."""

    kind: Literal["weight", "activation", "attention"]
    of: str
    param: str | None


class QuantizedInputs(TypedDict):
    """The quantizer nodes a quantized node reads (node names)."""

    weight: str | None
    inputs: list[str]
    bias: str | None


class BiasQuantizerRecord(TypedDict):
    """A bias-quantizer node: the conv whose bias it quantizes and the two quantizers giving its scale."""

    of: str
    input: str
    weight: str


class CalibRecord(TypedDict):
    """A calibrated quantizer's method and parameters (one value per channel for per-channel weights)."""

    method: str
    scale: list[float]
    zero_point: list[int]


class DetPTQRecord(TypedDict):
    """The Lp norm DetPTQ chose for a layer and the ODOL of every candidate p."""

    p: float
    odol: dict[float, float]


class _Estimate(TypedDict):
    samples: int
    batches: int
    method: Literal["empirical", "hutchinson"]
    per_sample: bool


class FisherRecord(_Estimate, total=False):
    """Per-element Fisher (or Hessian) traces of a node's weight, by objective, and how they were estimated
    (``alpha`` for the critical/combined objectives; ``probes``, ``seed``, ``blockwise`` for Hutchinson)."""

    overall: float
    critical: float
    combined: float
    alpha: float
    probes: int
    seed: int
    blockwise: bool


class QATRecord(TypedDict):
    """A learnable quantizer of a QAT graph: its initial calibration method, LSQ's gradient-scale N (None:
    the elements sharing a scale, counted per input) and the parameters that learn."""

    init: str
    grad_scale_numel: int | None
    learnable: list[str]


class AllocationSummary(TypedDict):
    """The bit allocation's problem, optimum and chosen bits."""

    budget_kind: str
    budget: float
    used: float
    min_budget: float
    objective: str
    objective_value: float
    candidates: list[int]
    bits: dict[str, int]
    tie_groups: list[list[str]]


@dataclass(frozen=True)
class Key(Generic[T]):
    """One metadata key: its name, value type, writer module, reader modules and meaning."""

    name: str
    value: Any
    writer: str
    readers: tuple[str, ...]
    meaning: str
    graph: bool = False
    saved: bool = False


#: Every declared key by name, in declaration order.
REGISTRY: dict[str, Key] = {}


def declare(name: str, value: Any, writer: str, readers: tuple[str, ...], meaning: str, *,
            graph: bool = False, saved: bool = False) -> Key:
    """Declare a key (``graph=True``: on ``gm.meta``; ``saved``: kept in analysis files) and register it;
    ``readers`` are the modules that read it directly (tests/test_meta.py checks the list)."""
    if name in REGISTRY:
        raise ValueError(f"metadata key {name!r} is declared twice")
    REGISTRY[name] = key = Key(name, value, writer, tuple(sorted(readers)), meaning, graph, saved)
    return key


_P, _B = "fxq.passes.", "fxq.backends."

MODEL: Key[ModelInfo] = declare(
    "fxq.model", ModelInfo, "fxq.tracing", ("fxq.passes.analysis_io",),
    "what the traced model declared (head, classes, queries) and whether the graph takes a mask", graph=True)
MODULE: Key[str] = declare(
    "fxq.module", str, "fxq.tracer",
    (_B + "onnx_export", _B + "runtime_lower", _P + "distribution_alignment", _P + "float_stage", _P + "insert_quant",
     _P + "policy",
     _P + "report", _P + "runtime_prep", _P + "sampling_values", _P + "tie_groups", _P + "training_graph"),
    "dotted path of the module whose forward created the node (state_dict prefix)")
ROLE: Key[str] = declare(
    "fxq.role", str, "fxq.tracing",
    (_B + "node_map", _B + "runtime_lower", "fxq.costs", "fxq.roles", _P + "fold_bn",
     _P + "distribution_alignment", _P + "insert_quant", _P + "policy", _P + "precision", _P + "remove_dropout",
     _P + "runtime_prep", _P + "tie_groups", _P + "training_graph", _P + "weights"),
    "what the node computes: a value of fxq.roles (conv, linear, attn_qk, quantize, ...)")
SHAPE: Key[list | None] = declare(
    "fxq.shape", list | None, "fxq.costs",
    (_P + "distribution_alignment", _P + "insert_quant", _P + "prepare_qat", _P + "runtime_prep",
     _P + "training_graph", "fxq.ptq"),
    "output shape at the traced input size (a list of shapes for tuple outputs; None for non-tensors)")
PARAMS: Key[int] = declare(
    "fxq.params", int, "fxq.costs", (),
    "trainable parameter elements the node reads first (the graph's sum is the model's parameter count)")
MACS: Key[int] = declare(
    "fxq.macs", int, "fxq.costs", (_P + "allocate",),
    "multiply-accumulates of conv, linear and matmul nodes at the traced input size, batch included")
WEIGHT: Key[str | None] = declare(
    "fxq.weight", str | None, "fxq.costs", (_P + "insert_quant", _P + "weights"),
    "conv/linear nodes: qualified name of the weight parameter, name[start:stop] for a row slice")
QSPEC: Key[QSpec] = declare(
    "fxq.qspec", "QSpec", _P + "policy",
    (_B + "runtime_lower", _P + "allocate", _P + "insert_quant", _P + "precision", _P + "prepare_qat",
     _P + "quantize", _P + "report", _P + "runtime_prep", _P + "sampling_values", _P + "sensitivity",
     "fxq.cli.report_html"),
    "how the node is quantized (fxq.quant.QSpec); absent: the node stays float", saved=True)
QUANTIZER: Key[QuantizerRecord] = declare(
    "fxq.quantizer", QuantizerRecord, _P + "insert_quant",
    (_B + "quant_points", _P + "calibrate", _P + "float_stage", _P + "prepare_qat", _P + "runtime_prep"),
    "on fake-quantizer nodes (role quantize): what they quantize")
QUANTIZED_INPUTS: Key[QuantizedInputs] = declare(
    "fxq.quantized_inputs", QuantizedInputs, _P + "insert_quant",
    (_B + "node_map", _B + "runtime_lower", _P + "detptq", _P + "float_stage", _P + "prepare_qat",
     _P + "runtime_prep"),
    "on quantized nodes: the quantizer nodes of their weight, inputs and bias")
CALIB: Key[CalibRecord] = declare(
    "fxq.calib", CalibRecord, _P + "calibrate", (),
    "on quantizer nodes: the calibration method, scale and zero-point, as lists")
DETPTQ: Key[DetPTQRecord] = declare(
    "fxq.detptq", DetPTQRecord, _P + "detptq", (),
    "on quantized layers: the Lp norm DetPTQ chose and every candidate's ODOL")
FISHER: Key[FisherRecord] = declare(
    "fxq.fisher", FisherRecord, _P + "fisher",
    (_P + "allocate", _P + "report", _P + "sensitivity", "fxq.cli.report_html"),
    "conv/linear nodes: Fisher (empirical or Hutchinson) traces per weight element, by objective", saved=True)
QUANT_ERROR: Key[dict[int, float]] = declare(
    "fxq.quant_error", dict[int, float], _P + "sensitivity", (),
    "{bits: ‖Q_b(W) − W‖²} of the node's weight", saved=True)
SENSITIVITY: Key[dict[int, float]] = declare(
    "fxq.sensitivity", dict[int, float], _P + "sensitivity", (_P + "allocate", "fxq.cli.report_html"),
    "{bits: Ω(bits)}, the loss perturbation the allocation minimises", saved=True)
ALLOCATION: Key[AllocationSummary] = declare(
    "fxq.allocation", AllocationSummary, _P + "allocate", (_P + "report",),
    "the mixed-precision allocation's budget, optimum and chosen bits", graph=True, saved=True)
OUTPUT_QUANTIZER: Key[str] = declare(
    "fxq.output_quantizer", str, _P + "runtime_prep", (_B + "runtime_lower",),
    "runtime-prepared convs and adds: the quantizer node of their output")
OUTPUT_QUANTIZER_ACTION: Key[Literal["kept", "shared", "inserted"]] = declare(
    "fxq.output_quantizer_action", Literal["kept", "shared", "inserted"], _P + "runtime_prep",
    (_B + "runtime_lower",), "how runtime preparation gave the node its output quantizer")
BIAS_QUANTIZER: Key[BiasQuantizerRecord] = declare(
    "fxq.bias_quantizer", BiasQuantizerRecord, _P + "runtime_prep", (),
    "on int32 bias-quantizer nodes (role bias_quantize): the conv and the quantizers giving the scale")
QAT: Key[QATRecord] = declare(
    "fxq.qat", QATRecord, _P + "prepare_qat", (),
    "on the quantizer nodes of a QAT graph: initial calibration method, LSQ's N, learnable parameters")

#: Keys every node carries (written at trace time; by :func:`annotate_inserted` on nodes passes insert).
STRUCTURAL: tuple[Key, ...] = (ROLE, MODULE, SHAPE, PARAMS, MACS)


def _meta(holder: Holder, key: Key) -> dict:
    if key.graph == isinstance(holder, torch.fx.Node):
        want = "the GraphModule (gm.meta)" if key.graph else "a graph node (node.meta)"
        raise InputError(f"metadata key {key.name!r} belongs on {want}, got a {type(holder).__name__}")
    return holder.meta


def get(holder: Holder, key: Key[T], default: T | None = None) -> T | None:
    """The value of ``key`` on a node (or graph, for graph keys), ``default`` when it has none."""
    return _meta(holder, key).get(key.name, default)


def put(holder: Holder, key: Key[T], value: T) -> None:
    """Set ``key`` on a node (or graph). Only the key's writer (or :data:`RESTORER` for saved keys) calls it."""
    _meta(holder, key)[key.name] = value


def drop(holder: Holder, key: Key) -> None:
    """Remove ``key`` from a node (or graph) if present."""
    _meta(holder, key).pop(key.name, None)


def annotate_inserted(node: torch.fx.Node, role: str, module: str, shape: list | None) -> None:
    """Give a node a pass inserted the structural keys: its role, owning module and output shape; no
    parameters and no MACs of its own."""
    for key, value in zip(STRUCTURAL, (role, module, shape, 0, 0), strict=True):
        put(node, key, value)


def type_name(value: Any) -> str:
    """A short readable name of a key's value type (TypedDicts list their fields, ``?`` marking optional ones)."""
    if isinstance(value, str):
        return value
    if typing.is_typeddict(value):
        fields = [f + ("?" if f in value.__optional_keys__ else "") for f in value.__annotations__]
        return f"{value.__name__} {{{', '.join(fields)}}}"
    if isinstance(value, type) and not isinstance(value, types.GenericAlias):
        return value.__name__
    return str(value).replace("typing.", "")


def markdown_table() -> str:
    """The registry as a Markdown table: key, where it lives, value, writer, readers, meaning."""
    rows = ["| key | on | value | writer | readers | meaning |", "|---|---|---|---|---|---|"]
    for key in REGISTRY.values():
        writer = f"`{key.writer}`" + (f" (saved and restored by `{RESTORER}`)" if key.saved else "")
        readers = ", ".join(f"`{r}`" for r in key.readers) or "—"
        cells = [f"`{key.name}`", "graph" if key.graph else "node", type_name(key.value), writer, readers, key.meaning]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
