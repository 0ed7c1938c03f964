"""DetPTQ calibration: per layer, the Lp norm (p from a candidate set) whose fitted scales give the lowest ODOL.

ODOL (object detection output loss) is the DETR set loss of the quantized graph's outputs against the float
graph's detections as pseudo ground truth (queries scoring above ``score_threshold``: 0.5 for softmax heads,
0.3 for sigmoid heads), on calibration batches.

Procedure (the paper gives only the idea; these details are ours, docs/METHODS.md): observe every quantizer once (the
graph must be annotated with ``"lp:<p>"`` or ``"mse"`` observers, e.g. ``annotate_policy(gm, "W4A4",
a_observer="lp:2", w_observer="lp:2")``); fit, for every candidate p, the scales of every layer's quantizers (its
weight quantizer and the input quantizers it owns; a shared input quantizer belongs to its first reader); start
from the candidate p whose uniform use gives the lowest ODOL; then, layer by layer in graph order, try every p
for that layer's quantizers and keep the one with the lowest ODOL. By construction the result's ODOL is never
above the best uniform p's on the calibration batches.

The fit for a given p (``fit``):

- ``"output"`` (default; as published): the layer's quantizers minimise Σ|O − Ô|^p of the layer's output, O the
  float layer on the float graph's inputs of the calibration batches, Ô the same layer with its quantizers active
  (:func:`fxq.quant.calibration_output.fit_output_qparams`: the clip-ratio grid of the input fit, searched
  coordinate-wise — the weight per output channel, then each owned input quantizer — starting from the
  input-fitted scales, so the output error is never above theirs). Quantizers the layer reads but does not own
  stay at their owner's fit.
- ``"input"``: each quantizer minimises Σ|x − Q(x)|^p over its observed input (the Lp search of
  :mod:`fxq.quant.calibration`), the search before the output fit.

Reads ``fxq.quantized_inputs`` and the quantizer nodes; writes ``fxq.detptq`` = {"p", "odol": {p: loss}} on
every quantized layer node and ``fxq.calib`` on every quantizer node (method ``lp:<p>`` for the input fit,
``lp:<p>:output`` for the output fit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from tqdm import tqdm

from fxq.errors import InputError
from fxq.objectives import build_criterion
from fxq.passes.calibrate import observe, record_calibration
from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, lp_error, search_clip_qparams
from fxq.quant.calibration_output import LayerFn, Operand, fit_output_qparams
from fxq.quant.observers import ClipSearchObserver
from fxq.roles import quantizers
from fxq.tracing import model_batch

DEFAULT_CANDIDATES = (1.0, 2.0, 3.0, 4.0)
#: What a quantizer's scale for a candidate p is fitted on: its layer's output (default) or its own input.
FITS = ("output", "input")
#: Score above which a float detection becomes a pseudo-target, by head. Focal-loss (sigmoid) heads score
#: confident detections lower than softmax heads: at 0.5 the embedded detr_tiny kept 5 pseudo-targets for 31
#: ground-truth boxes on the calibration batches (0.3: 72), and DetPTQ then preferred p = 1 everywhere.
PSEUDO_TARGET_THRESHOLD = {"softmax": 0.5, "sigmoid": 0.3}


def pseudo_targets(outputs: dict, head: str, score_threshold: float) -> list[dict]:
    """The float model's confident detections as targets: per image ``labels`` and ``boxes`` (cxcywh)."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if head == "softmax":
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    else:
        scores, labels = logits.sigmoid().max(-1)
    keep = scores > score_threshold
    return [{"labels": labels[i][keep[i]], "boxes": boxes[i][keep[i]]} for i in range(len(keep))]


def _layer_groups(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, list[str]]]:
    """Per quantized layer, the quantizer nodes it owns (shared input quantizers go to their first reader)."""
    owned: set[str] = set()
    groups = []
    for node in gm.graph.nodes:
        record = node.meta.get("fxq.quantized_inputs")
        if record is None:
            continue
        names = [n for n in [record["weight"], *record["inputs"]] if n is not None and n not in owned]
        owned.update(names)
        if names:
            groups.append((node, names))
    return groups


