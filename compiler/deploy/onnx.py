"""ONNX export: the fp32 graph to ONNX, simplified with onnx-simplifier, checked by onnx.checker and
run in ONNX Runtime against PyTorch before the file is kept.

graphopt's fused ops export as the standard ops they stand for (Conv + Add + Relu, Gemm + ...):
the portable graph is lowered to kernels/reference.py first, which is plain aten.

An int8 graph exports in ONNX's QDQ form, which ONNX Runtime runs as int8 kernels: every int8
value becomes QuantizeLinear -> DequantizeLinear with its scale and zero point, every int8
weight an int8 initializer (per-channel scales) read through DequantizeLinear, and the float
op between them the fused op's reference. It is checked against the same QDQ graph in PyTorch by
SQNR (ONNX Runtime's integer kernels may round a requantization the other way).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.errors import GraphoptError


def _portable_reference(model: nn.Module, magnitudes_of: Sequence[str] = (), for_engine: bool = False,
                        by_sum: Collection[str] = ()) -> nn.Module:
    """The graph to export: plain aten, leaf modules inlined (attention through its functional path,
    which the exporter can write; its fused fast path it cannot). Always a copy: the export runs it in
    eval mode, and the user's model keeps its mode, parameters and buffers untouched.
    ``magnitudes_of``: names of values of an OptimizedModule's portable graph whose max |v| is appended to
    its outputs, as a tuple of scalars (the range checks of compiler/core/engines.py; sum |v| for those in
    ``by_sum``). ``for_engine``: see _fake_quantized."""
    from graphopt.compiler.core.module import OptimizedModule, finalize
    from graphopt.compiler.core.pipeline import clone, is_quantized
    from graphopt.compiler.deploy.inline import inline_modules
    from graphopt.passes.lower_to_reference import lower_to_reference

    if not isinstance(model, OptimizedModule):
        return copy.deepcopy(model)
    gm = clone(model.portable)
    if magnitudes_of:
        _append_magnitudes(gm, magnitudes_of, by_sum)
    if is_quantized(gm):
        _fake_quantized(gm, for_engine, getattr(model, "int8_sums", None))
    lower_to_reference(gm, None)
    try:
        inline_modules(gm, attention=True)
    except GraphoptError:
        gm = clone(model.portable)  # a module that does not inline: export it as it is
        lower_to_reference(gm, None)
    return finalize(gm)


def _append_magnitudes(gm, names: Sequence[str], by_sum: Collection[str] = ()) -> None:
    """The output becomes (output, (max |v| + 0 * sum(v) for each named value)), in place: NaN where v holds a NaN
    or an inf (ONNX Runtime's ReduceMax skips NaN; a sum carries it, and an inf becomes 0 * inf = NaN).
    max |v| as max(max v, -min v): three reads of v and no tensor written (abs then max wrote one, and cost
    EfficientNet-B0's four checks in ONNX Runtime 1.05 ms a call; this form 0.37 ms, measured interleaved).
    A value in ``by_sum`` gets sum |v| instead: at least max |v|, NaN with a NaN, inf with an inf (or past
    float32), in one read and one node (ReduceL1)."""
    values = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    graph = gm.graph

    def magnitude(v):
        largest = graph.call_function(torch.maximum, (graph.call_function(torch.amax, (v,)), graph.call_function(
            torch.neg, (graph.call_function(torch.amin, (v,)),))))
        return graph.call_function(torch.add, (largest, graph.call_function(torch.mul, (
            graph.call_function(torch.sum, (v,)), 0.0))))
    with graph.inserting_before(output):
        maxima = tuple(graph.call_function(torch.linalg.vector_norm, (values[name], 1)) if name in by_sum
                       else magnitude(values[name]) for name in names)
    output.args = ((output.args[0], maxima),)
    gm.recompile()


def _fake_quantized(gm, for_engine: bool = False, sums: dict | None = None) -> None:
    """int8 ops -> fake quantization around the float ops (what ONNX's QDQ form says), in place.

    ONNX Runtime runs DequantizeLinear -> Conv / Gemm -> QuantizeLinear as one int8 kernel. An int8 op with no
    such form (a residual added inside it, a float output, an activation not ``fused_in_int8_conv``) runs as the
    float op, and its weights'
    DequantizeLinear runs on every call: ``for_engine`` (a session graphopt runs, not a file for the user) gives
    those ops their dequantized weights as float constants instead (the same numbers, none of that cost), except
    a conv whose own sum ``sums`` quantizes ({name: (scale, zero point)}, compiler/int8/plans.py conv_sums):
    int8 conv, QuantizeLinear, then the residual and the activation (QLinearConv, QLinearAdd; a sigmoid or SiLU
    with no residual on int8 codes, ``_act_on_codes``, the rest in float); after a
    relu or a clamp from 0 with no residual, its output instead (``quantized_after_act``: one QLinearConv), and a float-
    output linear with no activation on 2-d inputs (a classifier), which keeps its int8 weights (QGemm, with the
    int32 bias int8_weights gives it). A quantization after a flatten / reshape is also made before it (the same
    values): a pooling between DequantizeLinear and QuantizeLinear then runs in int8 (QLinearGlobalAveragePool).
    The user's file gets the same ``sums`` (a module that runs in a library has them) and int8 weights throughout.
    """
    from graphopt.kernels.ops import OPS
    from graphopt.kernels.signatures import ConvAct, LinearAct, QConvAct, signature_of
    from graphopt.passes.lib.query import constant_value
    from graphopt.passes.lib.rewrite import add_constant

    sums = sums or {}
    gemms = {n for n in gm.graph.nodes if _gemm_with_float_output(signature_of(n))}  # (before the rewrites below)

    def fq(x, scale, zp):  # as uint8 (zero point + 128: the same grid), ONNX Runtime's fast form on x86
        return gm.graph.call_function(torch.fake_quantize_per_tensor_affine, (x, float(scale), int(zp) + 128, 0, 255))

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is OPS["quantize"]:
            source = node.args[0]
            if _reshapes(source) and len(source.users) == 1:  # quantized before the reshape too (the same values):
                with gm.graph.inserting_before(source):  # ONNX Runtime fuses DequantizeLinear -> pooling ->
                    source.replace_input_with(source.args[0], fq(source.args[0], *node.args[1:]))  # QuantizeLinear
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(fq(*node.args))
        elif node.target is OPS["dequantize"]:  # (a no-op on its grid: every reader sees DequantizeLinear)
            with gm.graph.inserting_before(node):
                node.replace_all_uses_with(fq(*node.args))
        elif node.target in (OPS["qconv2d_act"], OPS["qlinear_act"]):
            q = signature_of(node)
            w = q.weight
            wq, scale = constant_value(gm, w), constant_value(gm, q.w_scale)
            shape = (-1,) + (1,) * (wq.dim() - 1)
            residual = getattr(q, "residual", None)
            split = isinstance(q, QConvAct) and node.name in sums  # (in the user's file too: what the library ran)
            float_weights = for_engine and not split and node not in gemms and no_int8_form(q)
            with gm.graph.inserting_before(node):
                wfq = gm.graph.get_attr(add_constant(gm, f"{w.target}_dq", wq.float() * scale.view(shape)))
                if not float_weights:
                    sc = gm.graph.get_attr(add_constant(gm, f"{w.target}_dq_scale", scale.float()))
                    zp = gm.graph.get_attr(add_constant(gm, f"{w.target}_dq_zp", torch.zeros(len(scale),
                                                                                             dtype=torch.int32)))
                    wfq = gm.graph.call_function(torch.fake_quantize_per_channel_affine,
                                                 (wfq, sc, zp, 0, -128, 127))
                # the input again (a no-op on its grid): ONNX Runtime fuses DequantizeLinear -> op -> QuantizeLinear
                # into an int8 kernel only where the DequantizeLinear feeds the op directly (not across a Flatten)
                x = fq(q.x, q.x_scale, q.x_zp)
                if split:  # int8 conv, its sum quantized (QLinearConv), then the residual (QLinearAdd) and activation
                    after = quantized_after_act(q)  # (or its output, after a relu or a clamp from 0)
                    conv = ConvAct(x, wfq, q.bias, q.stride, q.padding, q.dilation, q.groups,
                                   q.act if after else "none", None)
                    y = fq(gm.graph.call_function(OPS[conv.op], conv.as_args()), *sums[node.name])
                    if residual is not None:
                        y = gm.graph.call_function(torch.add, (y, residual))
                    if not after:
                        y = _act_on_codes(gm.graph, y, q, sums[node.name], fq)
                elif isinstance(q, QConvAct):
                    fp32 = ConvAct(x, wfq, q.bias, q.stride, q.padding, q.dilation, q.groups, q.act, residual)
                    y = gm.graph.call_function(OPS[fp32.op], fp32.as_args())
                else:
                    fp32 = LinearAct(x, wfq, q.bias, q.act)
                    y = gm.graph.call_function(OPS[fp32.op], fp32.as_args())
                if q.out_scale is not None:
                    y = fq(y, q.out_scale, q.out_zp)
            node.replace_all_uses_with(y)
        else:
            continue
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _known(proto) -> Callable[[str], Any]:
    """name -> the numpy value of a tensor known before run time (an initializer, a Constant, or an Identity /
    Cast of one), or None."""
    import onnx
    from onnx import numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}

    def value(name):
        if name in init:
            return numpy_helper.to_array(init[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":
            return value(node.input[0])
        if node is not None and node.op_type == "Cast":
            source = value(node.input[0])
            return None if source is None else source.astype(
                onnx.helper.tensor_dtype_to_np_dtype(next(a.i for a in node.attribute if a.name == "to")))
        return None
    return value


# a sigmoid a library's graph quantizes (``_act_on_codes``): uint8 codes 0..255 over [0, 1], at most 1/510 from
# the float sigmoid (so a SiLU's product at most |x| / 510 from the float one)
GATE_SCALE = 1.0 / 255


def fused_in_int8_conv(act: str) -> bool:
    """Does ONNX Runtime run ``act`` inside an int8 conv (QLinearConv) when the conv's output is quantized after
    it? Yes for none, a relu and a clamp from 0 (relu6, hardtanh:0:x): it drops a Relu / Clip whose range the
    QuantizeLinear after it makes redundant (a calibrated range after them starts at 0)."""
    from graphopt.kernels.reference import parse_act

    name, params = parse_act(act)
    return name in ("none", "relu", "relu6") or (name == "hardtanh" and float(params[0]) == 0.0)


def no_int8_form(q) -> bool:
    """Can ONNX Runtime not run this int8 conv / linear as one int8 kernel as it stands (DequantizeLinear -> op ->
    QuantizeLinear)? A residual added inside it, a float output, or an activation not ``fused_in_int8_conv``: a
    library's graph then quantizes a conv's own sum (compiler/int8/plans.py ``summed``) or runs the op in float."""
    return getattr(q, "residual", None) is not None or q.out_scale is None or not fused_in_int8_conv(q.act)


def _act_on_codes(graph, y, q, grid: tuple[float, int], fq: Callable):
    """The activation of a summed conv ``q`` (compiler/int8/plans.py ``summed``) on its quantized sum ``y`` (on
    ``grid``: scale, zero point) in a library's graph, with no residual: a sigmoid and a SiLU run on int8 codes
    (ONNX Runtime's QLinearSigmoid and QLinearMul, as its own int8 recipe does, not a DequantizeLinear of the sum
    to each of a float Sigmoid and Mul, a QuantizeLinear after them, and the layout transposes around those).

    The sigmoid is quantized at GATE_SCALE. A SiLU's product is quantized on the conv's output grid, or, for a float
    output, on ``silu_grid``. A squeeze-excite block then runs in int8 end to end: the pooling
    (QLinearGlobalAveragePool), its two convs, its gate (QLinearSigmoid) and the multiply (QLinearMul).
    Each is one more rounding, checked against graphopt's graph like the rest (compiler/core/engines.py). Any
    other activation runs in float."""
    if q.residual is None and q.act == "sigmoid":
        gate = graph.call_function(torch.sigmoid, (y,))
        return gate if q.out_scale is not None else fq(gate, GATE_SCALE, -128)  # (an int8 output: QLinearSigmoid)
    if q.residual is None and q.act == "silu":
        y = graph.call_function(torch.mul, (y, fq(graph.call_function(torch.sigmoid, (y,)), GATE_SCALE, -128)))
        return y if q.out_scale is not None else fq(y, *silu_grid(grid))
    from graphopt.kernels.reference import apply_act

    return graph.call_function(apply_act, (y, q.act))


def silu_grid(grid: tuple[float, int]) -> tuple[float, int]:
    """The grid (scale, zero point) of a SiLU's float output in a library's graph (``_act_on_codes``), from that of
    the sum it reads (``grid``): from the least x * gate over the sum's 256 values (the sigmoid on its GATE_SCALE
    grid as the graph computes it, or one step above, for a library that rounds it the other way) to the sum's
    top (x * gate <= x). Made from numbers the saved plan already holds. (SiLU's global minimum, -0.281 with the
    gate on its grid, made the grid far coarser than the values where the sum's range is narrow, as in a deep
    layer of random weights: a sum within +-0.0019 got a grid of 0.0011, 75 times its own.)"""
    from graphopt.kernels.reference import activation_qparams

    scale, zp = grid
    x = scale * (torch.arange(-128, 128, dtype=torch.float64) - zp)  # every value of the sum's grid
    gate = torch.round(torch.sigmoid(x) / GATE_SCALE) * GATE_SCALE
    lowest = float(torch.minimum(x * gate, x * (gate + GATE_SCALE).clamp(max=1.0)).min())
    return activation_qparams(lowest, float(x[-1]))


def quantized_after_act(q) -> bool:
    """Does a library's graph quantize this summed conv (compiler/int8/plans.py ``summed``) after its activation
    rather than before? Yes for a float output with no residual and an activation ``fused_in_int8_conv`` other
    than none (a relu, a clamp from 0): ONNX Runtime drops a Relu / Clip between a Conv and a QuantizeLinear
    whose range it makes redundant, so the conv, its activation and the quantization run as one QLinearConv, and
    what reads it (a pooling) gets an int8 input (QLinearGlobalAveragePool).
    (``conv_sums`` observes the range of what is quantized here.)"""
    return q.residual is None and q.out_scale is None and q.act != "none" and fused_in_int8_conv(q.act)


def _reshapes(node) -> bool:
    """Is ``node`` a flatten / reshape / view (values unchanged, only the shape)?"""
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))
        or (node.op == "call_method" and node.target in ("flatten", "reshape", "view")))


def _gemm_with_float_output(q) -> bool:
    """An int8 linear on 2-d inputs whose output stays float, with no activation (a classifier): it exports as a
    Gemm, which ONNX Runtime runs as one int8 kernel with a float output once its bias is int32 too
    (_int32_biases); so its weights stay int8. (With a Relu after it and no QuantizeLinear, ONNX Runtime fuses
    nothing: its weights stay float.)"""
    from graphopt.kernels.signatures import QLinearAct
    from graphopt.passes.lib.query import tensor_meta

    if not isinstance(q, QLinearAct) or q.out_scale is not None or q.act != "none":
        return False
    meta = tensor_meta(q.x)
    return meta is not None and len(getattr(meta, "shape", ())) == 2


def _int8_initializers(proto) -> int:
    """QuantizeLinear of a constant weight -> the int8 initializer it computes (what QDQ models carry)."""
    import numpy as np
    from onnx import numpy_helper

    value = _known(proto)
    done = 0
    for node in [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]:
        w, scale, zp = (value(i) for i in node.input[:3])
        if w is None or scale is None or zp is None or scale.ndim != 1:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape), -128, 127).astype(np.int8)
        proto.graph.initializer.append(numpy_helper.from_array(q, node.output[0] + "_int8"))
        for other in proto.graph.node:
            for i, name in enumerate(other.input):
                if name == node.output[0]:
                    other.input[i] = node.output[0] + "_int8"
        proto.graph.node.remove(node)
        done += 1
    return done


def _int32_biases(proto) -> int:
    """Gemm(DequantizeLinear(x), DequantizeLinear(w), float bias) -> the bias as DequantizeLinear of an int32
    initializer on scale x_scale * w_scale, zero point 0 (the QDQ form of a bias). ONNX Runtime runs a Gemm with
    every input dequantized as one int8 kernel even where no QuantizeLinear follows (QGemm with a float output);
    with a float bias it dequantizes the weights on every call and runs a float Gemm (a classifier 1280 -> 1000:
    0.38 ms against 0.17). The bias moves by at most half a step of x_scale * w_scale, well under the int8
    product's own rounding (checked against graphopt's int8 graph like the rest: compiler/core/engines.py)."""
    import numpy as np
    from onnx import helper, numpy_helper

    value = _known(proto)
    init = {t.name for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    done = 0
    for gemm in [n for n in proto.graph.node if n.op_type == "Gemm" and len(n.input) == 3 and n.input[2] in init]:
        x, w = producers.get(gemm.input[0]), producers.get(gemm.input[1])
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        if (x is None or w is None or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear"
                or attrs.get("transA", 0) != 0 or attrs.get("transB", 0) != 1
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        bias, x_scale, w_scale = value(gemm.input[2]), value(x.input[1]), value(w.input[1])
        if bias is None or x_scale is None or w_scale is None or bias.ndim != 1 or x_scale.size != 1 \
                or w_scale.size not in (1, bias.size):
            continue
        scale = np.broadcast_to(np.float32(x_scale.reshape(())) * w_scale.astype(np.float32).reshape(-1), bias.shape)
        steps = np.rint(bias.astype(np.float64) / scale)
        if not (np.all(scale > 0) and np.all(np.abs(steps) < 2 ** 31 - 1)):
            continue
        name = gemm.input[2] + "_int32"
        proto.graph.initializer.extend([numpy_helper.from_array(steps.astype(np.int32), name),
                                        numpy_helper.from_array(np.ascontiguousarray(scale), name + "_scale"),
                                        numpy_helper.from_array(np.zeros(bias.size, np.int32), name + "_zp")])
        dq = helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zp"], [name + "_dq"], axis=0)
        proto.graph.node.insert(list(proto.graph.node).index(gemm), dq)
        gemm.input[2] = name + "_dq"
        done += 1
    return done


def int8_weights(model: bytes) -> bytes:
    """An exported int8 model (for a library's session, or the user's file) with its weights stored as int8
    (_int8_initializers) and the biases of its int8 Gemms as int32 (_int32_biases), serialized again."""
    import onnx

    proto = onnx.load_from_string(model)
    _int8_initializers(proto)
    _int32_biases(proto)
    read = {name for node in proto.graph.node for name in node.input}
    for unread in [t for t in proto.graph.initializer if t.name not in read]:  # (the float weights quantized)
        proto.graph.initializer.remove(unread)
    return proto.SerializeToString()


INT8_EXPORT_FLOOR_DB = 30.0


class _Exportable(nn.Module):
    """A plain module around the graph (the TorchScript exporter mistakes an fx graph for its own)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def write_onnx(module: nn.Module, inputs: tuple, f: Any, *, dynamic_batch: bool, opset: int = 17) -> list[str]:
    """The TorchScript exporter on a plain-aten module (it handles a dynamic batch simply); ``f`` is a path or a
    file object. Inputs are named input_<i>, outputs output_<i> in their flattened order; returns the input names.
    ``dynamic_batch``: dimension 0 of every input, and of every output that has one, is the batch (a 0-d output,
    such as an engine's range check, has none)."""
    names = [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = tree_flatten(module(*inputs))[0]
    out_names = [f"output_{i}" for i in range(len(outputs))]
    batched = names + [n for n, t in zip(out_names, outputs) if not isinstance(t, torch.Tensor) or t.dim() > 0]
    axes = {n: {0: "batch"} for n in batched} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, inputs, f, input_names=names, output_names=out_names, dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    return names


def exportable(model: nn.Module, magnitudes_of: Sequence[str] = (), for_engine: bool = False,
               by_sum: Collection[str] = ()) -> nn.Module:
    """What the exporter traces: a copy of ``model`` (for an OptimizedModule, its portable graph in plain aten,
    ``magnitudes_of``, ``for_engine`` and ``by_sum`` as in _portable_reference)."""
    return _Exportable(_portable_reference(model, magnitudes_of, for_engine, by_sum)).eval()


def _check_inputs(inputs: tuple, batch: int | None) -> list[tuple]:
    """The inputs the export is checked on: the example, negatives, large values, and another batch size.
    Integer inputs (token ids, masks) keep the example's values: other values may not be valid ids."""
    g = torch.Generator().manual_seed(0)
    floats = lambda t: t.is_floating_point()  # noqa: E731
    cases = [inputs, tuple(-t.abs() - 1 if floats(t) else t for t in inputs),
             tuple(torch.randn(t.shape, generator=g) * 100 if floats(t) else t for t in inputs)]
    if batch is not None:
        cases.append(tuple(torch.randn((batch, *t.shape[1:]), generator=g) if floats(t)
                           else t[torch.arange(batch) % t.shape[0]] for t in inputs))
    return cases


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, simplify: bool = True,
                dynamic_batch: bool = True, opset: int = 17, rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Export, simplify, check and cross-run; returns op counts before/after simplification and max errors."""
    import onnx
    import onnxruntime as ort

    from graphopt.compiler.core.module import OptimizedModule
    from graphopt.compiler.core.pipeline import is_quantized

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    quantized = isinstance(model, OptimizedModule) and is_quantized(model.portable)
    module = exportable(model)
    path = Path(path)
    names = write_onnx(module, inputs, str(path), dynamic_batch=dynamic_batch, opset=opset)
    proto = onnx.load(str(path))
    if quantized:  # int8 weights, int32 biases: the QDQ form ONNX Runtime runs as int8 kernels
        proto = onnx.load_from_string(int8_weights(proto.SerializeToString()))
        onnx.save(proto, str(path))
    before = Counter(n.op_type for n in proto.graph.node)
    if simplify:
        import onnxsim

        # (folding constants would turn the int8 weights' DequantizeLinear back into float weights)
        proto, ok = onnxsim.simplify(proto, skip_constant_folding=quantized)
        if not ok:
            raise GraphoptError("onnx-simplifier could not validate the simplified model", hint="simplify=False")
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    after = Counter(n.op_type for n in proto.graph.node)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    other_batch = inputs[0].shape[0] + 3 if dynamic_batch and inputs[0].dim() > 0 else None
    for case in _check_inputs(inputs, other_batch):
        with torch.no_grad():
            want = tree_flatten(module(*case))[0]
        got = session.run(None, {n: t.numpy() for n, t in zip(names, case)})
        for w, o in zip(want, got):
            if quantized:
                from graphopt.compiler.core.verify import sqnr

                db = sqnr(w.detach(), torch.from_numpy(o))
                if db < INT8_EXPORT_FLOOR_DB:
                    raise GraphoptError(f"ONNX Runtime disagrees with PyTorch on {path.name}: SQNR {db:.1f} dB < "
                                        f"{INT8_EXPORT_FLOOR_DB} dB", hint="please report this model")
            else:
                torch.testing.assert_close(torch.from_numpy(o), w.detach(), rtol=rtol, atol=atol * max(1.0, float(
                    w.abs().max())), msg=lambda m: f"ONNX Runtime disagrees with PyTorch on {path.name}: {m}")
            errors.append(float((torch.from_numpy(o) - w).abs().max()))
    return {"path": str(path), "ops_before": dict(before), "ops_after": dict(after), "max_abs_error": max(errors)}
