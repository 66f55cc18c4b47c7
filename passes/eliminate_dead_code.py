"""Erase nodes whose values nobody reads.

Side-effect aware: an in-place op (x.add_(1), nn.ReLU(inplace=True), operator.iadd), a random
op and anything fx considers impure stays even without users, since erasing it would change
what the tensors it writes hold.
"""

from __future__ import annotations

import torch.fx as fx

from passes import PassContext, register
from passes.graph import is_impure


@register("eliminate_dead_code", kind="exact")
def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not is_impure(gm, node):
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites
