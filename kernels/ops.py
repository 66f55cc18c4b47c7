"""The fused ops as torch.library custom ops in the ``graphopt`` namespace.

Each op has a fake (meta) impl for shape propagation, a CPU kernel (kernels/cpu.py), a CUDA
kernel (kernels/triton/) and the reference (kernels/reference.py) for every other device. Graphs hold these
ops, so an optimized graph prints, saves and reloads like any fx graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import cpu, reference


@torch.library.custom_op("graphopt::conv2d_act", mutates_args=())
def conv2d_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    residual: Tensor | None,
) -> Tensor:
    return reference.conv2d_act(x, weight, bias, stride, padding, dilation, groups, act, residual)


@conv2d_act.register_kernel("cpu")
def _(x, weight, bias, stride, padding, dilation, groups, act, residual):
    return cpu.conv2d_act(x, weight, bias, stride, padding, dilation, groups, act, residual)


@conv2d_act.register_kernel("cuda")
def _(x, weight, bias, stride, padding, dilation, groups, act, residual):
    from kernels import triton as triton_kernels  # imported on first CUDA use: triton is optional

    return triton_kernels.conv2d_act(x, weight, bias, stride, padding, dilation, groups, act, residual)


@conv2d_act.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, act, residual):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = reference.conv_out_size(h, r, stride[0], padding[0], dilation[0])
    q = reference.conv_out_size(w, s, stride[1], padding[1], dilation[1])
    return x.new_empty((n, k, p, q))


@torch.library.custom_op("graphopt::linear_act", mutates_args=())
def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str) -> Tensor:
    return reference.linear_act(x, weight, bias, act)


@linear_act.register_kernel("cpu")
def _(x, weight, bias, act):
    return cpu.linear_act(x, weight, bias, act)


@linear_act.register_kernel("cuda")
def _(x, weight, bias, act):
    from kernels import triton as triton_kernels

    return triton_kernels.linear_act(x, weight, bias, act)


@linear_act.register_fake
def _(x, weight, bias, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# The ops a graph may call, by name; codegen and the loader resolve names through this table.
OPS = {"conv2d_act": torch.ops.graphopt.conv2d_act.default, "linear_act": torch.ops.graphopt.linear_act.default}
REFERENCES = {"conv2d_act": reference.conv2d_act, "linear_act": reference.linear_act}
