"""Fold an inference-mode BatchNorm1d into the linear layer before it.

    s = gamma / sqrt(var + eps)        W' = W * s[:, None]        b' = (b - mean) * s + beta

Only where BatchNorm normalizes the linear's output features: a (N, F) output. On (N, C, L)
the BN's channel is dim 1 while the linear's features are the last dim: no match.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.fold_conv_bn import fold_into, is_shared
from graphopt.passes.graph import tensor_meta
from graphopt.passes.patterns import match_batch_norm, match_linear


@register("fold_linear_bn", kind="fp32")
def fold_linear_bn(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        bn = match_batch_norm(gm, node)
        linear = match_linear(gm, bn.input) if bn is not None else None
        if linear is None or len(linear.node.users) != 1 or is_shared(gm, linear):
            continue
        meta = tensor_meta(linear.node)
        weight, bias = linear.weight_tensor(gm), linear.bias_tensor(gm)
        if meta is None or len(meta.shape) != 2 or weight is None or (linear.bias is not None and bias is None):
            continue
        if bn.mean.numel() != weight.shape[0] or not weight.is_floating_point():
            continue

        def make_call(w, b, lin=linear):
            return gm.graph.call_function(F.linear, (lin.input, w, b))

        fold_into(gm, linear, bn, weight, bias, make_call)
        rewrites += 1
    return rewrites
