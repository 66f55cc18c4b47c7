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

from graphopt.passes.lib.query import alias_roots, is_inplace, tensor_meta

# ops that copy or alias depending on the input's strides: a layout change can flip which
_MAYBE_COPY = {"contiguous", "reshape", "flatten", "view", "view_as", "reshape_as", "to", "type_as", "float",
               "unflatten"}


def layout_changes_aliasing(gm: fx.GraphModule) -> bool:
    """Is some value written in place after a copy-or-alias op on it? Then changing layouts (or adding
    ``.contiguous()`` guards) could change which tensors share memory, and with it the results:
    ``y = x.contiguous(); y.add_(1)`` writes x only when x was contiguous already."""
    roots = alias_roots(gm.graph)
    first_copy: dict[fx.Node, int] = {}
    for i, node in enumerate(gm.graph.nodes):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if node.op in ("call_method", "call_function") and name in _MAYBE_COPY:
            first_copy.setdefault(roots[node], i)
        if is_inplace(gm, node) and node.args and isinstance(node.args[0], fx.Node):
            if first_copy.get(roots[node.args[0]], i) < i:
                return True
    return False


def is_conversion(node: fx.Node, fmt: torch.memory_format) -> bool:
    return (node.op == "call_method" and node.target == "contiguous"
            and node.kwargs.get("memory_format", torch.contiguous_format) == fmt)


def is_4d_float(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4 and meta.dtype.is_floating_point


def convert(gm: fx.GraphModule, value: fx.Node, fmt: torch.memory_format, users: list[fx.Node]) -> fx.Node:
    """Insert ``value.contiguous(memory_format=fmt)``, read by ``users`` instead of ``value``.

    It goes right before the first of those users, not after ``value``: a copy made earlier
    would miss the in-place writes to ``value`` in between."""
    first = next(n for n in gm.graph.nodes if n in users)
    with gm.graph.inserting_before(first):
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
