"""Merge nodes that compute the same value: same op, same target, same arguments.

Two reads of one value merge only when nothing writes that value in place anywhere in the
graph (``a = x + 1; x.add_(1); b = x + 1`` must keep both), and impure nodes never merge.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import alias_roots, is_impure, mutated_roots


def _key(value: Any) -> Any:
    """A hashable fingerprint of an argument structure; nodes by identity."""
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


@register("exact")
def eliminate_common_subexpressions(gm: fx.GraphModule, ctx: PassContext) -> int:
    roots, mutated = alias_roots(gm.graph), mutated_roots(gm)
    seen: dict[Any, fx.Node] = {}
    rewrites = 0
    for node in list(gm.graph.nodes):
        if is_impure(gm, node) or any(roots[i] in mutated for i in node.all_input_nodes) or roots[node] in mutated:
            continue
        key = (node.op, _key(node.target) if not isinstance(node.target, str) else node.target,
               _key(node.args), _key(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            rewrites += 1
    return rewrites
