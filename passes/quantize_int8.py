"""Quantize the fused convolutions and linears to int8, with the ranges calibration measured.

    conv2d_act(x, w, b, ..., act, r)  ->  qconv2d_act(xq, sx, zx, wq, sw, b, ..., act, r, out_scale, out_zp)
    linear_act(x, w, b, act)          ->  qlinear_act(xq, sx, zx, wq, sw, b, act, out_scale, out_zp)

Weights: int8 per output channel, symmetric; activations: int8 per tensor with a zero point
(passes/observers.py). The op's output is int8 (requantized inside the op, with the range of
its fp32 value) when every reader takes int8: the next quantized op, or an op that passes
int8 through unchanged (max pooling, flatten, view, reshape) whose readers do too. Otherwise the
op writes fp32. An fp32 value read by a quantized op is quantized once (``graphopt::quantize``);
an int8 residual is read through ``graphopt::dequantize``, which the CPU lowering fuses into the
convolution's sum post-op.

Reads ``ctx.int8_ranges`` {node name: (lo, hi)} from calibration (nothing to do without it),
``ctx.int8_skip``, the node names that stay fp32 (the accuracy budget's fallbacks), and
``ctx.int8_scheme``, the weights' range (kernels/reference.py): "s8", or "s7" where the CPU's int8
arithmetic saturates beyond it, which the driver picks for the machine (compiler/int8/scheme.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.ops import OPS
from graphopt.kernels.reference import SCHEMES, activation_qparams, weight_qparams
from graphopt.kernels.signatures import ConvAct, QConvAct, QLinearAct, signature_of
from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import constant_value, tensor_meta
from graphopt.passes.lib.rewrite import add_constant, copy_meta

_FLOAT_OPS = {OPS["conv2d_act"]: OPS["qconv2d_act"], OPS["linear_act"]: OPS["qlinear_act"]}
_PASS_FUNCTIONS = (F.max_pool2d, torch.flatten, torch.reshape)
_PASS_METHODS = ("flatten", "view", "reshape", "contiguous")
_PASS_MODULES = (nn.MaxPool2d, nn.Flatten)


def candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """The ops this pass can quantize: fused conv / linear on float32 with constant weights, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _FLOAT_OPS:
            continue
        sig = signature_of(node)
        weight, meta = constant_value(gm, sig.weight), tensor_meta(sig.x)
        if weight is None or weight.dtype != torch.float32 or meta is None or meta.dtype != torch.float32:
            continue
        if sig.bias is not None and constant_value(gm, sig.bias) is None:
            continue
        found.append(node)
    return found


def passes_int8_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that reads one int8 tensor (its first argument) and gives int8 with the same scale."""
    if node.op == "call_function" and node.target in _PASS_FUNCTIONS:
        return not node.kwargs.get("return_indices", False) and not node.kwargs.get("ceil_mode", False)
    if node.op == "call_method":
        return node.target in _PASS_METHODS
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _PASS_MODULES) and not getattr(module, "return_indices", False) \
            and not getattr(module, "ceil_mode", False)
    return False


def _plan(gm: fx.GraphModule, targets: set[fx.Node]) -> set[fx.Node]:
    """The nodes whose value can be int8: every reader takes int8."""
    memo: dict[fx.Node, bool] = {}

    def reads_int8(user: fx.Node, value: fx.Node) -> bool:
        if user in targets:
            sig = signature_of(user)
            return sig.x is value or (isinstance(sig, ConvAct) and sig.residual is value)
        if passes_int8_through(gm, user) and user.args[0] is value and value not in user.args[1:]:
            return emits(user)
        return False

    def emits(node: fx.Node) -> bool:
        if node not in memo:
            memo[node] = False  # (no cycles in a DAG; guards the recursion anyway)
            memo[node] = bool(node.users) and all(reads_int8(u, node) for u in node.users)
        return memo[node]

    plan = set()
    for node in gm.graph.nodes:
        if node in targets and emits(node):
            plan.add(node)
        elif passes_int8_through(gm, node) and isinstance(node.args[0], fx.Node) and node.args[0] in plan \
                and emits(node):
            plan.add(node)
    return plan


@register("int8")
def quantize_int8(gm: fx.GraphModule, ctx: PassContext) -> int:
    ranges: dict[str, tuple[float, float]] = ctx.int8_ranges or {}
    skip = set(ctx.int8_skip)
    bits = SCHEMES[ctx.int8_scheme]
    targets = {n for n in candidates(gm)
               if n.name not in skip and signature_of(n).x.name in ranges and n.name in ranges}
    if not targets:
        return 0
    plan = _plan(gm, targets)
    qparams: dict[fx.Node, tuple[float, int]] = {}  # the int8 values so far, with their scale and zero point
    quantized: dict[fx.Node, fx.Node] = {}  # fp32 value -> its graphopt::quantize
    dequantized: dict[fx.Node, fx.Node] = {}  # int8 value -> its graphopt::dequantize
    calibrated: dict[fx.Node, str] = {}  # a quantized op writing fp32 -> the name its range was measured under
    rewrites = 0

    def as_int8(x: fx.Node, before: fx.Node) -> tuple[fx.Node, float, int]:
        if x in qparams:
            return (x, *qparams[x])
        scale, zp = activation_qparams(*ranges[calibrated.get(x, x.name)])
        if x not in quantized:
            with gm.graph.inserting_before(before):
                quantized[x] = gm.graph.call_function(OPS["quantize"], (x, scale, zp))
        return quantized[x], scale, zp

    def as_fp32(v: fx.Node | None, before: fx.Node) -> fx.Node | None:
        if v is None or v not in qparams:
            return v
        if v not in dequantized:
            with gm.graph.inserting_before(before):
                dequantized[v] = gm.graph.call_function(OPS["dequantize"], (v, *qparams[v]))
        return dequantized[v]

    for node in list(gm.graph.nodes):
        if node in targets:
            sig = signature_of(node)
            w = sig.weight
            xq, x_scale, x_zp = as_int8(sig.x, node)
            wq, w_scale = weight_qparams(constant_value(gm, w), bits)
            out_scale, out_zp = activation_qparams(*ranges[node.name]) if node in plan else (None, 0)
            with gm.graph.inserting_before(node):
                wq_node = gm.graph.get_attr(add_constant(gm, f"{w.target}_int8", wq))
                ws_node = gm.graph.get_attr(add_constant(gm, f"{w.target}_scale", w_scale))
            common = dict(x=xq, x_scale=x_scale, x_zp=x_zp, weight=wq_node, w_scale=ws_node, bias=sig.bias,
                          act=sig.act, out_scale=out_scale, out_zp=out_zp)
            if isinstance(sig, ConvAct):
                q = QConvAct(**common, stride=sig.stride, padding=sig.padding, dilation=sig.dilation,
                             groups=sig.groups, residual=as_fp32(sig.residual, node))
            else:
                q = QLinearAct(**common)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(_FLOAT_OPS[node.target], q.as_args())
            copy_meta(new, node, [node])
            new.meta.pop("tensor_meta", None)  # (its dtype may change: propagation sets it again)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            if not w.users:
                gm.graph.erase_node(w)
            if out_scale is not None:
                qparams[new] = (out_scale, out_zp)
            else:
                calibrated[new] = node.name
            rewrites += 1
        elif node in plan:
            qparams[node] = qparams[node.args[0]]
    return rewrites
