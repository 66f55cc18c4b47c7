"""Lower the fused ops to their plain-aten references (kernels/reference.py): the portable
backend, and the oracle's own arithmetic, for comparing any other backend against."""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS, REFERENCES
from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import calls


@register("fp32")
def lower_to_reference(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for name, op in OPS.items():
        for node in calls(gm, op):
            node.target = REFERENCES[name]
            rewrites += 1
    return rewrites
