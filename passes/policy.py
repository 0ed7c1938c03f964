"""Annotate quantizable nodes with a uniform precision policy, with per-module overrides.

Reads ``fxq.role`` and ``fxq.module``; writes ``fxq.qspec`` (a :class:`fxq.quant.QSpec`) on every node whose
role is in :data:`fxq.roles.QUANTIZABLE_ROLES` (conv, linear, attn_qk, attn_av) and removes it from the others.
It is the one writer of ``fxq.qspec``: other passes that change a node's precision call :func:`assign_qspec`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch.fx

from fxq.passes.pass_manager import PassResult
from fxq.quant import QSpec, parse_policy
from fxq.roles import QUANTIZABLE_ROLES

#: Module-path patterns and the policy they get instead of the uniform one (None = stay float).
#: Heads stay float (FQ-DETR, Q-DETR); Deformable DETR's sampling geometry stays float (a small error in a
#: sampling offset moves the sampled point); the stem conv keeps 8 bits, as is common practice.
DEFAULT_OVERRIDES: dict[str, str | None] = {
    "class_embed*": None,
    "bbox_embed*": None,
    "transformer.decoder.class_embed*": None,
    "transformer.decoder.bbox_embed*": None,
    "transformer.reference_points": None,
    "transformer.enc_output": None,  # two-stage: it scores the proposals, so it decides which queries exist
    "*.sampling_offsets": None,
    "backbone.0.body.conv1": "W8A8",
}


def quantizable_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """Nodes of ``gm`` that fxq can quantize, in graph order."""
    return [n for n in gm.graph.nodes if n.meta.get("fxq.role") in QUANTIZABLE_ROLES]


def assign_qspec(node: torch.fx.Node, spec: QSpec | None) -> None:
    """Set how ``node`` is quantized (``fxq.qspec``); None keeps it float (removes the annotation)."""
    if spec is None:
        node.meta.pop("fxq.qspec", None)
    else:
        node.meta["fxq.qspec"] = spec


def set_weight_bits(gm: torch.fx.GraphModule, bits: int) -> None:
    """Every node whose ``fxq.qspec`` quantizes its weight gets weight bit-width ``bits`` (other fields kept)."""
    for node in gm.graph.nodes:
        spec = node.meta.get("fxq.qspec")
        if spec is not None and spec.w_bits is not None:
            assign_qspec(node, spec.replace(w_bits=bits))


def _override_for(module: str, overrides: Mapping[str, str | QSpec | None]) -> tuple[bool, str | QSpec | None]:
    for pattern, policy in overrides.items():
        if fnmatch.fnmatchcase(module, pattern):
            return True, policy
    return False, None


def _as_spec(policy: str | QSpec | None, **fields: object) -> QSpec | None:
    if policy is None:
        return None
    spec = policy if isinstance(policy, QSpec) else parse_policy(policy, **fields)
    return None if spec.is_float else spec


def annotate_policy(gm: torch.fx.GraphModule, policy: str | QSpec = "W8A8",
                    overrides: Mapping[str, str | QSpec | None] | None = None, **fields: object) -> PassResult:
    """Give every quantizable node the ``policy`` QSpec (e.g. "W4A8", "4-4-8"), or its override's.

    ``overrides`` maps fnmatch patterns over ``fxq.module`` to a policy or None (float); the first matching
    pattern wins; default :data:`DEFAULT_OVERRIDES`. ``fields`` set other QSpec fields (e.g. a_observer="mse").
    """
    overrides = DEFAULT_OVERRIDES if overrides is None else overrides
    base = _as_spec(policy, **fields)
    counts = {"quantized": 0, "float": 0}
    for node in gm.graph.nodes:
        assign_qspec(node, None)
    for node in quantizable_nodes(gm):
        matched, special = _override_for(node.meta.get("fxq.module", ""), overrides)
        spec = _as_spec(special, **fields) if matched else base
        assign_qspec(node, spec)
        counts["quantized" if spec is not None else "float"] += 1
    return PassResult(gm, False, counts)
