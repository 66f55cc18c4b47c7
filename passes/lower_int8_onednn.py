"""Lower the int8 ops to oneDNN's int8 primitives (VNNI / AMX integer arithmetic), weights prepacked now.

    graphopt::quantize(x, s, z)          ->  cpu.quantize_u8(x, s, z + 128)
    graphopt::dequantize(q, s, z)        ->  cpu.dequantize_u8(q, s, z + 128)
    graphopt::qconv2d_act(xq, ..., r)    ->  onednn::qconv2d_pointwise(xq, ..., W, ...)          (act as post-op)
                                             onednn::qconv2d_pointwise.binary(xq, ..., accum, ...)  (with a residual:
                                             oneDNN's sum post-op; an int8 residual is summed as int8)
    graphopt::qlinear_act(xq, ...)       ->  onednn::qlinear_pointwise(xq, ..., W, ...)
    max_pool2d on an int8 tensor         ->  cpu.max_pool2d_u8

Every int8 tensor of the graph becomes uint8 shifted by 128 (kernels/cpu.py); requantization
happens inside the primitive. An activation oneDNN has no int8 post-op for runs after the
primitive in fp32 (then ``quantize_u8`` if the op writes int8). oneDNN writes the sum into the
summed tensor, which it takes channels-last only: it gets a channels-last copy unless this op is
its last reader and it is not the convolution's own input (then ``.contiguous`` costs nothing).

Weights this CPU's oneDNN would not multiply exactly (8-bit codes where int8 saturates: no VNNI /
AMX, kernels/cpu.py) run as the fp32 op on the dequantized weights instead, which
lower_to_onednn lowers next: the saved numbers to fp32 rounding, at fp32 speed.

    graphopt::qconv2d_act(xq, ...)       ->  graphopt::conv2d_act(dequantize_u8(xq), wq * sw, ...) [-> quantize_u8]
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels import cpu
from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import ConvAct, LinearAct, QConvAct, QLinearAct, signature_of
from graphopt.passes import PassContext, register
from graphopt.passes.lib.layout import layout_changes_aliasing, restore_default_layout
from graphopt.passes.lib.onednn import QCONV, QCONV_SUM, QLINEAR
from graphopt.passes.lib.query import alias_roots, calls, constant_value, tensor_meta
from graphopt.passes.lib.rewrite import add_constant, copy_meta

_SHIFT = cpu.U8_SHIFT


def _last_reader(node: fx.Node, value: fx.Node) -> bool:
    """Is ``node`` the last op to read ``value``, which nothing else can see (not an input or output)?"""
    if value.op in ("placeholder", "get_attr") or any(u.op == "output" for u in value.users):
        return False
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return all(order[u] <= order[node] for u in value.users)


def _accumulator(gm: fx.GraphModule, node: fx.Node, residual: fx.Node, out_int8: bool):
    """(tensor to sum into, its scale, its zero point) for a residual, or None when the primitive can't."""
    if out_int8:  # oneDNN sums an int8 tensor into an int8 result: take the residual before its dequantize
        if residual.op != "call_function" or residual.target is not cpu.dequantize_u8:
            return None
        value, scale, zp = residual.args
    else:
        value, scale, zp = residual, 1.0, 0
    roots = alias_roots(gm.graph)
    in_place = _last_reader(node, value) and roots[value] is not roots[QConvAct.from_node(node).x]
    with gm.graph.inserting_before(node):
        value = gm.graph.call_method("contiguous" if in_place else "clone", (value,),
                                     {"memory_format": torch.channels_last})
    return value, scale, zp


