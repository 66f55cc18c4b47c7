"""Write nn.MultiheadAttention's self-attention out as the calls it makes.

    attn(x, x, x)[0]  ->  q, k, v = F.linear(x, W_in, b_in).chunk(3, -1)
                          each .unflatten(-1, (heads, head_dim)).permute(0, 2, 1, 3)   (batch first)
                          a = F.scaled_dot_product_attention(q, k, v)
                          F.linear(a.permute(0, 2, 1, 3).flatten(-2), W_out, b_out)
                          (sequence first: the permutes (1, 2, 0, 3) and (2, 0, 1, 3))

torch.fx keeps nn.MultiheadAttention whole (a call_module: its forward branches on its inputs), so nothing else
sees inside it: its two projections stay out of the linear lowering and int8, and a saved graph, which holds no
modules, cannot hold it (torchvision's ViT). Written out, the projections are linears like any other and the
graph saves. Torch's module runs a fused fast path in inference; the calls here sum in another order, so this is
an fp32 pass.

Rewritten: self-attention (query, key and value the same tensor) in inference, with one packed input projection,
no mask, no bias_k / bias_v / zero attention, and the attention weights unread (``need_weights`` either way).
Anything else is reported as a miss and stays the module.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.passes import PassContext, register

# MultiheadAttention.forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
# is_causal), by position
_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
_HARMLESS = {"key_padding_mask": None, "attn_mask": None, "is_causal": False}  # (need_weights: the weights' reads)


def _why_not(module: torch.nn.MultiheadAttention, node: fx.Node) -> str | None:
    """Why this call stays the module (None: it is written out)."""
    if module.training:
        return "in training mode (dropout on the attention)"
    if len(node.args) > len(_ARGS) or set(node.kwargs) - set(_ARGS):
        return "an argument it does not know"
    given = dict(zip(_ARGS, node.args)) | dict(node.kwargs)
    if not (given.get("query") is given.get("key") is given.get("value")) or not isinstance(given["query"], fx.Node):
        return "query, key and value are not one tensor (cross-attention)"
    if any(given.get(name, default) is not default for name, default in _HARMLESS.items()):
        return "a mask or is_causal"
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return "separate key / value sizes, bias_k / bias_v or add_zero_attn"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return "its output tuple is used whole"
        if user.args[1] == 1 and user.users:
            return "the attention weights are read"
    return None


@register("fp32")
def decompose_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), torch.nn.MultiheadAttention):
            continue
        module = gm.get_submodule(node.target)
        why = _why_not(module, node)
        if why is not None:
            ctx.miss(why, node)
            continue
        x = (dict(zip(_ARGS, node.args)) | dict(node.kwargs))["query"]
        heads, head_dim = module.num_heads, module.head_dim
        old = set(g.nodes)
        # (N, L, heads, head_dim) -> (N, heads, L, head_dim), from (L, N, ...) where the batch is not first; the
        # linears read x and a contiguous tensor as they are (a transposed 3-d input would sum in another order)
        split, merge = ((0, 2, 1, 3), (0, 2, 1, 3)) if module.batch_first else ((1, 2, 0, 3), (2, 0, 1, 3))
        with g.inserting_before(node):
            bias = g.get_attr(f"{node.target}.in_proj_bias") if module.in_proj_bias is not None else None
            qkv = g.call_function(F.linear, (x, g.get_attr(f"{node.target}.in_proj_weight"), bias))
            parts = g.call_method("chunk", (qkv, 3, -1))
            q, k, v = (g.call_method("permute", (g.call_method("unflatten", (
                g.call_function(operator.getitem, (parts, i)), -1, (heads, head_dim))), split)) for i in range(3))
            a = g.call_function(F.scaled_dot_product_attention, (q, k, v))
            a = g.call_method("flatten", (g.call_method("permute", (a, merge)), -2))  # (a copy: contiguous)
            bias = g.get_attr(f"{node.target}.out_proj.bias") if module.out_proj.bias is not None else None
            out = g.call_function(F.linear, (a, g.get_attr(f"{node.target}.out_proj.weight"), bias))
        for new in (n for n in g.nodes if n not in old):  # (errors name the module and the user's line)
            new.meta.update({k: node.meta[k] for k in ("module", "stack_trace") if k in node.meta})
        # the two projections go by their own names in the int8 report and fp32_layers
        qkv.meta["layer"], out.meta["layer"] = f"{node.target}.in_proj", f"{node.target}.out_proj"
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            g.erase_node(user)
        g.erase_node(node)
        rewrites += 1
    return rewrites
