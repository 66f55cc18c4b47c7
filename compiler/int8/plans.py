"""Which int8 plan runs, by measurement: graphopt's int8 kernels, another library's, or none.

optimize(quantize="int8") on the CPU, with kernel libraries to measure (``engines``), builds

    int8              graphopt's int8 plan: layers too small for oneDNN's int8 to pay off stay fp32
                      (compiler/int8/quantize.py MIN_INT8_MACS)
    int8 every layer  every quantizable layer in int8 (ONNX Runtime's int8 kernels cost less per call than
                      oneDNN's through PyTorch), where that differs from the first
    fp32              the optimized fp32 graph

each run by graphopt's kernels or a library, whichever measured faster for it (compiler/core/engines.py),
times the modules interleaved and keeps the fastest int8 one, unless the fp32 module is faster: int8 never makes
a model slower than its fp32 module without the user asking for it. ``opt.int8_report.plan`` says which ran and
the times; when fp32 runs, every layer's reason says why. ``engines="graphopt"`` quantizes as asked, unmeasured.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.pipeline import PassRecord

SLOWER = "slower than fp32"  # how a layer's reason starts when the fp32 module runs


def fastest(build: Callable, fp32_graph: fx.GraphModule, own: tuple, again: Callable, inputs: tuple) -> tuple:
    """(the module to return, its int8 report). ``build(graph, records)`` makes a module; ``own`` is graphopt's
    int8 plan (graph, pass records, report); ``again()`` makes the every-layer plan the same way."""
    from graphopt.compiler.core.engines import race

    graph, records, report = own
    plans = {"int8": (build(graph, records), report)}
    if any((layer["reason"] or "").startswith("small") for layer in report.layers):
        every, every_records, every_report = again()
        plans["int8 every layer"] = (build(every, every_records), every_report)
    fp32 = build(fp32_graph, [])
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
