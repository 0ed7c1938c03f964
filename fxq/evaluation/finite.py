"""Guards against NaN and infinity: in a model's weights and in what it computes.

A checkpoint with NaN weights still runs and scores (or exports) something; these checks turn that into one
InputError naming the first tensor, or the first module whose output is not finite.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fxq.errors import InputError


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """``(name, non-finite count, size)`` of the first floating tensor holding NaN or inf, else None."""
    for name, tensor in tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                return name, bad, tensor.numel()
    return None


def check_finite_weights(model: nn.Module, source: str = "the model") -> None:
    """InputError naming the first parameter of ``model`` with NaN or inf values."""
    found = first_nonfinite(model.named_parameters())
    if found is not None:
        name, bad, size = found
        raise InputError(f"weight {name!r} of {source} holds {bad} NaN/inf of {size} values: the checkpoint is "
                         "damaged or its training diverged; use another checkpoint")


def check_finite_outputs(model: nn.Module, outputs, inputs: tuple, where: str) -> None:
    """InputError when a tensor of ``outputs`` (``model(*inputs)``) is not finite, naming the first module that
    produced a non-finite value on ``inputs`` (found by running them once more)."""
    found = first_nonfinite(_named_tensors(outputs))
    if found is None:
        return
    key, bad, size = found
    module = first_nonfinite_module(model, inputs)
    origin = f"; the first module with a non-finite output is {module!r}" if module else ""
    raise InputError(f"the model's output {key!r} holds {bad} NaN/inf of {size} values ({where}){origin}: "
                     "check the checkpoint's weights and the input images")


def first_nonfinite_module(model: nn.Module, inputs: tuple) -> str | None:
    """The name of the first submodule (in execution order) whose output holds NaN or inf on ``inputs``."""
    found: list[str] = []

    def hook(name: str):
        def check(_module, _args, output) -> None:
            if not found and first_nonfinite(_named_tensors(output)) is not None:
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _named_tensors(value, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if torch.is_tensor(value):
        return [(prefix or "output", value)]
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in _named_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list | tuple):
        return [t for i, v in enumerate(value) for t in _named_tensors(v, f"{prefix}[{i}]")]
    return []
