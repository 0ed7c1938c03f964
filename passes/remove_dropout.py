"""Remove dropout nodes (identity in inference) so quantizers see the tensors the deployed model computes.

Reads ``fxq.role``; writes nothing; erases ``dropout`` nodes.
"""

from __future__ import annotations

import torch.fx

from fxq.passes.pass_manager import PassResult


def remove_dropout(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every dropout node by its input."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.meta.get("fxq.role") == "dropout":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, removed > 0, {"removed": removed})
