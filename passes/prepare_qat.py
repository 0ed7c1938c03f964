"""prepare_qat: a float detector graph → a fake-quantized graph with learnable LSQ / LSQ+ quantizers.

Input: the float graph of :func:`fxq.ptq.float_graph`. Batch norm is folded before QAT (``float_graph`` does
it), so QAT trains the folded conv weights and biases and no batch statistics exist any more; dropout is
removed. The precision comes from one of

- ``policy``: a uniform policy ("W8A8", "W4A8", "4-4-8", "W2A4-Att8", or a QSpec) with ``overrides`` as in PTQ
  (default :data:`fxq.passes.policy.DEFAULT_OVERRIDES`: heads and Deformable DETR's sampling geometry float,
  stem W8A8);
- ``allocation``: an analysis file written by ``fxq allocate --out`` (:func:`save_analysis`): its per-node
  ``fxq.qspec``, float islands included;
- neither: the ``fxq.qspec`` the nodes of ``float_gm`` already carry (e.g. after ``allocate_bits``).

Quantizers go on weights, activations and attention operands (q, k, v and the attention map) as in PTQ, and a
runtime ``target`` (:data:`fxq.targets.TARGETS`) adds what :func:`fxq.ptq.quantize_ptq` adds for it
(symmetric activations, conv output quantizers, int32 conv biases). Passes may not import the PTQ recipe
(tests/test_layering.py), so this pass runs the same passes in the same order; tests/test_qat.py checks that
the graph equals ``quantize_ptq``'s, with and without a target. Initialisation (``init``):

- a PTQ calibration method (``minmax``, ``percentile[:q]``, ``mse``, ``lp:<p>``, ``detptq``), with the
  observers ``quantize_ptq`` gives it. Default: the best in benchmarks/RESULTS.md's PTQ tables by mean AP over
  the two tiny models: ``"mse"`` when every quantizer has 8 or more bits (W8A8: mse 0.6655, percentile 0.665,
  lp:3 0.6645, minmax 0.664), else ``"lp:3"`` (W4A8: 0.6365, next lp:4 0.6305; W4A4: 0.589, next DetPTQ
  0.5885; 4-4-8: 0.602, next DetPTQ 0.5995 — DetPTQ also takes 200–300 s) — :data:`DEFAULT_INIT`,
  :func:`default_init`. Policies the tables lack (W2A4-Att8, allocations) follow the rule by their fewest bits;
- ``"lsq"``: LSQ's step 2·mean|w|/√Qp for the (symmetric) weights and symmetric activations; affine
  activations take LSQ+'s initialisation, s = (max − min)/(Qp − Qn) with the zero-point at min (min-max).

Then every scale becomes an ``nn.Parameter``, and so does every affine quantizer's zero-point (LSQ+;
``learn_zero_point=False`` keeps zero-points fixed); weights stay the model's parameters. LSQ's gradient scale
g = 1/sqrt(N·Qp): N = elements per channel for per-channel weights; for activations and attention operands
N = their elements **per image** at the traced input size (``fxq.shape`` over the images' batch), fixed, so the
scales' learning rate does not depend on the batch size (the loss is a mean over the batch).
Observers are off during QAT: every quantizer stays in "quantize" mode and its observer is emptied; nothing
updates a scale but the optimiser (``start_observing`` would, if asked). Second-order gradients flow through
the quantizers (:mod:`fxq.quant.fake_quant`). After each optimiser step, :func:`keep_qparams_valid` (an
optimiser post-step hook) clamps scales to ≥ MIN_LEARNABLE_SCALE and zero-points into their range.
:func:`qat_structure` rebuilds the same graph from a trained state_dict without calibration data.

Reads ``fxq.qspec``, ``fxq.role``, ``fxq.shape``, ``fxq.quantizer``, ``fxq.quantized_inputs``; sets
``fxq.qspec`` through :func:`fxq.passes.quantize.quantize_annotated` (the observers of ``init``, the target's
symmetry); the passes it runs write what they write (``fxq.quantizer``, ``fxq.quantized_inputs``, ``fxq.calib``
= the initial values, ...). Writes ``fxq.qat`` on every quantizer node: {"init": method, "grad_scale_numel": N
or None, "learnable": ["scale"] or ["scale", "zero_point"]}.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import torch
import torch.fx

from fxq import meta
from fxq.errors import InputError
from fxq.passes.calibrate import record_calibration
from fxq.passes.pass_manager import PassResult
from fxq.passes.precision import annotated_copy
from fxq.passes.quantize import quantize_annotated
from fxq.passes.weights import parameter, weight_ref
from fxq.quant import QSpec, parse_method
from fxq.roles import quantizer_nodes, quantizers
from fxq.targets import TargetProfile, target_profile
from fxq.tracing import DetectorGraph

INIT_METHODS = ("minmax", "percentile[:q]", "mse", "lp:<p>", "detptq", "lsq")
#: Default initialisation: "mse" when every quantizer has 8 or more bits ("8bit"), else "lp:3" ("low_bit").
DEFAULT_INIT = {"8bit": "mse", "low_bit": "lp:3"}


def check_init(init: str) -> str:
    """``init`` if it names an initialisation method, else InputError listing them."""
    if init == "detptq":
        return init
    try:
        parse_method(init)
    except InputError:
        raise InputError(f"QAT initialisation {init!r} is unknown; use one of {INIT_METHODS}") from None
    return init


def default_init(gm: torch.fx.GraphModule) -> str:
    """The default initialisation for the precisions ``gm``'s nodes carry (see :data:`DEFAULT_INIT`)."""
    specs = [meta.get(n, meta.QSPEC) for n in gm.graph.nodes]
    bits = [b for s in specs if s is not None for b in (s.w_bits, s.a_bits, s.attn_bits) if b is not None]
    return DEFAULT_INIT["8bit" if min(bits, default=8) >= 8 else "low_bit"]


