"""Lower the fused ops to oneDNN's fused primitives, with weights reordered once, now.

    graphopt::conv2d_act(x, w, b, ..., act, r)  ->  mkldnn::_convolution_pointwise[.binary](x, [r,] W, b, ...)
    graphopt::linear_act(x, w, b, act)          ->  mkl::_mkl_linear(x, W, w, b, rows)        (large, Intel CPU)
                                                    mkldnn::_linear_pointwise(x, W, b, ...)  (large, elsewhere)
                                                    aten::linear(x, w, b)                    (small: less overhead)

W is the weight packed once for the traced input shape (any batch size still runs): a plain linear
weight would be reordered on every call (measured, 768x768 at 16 rows: 0.22 ms plain, 0.15 ms packed).
On an Intel CPU, large fp32 linears run on MKL's packed GEMM (as Inductor's freezing does), their
activation after it in place: faster than oneDNN's primitive with the activation as a post-op at 128 to
16384 rows (measured interleaved, (512 | 2048) x 768 -> 3072: MKL's time / oneDNN's 0.95-0.96 with GELU,
0.91-0.95 SiLU, 0.95-0.96 sigmoid, 0.92-0.99 tanh, 0.94-0.95 hardswish, 0.95-0.96 leaky_relu; 16384 x 1024
-> 4096 with GELU 0.95). The exception is GELU's tanh form where oneDNN has AVX-512, whose post-op
there beats torch's (MKL 1.07-1.10x oneDNN's time): those keep oneDNN, as do all large linears where
torch has no MKL. With MKL and oneDNN capped at AVX2 (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), MKL
wins on every activation: 0.82-0.89 with GELU, SiLU and GELU's tanh form (0.87-0.95 with torch's own
kernels capped too, ATEN_CPU_CAPABILITY=avx2). Rows other than the traced count run on the plain weight
through aten::linear. A linear with few rows (a batch-1 classifier head) or a small weight runs through
aten::linear, MKL's unpacked GEMM (1280 -> 1000 at one row: 0.13 ms, oneDNN 0.19). On other vendors'
CPUs (and without MKL) MKL's generic path loses to oneDNN's primitive from about a million multiply-adds
on (linear_kernel; an AMD EPYC, Zen 5: 0.42-0.45x MKL's time at 128 to 512 rows, 0.79-0.85x with oneDNN
capped at AVX2), the activation fused as its post-op where that is exact.

The activation becomes a oneDNN post-op where oneDNN's results equal eager's on NaN and inf
too (kernels/cpu.py); relu, relu6, hardtanh run as an in-place op after the primitive instead.
Only on float32 CPU tensors with constant weights; anything else keeps the custom op, which runs
everywhere. Those convolutions write channels-last outputs, so views and 4-d outputs get a
``.contiguous()`` guard (passes/lib/layout.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.kernels import cpu
from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import ConvAct, LinearAct
from graphopt.passes import PassContext, register
from graphopt.passes.lib.layout import layout_changes_aliasing, restore_default_layout
from graphopt.passes.lib.onednn import CONV, CONV_ADD, LINEAR, MKL_LINEAR
from graphopt.passes.lib.query import calls, constant_value, tensor_meta
from graphopt.passes.lib.rewrite import add_constant, copy_meta

SMALL_LINEAR = 1 << 15  # weights with fewer elements run faster through aten::linear (measured: bench/)
FEW_ROWS = 4  # ... and inputs with this many rows or fewer (all dimensions but the last)
POSTOP_FASTER = frozenset({"gelu:tanh"})  # activations oneDNN's AVX-512 post-op applies faster than torch's in place
# Without MKL's fast GEMM: oneDNN's primitive from this many multiply-adds (rows x weight elements), aten::linear
# below (on an AMD EPYC, Zen 5: oneDNN / aten 0.96-0.99 at 2^20 (16 x 256 -> 256), 1.2-1.3 at 2^19, 0.4-0.5
# from 2^22; oneDNN's fixed cost about 12 us a call).
ONEDNN_MACS = 1 << 20


def linear_kernel(weight: torch.Tensor, rows: int, act: str) -> str:
    """Which kernel a float32 linear of ``weight`` with activation ``act`` on inputs of ``rows`` rows runs on: "mkl"
    (MKL's packed GEMM, the activation after it in place), "onednn" (oneDNN's primitive, the activation fused as
    its post-op where that is exact) or "aten" (aten::linear). Where MKL's GEMM is the fast one (an Intel CPU):
    MKL, but aten for a small weight or few rows, and oneDNN for the activations in POSTOP_FASTER where oneDNN
    has AVX-512. Elsewhere (another vendor's CPU, or no MKL): oneDNN from ONEDNN_MACS multiply-adds, below that
    aten, whose GEMM costs less than the primitive's fixed overhead."""
    if weight.dim() != 2:
        return "aten"
    if not cpu.mkl_gemm_fast():
        return "onednn" if rows * weight.numel() >= ONEDNN_MACS else "aten"
    if weight.numel() < SMALL_LINEAR or rows <= FEW_ROWS:
        return "aten"
    return "onednn" if act in POSTOP_FASTER and cpu.onednn_avx512() else "mkl"


def _lowerable(gm: fx.GraphModule, x: fx.Node, w: fx.Node, b: fx.Node | None) -> torch.Tensor | None:
    """The weight tensor, if this call can run on oneDNN: float32 on the CPU, constant weight and bias."""
    meta, weight = tensor_meta(x), constant_value(gm, w)
    if meta is None or weight is None or meta.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if weight.device.type != "cpu" or (b is not None and constant_value(gm, b) is None):
        return None
    return weight


def _finish(gm: fx.GraphModule, node: fx.Node, new: fx.Node, act: str, in_postop: bool) -> None:
    """Apply the activation after the primitive unless it ran as a post-op, then replace ``node``."""
    out = new
    if not in_postop and cpu.inplace_act(act) is not None:
        fn, args, kwargs = cpu.inplace_act(act)
        with gm.graph.inserting_after(new):
            out = gm.graph.call_function(fn, (new, *args), kwargs)
    copy_meta(new, node, [node])
    copy_meta(out, node, [node])
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def _erase_unused(gm: fx.GraphModule, *values) -> None:
    for v in values:
        if isinstance(v, fx.Node) and not v.users:
            gm.graph.erase_node(v)


@register("fp32")
def lower_to_onednn(gm: fx.GraphModule, ctx: PassContext) -> int:
    if not torch.backends.mkldnn.is_available() or layout_changes_aliasing(gm):
        return 0  # (oneDNN writes channels-last: see passes/lib/layout.py)
    rewrites = 0
    for node in calls(gm, OPS["conv2d_act"]):
        c = ConvAct.from_node(node)
        weight = _lowerable(gm, c.x, c.weight, c.bias)
        if weight is None or (c.residual is not None and tensor_meta(c.residual) is None):
            continue
        packed = cpu.pack_conv_weight(weight, c.padding, c.stride, c.dilation, c.groups, tensor_meta(c.x).shape)
        # oneDNN's binary (residual) form takes no unary post-op but relu, which is NaN-safe only on NaN-free values
        postop = (cpu.onednn_postop(c.act) or (cpu.clamp_postop(c.act) if ctx.nan_free else None)) \
            if c.residual is None else (("relu", [], "") if ctx.nan_free and c.act == "relu" else None)
        geometry = (c.padding, c.stride, c.dilation, c.groups)  # (oneDNN's order: padding first)
        with gm.graph.inserting_before(node):
            wp = gm.graph.get_attr(add_constant(gm, f"{c.weight.target}_onednn", packed, buffer=False))
            if c.residual is None:
                new = gm.graph.call_function(CONV, (c.x, wp, c.bias, *geometry, *(postop or ("none", [], ""))))
            else:
                unary = postop[0] if postop else None
                new = gm.graph.call_function(CONV_ADD, (c.x, c.residual, wp, c.bias, *geometry, "add", None, unary,
                                                        [], None))
        _finish(gm, node, new, c.act, postop is not None)
        _erase_unused(gm, c.weight)
        rewrites += 1
    for node in calls(gm, OPS["linear_act"]):
        lin = LinearAct.from_node(node)
        x, w, b, act = lin.x, lin.weight, lin.bias, lin.act
        weight = _lowerable(gm, x, w, b)
        if weight is None:
            continue
        # (no clamp post-ops here even on NaN-free values: they would move a relu linear off aten's GEMM and
        # change its bits; the fused and the separate-activation graphs give the same bits)
        rows = tensor_meta(x).shape[:-1].numel()
        kernel = linear_kernel(weight, rows, act)
        postop = (cpu.onednn_postop(act) or ("none", [], "")) if kernel == "onednn" else None
        with gm.graph.inserting_before(node):
            if kernel == "mkl":  # (the plain weight stays: other row counts run on it)
                packed = cpu.pack_linear_weight_mkl(weight, rows)
                wp = gm.graph.get_attr(add_constant(gm, f"{w.target}_mkl", packed, buffer=False))
                new = gm.graph.call_function(MKL_LINEAR, (x, wp, w, b, rows))
            elif kernel == "onednn":
                packed = cpu.pack_linear_weight(weight, rows)
                wp = gm.graph.get_attr(add_constant(gm, f"{w.target}_onednn", packed, buffer=False))
                new = gm.graph.call_function(LINEAR, (x, wp, b, *postop))
            else:
                new = gm.graph.call_function(F.linear, (x, w, b))
        _finish(gm, node, new, act, kernel == "onednn" and postop[0] != "none")
        if kernel == "onednn":
            _erase_unused(gm, w)
        rewrites += 1
    if rewrites:
        restore_default_layout(gm)  # the convolutions now write channels-last outputs
    return rewrites
