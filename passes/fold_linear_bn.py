"""Fold an inference-mode BatchNorm1d into the linear layer before it.

    s = gamma / sqrt(var + eps)        W' = W * s[:, None]        b' = (b - mean) * s + beta

Only where BatchNorm normalizes the linear's output features: a (N, F) output. On (N, C, L)
the BN's channel is dim 1 while the linear's features are the last dim: no match.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.bn_fold import fold_into, why_not_foldable
from graphopt.passes.lib.patterns import match_batch_norm, match_linear
from graphopt.passes.lib.query import tensor_meta


@register("fp32")
def fold_linear_bn(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        bn = match_batch_norm(gm, node)
        linear = match_linear(gm, bn.input) if bn is not None else None
        if linear is None:
            continue  # not linear + BatchNorm
        meta = tensor_meta(linear.node)
        not_2d = "BatchNorm over a linear output that is not (N, F)" if meta is None or len(meta.shape) != 2 else None
        why = bn.problem or not_2d or why_not_foldable(gm, linear, bn, "linear")
        if why is not None:
            ctx.miss(why, bn.node)
            continue  # no match: nothing touched

        def make_call(w: fx.Node, b: fx.Node, lin=linear) -> fx.Node:
            return gm.graph.call_function(F.linear, (lin.input, w, b))

        fold_into(gm, linear, bn, make_call)
        rewrites += 1
    return rewrites
