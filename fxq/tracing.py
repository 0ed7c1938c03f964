"""``fxq.trace``: an eager DETR-family model to an annotated torch.fx GraphModule.

Nodes carry ``fxq.module``, ``fxq.role``, ``fxq.shape``, ``fxq.params``, ``fxq.macs`` (and ``fxq.weight`` on
conv/linear nodes); see fxq/tracer.py, fxq/roles.py and fxq/costs.py.

:func:`model_batch` is the one adapter from a loader batch to a model's positional inputs (and targets), for
traced graphs and eager detectors alike; calibration, the Fisher analyses, DetPTQ, evaluation and the trainer
all feed models through it, moving the batch to the device :func:`module_device` reads off the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from fxq.costs import annotate_costs, record_shapes
from fxq.errors import InputError, TraceError
from fxq.roles import role_of
from fxq.tracer import FxqTracer, untraceable

#: The output key of a training graph's intermediate tensors (:mod:`fxq.passes.training_graph`).
TRAIN_OUTPUTS = "fxq_train"


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


class ModelBatch(NamedTuple):
    """A loader batch as a model takes it: the positional ``inputs`` ((images,) or (images, mask)) and the
    per-image ``targets`` (None when the batch has none)."""

    inputs: tuple[torch.Tensor, ...]
    targets: list[dict] | None


def takes_mask(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes a padding mask after the images: what the model says (a DetectorGraph
    and wrappers of one have ``takes_mask``), else whether a plain GraphModule has a second input, else True
    (eager DETR-family modules take ``(images, mask)``)."""
    declared = getattr(model, "takes_mask", None)
    if declared is not None:
        return bool(declared)
    if isinstance(model, torch.fx.GraphModule):
        return sum(node.op == "placeholder" for node in model.graph.nodes) > 1
    return True


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else first buffer); CPU for a module holding no tensors."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def model_batch(model: nn.Module, batch: Any, *, need_targets: bool = False, index: int | None = None) -> ModelBatch:
    """``batch`` (images, ``(images, mask)``, ``(images, targets)`` or ``(images, mask, targets)`` as
    :func:`fxq.data.collate` yields it) as ``model`` takes it (:func:`takes_mask`), on the model's device.

    InputError (prefixed ``batch <index>:`` when given) unless the images are a finite float [B, 3, H, W]
    tensor and the mask, when present, a bool [B, H, W] one; when the model takes a mask and the batch has
    none. With ``need_targets`` (the targets are used; they are checked, one dict per image, and moved to the
    device too) a padded batch is refused for a model that takes no mask: it would see the padding as image,
    and its boxes would be relative to the padded frame while the targets' are relative to each image. Without
    ``need_targets`` the targets are passed through unchecked and such a model sees padded images as they are.
    """
    images, mask, targets = _unpack(batch)
    where = "" if index is None else f"batch {index}: "
    check_images(images, mask)
    wants_mask = takes_mask(model)
    if wants_mask and mask is None:
        raise InputError(f"{where}{type(model).__name__} takes a padding mask after the images but the batch has "
                         "none: yield (images, mask[, targets]) batches as fxq.data.collate does")
    if need_targets:
        _check_targets(targets, images.shape[0], where)
        if not wants_mask and mask is not None and bool(mask.any()):
            raise InputError(f"{where}the batch is padded but {type(model).__name__} takes no padding mask "
                             "(traced with images only), so its boxes would not match the targets: use "
                             "batch_size=1 or same-size images, or trace with fxq.trace(model, (images, mask))")
    bad = (~torch.isfinite(images).flatten(1).all(1)).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"{where}images {bad} hold NaN/inf values; check the data pipeline (decoding, "
                         "normalisation) or drop those images")
    device = module_device(model)
    inputs = (images.to(device), mask.to(device)) if wants_mask else (images.to(device),)
    if need_targets:
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return ModelBatch(inputs, None if targets is None else list(targets))


def _unpack(batch: Any) -> tuple[Any, Any, Any]:
    """(images, mask or None, targets or None) of a loader batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    if not isinstance(batch, (tuple, list)) or not 1 <= len(batch) <= 3:
        size = f" of {len(batch)} values" if isinstance(batch, (tuple, list)) else ""
        raise InputError(f"a batch must be images, (images, mask) or (images, mask, targets), got "
                         f"{type(batch).__name__}{size}; pass fxq.data.collate as the loader's collate_fn")
    if len(batch) == 3:
        return tuple(batch)
    if len(batch) == 2 and not isinstance(batch[1], torch.Tensor) and batch[1] is not None:
        return batch[0], None, batch[1]
    return batch[0], (batch[1] if len(batch) == 2 else None), None


def _check_targets(targets: Any, count: int, where: str) -> None:
    if targets is None:
        raise InputError(f"{where}the batch has no targets and this needs ground truth: the loader must yield "
                         "(images, mask, targets) batches as fxq.data.collate does, with one target dict per image")
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, dict) for t in targets):
        raise InputError(f"{where}targets must be a list of dicts (one per image), got {type(targets).__name__}; "
                         "pass fxq.data.collate as the loader's collate_fn")
    if len(targets) != count:
        raise InputError(f"{where}the batch has {count} images but {len(targets)} target dicts; "
                         "yield one target dict per image")


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


def train_output(outputs, key: str, needed_by: str) -> list:
    """``outputs[TRAIN_OUTPUTS][key]`` of a training graph; InputError naming ``needed_by`` when absent."""
    train = outputs.get(TRAIN_OUTPUTS)
    if not train or not train.get(key):
        raise InputError(f"{needed_by} needs outputs[{TRAIN_OUTPUTS!r}][{key!r}]: run it as the training graph of "
                         "fxq.passes.training_graph")
    return train[key]
