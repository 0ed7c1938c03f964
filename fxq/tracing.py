"""``fxq.trace``: an eager DETR-family model to an annotated torch.fx GraphModule.

Nodes carry ``fxq.module``, ``fxq.role``, ``fxq.shape``, ``fxq.params``, ``fxq.macs`` (and ``fxq.weight`` on
conv/linear nodes); see fxq/tracer.py, fxq/roles.py and fxq/costs.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from fxq.costs import annotate_costs, record_shapes
from fxq.errors import InputError, TraceError
from fxq.roles import role_of
from fxq.tracer import FxqTracer, untraceable


class DetectorGraph(torch.fx.GraphModule):
    """The GraphModule of a traced detector. ``meta["fxq.model"]`` holds what the model declared (``head``,
    ``num_classes``, ``num_queries``) and ``takes_mask``; it survives ``copy.deepcopy``."""

    @property
    def head(self) -> str | None:
        """"softmax" (DETR) or "sigmoid" (Deformable DETR)."""
        return self.meta.get("fxq.model", {}).get("head")

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("fxq.model", {}).get("num_classes")

    @property
    def num_queries(self) -> int | None:
        return self.meta.get("fxq.model", {}).get("num_queries")

    @property
    def takes_mask(self) -> bool:
        """Whether the graph's forward takes a padding mask after the images."""
        return self.meta.get("fxq.model", {}).get("takes_mask", False)


def check_images(images: object, mask: object = None) -> None:
    """Raise InputError unless ``images`` is a float [B, 3, H, W] tensor and ``mask`` a bool [B, H, W] one."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"images must have rank 4 [B, 3, H, W], got shape {tuple(images.shape)}; "
                         "add a batch dimension with images.unsqueeze(0)")
    if images.shape[1] != 3:
        raise InputError(f"images must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}; "
                         "convert grayscale/RGBA images to RGB and use NCHW layout")
    if not images.is_floating_point():
        raise InputError(f"images must be floating point (normalised), got dtype {images.dtype}")
    if mask is not None:
        b, _, h, w = images.shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (b, h, w):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"mask must be a bool tensor of shape {(b, h, w)} (True = padding), got {got}")


def _split_inputs(example_inputs: torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs, None
    inputs = tuple(example_inputs)
    if len(inputs) not in (1, 2):
        raise InputError(f"example_inputs must be images or (images, mask), got {len(inputs)} values")
    return inputs[0], (inputs[1] if len(inputs) == 2 else None)


def trace(model: nn.Module, example_inputs: torch.Tensor | tuple, *, aux: bool = False,
          leaf_modules: Iterable[str | type[nn.Module]] = ()) -> DetectorGraph:
    """Trace ``model`` to a GraphModule ``gm(images[, mask]) -> {"pred_logits", "pred_boxes"[, "aux_outputs"]}``.

    With no mask in ``example_inputs`` the graph takes images only and treats them as unpadded; it then runs
    at any input size. ``aux=True`` keeps the decoder's auxiliary outputs. ``leaf_modules`` (paths or classes)
    stay opaque call_module nodes. Nodes are annotated at the example inputs' size.
    """
    images, mask = _split_inputs(example_inputs)
    check_images(images, mask)
    tracer = FxqTracer(leaf_modules)
    concrete = {} if mask is not None else {"mask": None}
    saved_aux = getattr(model, "aux_loss", None)
    if saved_aux is not None:
        model.aux_loss = aux
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except TraceError:
        raise
    except Exception as exc:
        raise untraceable("", model, exc) from exc
    finally:
        if saved_aux is not None:
            model.aux_loss = saved_aux
    gm = DetectorGraph(tracer.root, graph, type(model).__name__)
    declared = {a: getattr(model, a) for a in ("head", "num_classes", "num_queries") if hasattr(model, a)}
    gm.meta["fxq.model"] = {**declared, "takes_mask": mask is not None}
    annotate(gm, images, mask)
    return gm


def annotate(gm: torch.fx.GraphModule, images: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Write ``fxq.role``, ``fxq.shape``, ``fxq.params``, ``fxq.macs`` on every node of ``gm``."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        node.meta["fxq.role"] = role_of(node, modules)
    record_shapes(gm, *((images,) if mask is None else (images, mask)))
    annotate_costs(gm)
