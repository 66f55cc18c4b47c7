"""Lower the fused ops to graphopt's Triton kernels, with conv weights laid out for the GEMM once, now.

    graphopt::conv2d_act(x, w, ...)  ->  kernels.triton.conv2d_act(x, w, ..., w_gemm=W)   W: (groups, R*S*Cg, K/groups)
    graphopt::linear_act(x, w, ...)  ->  kernels.triton.linear_act(x, w, ...)
    graphopt::qconv2d_act / qlinear_act  ->  kernels.triton.qconv2d_act / qlinear_act (int8)

On CUDA tensors; on CPU tensors too under TRITON_INTERPRET=1, which is how it is tested here.
Without triton installed it does nothing (the custom ops still run).
"""

from __future__ import annotations

import torch.fx as fx

from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import ConvAct
from graphopt.passes import PassContext, register
from graphopt.passes.lib.query import calls, constant_value
from graphopt.passes.lib.rewrite import add_constant


@register("fp32")
def lower_to_triton(gm: fx.GraphModule, ctx: PassContext) -> int:
    try:
        from graphopt.kernels import triton as triton_kernels
        from graphopt.kernels.triton.conv2d_act import prepare_weight
    except ImportError:
        return 0
    rewrites = 0
    for node in calls(gm, OPS["conv2d_act"]):
        c = ConvAct.from_node(node)
        weight = constant_value(gm, c.weight)
        if weight is None:
            continue
        name = add_constant(gm, f"{c.weight.target}_gemm", prepare_weight(weight, c.groups), buffer=False)
        with gm.graph.inserting_before(node):
            w_gemm = gm.graph.get_attr(name)
        node.target, node.kwargs = triton_kernels.conv2d_act, {"w_gemm": w_gemm}
        rewrites += 1
    for node in calls(gm, OPS["linear_act"]):
        node.target = triton_kernels.linear_act
        rewrites += 1
    for name in ("qconv2d_act", "qlinear_act"):  # int8: the same signature as the custom ops
        for node in calls(gm, OPS[name]):
            node.target = getattr(triton_kernels, name)
            rewrites += 1
    return rewrites
