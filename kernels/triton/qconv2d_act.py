"""qconv2d_act on Triton: the implicit-GEMM convolution of conv2d_act.py on int8 NHWC activations
and int8 weights, int32 accumulation, and the dequantize / bias / residual / activation /
requantize epilogue (the scheme in kernels/reference.py). Padding reads the activation zero
point (the int8 code of 0.0); the zero point is taken out after the GEMM with the weights'
per-channel sums."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.kernels.reference import conv_out_size
from graphopt.kernels.triton.activations import act_code, apply_act, requantize
from graphopt.kernels.triton.conv2d_act import prepare_weight

CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]


@triton.autotune(configs=INTERPRET_CONFIGS if os.environ.get("TRITON_INTERPRET") == "1" else CONFIGS,
                 key=["M", "KG", "RSC"])
@triton.jit
def _qconv2d_act_kernel(x_ptr, w_ptr, colsum_ptr, w_scale_ptr, b_ptr, r_ptr, y_ptr,
                        M, H, W, C, P, Q, K, KG, CG, RSC, S,
                        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                        X_SCALE, X_ZP, OUT_SCALE, OUT_ZP, P0, P1,
                        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                        QUANT_OUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_img = rm // (P * Q)
    oh = (rm // Q) % P
    ow = rm % Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, RSC, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        c = rk % CG
        s = (rk // CG) % S
        r = rk // (CG * S)
        ih = oh[:, None] * STRIDE_H - PAD_H + r[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + s[None, :] * DIL_W
        real = (rm[:, None] < M) & (rk[None, :] < RSC)
        inside = real & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + ((n_img[:, None] * H + ih) * W + iw) * C + group * CG + c[None, :], mask=inside,
                    other=0)
        a = tl.where(real & ~inside, X_ZP, a).to(tl.int8)  # padding holds the code of 0.0
        b = tl.load(w_ptr + (group * RSC + rk[:, None]) * KG + rn[None, :],
                    mask=(rk[:, None] < RSC) & (rn[None, :] < KG), other=0)
        acc += tl.dot(a, b)
    channel = group * KG + rn
    acc -= X_ZP * tl.load(colsum_ptr + channel, mask=rn < KG, other=0)[None, :]
    y = acc.to(tl.float32) * (X_SCALE * tl.load(w_scale_ptr + channel, mask=rn < KG, other=0.0))[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < KG)
    if HAS_BIAS:
        y += tl.load(b_ptr + channel, mask=rn < KG, other=0.0)[None, :]
    if HAS_RESIDUAL:
        y += tl.load(r_ptr + rm[:, None] * K + channel[None, :], mask=out_mask, other=0.0)
    y = apply_act(y, ACT, P0, P1)
    if QUANT_OUT:
        tl.store(y_ptr + rm[:, None] * K + channel[None, :], requantize(y, OUT_SCALE, OUT_ZP), mask=out_mask)
    else:
        tl.store(y_ptr + rm[:, None] * K + channel[None, :], y, mask=out_mask)


def qconv2d_act(x: torch.Tensor, x_scale: float, x_zp: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
                act: str, residual: torch.Tensor | None = None, out_scale: float | None = None,
                out_zp: int = 0) -> torch.Tensor:
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError("qconv2d_act takes int8 activations and weights")
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    p = conv_out_size(h, r, stride[0], padding[0], dilation[0])
    q = conv_out_size(w, s, stride[1], padding[1], dilation[1])
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    w_gemm = prepare_weight(weight, groups)
    colsum = weight.to(torch.int32).sum(dim=(1, 2, 3), dtype=torch.int32)
    scales = w_scale.to(torch.float32).contiguous()
    y = torch.empty((n, p, q, k), device=x.device, dtype=torch.int8 if out_scale is not None else torch.float32)
    res = residual.float().permute(0, 2, 3, 1).contiguous() if residual is not None else scales
    code, p0, p1 = act_code(act)
    m, kg, rsc = n * p * q, k // groups, r * s * cg

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kg, meta["BLOCK_N"]), groups)

    _qconv2d_act_kernel[grid](x_nhwc, w_gemm, colsum, scales, bias.float() if bias is not None else scales, res, y,
                              m, h, w, c, p, q, k, kg, cg, rsc, s, stride[0], stride[1], padding[0], padding[1],
                              dilation[0], dilation[1], float(x_scale), int(x_zp), float(out_scale or 1.0),
                              int(out_zp), p0, p1, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                              ACT=code, QUANT_OUT=out_scale is not None)
    return y.permute(0, 3, 1, 2)
