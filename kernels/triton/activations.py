"""The activation epilogue shared by the Triton kernels: ``act`` strings become a constexpr code
and two float parameters (each activation's record in kernels/activations.py names its code). Written
with ``where`` so that NaN propagates as in PyTorch."""

from __future__ import annotations

import triton
import triton.language as tl

from graphopt.kernels.activations import ACTS, TRITON_CODES
from graphopt.kernels.reference import parse_act

# apply_act's branches, by the codes of kernels/activations.py (constexpr globals, readable inside a jit function)
_RELU = tl.constexpr(TRITON_CODES["relu"])
_CLAMP = tl.constexpr(TRITON_CODES["clamp"])
_SILU = tl.constexpr(TRITON_CODES["silu"])
_SIGMOID = tl.constexpr(TRITON_CODES["sigmoid"])
_TANH = tl.constexpr(TRITON_CODES["tanh"])
_HARDSWISH = tl.constexpr(TRITON_CODES["hardswish"])
_GELU = tl.constexpr(TRITON_CODES["gelu"])
_GELU_TANH = tl.constexpr(TRITON_CODES["gelu_tanh"])
_LEAKY_RELU = tl.constexpr(TRITON_CODES["leaky_relu"])


def act_code(act: str) -> tuple[int, float, float]:
    """(ACT code, P0, P1) for a kernel launch."""
    name, params = parse_act(act)
    return ACTS[name].triton(*params)


@triton.jit
def _sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


@triton.jit
def apply_act(y, ACT: tl.constexpr, P0, P1):
    if ACT == _RELU:  # relu: NaN < 0 is false, so NaN stays NaN
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == _CLAMP:  # clamp(P0, P1)
        y = tl.where(y < P0, P0, y)
        y = tl.where(y > P1, P1, y)
    elif ACT == _SILU:  # silu
        y = y * _sigmoid(y)
    elif ACT == _SIGMOID:
        y = _sigmoid(y)
    elif ACT == _TANH:  # tanh
        y = 2.0 * _sigmoid(2.0 * y) - 1.0
    elif ACT == _HARDSWISH:  # hardswish
        r = tl.where(y + 3.0 < 0.0, 0.0, y + 3.0)
        r = tl.where(r > 6.0, 6.0, r)
        y = y * r / 6.0
    elif ACT == _GELU:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == _GELU_TANH:  # gelu (tanh approximation)
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * _sigmoid(2.0 * inner) - 1.0))
    elif ACT == _LEAKY_RELU:  # leaky relu, slope P0
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
