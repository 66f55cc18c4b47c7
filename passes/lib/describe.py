"""Readable names and the networkx view of a graph, for the dumps, the explorer and error messages."""

from __future__ import annotations

import networkx as nx
import torch
import torch.fx as fx

from graphopt.passes.lib.query import tensor_meta


def describe_target(node: fx.Node) -> str:
    """A short readable name for what a node calls: torch.conv2d, F.relu, mkldnn._convolution_pointwise, ..."""
    t = node.target
    if isinstance(t, str):
        if node.op == "call_module" and node.graph.owning_module is not None:
            return type(node.graph.owning_module.get_submodule(t)).__name__
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    module = {"torch.nn.functional": "F", "_operator": "operator"}.get(getattr(t, "__module__", None) or "",
                                                                    getattr(t, "__module__", None) or "")
    name = getattr(t, "__name__", None) or str(t)
    return f"{module}.{name}" if module else name


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=describe_target(node), shape=_shape(node))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _shape(node: fx.Node) -> str:
    meta = tensor_meta(node)
    return "x".join(map(str, meta.shape)) if meta is not None and hasattr(meta, "shape") else ""
