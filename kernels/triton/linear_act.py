"""linear_act on Triton: y = act(x @ W.T + b), a tiled GEMM with the bias and activation in the
epilogue; fp32 accumulation whatever the input dtype."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.kernels.triton.activations import act_code, apply_act

CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# the interpreter runs every config it is given: one small one is enough to test the logic
INTERPRET_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]


@triton.autotune(configs=INTERPRET_CONFIGS if os.environ.get("TRITON_INTERPRET") == "1" else CONFIGS,
                 key=["M", "N", "K"])
@triton.jit
def _linear_act_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, P0, P1,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + rn[None, :] * K + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    acc = apply_act(acc, ACT, P0, P1)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_act: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match")
    lead, k, n = x.shape[:-1], weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    w = weight.contiguous()  # (N, K)
    y = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    code, p0, p1 = act_code(act)
    m = x2.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _linear_act_kernel[grid](x2, w, bias if bias is not None else w, y, m, n, k, p0, p1,
                             HAS_BIAS=bias is not None, ACT=code)
    return y.reshape(*lead, n)
