"""The pass contract: a pass is a callable ``pass(gm) -> PassResult``; a PassManager runs a list of them.

A pass with options is given as ``functools.partial(pass_fn, option=value)`` (named after the function and its
options, e.g. ``annotate_policy(policy='W4A8')``) or as an object with ``__call__(gm)`` (named by its ``name``
attribute, else its class). ``torch.fx.passes.infra.pass_base.PassBase`` instances are passes too: their
result (torch's ``PassResult``, or None: changed in place) becomes fxq's with an empty ``info``. torch's own
PassManager is not used: it keeps no per-pass summary, and it reports a failing pass as a plain ``Exception``.

Reads and writes no ``node.meta`` key itself (each pass states its own).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchPassResult

from fxq.errors import FxqError


@dataclass
class PassResult:
    """What a pass returns: the (possibly rewritten) graph module, whether it changed, and a summary."""

    gm: torch.fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


Pass = Callable[[torch.fx.GraphModule], PassResult]


class PassError(FxqError):
    """A pass of a PassManager failed; the message names it and the passes that ran before it, and the
    original exception is chained (``__cause__``)."""

    def __init__(self, message: str, pass_name: str, completed: Sequence[str]) -> None:
        super().__init__(message)
        self.pass_name, self.completed = pass_name, list(completed)


def pass_name(p: Pass) -> str:
    """A readable name of ``p``: a function's name, a partial's function with its options, an object's
    ``name`` attribute or class name."""
    if isinstance(p, functools.partial):
        options = [_short(a) for a in p.args] + [f"{k}={_short(v)}" for k, v in p.keywords.items()]
        return f"{pass_name(p.func)}({', '.join(options)})"
    name = getattr(p, "__name__", None) or getattr(p, "name", None)
    return name if isinstance(name, str) else type(p).__name__


def _short(value: Any) -> str:
    """repr for plain values, the type's name for anything else (a data loader, a model)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, (tuple, list)) and len(value) <= 8 and all(isinstance(v, (int, float, str)) for v in value):
        return repr(value)
    return type(value).__name__


class PassManager:
    """Runs passes in order and lints and recompiles the graph after each one that changed it.

    Calling it returns a PassResult whose ``info["passes"]`` lists ``(pass name, that pass's info)`` for this
    run only. A failing pass (or an invalid graph after it) raises :class:`PassError` naming it and the
    passes before it.
    """

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        infos: list[tuple[str, dict[str, Any]]] = []
        modified = False
        for p in self.passes:
            name = pass_name(p)
            try:
                result = _as_result(p, p(gm), gm)
                if result.modified:
                    result.gm.graph.lint()
                    result.gm.recompile()
            except Exception as exc:
                done = [n for n, _ in infos]
                raise PassError(f"pass {name!r} failed after {done or 'no other passes'}: "
                                f"{type(exc).__name__}: {exc}", name, done) from exc
            gm, modified = result.gm, modified or result.modified
            infos.append((name, result.info))
        return PassResult(gm, modified, {"passes": infos})


def _as_result(p: Pass, result: Any, gm: torch.fx.GraphModule) -> PassResult:
    if isinstance(result, PassResult):
        return result
    if isinstance(p, PassBase) and (result is None or isinstance(result, TorchPassResult)):
        return PassResult(gm, True) if result is None else PassResult(result.graph_module, result.modified)
    raise TypeError(f"a pass must return fxq.passes.PassResult, got {type(result).__name__}; return "
                    "PassResult(gm, modified, info) from it")
