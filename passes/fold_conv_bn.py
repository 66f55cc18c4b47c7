"""Fold an inference-mode BatchNorm into the convolution before it.

    s = gamma / sqrt(var + eps)        w' = w * s[:, None, ...]        b' = (b - mean) * s + beta

computed in float64 and rounded once. conv1d/2d/3d, grouped and depthwise alike. The folded
conv is written as a call of torch.convNd on new buffers; the original module and tensors are
never modified. No match when the conv's output has another reader, the conv's module or
weight serves other call sites (folding would give them this BN too, or duplicate weights),
or the BN has no running statistics.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.passes import PassContext, register
from graphopt.passes.graph import add_constant, call_sites, copy_meta, erase_chain, shares_tensor
from graphopt.passes.patterns import match_batch_norm, match_conv

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}


def fold_into(gm: fx.GraphModule, layer, bn, weight: torch.Tensor, bias: torch.Tensor | None, make_call) -> None:
    """Rewrite ``bn(layer(x))`` as one call on folded buffers; shared by the conv and linear folds."""
    s, t = bn.scale_shift()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_w = (weight.double() * s.reshape(shape)).to(weight.dtype)
    new_b = ((bias.double() * s if bias is not None else 0.0) + t).to(weight.dtype)
    w_name = add_constant(gm, f"{layer.node.name}_folded_weight", new_w)
    b_name = add_constant(gm, f"{layer.node.name}_folded_bias", new_b)
    with gm.graph.inserting_before(layer.node):  # the layer's inputs are all defined here
        folded = make_call(gm.graph.get_attr(w_name), gm.graph.get_attr(b_name))
    copy_meta(folded, bn.node, [layer.node, bn.node])
    bn.node.replace_all_uses_with(folded)
    erase_chain(gm, [layer.node, bn.node])


def is_shared(gm: fx.GraphModule, layer) -> bool:
    """Is the layer's module or weight used elsewhere too? Folding would then have to copy it."""
    if layer.owner is None:
        return True  # weights that arrive at run time cannot be folded at all
    if isinstance(layer.weight, fx.Node) and len(layer.weight.users) > 1:
        return True
    return call_sites(gm, layer.owner) > 1 or shares_tensor(gm, layer.weight_tensor(gm), layer.owner)


@register("fold_conv_bn", kind="fp32")
def fold_conv_bn(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        bn = match_batch_norm(gm, node)
        conv = match_conv(gm, bn.input) if bn is not None else None
        if conv is None or len(conv.node.users) != 1 or is_shared(gm, conv):
            continue
        weight, bias = conv.weight_tensor(gm), conv.bias_tensor(gm)
        if weight is None or (conv.bias is not None and bias is None) or bn.mean.numel() != weight.shape[0]:
            continue
        if not weight.is_floating_point():
            continue

        def make_call(w, b, c=conv):
            x = c.padded_input(gm)
            return gm.graph.call_function(_CONV[c.dim], (x, w, b, c.stride, c.padding, c.dilation, c.groups))

        fold_into(gm, conv, bn, weight, bias, make_call)
        rewrites += 1
    return rewrites
