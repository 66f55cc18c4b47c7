"""Write torch's attention modules out as the calls they make.

    attn(x, x, x)[0]  ->  q, k, v = F.linear(x, W_in, b_in).chunk(3, -1)
                          each .unflatten(-1, (heads, head_dim)).permute(0, 2, 1, 3)   (batch first)
                          a = F.scaled_dot_product_attention(q, k, v)
                          F.linear(a.permute(0, 2, 1, 3).flatten(-2), W_out, b_out)
                          (sequence first: the permutes (1, 2, 0, 3) and (2, 0, 1, 3))
    nn.TransformerEncoderLayer(x)  ->  x = norm1(x + attn(x)); norm2(x + linear2(act(linear1(x))))   (post-norm)
                                       x = x + attn(norm1(x)); x + linear2(act(linear1(norm2(x))))   (norm_first)
    nn.TransformerEncoder(x)  ->  its layers one after another, then its norm

torch.fx keeps these modules whole (call_module: their forwards branch on their inputs), so nothing else sees
inside them: their linears stay out of the linear lowering and int8, and a saved graph, which holds no modules,
cannot hold them (torchvision's ViT). Written out, the projections and the feed-forward layers are linears like
any other and the graph saves. Torch's modules run fused fast paths in inference; the calls here sum in another
order, so this is an fp32 pass.

Rewritten, in inference: self-attention (query, key and value the same tensor) with one packed input projection,
no mask, no bias_k / bias_v / zero attention, the attention weights unread (``need_weights`` either way); an
encoder layer with relu or gelu and no mask; an encoder without a mask. Anything else is reported as a miss and
stays the module.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import tensor_meta

# MultiheadAttention.forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
# is_causal), by position
_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
_DEFAULTS = {"key_padding_mask": None, "attn_mask": None, "is_causal": False}  # (need_weights: the weights' reads)
# TransformerEncoderLayer.forward(src, src_mask, src_key_padding_mask, is_causal);
# TransformerEncoder.forward(src, mask, src_key_padding_mask, is_causal)
_LAYER_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")
_ENCODER_ARGS = ("src", "mask", "src_key_padding_mask", "is_causal")


def _activation(module: nn.TransformerEncoderLayer) -> Callable | None:
    """The layer's activation as a function, where it is relu or exact gelu (None: another). Read off
    ``module.activation`` itself (torch's own flag calls a tanh GELU gelu, and is not updated when the
    activation is replaced)."""
    act = module.activation
    if act is F.relu or type(act) is nn.ReLU:
        return F.relu
    if act is F.gelu or type(act) is nn.GELU and act.approximate == "none":
        return F.gelu
    return None


def _three_d(node: fx.Node) -> bool:
    """Batched: (N, L, E) or (L, N, E) (the modules also take one unbatched (L, E) sequence)."""
    meta = tensor_meta(node)
    return meta is not None and len(meta.shape) == 3


def _given(node: fx.Node, names: tuple[str, ...]) -> dict | None:
    """The call's arguments by name, or None where it has one the module does not take."""
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _attention_why_not(module: nn.MultiheadAttention, node: fx.Node, batched: bool) -> str | None:
    """Why this attention stays the module (None: it is written out)."""
    given = _given(node, _ARGS)
    if given is None:
        return "an argument it does not know"
    if not (given.get("query") is given.get("key") is given.get("value")) or not isinstance(given["query"], fx.Node):
        return "query, key and value are not one tensor (cross-attention)"
    if not (batched or _three_d(given["query"])):
        return "an unbatched or unknown-rank input"
    if any(given.get(name, default) is not default for name, default in _DEFAULTS.items()):
        return "a mask or is_causal"
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return "separate key / value sizes, bias_k / bias_v or add_zero_attn"
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return "its output is read other than as (output, weights)"
        if user.args[1] == 1 and user.users:
            return "the attention weights are read"
    return None


def _why_not(module: nn.Module, node: fx.Node, batched: bool) -> str | None:
    """Why this attention, encoder layer or encoder stays the module (None: it is written out). ``batched``: its
    input is known to be 3-d (the call was written out of a batched layer or encoder, before shapes are known)."""
    if any(m.training for m in module.modules()):
        return "in training mode (dropout)"
    if isinstance(module, nn.MultiheadAttention):
        return _attention_why_not(module, node, batched)
    given = _given(node, _LAYER_ARGS if isinstance(module, nn.TransformerEncoderLayer) else _ENCODER_ARGS)
    if given is None:
        return "an argument it does not know"
    if not isinstance(given.get("src"), fx.Node) or not (batched or _three_d(given["src"])):
        return "an unbatched or unknown-rank input"
    if any(given[name] is not None and given[name] is not False for name in given if name != "src"):
        return "a mask or is_causal"
    if isinstance(module, nn.TransformerEncoderLayer) and _activation(module) is None:
        return "an activation other than relu or exact gelu"
    if isinstance(module, nn.TransformerEncoder) and any(type(m) is not nn.TransformerEncoderLayer
                                                         for m in module.layers):
        return "a layer of another type (torch calls it with its masks)"
    return None


