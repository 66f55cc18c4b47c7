"""The fused ops composed from plain aten ops: the oracle every implementation is tested against.

An activation is named by a string so that it can live in an fx graph, a dump and a saved
artifact: ``name`` or ``name:p1[:p2]``.

    none, relu, relu6, silu, sigmoid, tanh, hardswish, gelu, gelu:tanh,
    hardtanh:LO:HI (also clamp, with inf for a missing bound), leaky_relu:SLOPE

Each is one record of kernels/activations.py, which holds its formula.

conv2d_act(x, w, b, ...) = act(conv2d(x, w, b) + residual)       # residual added before the act
linear_act(x, w, b, act) = act(x @ w.T + b)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphopt.kernels.activations import ACTIVATIONS, ACTS
from graphopt.kernels.activations import format_act as format_act  # (re-exported: its home is the table)


def parse_act(act: str) -> tuple[str, tuple[str, ...]]:
    """'hardtanh:0.0:6.0' -> ('hardtanh', ('0.0', '6.0')); raises ValueError for an unknown name."""
    name, *params = act.split(":")
    record = ACTS.get(name)
    if record is not None and record.variants and len(params) <= 1 and all(
            p in ("none", *record.variants) for p in params):
        return name, tuple(p for p in params if p != "none")
    if record is None or len(params) != len(record.params):
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    for p in params:
        float(p)  # raises for a malformed number
    return name, tuple(params)


def apply_act(y: torch.Tensor, act: str) -> torch.Tensor:
    name, params = parse_act(act)
    return ACTS[name].reference(y, *params)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1


def conv2d_act(
    x: torch.Tensor,  # (N, C, H, W)
    weight: torch.Tensor,  # (K, C / groups, R, S)
    bias: torch.Tensor | None,  # (K,)
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
    residual: torch.Tensor | None = None,  # (N, K, P, Q)
) -> torch.Tensor:  # (N, K, P, Q)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return apply_act(y, act)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    return apply_act(F.linear(x, weight, bias), act)


# ---------------------------------------------------------------- int8
#
# The quantization scheme every int8 implementation follows (CPU and Triton alike):
#   activations  int8, per tensor:   x = (q - zero_point) * scale
#   weights      int8, per output channel, symmetric:   w[n] = q[n] * w_scale[n]
#   accumulate   int32:  acc[n] = sum_k (xq_k - x_zp) * wq[n, k]           (exact)
#   epilogue     fp32:   y = act(acc * (x_scale * w_scale[n]) + bias[n] [+ residual])
#   output       fp32, or int8:  clamp(round_half_even(y / out_scale) + out_zp, -128, 127)
#
# Two weight ranges, named by SCHEMES: "s8" codes in [-127, 127], "s7" codes in [-63, 63] (scale
# amax / 63). x86 CPUs without int8 dot-product instructions (VNNI, AMX) multiply uint8 by int8 with
# vpmaddubsw, which adds each pair of products into a saturating int16: 2 * 255 * 127 overflows it,
# 2 * 255 * 64 = 32640 does not, so s7 is exact there. Both are plain int8 tensors here: this
# reference is the oracle of either, unchanged.

SCHEMES = {"s8": 8, "s7": 7}  # scheme -> weight bits


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) of the int8 activation scheme for values in [lo, hi] (0 kept exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    if not scale > 1e-12 * max(abs(lo), abs(hi), 1.0):  # a constant (or all-zero) tensor
        scale = max(abs(lo), abs(hi), 1.0) / 127.0
    zero_point = int(round(-128 - lo / scale))
    return float(scale), max(-128, min(127, zero_point))


def weight_qparams(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per output channel): symmetric, codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1];
    a zero channel gets scale 1."""
    if bits not in SCHEMES.values():
        raise ValueError(f"weight bits must be one of {sorted(SCHEMES.values())}, not {bits!r}")
    qmax = float(2 ** (bits - 1) - 1)
    amax = weight.detach().abs().flatten(1).amax(1).float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.clamp(torch.round(weight.detach().float() / scale.view(shape)), -qmax, qmax).to(torch.int8)
    return q, scale


def requantize(y: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """fp32 -> int8: round half to even, add the zero point, saturate to [-128, 127]."""
    return torch.clamp(torch.round(y / scale) + zero_point, -128, 127).to(torch.int8)


def qlinear_act(x: torch.Tensor, x_scale: float, x_zp: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, act: str, out_scale: float | None = None, out_zp: int = 0) -> torch.Tensor:
    acc = (x.long() - x_zp) @ weight.long().T  # (..., N), exact
    y = acc.to(torch.float32) * (x_scale * w_scale.float())
    y = apply_act(y + bias.float() if bias is not None else y, act)
    return y if out_scale is None else requantize(y, out_scale, out_zp)


def qconv2d_act(x: torch.Tensor, x_scale: float, x_zp: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                act: str, residual: torch.Tensor | None = None, out_scale: float | None = None,
                out_zp: int = 0) -> torch.Tensor:
    # integer sums in float64 are exact (well below 2**53), and aten has no integer convolution
    acc = F.conv2d(x.double() - x_zp, weight.double(), None, stride, padding, dilation, groups)
    y = acc.to(torch.float32) * (x_scale * w_scale.float()).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    y = apply_act(y, act)
    return y if out_scale is None else requantize(y, out_scale, out_zp)


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """fp32 -> int8 on the activation scheme (the graph's entry into int8)."""
    return requantize(x.float(), scale, zero_point)


def dequantize(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """int8 -> fp32: (q - zero_point) * scale."""
    return (q.float() - zero_point) * scale
