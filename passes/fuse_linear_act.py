"""Fuse linear [+ activation] into one ``graphopt::linear_act``.

    act(linear(x, W, b))  ->  linear_act(x, W, b, act)

A linear with no activation after it becomes ``linear_act(..., "none")``, so that every GEMM
runs on the backend's kernel.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import LinearAct
from graphopt.passes import PassContext, register
from graphopt.passes.lib.epilogue import inputs_stable, match_epilogue
from graphopt.passes.lib.patterns import Linear, match_linear
from graphopt.passes.lib.query import tensor_meta
from graphopt.passes.lib.rewrite import as_node, replace_chain


def _unfusable(linear: Linear) -> str | None:
    """Why this linear has no fused op, or None."""
    x_meta, y_meta = tensor_meta(linear.input), tensor_meta(linear.node)
    if x_meta is None or y_meta is None:
        return "no shape recorded for the input or output"
    if len(x_meta.shape) == 0:
        return "0-d input"
    if not y_meta.dtype.is_floating_point or y_meta.dtype != x_meta.dtype:
        return "not a floating-point linear with equal input and output dtypes"
    return None


@register("fp32")
def fuse_linear_act(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        linear = match_linear(gm, node)
        if linear is None:
            continue  # not a linear
        why = _unfusable(linear)
        if why is not None:
            ctx.miss(why, node)
            continue
        ep = match_epilogue(gm, node, allow_residual=False, kind="linear")
        if not ep.last.users:
            continue  # dead work: eliminate_dead_code's, not ours to rewrite
        if not inputs_stable(gm, ep, [linear.input, linear.weight, linear.bias]):
            ctx.miss("an input is written in place between the linear and its activation", node)
            continue
        if ep.missed is not None:
            ctx.miss(ep.missed, node)  # the linear fuses; the activation after it stays apart
        with gm.graph.inserting_before(ep.last):
            sig = LinearAct(linear.input, as_node(gm, linear.weight), as_node(gm, linear.bias), ep.act)
            fused = gm.graph.call_function(OPS[sig.op], sig.as_args())
        replace_chain(gm, fused, ep.nodes)
        rewrites += 1
    return rewrites
