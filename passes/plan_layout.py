"""Keep activations channels-last across the whole graph when it runs on oneDNN convolutions.

oneDNN's convolutions read NHWC without a reorder and write NHWC; pooling, adds and
activations keep the layout they are given. So one conversion per 4-d input that reaches a
convolution puts the whole graph in NHWC, and nothing converts between two convolutions.
Back to the default layout only where needed: before views and on 4-d outputs, which the
oneDNN lowering already guards (passes/lib/layout.py).

An input that some in-place op writes keeps its layout: converting it would write a copy. A graph
that writes in place after a copy-or-alias op (``.contiguous()``, ``.reshape()``) keeps all its
layouts: whether those copy depends on the layout.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.lib.layout import convert, is_4d_float, is_conversion, layout_changes_aliasing
from graphopt.passes.lib.onednn import CONV, CONV_ADD, QCONV, QCONV_SUM
from graphopt.passes.lib.query import alias_roots, mutated_roots


def _reaches_conv(node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "call_function" and n.target in (CONV, CONV_ADD, QCONV, QCONV_SUM):
            return True
        for u in n.users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return False


@register("fp32")
def plan_layout(gm: fx.GraphModule, ctx: PassContext) -> int:
    if layout_changes_aliasing(gm):
        return 0
    roots, written = alias_roots(gm.graph), mutated_roots(gm)
    rewrites = 0
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        users = list(node.users)
        if not is_4d_float(node) or roots[node] in written or any(is_conversion(u, torch.channels_last)
                                                                   for u in users):
            continue
        if _reaches_conv(node):
            convert(gm, node, torch.channels_last, users)
            rewrites += 1
    return rewrites
