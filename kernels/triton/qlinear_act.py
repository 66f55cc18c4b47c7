"""qlinear_act on Triton: int8 x int8 -> int32 GEMM, then the dequantize / bias / activation /
requantize epilogue (the scheme in kernels/reference.py). The activation zero point is taken
out after the GEMM: sum_k (x_k - zp) w_k = sum_k x_k w_k - zp * sum_k w_k."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.kernels.triton.activations import act_code, apply_act, requantize

CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]


@triton.autotune(configs=INTERPRET_CONFIGS if os.environ.get("TRITON_INTERPRET") == "1" else CONFIGS,
                 key=["M", "N", "K"])
@triton.jit
def _qlinear_act_kernel(x_ptr, w_ptr, colsum_ptr, w_scale_ptr, b_ptr, y_ptr, M, N, K, X_SCALE, X_ZP,
                        OUT_SCALE, OUT_ZP, P0, P1,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, QUANT_OUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0)
        b = tl.load(w_ptr + rn[None, :] * K + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0)
        acc += tl.dot(a, b)
    acc -= X_ZP * tl.load(colsum_ptr + rn, mask=rn < N, other=0)[None, :]
    scale = X_SCALE * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    y = apply_act(y, ACT, P0, P1)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if QUANT_OUT:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], requantize(y, OUT_SCALE, OUT_ZP), mask=mask)
    else:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y, mask=mask)


def qlinear_act(x: torch.Tensor, x_scale: float, x_zp: int, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, act: str, out_scale: float | None = None, out_zp: int = 0) -> torch.Tensor:
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError("qlinear_act takes int8 activations and weights")
    lead, k, n = x.shape[:-1], weight.shape[1], weight.shape[0]
    x2, w = x.reshape(-1, k).contiguous(), weight.contiguous()
    colsum = w.to(torch.int32).sum(dim=1, dtype=torch.int32)
    scales = w_scale.to(torch.float32).contiguous()
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=torch.int8 if out_scale is not None else torch.float32)
    code, p0, p1 = act_code(act)
    m = x2.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _qlinear_act_kernel[grid](x2, w, colsum, scales, bias.float() if bias is not None else scales, y, m, n, k,
                              float(x_scale), int(x_zp), float(out_scale or 1.0), int(out_zp), p0, p1,
                              HAS_BIAS=bias is not None, ACT=code, QUANT_OUT=out_scale is not None)
    return y.reshape(*lead, n)
