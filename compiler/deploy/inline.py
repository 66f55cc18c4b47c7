"""Inline leaf modules into the functional calls they make, so a graph is only calls and tensors.

Saving (a saved graph names no module) and ONNX export both need this. BatchNorm, transposed
convolutions and (for export only) nn.MultiheadAttention have explicit functional forms; any other
module is traced into its own graph and spliced in.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.compiler.core.capture import ThreadSafeTracer
from graphopt.compiler.core.errors import GraphoptError, node_source


class _InlineTracer(ThreadSafeTracer):
    """Traces through every module (one trace at a time; other threads' module calls run as usual meanwhile)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return False


def _batch_norm(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module) -> fx.Node:
    """An inference BatchNorm as F.batch_norm (its forward checks input.dim(), which does not trace)."""
    def attr(name: str):
        return gm.graph.get_attr(f"{node.target}.{name}") if getattr(module, name) is not None else None

    args = (node.args[0], attr("running_mean"), attr("running_var"), attr("weight"), attr("bias"), False, 0.0,
            module.eps)
    return gm.graph.call_function(torch.nn.functional.batch_norm, args)


_CONV_TRANSPOSE = {torch.nn.ConvTranspose1d: torch.conv_transpose1d, torch.nn.ConvTranspose2d: torch.conv_transpose2d,
                   torch.nn.ConvTranspose3d: torch.conv_transpose3d}


def _conv_transpose(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module) -> fx.Node | None:
    """A transposed convolution without output_size as torch.conv_transposeNd (its forward checks
    the input's rank, which does not trace)."""
    if len(node.args) != 1 or node.kwargs or module.padding_mode != "zeros":
        return None
    weight = gm.graph.get_attr(f"{node.target}.weight")
    bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
    args = (node.args[0], weight, bias, module.stride, module.padding, module.output_padding, module.groups,
            module.dilation)
    return gm.graph.call_function(_CONV_TRANSPOSE[type(module)], args)


def _attention(gm: fx.GraphModule, node: fx.Node, module: torch.nn.MultiheadAttention) -> bool:
    """nn.MultiheadAttention as F.multi_head_attention_forward (its forward branches on the inputs).

    Its numbers are the functional path's, close to but not bitwise those of the module's fused
    fast path: used for ONNX export, where the check is a tolerance, not for saved modules."""
    q, k, v = (node.args + (None, None, None))[:3]
    plain = (module._qkv_same_embed_dim and module.bias_k is None and set(node.kwargs) <= {"need_weights"}
             and all(isinstance(t, fx.Node) for t in (q, k, v)) and not module.training
             and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))
    if not plain:
        return False
    g = gm.graph
    with g.inserting_before(node):
        if module.batch_first:
            q, k, v = (g.call_method("transpose", (t, 1, 0)) for t in (q, k, v))
        attr = lambda name: g.get_attr(f"{node.target}.{name}")  # noqa: E731
        out = g.call_function(torch.nn.functional.multi_head_attention_forward, (
            q, k, v, module.embed_dim, module.num_heads, attr("in_proj_weight"), attr("in_proj_bias"), None, None,
            module.add_zero_attn, module.dropout, attr("out_proj.weight"), attr("out_proj.bias")),
            {"training": False, "need_weights": node.kwargs.get("need_weights", True)})
        result = g.call_function(operator.getitem, (out, 0))
        if module.batch_first:
            result = g.call_method("transpose", (result, 1, 0))
        weights = g.call_function(operator.getitem, (out, 1))
    for user in list(node.users):
        user.replace_all_uses_with(result if user.args[1] == 0 else weights)
        g.erase_node(user)
    g.erase_node(node)
    return True


def _untraceable_hint(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.MultiheadAttention):
        return ("nn.MultiheadAttention runs torch's fused fast path, which no functional call gives bit for bit, "
                "and a saved module reloads bit for bit: graphopt.export_onnx exports it (checked within a "
                "tolerance); to save it with graphopt, write the attention as functional calls "
                "(F.scaled_dot_product_attention), or keep the optimized module in the process that built it")
    if isinstance(module, (torch.nn.TransformerEncoder, torch.nn.TransformerEncoderLayer)):
        return ("graphopt writes an encoder or an encoder layer out as functional calls (decompose_attention) "
                "when it is in eval mode and called on a batch (3-d) without a mask, key_padding_mask or is_causal, "
                "and its layers are nn.TransformerEncoderLayer with relu or exact gelu; otherwise it stays torch's "
                "module, whose fast path does not trace: call it that way, or keep the optimized module in the "
                "process that built it (opt.report's decompose_attention row says why it stayed)")
    return ("make this module's forward traceable by torch.fx (no Python branching on inputs or their sizes), "
            "or run the optimized module in the process that built it")


def inline_modules(gm: fx.GraphModule, attention: bool = False) -> fx.GraphModule:
    """Replace each call_module by the functional graph of that module's forward
    (``attention=True``: nn.MultiheadAttention too, through its functional path)."""
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:
        module = gm.get_submodule(node.target)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not module.training \
                and module.running_mean is not None:
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(_batch_norm(gm, node, module))
            gm.graph.erase_node(node)
            continue
        if attention and isinstance(module, torch.nn.MultiheadAttention) and _attention(gm, node, module):
            continue
        if type(module) in _CONV_TRANSPOSE:
            with gm.graph.inserting_before(node):
                functional = _conv_transpose(gm, node, module)
            if functional is not None:
                node.replace_all_uses_with(functional)
                gm.graph.erase_node(node)
                continue
        try:
            sub = _InlineTracer().trace(module)
        except Exception as e:
            raise GraphoptError(f"cannot save module {node.target} ({type(module).__name__}): it does not trace to "
                                f"functional calls, and a saved graph holds no modules: {e}", node=node.format_node(),
                                module=node.target, source=node_source(node), hint=_untraceable_hint(module)) from e
        placeholders = [n for n in sub.nodes if n.op == "placeholder"]
        env = dict(zip(placeholders, node.args))
        for p in placeholders[len(node.args):]:
            env[p] = node.kwargs.get(p.target, p.args[0] if p.args else None)
        with gm.graph.inserting_before(node):
            for inner in sub.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    node.replace_all_uses_with(fx.node.map_arg(inner.args[0], lambda n: env[n]))
                    break
                target = f"{node.target}.{inner.target}" if inner.op in ("get_attr", "call_module") else inner.target
                env[inner] = gm.graph.create_node(inner.op, target, fx.node.map_arg(inner.args, lambda n: env[n]),
                                                  fx.node.map_arg(inner.kwargs, lambda n: env[n]))
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
