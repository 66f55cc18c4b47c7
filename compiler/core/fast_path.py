"""A second lowering for inputs that provably make no NaN: relu / relu6 / hardtanh fused into oneDNN.

oneDNN's clamp post-ops map NaN to 0, so the default CPU graph runs those activations as a separate
pass over memory after each primitive (eager's NaN semantics). compiler/core/finite_range.py bounds
every value of the graph by the input's largest magnitude; below ``limit``, nothing can reach inf
and so nothing can be NaN, and the fused post-ops give exactly eager's results. The optimized module
then checks each call's inputs (one max |x| reduction, NaN and inf included since max of NaN is NaN)
and runs the fused graph when they are within the limit, the separate-activation graph otherwise.
``optimize(..., nan_checks="strict")`` keeps only the latter.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from graphopt.compiler.core.finite_range import input_limit
from graphopt.kernels.cpu import clamp_postop
from graphopt.kernels.signatures import ConvAct, LinearAct, signature_of


def _is_clamp(node: fx.Node) -> bool:
    """A fused fp32 op whose activation has a oneDNN post-op exact only on NaN-free values (relu, relu6, hardtanh)."""
    sig = signature_of(node)
    return isinstance(sig, (ConvAct, LinearAct)) and clamp_postop(sig.act) is not None


def _has_clamps(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and _is_clamp(n) for n in gm.graph.nodes)


def fast_context(portable: fx.GraphModule, ctx):
    """(the PassContext of the fused lowering, the input limit), or None when it would not help or not be exact."""
    if ctx.backend != "cpu" or not _has_clamps(portable):
        return None
    inputs = [t for t in ctx.example_inputs if isinstance(t, torch.Tensor)]
    if not inputs or any(not t.is_floating_point() for t in inputs):
        return None
    limit = input_limit(portable)
    if limit is None:
        return None
    return dataclasses.replace(ctx, nan_free=True, misses=type(ctx.misses)()), limit


MIN_CLAMPED_ELEMENTS = 1 << 18  # below this the per-call input check costs more than the passes it saves (bench)


def worth_it(portable: fx.GraphModule, inputs: tuple) -> bool:
    """Do the separate activations touch enough memory (at the traced shapes) to pay for the input check,
    a read of every input element per call? Deterministic: no timing decides the graph."""
    clamped = 0
    for node in portable.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "call_function" and meta is not None and _is_clamp(node):
            clamped += meta.shape.numel()
    read = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
    return clamped >= MIN_CLAMPED_ELEMENTS and clamped >= 4 * read


def within(limit: float, args: tuple) -> bool:
    """Are all tensor inputs finite within [-limit, limit]? (aminmax propagates NaN, and NaN compares False.)

    One aminmax reduction per input: about 30 us for a 224x224 image on 2 threads (torch.linalg.vector_norm
    with ord=inf, the obvious spelling, takes 10x that)."""
    for x in args:
        if isinstance(x, torch.Tensor) and x.numel():
            lo, hi = torch.aminmax(x)
            if not (-limit <= float(lo) and float(hi) <= limit):
                return False
    return True
