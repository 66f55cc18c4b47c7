"""Fuse conv2d [+ residual add] [+ activation] into one ``graphopt::conv2d_act``.

    act(conv2d(x, w, b) + r)  ->  conv2d_act(x, w, b, stride, padding, dilation, groups, act, r)

A conv2d with nothing to absorb becomes ``conv2d_act(..., "none", None)`` too, so that every
convolution runs on the backend's kernel. See passes/lib/epilogue.py for what is absorbed and when.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import ConvAct
from graphopt.passes import PassContext, register
from graphopt.passes.lib.epilogue import inputs_stable, match_epilogue
from graphopt.passes.lib.patterns import Conv, match_conv
from graphopt.passes.lib.query import tensor_meta
from graphopt.passes.lib.rewrite import as_node, replace_chain


def _unfusable(conv: Conv) -> str | None:
    """Why this conv has no fused op, or None."""
    x_meta, y_meta = tensor_meta(conv.input), tensor_meta(conv.node)
    if conv.problem is not None:
        return conv.problem
    if conv.dim != 2:
        return f"conv{conv.dim}d (the fused op is conv2d only)"
    if x_meta is None or y_meta is None:
        return "no shape recorded for the input or output"
    if len(x_meta.shape) != 4:
        return "unbatched input"
    if not y_meta.dtype.is_floating_point or y_meta.dtype != x_meta.dtype:
        return "not a floating-point conv with equal input and output dtypes"
    return None


@register("fp32")
def fuse_conv_act(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        conv = match_conv(gm, node)
        if conv is None:
            continue  # not a conv
        why = _unfusable(conv)
        if why is not None:
            ctx.miss(why, node)
            continue
        ep = match_epilogue(gm, node, allow_residual=True, kind="conv")
        if not ep.last.users:
            continue  # dead work: eliminate_dead_code's, not ours to rewrite
        if not inputs_stable(gm, ep, [conv.input, conv.weight, conv.bias, ep.residual]):
            ctx.miss("an input is written in place between the conv and its epilogue", node)
            continue
        if ep.missed is not None:
            ctx.miss(ep.missed, node)  # the conv fuses; what follows it stays apart
        with gm.graph.inserting_before(ep.last):
            sig = ConvAct(conv.padded_input(gm), as_node(gm, conv.weight), as_node(gm, conv.bias), conv.stride,
                          conv.padding, conv.dilation, conv.groups, ep.act, ep.residual)
            fused = gm.graph.call_function(OPS[sig.op], sig.as_args())
        replace_chain(gm, fused, ep.nodes)
        rewrites += 1
    return rewrites
