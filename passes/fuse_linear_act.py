"""Fuse linear [+ activation] into one ``graphopt::linear_act``.

    act(linear(x, W, b))  ->  linear_act(x, W, b, act)

A linear with no activation after it becomes ``linear_act(..., "none")``, so that every GEMM
runs on the backend's kernel.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.passes import PassContext, register
from graphopt.passes.epilogue import inputs_stable, match_epilogue
from graphopt.passes.graph import copy_meta, erase_chain, tensor_meta
from graphopt.passes.patterns import as_node, match_linear


@register("fuse_linear_act", kind="fp32")
def fuse_linear_act(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        linear = match_linear(gm, node)
        x_meta, y_meta = tensor_meta(linear.input) if linear else None, tensor_meta(node)
        if linear is None or x_meta is None or y_meta is None or not y_meta.dtype.is_floating_point:
            continue
        if y_meta.dtype != x_meta.dtype or len(x_meta.shape) == 0:
            continue
        ep = match_epilogue(gm, node, allow_residual=False)
        if not ep.last.users:
            continue  # dead work: eliminate_dead_code's, not ours to rewrite
        if not inputs_stable(gm, ep, [linear.input, linear.weight, linear.bias]):
            continue
        with gm.graph.inserting_before(ep.last):
            args = (linear.input, as_node(gm, linear.weight), as_node(gm, linear.bias), ep.act)
            fused = gm.graph.call_function(OPS["linear_act"], args)
        copy_meta(fused, ep.last, ep.nodes)
        ep.last.replace_all_uses_with(fused)
        erase_chain(gm, ep.nodes)
        rewrites += 1
    return rewrites
