"""Evaluate, once, every subgraph that depends on no graph input.

A node is constant when it is a get_attr, or a pure call whose node inputs are all constant.
Each constant tensor that a run-time node reads (the frontier) is computed now and stored as
a buffer; the constant nodes that fed it are erased. Literal-only calls (``torch.ones(3)``)
count too; random and in-place ops never do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import alias_roots, attr_value, is_impure, module_of, mutated_roots
from graphopt.passes.lib.rewrite import add_constant


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "get_attr":
        return attr_value(gm, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return module_of(gm, node)(*args, **kwargs)


@register("exact")
def fold_constants(gm: fx.GraphModule, ctx: PassContext) -> int:
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method", "call_module")
            and not is_impure(gm, node)
            and all(i in constant for i in node.all_input_nodes)
        ):
            constant.add(node)

    roots, mutated = alias_roots(gm.graph), mutated_roots(gm)
    frontier = [n for n in gm.graph.nodes if n in constant and n.op != "get_attr"
                and any(u not in constant for u in n.users)
                and roots[n] not in mutated]  # a value written in place each call must be made each call
    if not frontier:
        return 0
    env: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in constant:
                env[node] = _evaluate(gm, node, env)
    rewrites = 0
    for node in frontier:
        value = env[node]
        if not isinstance(value, torch.Tensor):
            continue  # shapes and scalars stay where they are
        name = add_constant(gm, f"folded_{node.name}", value.clone() if value._base is not None else value)
        with gm.graph.inserting_before(node):
            folded = gm.graph.get_attr(name)
        folded.meta.update(node.meta)
        node.replace_all_uses_with(folded)
        rewrites += 1
    for node in reversed(list(gm.graph.nodes)):
        if node in constant and not node.users:
            gm.graph.erase_node(node)
    return rewrites
