"""CPU implementations of the fused ops, on oneDNN.

Two ways in:
  - the ``graphopt::`` custom ops' CPU kernels below (used while the graph is being optimized,
    and when a graph is run unlowered): aten conv/linear, then the epilogue in place on the
    freshly allocated output;
  - the lowering (passes/lower_to_onednn.py), which rewrites those ops into direct calls of
    oneDNN's fused primitives (``mkldnn::_convolution_pointwise``, ``_linear_pointwise``) on
    weights reordered once, with the activation as a oneDNN post-op.

oneDNN's relu / clip post-ops map NaN to a number (max(NaN, 0) = 0) where PyTorch keeps NaN,
so those activations run as a separate in-place op after the primitive; the post-ops used are
the ones whose results on NaN and +-inf match eager's (tested in tests/kernels).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kernels.reference import parse_act

# act name -> (function, its parameters as (args, kwargs)): fn(y, *args, **kwargs) applies the act,
# in place where torch has an in-place form
_INPLACE: dict[str, tuple[Callable, Callable[[tuple], tuple[tuple, dict]]]] = {
    "relu": (torch.relu_, lambda p: ((), {})),
    "relu6": (torch.clamp_, lambda p: ((0.0, 6.0), {})),
    "hardtanh": (torch.clamp_, lambda p: ((float(p[0]), float(p[1])), {})),
    "silu": (F.silu, lambda p: ((), {"inplace": True})),
    "sigmoid": (torch.sigmoid_, lambda p: ((), {})),
    "tanh": (torch.tanh_, lambda p: ((), {})),
    "hardswish": (F.hardswish, lambda p: ((), {"inplace": True})),
    "leaky_relu": (F.leaky_relu_, lambda p: ((float(p[0]),), {})),
    "gelu": (F.gelu, lambda p: ((), {"approximate": p[0] if p else "none"})),  # gelu has no in-place form
}

# act name -> oneDNN post-op (attr, scalars, algorithm); only those that keep eager's NaN / inf
_POSTOPS: dict[str, Callable[[tuple], tuple[str, list, str]]] = {
    "silu": lambda p: ("swish", [], ""),
    "sigmoid": lambda p: ("sigmoid", [], ""),
    "tanh": lambda p: ("tanh", [], ""),
    "hardswish": lambda p: ("hardswish", [], ""),
    "leaky_relu": lambda p: ("leaky_relu", [float(p[0])], ""),
    "gelu": lambda p: ("gelu", [], p[0] if p else "none"),
}


def inplace_act(act: str) -> tuple[Callable, tuple, dict] | None:
    """(fn, args, kwargs) with fn(y, *args, **kwargs) applying ``act`` to y; None for 'none'."""
    name, params = parse_act(act)
    if name == "none":
        return None
    fn, extra = _INPLACE[name]
    return (fn, *extra(params))


def onednn_postop(act: str) -> tuple[str, list, str] | None:
    """The oneDNN post-op for ``act`` when its results equal eager's, NaN and inf included; else None."""
    name, params = parse_act(act)
    if name == "none":
        return ("none", [], "")
    rule = _POSTOPS.get(name)
    return rule(params) if rule else None


def pack_conv_weight(weight: torch.Tensor, padding: list[int], stride: list[int], dilation: list[int],
                     groups: int, input_shape: list[int]) -> torch.Tensor:
    """Reorder a conv weight once into the blocked layout oneDNN picks for this input shape."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, stride, dilation, groups,
                                                     list(input_shape))


def _epilogue(y: torch.Tensor, act: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    if residual is not None:
        y.add_(residual)
    found = inplace_act(act)
    if found is None:
        return y
    fn, args, kwargs = found
    return fn(y, *args, **kwargs)


def conv2d_act(x, weight, bias, stride, padding, dilation, groups, act, residual=None):
    return _epilogue(F.conv2d(x, weight, bias, stride, padding, dilation, groups), act, residual)


def linear_act(x, weight, bias, act):
    return _epilogue(F.linear(x, weight, bias), act)
