"""The FX tracer of fxq: records each node's owning module and explains untraceable code.

Writes ``node.meta["fxq.module"]`` (dotted path of the innermost module whose forward created the node).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxq.errors import TraceError
from fxq.models.resnet import FrozenBatchNorm2d

LEAF_TYPES: tuple[type[nn.Module], ...] = (FrozenBatchNorm2d,)


class FxqTracer(torch.fx.Tracer):
    """torch.fx Tracer that keeps torch.nn modules and FrozenBatchNorm2d as leaves, plus user-declared leaves
    (module paths or classes), and annotates nodes with their module path."""

    def __init__(self, leaf_modules: Iterable[str | type[nn.Module]] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self.leaf_paths = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = LEAF_TYPES + tuple(x for x in leaves if isinstance(x, type))
        self._path: list[str] = [""]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self._path.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except TraceError:
            raise
        except Exception as exc:
            raise untraceable(path, m, exc) from exc
        finally:
            self._path.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["fxq.module"] = node.target if node.op == "call_module" else self._path[-1]
        return node


def untraceable(path: str, module: nn.Module, exc: Exception) -> TraceError:
    """A TraceError naming the module, the user source line that failed and how to declare a leaf."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    where = f"{frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}" if frames else "unknown line"
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TraceError(
        f"cannot trace module {path or '<root>'!r} ({type(module).__name__}) at {where}: {reason}. "
        f"Data-dependent control flow cannot be traced: remove it, or declare the module a leaf with "
        f"fxq.trace(model, inputs, leaf_modules=[{path!r}]) (it then stays opaque, unquantized, in the graph).")
