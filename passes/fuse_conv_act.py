"""Fuse conv2d [+ residual add] [+ activation] into one ``graphopt::conv2d_act``.

    act(conv2d(x, w, b) + r)  ->  conv2d_act(x, w, b, stride, padding, dilation, groups, act, r)

A conv2d with nothing to absorb becomes ``conv2d_act(..., "none", None)`` too, so that every
convolution runs on the backend's kernel. See passes/epilogue.py for what is absorbed and when.
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.passes import PassContext, register
from graphopt.passes.epilogue import inputs_stable, match_epilogue
from graphopt.passes.graph import copy_meta, erase_chain, tensor_meta
from graphopt.passes.patterns import as_node, match_conv


@register("fuse_conv_act", kind="fp32")
def fuse_conv_act(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        conv = match_conv(gm, node)
        x_meta, y_meta = tensor_meta(conv.input) if conv else None, tensor_meta(node)
        if conv is None or conv.dim != 2 or x_meta is None or y_meta is None or len(x_meta.shape) != 4:
            continue
        if not y_meta.dtype.is_floating_point or y_meta.dtype != x_meta.dtype:
            continue
        ep = match_epilogue(gm, node, allow_residual=True)
        if not ep.last.users:
            continue  # dead work: eliminate_dead_code's, not ours to rewrite
        if not inputs_stable(gm, ep, [conv.input, conv.weight, conv.bias, ep.residual]):
            continue
        with gm.graph.inserting_before(ep.last):
            args = (conv.padded_input(gm), as_node(gm, conv.weight), as_node(gm, conv.bias), conv.stride, conv.padding,
                    conv.dilation, conv.groups, ep.act, ep.residual)
            fused = gm.graph.call_function(OPS["conv2d_act"], args)
        copy_meta(fused, ep.last, ep.nodes)
        ep.last.replace_all_uses_with(fused)
        erase_chain(gm, ep.nodes)
        rewrites += 1
    return rewrites
