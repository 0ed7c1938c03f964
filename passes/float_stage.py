"""Q-DETR's two-stage schedule: the encoder and the decoder train float first, then everything quantized.

Q-DETR trains in two stages: stage 1 quantizes the backbone with the transformer's encoder and decoder float; stage
2 quantizes everything, starting from the stage-1 weights (docs/METHODS.md, Distillation). :class:`FloatStage` is
the trainer's ``before_step`` hook (:class:`fxq.train.trainer.StepHook`) that does it inside one QAT run: before
step ``steps`` the quantizers of the encoder and the decoder are in "disabled" mode (identity), from step ``steps``
on in "quantize" mode. The mode depends on the step alone, so a run resumed in either stage continues as an
uninterrupted one. The optimiser, lr schedule and the quantizers' scales carry over from stage 1 unchanged: a
disabled quantizer's scale gets no gradient and keeps its initial calibration (chosen here; Q-DETR's text does not
say whether stage 2 recalibrates).

A quantizer belongs to the transformer when the node it quantizes or a quantized node reading it was created
by a module under :data:`TRANSFORMER` (``fxq.module``); the backbone's, ``input_proj``'s and the heads'
quantizers stay on. Reads ``fxq.quantizer``, ``fxq.quantized_inputs``, ``fxq.module``; writes nothing (it sets
the quantizers' modes).
"""

from __future__ import annotations

import torch.fx

from fxq import meta
from fxq.errors import InputError
from fxq.quant.fake_quant import FakeQuantizer, QuantMode
from fxq.roles import quantizer_nodes

#: Module prefixes of the parts that stay float in stage 1 (the encoder and decoder of DETR and Deformable DETR).
TRANSFORMER = ("transformer.encoder", "transformer.decoder")


def transformer_quantizers(gm: torch.fx.GraphModule) -> dict[str, FakeQuantizer]:
    """The fake quantizers of the encoder and decoder, by quantizer node name, in graph order."""
    inside = {n.name for n in gm.graph.nodes if _in_transformer(meta.get(n, meta.MODULE))}
    feeds: set[str] = set()
    for node in gm.graph.nodes:
        record = meta.get(node, meta.QUANTIZED_INPUTS)
        if record is not None and node.name in inside:
            feeds.update(q for q in (record.get("weight"), *record.get("inputs", ()), record.get("bias")) if q)
    chosen = {}
    for node in quantizer_nodes(gm):
        record = meta.get(node, meta.QUANTIZER) or {}
        if node.name in feeds or record.get("of") in inside:
            chosen[node.name] = gm.get_submodule(node.target)
    return chosen


def _in_transformer(module: str | None) -> bool:
    return module is not None and any(module == p or module.startswith(p + ".") for p in TRANSFORMER)


class FloatStage:
    """Before step ``steps``: the encoder's and decoder's quantizers disabled; from it on: all quantizing.

    InputError when ``steps`` < 0 or the graph has no quantizer in the encoder or decoder."""

    def __init__(self, gm: torch.fx.GraphModule, steps: int) -> None:
        if steps < 0:
            raise InputError(f"float stage of {steps} steps: give 0 (off) or more steps")
        self.steps = steps
        self.quantizers = transformer_quantizers(gm)
        if not self.quantizers:
            raise InputError(f"the graph has no quantizer under {list(TRANSFORMER)}: the two-stage schedule needs "
                             "a quantized encoder or decoder; check the policy's float overrides")
        self._mode: QuantMode | None = None

    def config(self) -> dict:
        """Plain-type settings (for the run fingerprint)."""
        return {"float_stage_steps": self.steps}

    def __call__(self, step: int) -> None:
        self._set(QuantMode.DISABLED if step < self.steps else QuantMode.QUANTIZE)

    def quantize_all(self) -> None:
        """Every quantizer in "quantize" mode (stage 2), whatever the step."""
        self._set(QuantMode.QUANTIZE)

    def _set(self, mode: QuantMode) -> None:
        if mode is not self._mode:
            for quantizer in self.quantizers.values():
                quantizer.mode = mode
            self._mode = mode
