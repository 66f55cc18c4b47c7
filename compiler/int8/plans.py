"""Which int8 plan runs, by measurement: graphopt's int8 kernels, another library's, or none.

optimize(quantize="int8") on the CPU, with kernel libraries to measure (``engines``), builds

    int8              graphopt's int8 plan: layers too small for oneDNN's int8 to pay off stay fp32
                      (compiler/int8/quantize.py MIN_INT8_MACS)
    int8 every layer  every quantizable layer in int8 (ONNX Runtime's int8 kernels cost less per call than
                      oneDNN's through PyTorch), where that differs from the first
    fp32              the optimized fp32 graph

(a plan with no int8 layer left, every layer small or over the accuracy budget, is the fp32 module and is not
raced under an int8 name; with no int8 plan left, the fp32 module runs without a race)

each run by graphopt's kernels or a library, whichever measured faster for it (compiler/core/engines.py),
times the modules interleaved and keeps the fastest int8 one, unless the fp32 module is faster: int8 never makes
a model slower than its fp32 module without the user asking for it. ``opt.int8_report.plan`` says which ran and
the times; when fp32 runs, every layer's reason says why. ``engines="graphopt"`` quantizes as asked, unmeasured.

A library's int8 conv cannot add a residual in fp32 inside the op as graphopt's does, nor write a float output,
nor apply an activation other than a relu / clamp (ONNX Runtime fuses DequantizeLinear -> Conv only with a
QuantizeLinear after it), so its graph also quantizes each such conv's own sum (QLinearConv, then QLinearAdd, a
sigmoid or SiLU on int8 codes, or the float ops after it: ``summed``), on a range calibrated here
(``conv_sums``; a float output after a relu or a clamp from 0 is quantized after it: compiler/deploy/onnx.py
``quantized_after_act``); the (scale, zero point) of each is ``opt.int8_sums``, saved with the engine plan and
validated on load.
(MobileNetV2's last 1x1 conv, before the pooling, ran as a float conv in ONNX Runtime: 0.46 ms of a 3.8 ms
int8 call; then as QLinearConv with its relu6, the pooling and the classifier in float: 0.4 ms; now all int8.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.pipeline import PassRecord, is_quantized

SLOWER = "slower than fp32"  # how a layer's reason starts when the fp32 module runs


def fastest(build: Callable, fp32_graph: fx.GraphModule, own: tuple, again: Callable, inputs: tuple,
            batches: list[tuple]) -> tuple:
    """(the module to return, its int8 report). ``build(graph, records, sums)`` makes a module (``sums``: see
    conv_sums); ``own`` is graphopt's int8 plan (graph, pass records, report); ``again()`` makes the
    every-layer plan the same way; ``batches`` are the calibration batches."""
    from graphopt.compiler.core.engines import race

    graph, records, report = own
    graphs = {"int8": (graph, records, report)}
    if any((layer["reason"] or "").startswith("small") for layer in report.layers):
        graphs["int8 every layer"] = again()
    # a plan with no int8 layer is the fp32 module under another name: it is raced once, as "fp32"
    last = list(graphs.values())[-1]
    graphs = {name: plan for name, plan in graphs.items() if is_quantized(plan[0])}
    fp32 = build(fp32_graph, [], {})
    if not graphs:
        report = last[2]  # (the every-layer plan's where one was built: its reasons are not "small")
        report.plan = f"fp32 in {fp32.engine} (no plan has an int8 layer: each layer's reason says why)"
        fp32.report.append(PassRecord(f"int8 plan: {report.plan}", rewrites=1))
        return fp32, report
    ranges = conv_sums(fp32_graph, batches, [g for g, _, _ in graphs.values()])
    plans = {name: (build(g, r, sums_of(g, ranges)), rep) for name, (g, r, rep) in graphs.items()}
    modules = {name: module for name, (module, _) in plans.items()} | {"fp32": fp32}
    ms = race(modules, inputs)
    times = "; ".join(f"{name} {ms[name]:.3f} ms ({module.engine})" for name, module in modules.items())
    best = min(plans, key=lambda name: ms[name])
    opt, chosen = plans[best]
    if ms["fp32"] < ms[best]:
        opt, chosen = fp32, _fp32_report(report, fp32, fp32_graph, inputs,
                                         f"{SLOWER}: the fastest int8 module takes {ms[best]:.3f} ms, the fp32 "
                                         f"module {ms['fp32']:.3f} ms here (engines='graphopt' keeps int8)")
        best = "fp32"
    chosen.plan = f"{best} in {opt.engine} (measured: {times})"
    opt.report.append(PassRecord(f"int8 plan: {chosen.plan}", rewrites=int(best != "int8")))
    return opt, chosen


def summed(int8_graph: fx.GraphModule) -> list[fx.Node]:
    """The int8 convolutions whose own sum a library's graph quantizes: those with a residual added inside them,
    those with a float output, and those with an int8 output after an activation ONNX Runtime cannot run inside
    its int8 conv (compiler/deploy/onnx.py ``fused_in_int8_conv``: a SiLU, a GELU, ...; with no quantized sum,
    DequantizeLinear -> Conv -> SiLU -> QuantizeLinear ran as a float Conv on dequantized input and weights:
    EfficientNet-B0's every-layer int8 plan in ONNX Runtime ran 32 of its 81 convolutions so)."""
    from graphopt.compiler.deploy.onnx import no_int8_form
    from graphopt.kernels.signatures import QConvAct, signature_of

    return [n for n in int8_graph.graph.nodes if isinstance(q := signature_of(n), QConvAct) and no_int8_form(q)]


def _replaced(node: fx.Node) -> str:
    """The name of the fp32 node an int8 node replaced."""
    return (node.meta.get("replaces") or [node.name])[-1]


def conv_sums(fp32_graph: fx.GraphModule, batches: list[tuple], int8_graphs: list[fx.GraphModule]
              ) -> dict[str, tuple[float, float]]:
    """{fp32 node name: (lo, hi)} of the convolution's own sum (before its residual and activation; after a
    relu or a clamp from 0 where ``quantized_after_act``), over
    ``batches`` (min / max, by calibration's own observer: compiler/int8/calibrate.py), of every conv of
    ``fp32_graph`` that an int8 conv of ``int8_graphs`` in ``summed`` replaced.

    graphopt's int8 conv adds the residual in fp32 inside the op, and may write a float output. Another library's
    int8 conv can do neither: ONNX Runtime runs QuantizeLinear(conv) as QLinearConv, then an int8 add (QLinearAdd)
    or the float ops after a DequantizeLinear, so its graph quantizes that sum too (one more rounding: checked
    against graphopt's graph like the rest, compiler/core/engines.py)."""
    from graphopt.compiler.core.pipeline import clone
    from graphopt.compiler.deploy.onnx import quantized_after_act
    from graphopt.compiler.int8.calibrate import collect
    from graphopt.kernels.ops import OPS
    from graphopt.kernels.signatures import ConvAct, signature_of

    convs = [n for g in int8_graphs for n in summed(g)]
    names = {_replaced(n) for n in convs}
    after = {_replaced(n) for n in convs if quantized_after_act(signature_of(n))}
    observed = clone(fp32_graph)
    sums: dict[str, str] = {}  # the added node that computes a conv's own sum -> the conv's name
    for n in list(observed.graph.nodes):
        if n.name in names and isinstance(c := signature_of(n), ConvAct):
            with observed.graph.inserting_after(n):  # (unread: calibration's observer records its range)
                act = c.act if n.name in after else "none"
                own = ConvAct(c.x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, act, None)
                sums[observed.graph.call_function(OPS[own.op], own.as_args()).name] = n.name
    if not sums:
        return {}
    stats = collect(observed, batches, set(sums), "minmax")
    return {sums[k]: (stats.lo[k], stats.hi[k]) for k in sums if k in stats.lo}


def sums_of(int8_graph: fx.GraphModule, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, int]]:
    """{int8 conv node name: (scale, zero point)} of its own sum, from ``conv_sums``' ranges (by the fp32 node each
    int8 conv replaced)."""
    from graphopt.compiler.deploy.graph_json import is_plain
    from graphopt.kernels.reference import activation_qparams

    sums = {}
    for node in summed(int8_graph):
        key = _replaced(node)
        if key in ranges and is_plain(node.name):  # (a name save and load keep)
            sums[node.name] = activation_qparams(*ranges[key])
    return sums


def _fp32_report(report, fp32: torch.nn.Module, fp32_graph: fx.GraphModule, inputs: tuple, why: str):
    """The int8 report when the fp32 module runs: no layer in int8, each with ``why``; the output SQNR is the fp32
    module's against the fp32 graph."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.verify import sqnr_db, sqnr_terms

    with torch.no_grad():
        want, got = tree_flatten(fp32_graph(*fresh(inputs)))[0], tree_flatten(fp32(*fresh(inputs)))[0]
    terms = [sqnr_terms(w, g) for w, g in zip(want, got) if isinstance(w, torch.Tensor) and w.is_floating_point()]
    layers = [dict(layer, int8=False, reason=why) for layer in report.layers]
    return dataclasses.replace(report, layers=layers, fallback=[],
                               output_sqnr_db=sqnr_db(sum(t[0] for t in terms), sum(t[1] for t in terms)))
