"""The activation epilogue shared by the Triton kernels: ``act`` strings become a constexpr code
and two float parameters. Written with ``where`` so that NaN propagates as in PyTorch."""

from __future__ import annotations

import triton
import triton.language as tl

from graphopt.kernels.reference import parse_act

CODES = {"none": 0, "relu": 1, "relu6": 2, "hardtanh": 2, "silu": 3, "sigmoid": 4, "tanh": 5, "hardswish": 6,
         "gelu": 7, "leaky_relu": 9}


def act_code(act: str) -> tuple[int, float, float]:
    """(ACT code, P0, P1) for a kernel launch."""
    name, params = parse_act(act)
    if name == "relu6":
        return CODES[name], 0.0, 6.0
    if name == "hardtanh":
        return CODES[name], float(params[0]), float(params[1])
    if name == "gelu":
        return (8 if params and params[0] == "tanh" else 7), 0.0, 0.0
    if name == "leaky_relu":
        return CODES[name], float(params[0]), 0.0
    return CODES[name], 0.0, 0.0


@triton.jit
def _sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


@triton.jit
def apply_act(y, ACT: tl.constexpr, P0, P1):
    if ACT == 1:  # relu: NaN < 0 is false, so NaN stays NaN
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:  # clamp(P0, P1)
        y = tl.where(y < P0, P0, y)
        y = tl.where(y > P1, P1, y)
    elif ACT == 3:  # silu
        y = y * _sigmoid(y)
    elif ACT == 4:
        y = _sigmoid(y)
    elif ACT == 5:  # tanh
        y = 2.0 * _sigmoid(2.0 * y) - 1.0
    elif ACT == 6:  # hardswish
        r = tl.where(y + 3.0 < 0.0, 0.0, y + 3.0)
        r = tl.where(r > 6.0, 6.0, r)
        y = y * r / 6.0
    elif ACT == 7:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 8:  # gelu (tanh approximation)
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))
    elif ACT == 9:  # leaky relu, slope P0
        y = tl.where(y < 0.0, y * P0, y)
    return y


@triton.jit
def requantize(y, OUT_SCALE, OUT_ZP):
    """fp32 -> int8 like kernels.reference.requantize: round half to even, zero point, saturate."""
    v = y / OUT_SCALE
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)  # a tie rounds to the even neighbour
    q = r + OUT_ZP
    q = tl.where(q < -128.0, -128.0, q)
    q = tl.where(q > 127.0, 127.0, q)
    return q.to(tl.int8)
