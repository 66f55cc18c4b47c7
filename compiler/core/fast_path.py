"""A second lowering for inputs that provably make no NaN: relu / relu6 / hardtanh fused into oneDNN.

oneDNN's clamp post-ops map NaN to 0, so the default CPU graph runs those activations as a separate
pass over memory after each primitive (eager's NaN semantics). compiler/core/finite_range.py bounds
every value of the graph by the input's largest magnitude; below ``limit``, nothing can reach inf
and so nothing can be NaN, and the fused post-ops give exactly eager's results. The optimized module
then checks each call's inputs (one max |x| reduction, NaN and inf included since max of NaN is NaN)
and runs the fused graph when they are within the limit, the separate-activation graph otherwise.
``optimize(..., nan_checks="strict")`` keeps only the latter; ``nan_checks="off"`` (the user gives up eager's NaN
and inf results on inputs that hold NaN / inf or overflow) runs the fused graph on every call, unchecked.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from graphopt.compiler.core.finite_range import input_limit
from graphopt.kernels.cpu import clamp_postop
from graphopt.kernels.signatures import ConvAct, signature_of

NAN_CHECKS = ("fast", "strict", "off")  # optimize(nan_checks=...)
MIN_CLAMPED_ELEMENTS = 1 << 18  # below this the per-call input check costs more than the passes it saves (bench)


def _clamped_elements(gm: fx.GraphModule) -> int:
    """Elements (at the traced shapes) that convs with a relu / relu6 / hardtanh write: what fusing saves a pass
    over. (Linears keep their separate activation even on NaN-free values: lower_to_onednn says why.)"""
    total = 0
    for node in gm.graph.nodes:
        sig, meta = signature_of(node), node.meta.get("tensor_meta")
        if isinstance(sig, ConvAct) and meta is not None and clamp_postop(sig.act) is not None:
            total += meta.shape.numel()
    return total


def fast_plan(portable: fx.GraphModule, ctx, nan_checks: str = "fast"):
    """(the PassContext of the fused lowering, the input limit), or None where the fused graph would not pay for
    its input check or could not be proven exact. Deterministic: no timing decides the graph.
    ``nan_checks="off"``: (the context, None) wherever there is a CPU graph: fused, and no input check."""
    if ctx.backend != "cpu" or nan_checks == "strict":
        return None
    if nan_checks == "off":
        return dataclasses.replace(ctx, nan_free=True, misses=type(ctx.misses)()), None
    inputs = [t for t in ctx.example_inputs if isinstance(t, torch.Tensor)]
    if not inputs or any(not t.is_floating_point() for t in inputs):
        return None
    clamped = _clamped_elements(portable)
    if clamped < MIN_CLAMPED_ELEMENTS or clamped < 4 * sum(t.numel() for t in inputs):
        return None
    limit = input_limit(portable)
    if limit is None:
        return None
    return dataclasses.replace(ctx, nan_free=True, misses=type(ctx.misses)()), limit


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