def _lp_qparams(q: FakeQuantizer, p: float, num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    obs = q.observer
    return search_clip_qparams(obs.reservoir.samples, obs.minmax.min.cpu(), obs.minmax.max.cpu(), q.qrange,
                               q.symmetric, lp_error(p), num_candidates)


class _Odol:
    """ODOL of the graph on fixed calibration batches against the float graph's pseudo targets."""

    def __init__(self, gm: torch.fx.GraphModule, reference: torch.nn.Module, batches: list, threshold: float):
        self.gm = gm
        self.inputs = [model_batch(gm, b, index=i).inputs for i, b in enumerate(batches)]
        self.criterion = build_criterion(gm.head, aux=False)
        with torch.no_grad():  # the reference sees what the graph sees, so their boxes share one frame
            self.targets = [pseudo_targets(reference(*inputs), gm.head, threshold) for inputs in self.inputs]

    def __call__(self) -> float:
        total = 0.0
        with torch.no_grad():
            for inputs, targets in zip(self.inputs, self.targets, strict=True):
                total += self.criterion(self.gm(*inputs), targets)["loss"].item()
        return total / len(self.inputs)


def detptq(gm: torch.fx.GraphModule, loader: Iterable, reference: torch.nn.Module,
           candidates: Sequence[float] = DEFAULT_CANDIDATES, num_batches: int | None = None,
           score_threshold: float | None = None, num_clip_ratios: int = 100, progress: bool = True,
           fit: str = "output", fit_batches: int = 2, fit_ratios: int = 25) -> PassResult:
    """Calibrate ``gm``'s quantizers with DetPTQ (module docstring); ``reference`` is the float graph/model
    (it is given the graph's inputs). ``fit`` (one of :data:`FITS`) says what the scales for a p are fitted on:
    each quantizer's input, over all batches of ``loader`` and ``num_clip_ratios`` clipping ratios in (0, 1]
    (also the output fit's start), or the layer's output, on the first ``fit_batches`` batches over
    ``fit_ratios`` ratios. ``score_threshold`` (default :data:`PSEUDO_TARGET_THRESHOLD` of the head) selects the
    float detections used as pseudo-targets; ODOL is measured on the first ``num_batches`` batches of ``loader``
    (default: all of them)."""
    if fit not in FITS:
        raise InputError(f"DetPTQ fit {fit!r} is unknown; use one of {FITS}")
    qs = quantizers(gm)
    bad = [name for name, q in qs.items() if not isinstance(q.observer, ClipSearchObserver)]
    if not qs or bad:
        raise InputError(f"DetPTQ needs Lp-searching observers on every quantizer ({bad[:3] or 'no quantizers'}); "
                         'annotate with a_observer="lp:2", w_observer="lp:2" and run insert_quantizers first')
    loaded = list(loader)  # read once: observed whole, then the ODOL batches
    observe(gm, loaded, None, progress)
    batches = loaded if num_batches is None else loaded[:num_batches]
    table = {name: {p: _lp_qparams(q, p, num_clip_ratios) for p in candidates} for name, q in qs.items()}
    groups = _layer_groups(gm)
    if fit == "output":
        _fit_outputs(gm, groups, table, loaded[:fit_batches], fit_ratios, progress)
    threshold = PSEUDO_TARGET_THRESHOLD[gm.head] if score_threshold is None else score_threshold
    odol = _Odol(gm, reference, batches, threshold)
    uniform = {p: _apply(qs, table, qs, p, odol) for p in candidates}
    start = min(uniform, key=uniform.get)
    _apply(qs, table, qs, start, None)
    for node, names in tqdm(groups, desc="DetPTQ", disable=not progress, leave=False):
        scores = {p: _apply(qs, table, names, p, odol) for p in candidates}
        best = min(scores, key=scores.get)
        _apply(qs, table, names, best, None)
        node.meta["fxq.detptq"] = {"p": best, "odol": scores}
    suffix = ":output" if fit == "output" else ""
    for name, q in qs.items():
        q.method = f"lp:{_chosen_p(gm, name, start)}{suffix}"
    record_calibration(gm)
    return PassResult(gm, False, {"fit": fit, "uniform_odol": uniform, "start_p": start, "final_odol": odol(),
                                  "layers": len(groups)})


def _fit_outputs(gm: torch.fx.GraphModule, groups: list[tuple[torch.fx.Node, list[str]]], table: dict,
                 batches: list, num_clip_ratios: int, progress: bool) -> None:
    """Replace, for every p of ``table``, each layer's owned quantizers' entries by their output fit (layers in
    graph order, so a quantizer a layer reads but does not own already holds its owner's fit)."""
    qs = quantizers(gm)
    captured = _capture(gm, [node for node, _ in groups], batches)
    for node, names in tqdm(groups, desc="DetPTQ output fit", disable=not progress, leave=False):
        if not isinstance(captured[0][node.name], torch.Tensor):
            continue  # not a tensor-valued layer: its quantizers keep the input fit
        operand_names = _operand_names(node)
        reference = [values[node.name] for values in captured]
        layer = _layer_call(gm, node, operand_names, captured)
        for p in table[names[0]]:
            operands = [_operand(node, name, qs[name], table[name][p], name in names, captured)
                        for name in operand_names]
            fitted = fit_output_qparams(layer, reference, operands, p, num_clip_ratios)
            for name, qparams in zip(operand_names, fitted, strict=True):
                if name in names:
                    table[name][p] = qparams


def _capture(gm: torch.fx.GraphModule, layers: list[torch.fx.Node], batches: list) -> list[dict[str, object]]:
    """Per batch, the float graph's values of the ``layers`` and of every node they read (quantizers off)."""
    keep = {node.name for node in layers} | {arg.name for node in layers for arg in node.all_input_nodes}
    modes = {name: q.mode for name, q in quantizers(gm).items()}
    for q in quantizers(gm).values():
        q.disable()
    captured = []
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                recorder = _Recorder(gm, keep)
                recorder.run(*model_batch(gm, batch, index=index).inputs)
                captured.append(recorder.values)
    finally:
        for name, q in quantizers(gm).items():
            q.mode = modes[name]
    return captured


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps copies of the values of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, keep: set[str]):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n: torch.fx.Node) -> object:
        value = super().run_node(n)
        if n.name in self.keep:  # a copy: later in-place ops (ReLU(inplace=True)) must not change it
            self.values[n.name] = value.clone() if isinstance(value, torch.Tensor) else value
        return value


def _operand_names(node: torch.fx.Node) -> list[str]:
    """The quantizer nodes ``node`` reads, weight first."""
    record = node.meta["fxq.quantized_inputs"]
    names = [n for n in [record["weight"], *record["inputs"]] if n is not None]
    return list(dict.fromkeys(names))


def _operand(node: torch.fx.Node, name: str, q: FakeQuantizer, start: tuple, owned: bool,
             captured: list[dict]) -> Operand:
    """Quantizer ``name`` of layer ``node`` as an operand of the output fit, starting from ``start``."""
    weight = node.meta["fxq.quantized_inputs"]["weight"] == name  # a disabled quantizer's value is its input
    values = [captured[0][name]] if weight else [values[name] for values in captured]
    obs = q.observer
    return Operand(values, q.qrange, q.symmetric, q.axis, obs.minmax.min.cpu(), obs.minmax.max.cpu(), start,
                   search=owned, channel_dim=_output_channel_dim(node) if weight and q.axis == 0 else None)


def _output_channel_dim(node: torch.fx.Node) -> int | None:
    """The output dimension indexing a conv's or linear's weight channels (None for other layers)."""
    if node.target in (torch.conv2d, F.conv2d):
        return 1
    return -1 if node.target is F.linear else None


def _layer_call(gm: torch.fx.GraphModule, node: torch.fx.Node, operand_names: list[str],
                captured: list[dict]) -> LayerFn:
    """``node`` evaluated on cached batch b with its quantizer operands replaced by given values."""
    interpreter = torch.fx.Interpreter(gm)

    def call(batch: int, operands: list[torch.Tensor]) -> torch.Tensor:
        given = dict(zip(operand_names, operands, strict=True))
        values = captured[batch]
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: given.get(n.name, values[n.name]))
        with torch.no_grad():
            return getattr(interpreter, node.op)(node.target, args, kwargs)

    return call


def _apply(qs: dict, table: dict, names: Iterable[str], p: float, odol: _Odol | None) -> float | None:
    for name in names:
        qs[name].set_qparams(*table[name][p])
        qs[name].enable()
    return odol() if odol is not None else None


def _chosen_p(gm: torch.fx.GraphModule, quantizer: str, default: float) -> float:
    for node in gm.graph.nodes:
        record = node.meta.get("fxq.quantized_inputs")
        if record and "fxq.detptq" in node.meta and quantizer in [record["weight"], *record["inputs"]]:
            return node.meta["fxq.detptq"]["p"]
    return default