def _lower_qconv(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    q = QConvAct.from_node(node)
    weight, scales, meta = constant_value(gm, q.weight), constant_value(gm, q.w_scale), tensor_meta(q.x)
    if weight is None or scales is None or meta is None:
        return None
    out_int8 = q.out_scale is not None
    packed = torch.ops.onednn.qconv_prepack(weight, scales, q.x_scale, q.x_zp + _SHIFT, q.stride, q.padding,
                                            q.dilation, q.groups, list(meta.shape))
    postop = cpu.int8_postop(q.act, linear=False)
    acc = _accumulator(gm, node, q.residual, out_int8) if q.residual is not None and postop is not None \
        and postop[0] in ("none", "relu") else None
    fused = postop is not None and (q.residual is None or acc is not None)
    # what the primitive writes: int8 when the act (and residual) fuse; else fp32, finished below
    prim_int8 = out_int8 and fused
    o_scale, o_zp, o_dtype = (q.out_scale, q.out_zp + _SHIFT, None) if prim_int8 else (1.0, 0, torch.float32)
    with gm.graph.inserting_before(node):
        wp = gm.graph.get_attr(add_constant(gm, f"{q.weight.target}_onednn", packed, buffer=False))
        wz = gm.graph.get_attr(add_constant(gm, f"{q.weight.target}_zp",
                                            torch.zeros(weight.shape[0], dtype=torch.int64), buffer=False))
        head = (q.x, q.x_scale, q.x_zp + _SHIFT, wp, q.w_scale, wz)
        geometry = (q.stride, q.padding, q.dilation, q.groups, o_scale, o_zp, o_dtype)
        if fused and acc is not None:
            value, a_scale, a_zp = acc
            new = gm.graph.call_function(QCONV_SUM, (*head, value, q.bias, *geometry, float(a_scale), int(a_zp),
                                                     "sum", 1.0, postop[0], [], ""))
        elif fused:
            new = gm.graph.call_function(QCONV, (*head, q.bias, *geometry, *postop))
        else:
            new = gm.graph.call_function(QCONV, (*head, q.bias, *geometry, "none", [], ""))
            new = _fp32_epilogue(gm, new, q.act, q.residual, q.out_scale, q.out_zp)
    return new


def _fp32_epilogue(gm: fx.GraphModule, y: fx.Node, act: str, residual: fx.Node | None, out_scale: float | None,
                   out_zp: int) -> fx.Node:
    """The residual add and the activation in fp32 after the primitive, then quantize if the op writes int8."""
    if residual is not None:
        y = gm.graph.call_method("add_", (y, residual))
    found = cpu.inplace_act(act)
    if found is not None:
        fn, args, kwargs = found
        y = gm.graph.call_function(fn, (y, *args), kwargs)
    if out_scale is not None:
        y = gm.graph.call_function(cpu.quantize_u8, (y, out_scale, out_zp + _SHIFT))
    return y


def _lower_qlinear(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    q = QLinearAct.from_node(node)
    weight, meta = constant_value(gm, q.weight), tensor_meta(q.x)
    if weight is None or meta is None:
        return None
    postop = cpu.int8_postop(q.act, linear=True)
    prim_int8 = q.out_scale is not None and postop is not None
    o_scale, o_zp, o_dtype = (q.out_scale, q.out_zp + _SHIFT, None) if prim_int8 else (1.0, 0, torch.float32)
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    with gm.graph.inserting_before(node):
        wp = gm.graph.get_attr(add_constant(gm, f"{q.weight.target}_onednn", packed, buffer=False))
        wz = gm.graph.get_attr(add_constant(gm, f"{q.weight.target}_zp",
                                            torch.zeros(weight.shape[0], dtype=torch.int64), buffer=False))
        new = gm.graph.call_function(QLINEAR, (q.x, q.x_scale, q.x_zp + _SHIFT, wp, q.w_scale, wz, q.bias, o_scale,
                                               o_zp, o_dtype, *(postop or ("none", [], ""))))
        if postop is None:
            new = _fp32_epilogue(gm, new, q.act, None, q.out_scale, q.out_zp)
    return new


def _lower_fp32(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The int8 op as its fp32 op on the dequantized input and weights, for weights int8 is not exact for here."""
    q = signature_of(node)
    weight, scales = constant_value(gm, q.weight), constant_value(gm, q.w_scale)
    if weight is None or scales is None:
        return None
    w32 = weight.float() * scales.float().view(-1, *[1] * (weight.dim() - 1))
    with gm.graph.inserting_before(node):
        wf = gm.graph.get_attr(add_constant(gm, f"{q.weight.target}_fp32", w32))
        xf = gm.graph.call_function(cpu.dequantize_u8, (q.x, q.x_scale, q.x_zp + _SHIFT))
        if isinstance(q, QConvAct):
            fp32 = ConvAct(xf, wf, q.bias, q.stride, q.padding, q.dilation, q.groups, q.act, q.residual)
        else:
            fp32 = LinearAct(xf, wf, q.bias, q.act)
        new = gm.graph.call_function(OPS[fp32.op], fp32.as_args())
        if q.out_scale is not None:
            new = gm.graph.call_function(cpu.quantize_u8, (new, q.out_scale, q.out_zp + _SHIFT))
    return new


def _is_int8(node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and getattr(meta, "dtype", None) == torch.int8


def _max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Rewrite a max pooling of an int8 tensor to the uint8 kernel (aten's has no channels-last uint8); not one
    that returns its indices."""
    if node.op == "call_function" and node.target is F.max_pool2d and _is_int8(node.args[0]):
        if (node.args[6] if len(node.args) > 6 else node.kwargs.get("return_indices", False)) is not False:
            return False
        node.target = cpu.max_pool2d_u8
        return True
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d) \
            and _is_int8(node.args[0]) and not gm.get_submodule(node.target).return_indices:
        m = gm.get_submodule(node.target)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(cpu.max_pool2d_u8, (node.args[0], m.kernel_size, m.stride, m.padding,
                                                             m.dilation, m.ceil_mode))
        copy_meta(new, node, [node])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True
    return False


@register("fp32")
def lower_int8_onednn(gm: fx.GraphModule, ctx: PassContext) -> int:
    if not torch.backends.mkldnn.is_available() or layout_changes_aliasing(gm):
        return 0
    rewrites = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            rewrites += _max_pool(gm, node)
            continue
        if node.target is OPS["quantize"]:
            x, scale, zp = node.args
            node.target, node.args = cpu.quantize_u8, (x, scale, zp + _SHIFT)
        elif node.target is OPS["dequantize"]:
            q, scale, zp = node.args
            node.target, node.args = cpu.dequantize_u8, (q, scale, zp + _SHIFT)
        elif node.target in (OPS["qconv2d_act"], OPS["qlinear_act"]):
            lower = _lower_qconv if node.target is OPS["qconv2d_act"] else _lower_qlinear
            q = signature_of(node)
            w, w_scale = q.weight, q.w_scale
            weight = constant_value(gm, w)
            if weight is not None and not cpu.exact_here(weight):
                ctx.miss("8-bit weights where this CPU's int8 saturates: runs fp32", node)
                lower = _lower_fp32
            new = lower(gm, node)
            if new is None:
                continue
            copy_meta(new, node, [node])
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            for constant in (w, w_scale):
                if isinstance(constant, fx.Node) and not constant.users:
                    gm.graph.erase_node(constant)
        elif not _max_pool(gm, node):
            continue
        rewrites += 1
    for node in calls(gm, cpu.dequantize_u8):
        if not node.users:
            gm.graph.erase_node(node)
    if rewrites:
        restore_default_layout(gm)
    return rewrites
