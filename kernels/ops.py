"""The fused ops as torch.library custom ops in the ``graphopt`` namespace.

Each op has a fake (meta) impl for shape propagation, a CPU kernel (kernels/cpu.py), a CUDA
kernel (kernels/triton/) and the reference (kernels/reference.py) for every other device. The
arguments, by name, are the records of kernels/signatures.py. Graphs hold these
ops, so an optimized graph prints, saves and reloads like any fx graph.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from graphopt.kernels import cpu, reference


def _triton(name: str) -> Callable[..., Tensor]:
    """The Triton launcher ``name``, imported on first CUDA use: triton is optional."""
    def launch(*args):
        from graphopt.kernels import triton as triton_kernels

        return getattr(triton_kernels, name)(*args)

    return launch


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


conv2d_act.register_kernel("cpu", cpu.conv2d_act)
conv2d_act.register_kernel("cuda", _triton("conv2d_act"))


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


linear_act.register_kernel("cpu", cpu.linear_act)
linear_act.register_kernel("cuda", _triton("linear_act"))


@linear_act.register_fake
def _(x, weight, bias, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------- int8 (the scheme: kernels/reference.py)


@torch.library.custom_op("graphopt::quantize", mutates_args=())
def quantize(x: Tensor, scale: float, zero_point: int) -> Tensor:
    return reference.quantize(x, scale, zero_point)


@quantize.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("graphopt::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return reference.dequantize(q, scale, zero_point)


@dequantize.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("graphopt::qconv2d_act", mutates_args=())
def qconv2d_act(x: Tensor, x_scale: float, x_zp: int, weight: Tensor, w_scale: Tensor, bias: Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int, act: str,
                residual: Tensor | None, out_scale: float | None, out_zp: int) -> Tensor:
    return reference.qconv2d_act(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, act,
                                 residual, out_scale, out_zp)


qconv2d_act.register_kernel("cpu", cpu.qconv2d_act)
qconv2d_act.register_kernel("cuda", _triton("qconv2d_act"))


@qconv2d_act.register_fake
def _(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, act, residual, out_scale, out_zp):
    n, _, h, w = x.shape
    k, _, r, s = weight.shape
    p = reference.conv_out_size(h, r, stride[0], padding[0], dilation[0])
    q = reference.conv_out_size(w, s, stride[1], padding[1], dilation[1])
    return x.new_empty((n, k, p, q), dtype=torch.float32 if out_scale is None else torch.int8)


@torch.library.custom_op("graphopt::qlinear_act", mutates_args=())
def qlinear_act(x: Tensor, x_scale: float, x_zp: int, weight: Tensor, w_scale: Tensor, bias: Tensor | None,
                act: str, out_scale: float | None, out_zp: int) -> Tensor:
    return reference.qlinear_act(x, x_scale, x_zp, weight, w_scale, bias, act, out_scale, out_zp)


qlinear_act.register_kernel("cpu", cpu.qlinear_act)
qlinear_act.register_kernel("cuda", _triton("qlinear_act"))


@qlinear_act.register_fake
def _(x, x_scale, x_zp, weight, w_scale, bias, act, out_scale, out_zp):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32 if out_scale is None else torch.int8)


# The ops a graph may call, by name; codegen and the loader resolve names through this table.
OPS = {name: getattr(torch.ops.graphopt, name).default
       for name in ("conv2d_act", "linear_act", "quantize", "dequantize", "qconv2d_act", "qlinear_act")}
REFERENCES = {name: getattr(reference, name) for name in OPS}
INT8_OPS = ("quantize", "qconv2d_act", "qlinear_act")  # the ops that write int8 tensors
