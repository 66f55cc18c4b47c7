"""Erase nodes whose values nobody reads.

Side-effect aware: an in-place op (x.add_(1), nn.ReLU(inplace=True), operator.iadd), a random
op and anything fx considers impure stays even without users, since erasing it would change
what the tensors it writes hold. Except an in-place write that nobody can observe: into a
value computed in this graph that nothing else reads and nothing aliases.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import alias_roots, is_impure, is_inplace, is_random


def _unobserved_write(gm: fx.GraphModule, node: fx.Node, roots: dict) -> bool:
    if node.users or not is_inplace(gm, node) or is_random(gm, node) or not node.args:
        return False
    target = node.args[0]
    if not isinstance(target, fx.Node) or target.op in ("placeholder", "get_attr") or len(target.users) != 1:
        return False
    return sum(1 for r in roots.values() if r is roots[target]) == 2  # only the value and this write


@register("exact")
def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and (not is_impure(gm, node) or _unobserved_write(gm, node, alias_roots(gm.graph))):
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites
