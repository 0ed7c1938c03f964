"""DetPTQ calibration: per layer, the Lp norm (p from a candidate set) whose clipping gives the lowest ODOL.

ODOL (object detection output loss) is the DETR set loss of the quantized graph's outputs against the float
graph's detections as pseudo ground truth (queries scoring above ``score_threshold``: 0.5 for softmax heads,
0.3 for sigmoid heads), on calibration batches.

Procedure (the paper gives only the idea; these details are ours, docs/METHODS.md): observe every quantizer once (the
graph must be annotated with ``"lp:<p>"`` or ``"mse"`` observers, e.g. ``annotate_policy(gm, "W4A4",
a_observer="lp:2", w_observer="lp:2")``); start from the candidate p whose uniform use gives the lowest ODOL;
then, layer by layer in graph order, try every p for that layer's quantizers (its weight quantizer and the input
quantizers it owns) and keep the one with the lowest ODOL. Each quantizer's scale for a given p minimises
Σ|x − Q(x)|^p over its observed input (the Lp search of :mod:`fxq.quant.calibration`). By construction the
result's ODOL is never above the best uniform p's on the calibration batches.

Reads ``fxq.quantized_inputs`` and the quantizer nodes; writes ``fxq.detptq`` = {"p", "odol": {p: loss}} on
every quantized layer node and ``fxq.calib`` on every quantizer node.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx
from tqdm import tqdm

from fxq.errors import InputError
from fxq.objectives import build_criterion
from fxq.passes.calibrate import observe, record_calibration
from fxq.passes.pass_manager import PassResult
from fxq.quant import FakeQuantizer, lp_error, search_clip_qparams
from fxq.quant.observers import ClipSearchObserver
from fxq.roles import quantizers
from fxq.tracing import model_batch

DEFAULT_CANDIDATES = (1.0, 2.0, 3.0, 4.0)
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
           score_threshold: float | None = None, num_clip_ratios: int = 100, progress: bool = True) -> PassResult:
    """Calibrate ``gm``'s quantizers with DetPTQ (module docstring); ``reference`` is the float graph/model
    (it is given the graph's inputs). ``num_clip_ratios`` clipping ratios in (0, 1] are searched per quantizer
    and p; ``score_threshold`` (default :data:`PSEUDO_TARGET_THRESHOLD` of the head) selects the float
    detections used as pseudo-targets; ODOL is measured on the first ``num_batches`` batches of ``loader``
    (default: all of them)."""
    qs = quantizers(gm)
    bad = [name for name, q in qs.items() if not isinstance(q.observer, ClipSearchObserver)]
    if not qs or bad:
        raise InputError(f"DetPTQ needs Lp-searching observers on every quantizer ({bad[:3] or 'no quantizers'}); "
                         'annotate with a_observer="lp:2", w_observer="lp:2" and run insert_quantizers first')
    loaded = list(loader)  # read once: observed whole, then the ODOL batches
    observe(gm, loaded, None, progress)
    batches = loaded if num_batches is None else loaded[:num_batches]
    table = {name: {p: _lp_qparams(q, p, num_clip_ratios) for p in candidates} for name, q in qs.items()}
    threshold = PSEUDO_TARGET_THRESHOLD[gm.head] if score_threshold is None else score_threshold
    odol = _Odol(gm, reference, batches, threshold)
    uniform = {p: _apply(qs, table, qs, p, odol) for p in candidates}
    start = min(uniform, key=uniform.get)
    _apply(qs, table, qs, start, None)
    groups = _layer_groups(gm)
    for node, names in tqdm(groups, desc="DetPTQ", disable=not progress, leave=False):
        scores = {p: _apply(qs, table, names, p, odol) for p in candidates}
        best = min(scores, key=scores.get)
        _apply(qs, table, names, best, None)
        node.meta["fxq.detptq"] = {"p": best, "odol": scores}
    for name, q in qs.items():
        q.method = f"lp:{_chosen_p(gm, name, start)}"
    record_calibration(gm)
    return PassResult(gm, False, {"uniform_odol": uniform, "start_p": start, "final_odol": odol(),
                                  "layers": len(groups)})


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
