"""Fold an inference-mode BatchNorm into the convolution before it.

    s = gamma / sqrt(var + eps)        w' = w * s[:, None, ...]        b' = (b - mean) * s + beta

computed in float64 and rounded once. conv1d/2d/3d, grouped and depthwise alike. The folded
conv is written as a call of torch.convNd on new buffers; the original module and tensors are
never modified. No match, with the reason reported, when the conv's output has another reader,
the conv's module or weight serves other call sites (folding would give them this BN too, or
duplicate weights), or the BN is in training mode or has no running statistics.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.lib.bn_fold import fold_into, why_not_foldable
from graphopt.passes.lib.patterns import match_batch_norm, match_conv

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


@register("fp32")
def fold_conv_bn(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        bn = match_batch_norm(gm, node)
        conv = match_conv(gm, bn.input) if bn is not None else None
        if conv is None:
            continue  # not conv + BatchNorm
        why = conv.problem or why_not_foldable(gm, conv, bn, "conv")
        if why is not None:
            ctx.miss(why, bn.node)
            continue  # no match: nothing touched

        def make_call(w: fx.Node, b: fx.Node, c=conv) -> fx.Node:
            x = c.padded_input(gm)
            return gm.graph.call_function(_CONV[c.dim], (x, w, b, c.stride, c.padding, c.dilation, c.groups))

        fold_into(gm, conv, bn, make_call)
        rewrites += 1
    return rewrites
