"""Folding an inference-mode BatchNorm into the conv or linear before it: shared by fold_conv_bn and
fold_linear_bn.

    s = gamma / sqrt(var + eps)        w' = w * s[:, None, ...]        b' = (b - mean) * s + beta

computed in float64 and rounded once, into new buffers: the original module and tensors are never
modified.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from graphopt.passes.lib.patterns import BatchNorm, Conv, Linear
from graphopt.passes.lib.query import call_sites, shares_tensor
from graphopt.passes.lib.rewrite import add_constant, replace_chain


def sharing(gm: fx.GraphModule, layer: Conv | Linear) -> str | None:
    """Why the layer's weights are not this call's alone (folding would give the BN to the other users too), or
    None."""
    if layer.owner is None:
        return "weights computed at run time"
    if isinstance(layer.weight, fx.Node) and len(layer.weight.users) > 1:
        return "weight shared with another layer"
    if call_sites(gm, layer.owner) > 1:
        return "layer called more than once"
    if shares_tensor(gm, layer.weight_tensor(gm), layer.owner):
        return "weight shared with another layer"
    return None


def why_not_foldable(gm: fx.GraphModule, layer: Conv | Linear, bn: BatchNorm, kind: str) -> str | None:
    """Why ``bn(layer(x))`` cannot be folded (``kind`` names the layer: conv, linear), or None when it can."""
    if bn.problem is not None:
        return bn.problem
    if len(layer.node.users) != 1:
        return f"{kind} output has another reader"
    shared = sharing(gm, layer)
    if shared is not None:
        return shared
    weight, bias = layer.weight_tensor(gm), layer.bias_tensor(gm)
    if weight is None or (layer.bias is not None and bias is None):
        return "weight or bias is not a constant"
    if not weight.is_floating_point():
        return "integer weights"
    if bn.mean.numel() != weight.shape[0]:
        return f"BatchNorm channels differ from the {kind}'s outputs"
    return None


def fold_into(gm: fx.GraphModule, layer: Conv | Linear, bn: BatchNorm,
              make_call: Callable[[fx.Node, fx.Node], fx.Node]) -> None:
    """Rewrite ``bn(layer(x))`` as ``make_call(w', b')``, one call on the folded buffers."""
    weight, bias = layer.weight_tensor(gm), layer.bias_tensor(gm)
    s, t = bn.scale_shift()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    new_w = (weight.double() * s.reshape(shape)).to(weight.dtype)
    new_b = ((bias.double() * s if bias is not None else 0.0) + t).to(weight.dtype)
    w_name = add_constant(gm, f"{layer.node.name}_folded_weight", new_w)
    b_name = add_constant(gm, f"{layer.node.name}_folded_bias", new_b)
    with gm.graph.inserting_before(layer.node):  # the layer's inputs are all defined here
        folded = make_call(gm.graph.get_attr(w_name), gm.graph.get_attr(b_name))
    replace_chain(gm, folded, [layer.node, bn.node])
