"""Memory-layout helpers shared by the oneDNN lowering and the layout planner.

oneDNN convolutions on reordered weights write channels-last (NHWC) outputs, whatever the
layout of their input. Values are the same, strides are not, and two things in a graph
depend on strides: ``.view`` (it needs the strides the code was written for) and what the
caller receives. ``restore_default_layout`` guards both with ``.contiguous()``, which costs
nothing on a tensor already in the default layout.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.graph import tensor_meta


def is_conversion(node: fx.Node, fmt: torch.memory_format) -> bool:
    return (node.op == "call_method" and node.target == "contiguous"
            and node.kwargs.get("memory_format", torch.contiguous_format) == fmt)


def is_4d_float(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4 and meta.dtype.is_floating_point


def convert(gm: fx.GraphModule, value: fx.Node, fmt: torch.memory_format, users: list[fx.Node]) -> fx.Node:
    """Insert ``value.contiguous(memory_format=fmt)`` right after ``value``, read by ``users`` instead."""
    with gm.graph.inserting_after(value):
        kwargs = {"memory_format": fmt} if fmt != torch.contiguous_format else {}
        node = gm.graph.call_method("contiguous", (value,), kwargs)
    node.meta.update({k: v for k, v in value.meta.items() if k in ("stack_trace", "module")})
    for user in users:
        user.replace_input_with(value, node)
    return node


def restore_default_layout(gm: fx.GraphModule) -> int:
    """Put a ``.contiguous()`` before every view and on every 4-d output; returns how many were added."""
    added = 0
    for node in [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "view_as")]:
        base = node.args[0]
        if isinstance(base, fx.Node) and not is_conversion(base, torch.contiguous_format):
            convert(gm, base, torch.contiguous_format, [node])
            added += 1
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for value in output.all_input_nodes:
        if is_4d_float(value) and not is_conversion(value, torch.contiguous_format):
            convert(gm, value, torch.contiguous_format, [output])
            added += 1
    return added
