"""conv2d_act on Triton: an implicit-GEMM convolution on NHWC activations.

    GEMM rows    M = N * P * Q        (one per output pixel)
    GEMM columns Kg = K / groups      (output channels of a group; grid axis 2 runs the groups)
    reduction    R * S * Cg           (filter taps x input channels of the group)

The weight is laid out (groups, R * S * Cg, Kg) so that its tiles load contiguously; bias,
residual add and activation run in the epilogue. The output is NHWC memory (channels-last).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.kernels.reference import conv_out_size
from graphopt.kernels.triton.activations import act_code, apply_act

CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]


@triton.autotune(configs=INTERPRET_CONFIGS if os.environ.get("TRITON_INTERPRET") == "1" else CONFIGS,
                 key=["M", "KG", "RSC"])
@triton.jit
def _conv2d_act_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
                       M, H, W, C, P, Q, K, KG, CG, RSC, S,
                       STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, P0, P1,
                       HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output pixels
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channels within the group
    n_img = rm // (P * Q)
    oh = (rm // Q) % P
    ow = rm % Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, RSC, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # (r, s, c) flattened, c fastest
        c = rk % CG
        s = (rk // CG) % S
        r = rk // (CG * S)
        ih = oh[:, None] * STRIDE_H - PAD_H + r[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + s[None, :] * DIL_W
        inside = (rm[:, None] < M) & (rk[None, :] < RSC) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + ((n_img[:, None] * H + ih) * W + iw) * C + group * CG + c[None, :], mask=inside,
                    other=0.0)
        b = tl.load(w_ptr + (group * RSC + rk[:, None]) * KG + rn[None, :],
                    mask=(rk[:, None] < RSC) & (rn[None, :] < KG), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    channel = group * KG + rn
    out_mask = (rm[:, None] < M) & (rn[None, :] < KG)
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=rn < KG, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + rm[:, None] * K + channel[None, :], mask=out_mask, other=0.0).to(tl.float32)
    acc = apply_act(acc, ACT, P0, P1)
    tl.store(y_ptr + rm[:, None] * K + channel[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def prepare_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(K, Cg, R, S) -> (groups, R * S * Cg, K / groups): the GEMM's B operand, once per weight."""
    k, cg, r, s = weight.shape
    return weight.reshape(groups, k // groups, cg, r, s).permute(0, 3, 4, 2, 1).reshape(groups, r * s * cg,
                                                                                          k // groups).contiguous()


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
               padding: list[int], dilation: list[int], groups: int, act: str,
               residual: torch.Tensor | None = None, w_gemm: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's signature; ``w_gemm`` is ``prepare_weight(weight, groups)`` done ahead of time."""
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    if c != cg * groups or k % groups:
        raise ValueError(f"conv2d_act: x {tuple(x.shape)}, weight {tuple(weight.shape)} and groups={groups} "
                         "do not match")
    p = conv_out_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_out_size(w, s, stride[1], padding[1], dilation[1])
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C)
    w_gemm = prepare_weight(weight, groups) if w_gemm is None else w_gemm
    y = torch.empty((n, p, q, k), device=x.device, dtype=x.dtype)  # NHWC
    res = residual.permute(0, 2, 3, 1).contiguous() if residual is not None else y
    code, p0, p1 = act_code(act)
    m, kg, rsc = n * p * q, k // groups, r * s * cg

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kg, meta["BLOCK_N"]), groups)

    _conv2d_act_kernel[grid](x_nhwc, w_gemm, bias if bias is not None else w_gemm, res, y,
                             m, h, w, c, p, q, k, kg, cg, rsc, s, stride[0], stride[1], padding[0], padding[1],
                             dilation[0], dilation[1], p0, p1,
                             HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACT=code)
    return y.permute(0, 3, 1, 2)  # (N, K, P, Q) in channels-last memory
