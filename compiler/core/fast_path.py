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
from graphopt.kernels.reference import parse_act

_CLAMPS = {"relu", "relu6", "hardtanh"}


def _is_clamp(node: fx.Node) -> bool:
    ops = (torch.ops.graphopt.conv2d_act.default, torch.ops.graphopt.linear_act.default)
    if node.target not in ops:
        return False
    return parse_act(node.args[7] if node.target is ops[0] else node.args[3])[0] in _CLAMPS


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


MIN_CLAMPED_ELEMENTS = 1 << 16  # below this the per-call input check costs more than the passes it saves


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
    """Are all tensor inputs finite with max |x| <= limit? (A NaN or inf makes the max NaN or inf: False.)"""
    for x in args:
        if isinstance(x, torch.Tensor) and x.numel() and not float(torch.linalg.vector_norm(x, float("inf"))) <= limit:
            return False
    return True
