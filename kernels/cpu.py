"""CPU implementations of the fused ops.

The convolution / GEMM runs in oneDNN (through aten), and the epilogue (residual add,
activation) runs in place on the freshly allocated output, so the op allocates one tensor.
Numerics are those of the reference: same aten kernels, same order of operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import parse_act

# In-place epilogues on a tensor the op owns. Each one matches kernels.reference exactly,
# NaN and inf included.
_INPLACE = {
    "none": lambda y: y,
    "relu": torch.relu_,
    "relu6": lambda y: y.clamp_(0.0, 6.0),
    "silu": lambda y: F.silu(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "hardswish": lambda y: F.hardswish(y, inplace=True),
    "gelu": lambda y, approximate="none": y.copy_(F.gelu(y, approximate=approximate)),
    "hardtanh": lambda y, lo, hi: y.clamp_(float(lo), float(hi)),
    "leaky_relu": lambda y, slope: F.leaky_relu_(y, float(slope)),
}


def _epilogue(y: torch.Tensor, act: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:
        y.add_(residual)
    name, params = parse_act(act)
    return _INPLACE[name](y, *params)


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, act, residual=None):
    return _epilogue(F.conv2d(x, weight, bias, stride, padding, dilation, groups), act, residual)


def linear_act(x, weight, bias, act):
    return _epilogue(F.linear(x, weight, bias), act)