def _attention(gm: fx.GraphModule, node: fx.Node, module: nn.MultiheadAttention) -> fx.Node:
    """The attention's output, written out before ``node``."""
    g, x = gm.graph, _given(node, _ARGS)["query"]
    heads, head_dim = module.num_heads, module.head_dim
    # (N, L, heads, head_dim) -> (N, heads, L, head_dim), from (L, N, ...) where the batch is not first; the linears
    # read x and a contiguous tensor as they are (a transposed 3-d input would sum in another order)
    split, merge = ((0, 2, 1, 3), (0, 2, 1, 3)) if module.batch_first else ((1, 2, 0, 3), (2, 0, 1, 3))
    bias = g.get_attr(f"{node.target}.in_proj_bias") if module.in_proj_bias is not None else None
    qkv = g.call_function(F.linear, (x, g.get_attr(f"{node.target}.in_proj_weight"), bias))
    parts = g.call_method("chunk", (qkv, 3, -1))

    def heads_of(i: int) -> fx.Node:  # q, k or v: (..., E) -> (N, heads, L, head_dim)
        part = g.call_function(operator.getitem, (parts, i))
        return g.call_method("permute", (g.call_method("unflatten", (part, -1, (heads, head_dim))), split))

    q, k, v = heads_of(0), heads_of(1), heads_of(2)
    a = g.call_function(F.scaled_dot_product_attention, (q, k, v))
    a = g.call_method("flatten", (g.call_method("permute", (a, merge)), -2))  # (a copy: contiguous)
    bias = g.get_attr(f"{node.target}.out_proj.bias") if module.out_proj.bias is not None else None
    out = g.call_function(F.linear, (a, g.get_attr(f"{node.target}.out_proj.weight"), bias))
    # the two projections go by their own names in the int8 report and fp32_layers
    qkv.meta["layer"], out.meta["layer"] = f"{node.target}.in_proj", f"{node.target}.out_proj"
    return out


def _layer(gm: fx.GraphModule, node: fx.Node, module: nn.TransformerEncoderLayer) -> fx.Node:
    """The encoder layer's output, its attention a call of its own module (written out in turn)."""
    g, x, t = gm.graph, _given(node, _LAYER_ARGS)["src"], node.target

    def attend(v: fx.Node) -> fx.Node:
        return g.call_function(operator.getitem, (g.call_module(f"{t}.self_attn", (v, v, v), {"need_weights": False}),
                                                  0))

    def feed_forward(v: fx.Node) -> fx.Node:
        hidden = g.call_function(_activation(module), (g.call_module(f"{t}.linear1", (v,)),))
        return g.call_module(f"{t}.linear2", (hidden,))

    def norm(i: int, v: fx.Node) -> fx.Node:
        return g.call_module(f"{t}.norm{i}", (v,))

    add = operator.add
    if module.norm_first:
        x = g.call_function(add, (x, attend(norm(1, x))))
        return g.call_function(add, (x, feed_forward(norm(2, x))))
    x = norm(1, g.call_function(add, (x, attend(x))))
    return norm(2, g.call_function(add, (x, feed_forward(x))))


def _encoder(gm: fx.GraphModule, node: fx.Node, module: nn.TransformerEncoder) -> fx.Node:
    """The encoder's output: a call of each of its layers (written out in turn), then its norm."""
    x = _given(node, _ENCODER_ARGS)["src"]
    for i in range(len(module.layers)):
        x = gm.graph.call_module(f"{node.target}.layers.{i}", (x,))
    return gm.graph.call_module(f"{node.target}.norm", (x,)) if module.norm is not None else x


_WRITERS = {nn.MultiheadAttention: _attention, nn.TransformerEncoderLayer: _layer, nn.TransformerEncoder: _encoder}


@register("fp32")
def decompose_attention(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    g = gm.graph
    work = [n for n in g.nodes if n.op == "call_module" and type(gm.get_submodule(n.target)) in _WRITERS]
    batched: set[fx.Node] = set()  # calls written out of a batched one (the same (N, L, E) shape throughout)
    while work:
        node = work.pop(0)
        module = gm.get_submodule(node.target)
        why = _why_not(module, node, node in batched)
        if why is not None:
            ctx.miss(why, node)
            continue
        old = set(g.nodes)
        with g.inserting_before(node):
            out = _WRITERS[type(module)](gm, node, module)
        new = [n for n in g.nodes if n not in old]
        for n in new:  # (errors name the module and the user's line)
            n.meta.update({k: node.meta[k] for k in ("module", "stack_trace") if k in node.meta})
        if isinstance(module, nn.MultiheadAttention):
            for user in list(node.users):  # (getitem 0 reads the output; getitem 1, the weights, nobody reads)
                if user.args[1] == 0:
                    user.replace_all_uses_with(out)
                g.erase_node(user)
        else:
            node.replace_all_uses_with(out)
        g.erase_node(node)
        inner = [n for n in new if n.op == "call_module" and type(gm.get_submodule(n.target)) in _WRITERS]
        work += inner
        batched.update(inner)
        rewrites += 1
    return rewrites