def _images_batch(gm: torch.fx.GraphModule) -> list | None:
    images = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    return None if images is None else meta.get(images, meta.SHAPE)


def _per_image_numel(gm: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    images, shape = _images_batch(gm), meta.get(node, meta.SHAPE)
    if not images or not shape:
        return None
    return max(1, math.prod(shape) // images[0])


def _make_learnable(gm: DetectorGraph, method: str, learn_zero_point: bool) -> dict[str, int]:
    counts = {"quantizers": 0, "zero_points": 0}
    for node in quantizer_nodes(gm):
        q = gm.get_submodule(node.target)
        q.set_learnable(True)
        if not learn_zero_point and isinstance(q.zero_point, torch.nn.Parameter):
            q.zero_point.requires_grad_(False)
        if meta.get(node, meta.QUANTIZER)["kind"] != "weight":
            q.grad_scale_numel = _per_image_numel(gm, node)
        q.enable()
        q.observer.reset()
        learned = ["scale"] + (["zero_point"] if q.zero_point.requires_grad else [])
        meta.put(node, meta.QAT, {"init": method, "grad_scale_numel": q.grad_scale_numel, "learnable": learned})
        counts["quantizers"] += 1
        counts["zero_points"] += len(learned) - 1
    return counts


def prepare_qat(float_gm: DetectorGraph, calib: Iterable, policy: str | QSpec | None = None, *,
                allocation: str | os.PathLike | None = None, init: str | None = None,
                overrides: Mapping[str, str | QSpec | None] | None = None, learn_zero_point: bool = True,
                target: str | TargetProfile | None = None, progress: bool = False) -> PassResult:
    """A QAT-ready copy of ``float_gm`` (``float_gm`` is kept: it is the distillation teacher).

    ``calib`` yields loader batches or image tensors for the initial calibration. Returns a PassResult whose
    ``gm`` is the new graph and whose ``info`` holds the init method and the quantizer counts.
    """
    if init is not None:
        check_init(init)
    profile = None if target is None else target_profile(target)
    annotated = annotated_copy(float_gm, policy, allocation, overrides)
    method = init or default_init(annotated)
    gm = quantize_annotated(annotated, calib, float_gm, method, profile, progress=progress).gm
    if not quantizers(gm):
        raise InputError("the precision quantizes nothing (every node float); pick a quantized policy")
    counts = _make_learnable(gm, method, learn_zero_point)
    return PassResult(gm, True, {"init": method, **counts})


def qat_structure(float_gm: DetectorGraph, state: Mapping[str, torch.Tensor], policy: str | QSpec | None = None,
                  *, allocation: str | os.PathLike | None = None, init: str = "minmax",
                  overrides: Mapping[str, str | QSpec | None] | None = None, learn_zero_point: bool = True,
                  target: str | TargetProfile | None = None) -> DetectorGraph:
    """The graph :func:`prepare_qat` makes for these settings, holding the trained ``state`` (weights, scales,
    zero-points; loaded strictly) instead of a calibration's: no data needed. ``init`` is only recorded."""
    check_init(init)
    images = _images_batch(float_gm)
    if not images or len(images) != 4:
        raise InputError("the float graph's input has no traced shape (fxq.shape); trace it with fxq.trace")
    blank = [torch.zeros(1, *images[1:])]  # a structural stand-in: every scale comes from ``state``
    gm = prepare_qat(float_gm, blank, policy, allocation=allocation, init="minmax", overrides=overrides,
                     learn_zero_point=learn_zero_point, target=target).gm
    gm.load_state_dict(state, strict=True)
    record_calibration(gm)
    for node in quantizer_nodes(gm):
        meta.put(node, meta.QAT, {**meta.get(node, meta.QAT), "init": init})
    return gm


def quantized_weights(gm: torch.fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    """The parameters read by conv/linear nodes whose weight is fake-quantized, by name (each once).

    A parameter counts whole when a node reads a row slice of it (q/k/v read rows of ``in_proj_weight``).
    This is the default parameter set of the Fisher-trace regularizer.
    """
    found = {}
    for node in gm.graph.nodes:
        record, ref = meta.get(node, meta.QUANTIZED_INPUTS), weight_ref(node)
        if record is not None and record.get("weight") is not None and ref is not None:
            found.setdefault(ref.param, parameter(gm, ref, node))
    if not found:
        raise InputError("the graph has no fake-quantized conv/linear weight; run prepare_qat first")
    return found


def keep_qparams_valid(gm: torch.fx.GraphModule, optimizer: torch.optim.Optimizer):
    """Register a post-step hook on ``optimizer`` projecting every quantizer of ``gm`` back into its valid
    set (scale ≥ MIN_LEARNABLE_SCALE, zero-point in range); returns the hook's handle."""
    qs = list(quantizers(gm).values())

    def project(*_args) -> None:
        for q in qs:
            q.project_()

    return optimizer.register_step_post_hook(project)
