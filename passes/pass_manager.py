"""The pass contract: a pass is a callable ``pass(gm, **options) -> PassResult``; a PassManager runs a list."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx


@dataclass
class PassResult:
    """What a pass returns: the (possibly rewritten) graph module, whether it changed, and a summary."""

    gm: torch.fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


Pass = Callable[[torch.fx.GraphModule], PassResult]


class PassManager:
    """Runs passes in order, lints the graph after each transform, and keeps every pass's ``info``."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)
        self.infos: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            result = p(gm)
            if result.modified:
                result.gm.graph.lint()
                result.gm.recompile()
            gm, modified = result.gm, modified or result.modified
            self.infos.append((getattr(p, "__name__", type(p).__name__), result.info))
        return PassResult(gm, modified, {"passes": self.infos})
