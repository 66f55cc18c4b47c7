"""Recognize a linear layer written as a matrix product and make it F.linear.

    torch.addmm(b, x, W)  ->  F.linear(x, W^T, b)        x: (M, K), W: a constant (K, N), b: a constant (N,)

Hugging Face's GPT-2 family writes every linear this way (its ``Conv1D`` stores W as (in, out)). As F.linear
it is a linear like any other: fuse_linear_act takes it (with the activation after it), and the CPU lowering
runs it on MKL's GEMM packed once (where torch.addmm reads W afresh each call).

W^T is a new constant (the user's W is not touched); W's storage is freed from the optimized graph once nothing
else reads it. Where something else does read W (a tied weight), the copy would keep both: no rewrite.

The GEMM may sum in another order, so this is an fp32 pass. One consequence beyond rounding: where a row's
products pass float32's range inside the sum (inputs near 1e38), the order decides between +-inf and NaN, and
F.linear may give NaN where eager's addmm gives +-inf (both an overflow; graphopt's range analysis keeps the
other libraries away from such inputs, and graphopt's own graph runs them like this).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import attr_value, call_sites, constant_value, shares_tensor, tensor_meta
from graphopt.passes.lib.rewrite import add_constant, replace_chain


def _constant(gm: fx.GraphModule, v: object, ndim: int) -> torch.Tensor | None:
    """The float32 tensor of ``ndim`` dimensions behind a get_attr node, else None."""
    t = constant_value(gm, v)
    return t if t is not None and t.dim() == ndim and t.dtype == torch.float32 else None


def _why_not(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why this addmm is no linear (None: it is one). Only a miss worth reporting is a string; "" is no match."""
    if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or \
            set(node.kwargs) - {"beta", "alpha"}:
        return ""
    b, x, w = node.args
    weight, bias, x_meta = _constant(gm, w, 2), _constant(gm, b, 1), tensor_meta(x)
    if weight is None or bias is None or x_meta is None or len(x_meta.shape) != 2 or x_meta.dtype != torch.float32:
        return ""  # a product of two values, a bias that broadcasts over rows, ...: no linear
    if bias.shape[0] != weight.shape[1] or x_meta.shape[1] != weight.shape[0]:
        return ""
    if len(w.users) > 1 or node.args.count(w) > 1 or call_sites(gm, w.target) > 1 or \
            shares_tensor(gm, weight, w.target):
        return "weight read elsewhere (its transposed copy would keep both)"
    return None


@register("fp32")
def recognize_linears(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.addmm:
            continue
        why = _why_not(gm, node)
        if why is not None:
            if why:
                ctx.miss(why, node)
            continue
        b, x, w = node.args
        name = add_constant(gm, f"{w.target}_t", attr_value(gm, w.target).detach().t().contiguous())
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(F.linear, (x, gm.graph.get_attr(name), b))
        replace_chain(gm, linear, [node])  # (and W's read, which only it used)
        rewrites += 1
    return rewrites

