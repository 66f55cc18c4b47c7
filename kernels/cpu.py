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

import functools
import os
import platform
from typing import Callable

import torch
import torch.nn.functional as F

from graphopt.kernels import reference
from graphopt.kernels.activations import ACTS
from graphopt.kernels.reference import parse_act


def inplace_act(act: str) -> tuple[Callable, tuple, dict] | None:
    """(fn, args, kwargs) with fn(y, *args, **kwargs) applying ``act`` to y, in place where torch has an
    in-place form (kernels/activations.py); None for 'none'."""
    name, params = parse_act(act)
    rule = ACTS[name].inplace
    return rule(*params) if rule is not None else None


def onednn_postop(act: str) -> tuple[str, list, str] | None:
    """The oneDNN post-op for ``act`` when its results equal eager's, NaN and inf included; else None."""
    name, params = parse_act(act)
    record = ACTS[name]
    return record.postop(*params) if record.postop is not None and record.nan_exact else None


def clamp_postop(act: str) -> tuple[str, list, str] | None:
    """oneDNN's post-op for relu / relu6 / hardtanh, which maps NaN to 0: exact only on NaN-free values."""
    name, params = parse_act(act)
    record = ACTS[name]
    return record.postop(*params) if record.postop is not None and not record.nan_exact else None


def pack_conv_weight(weight: torch.Tensor, padding: list[int], stride: list[int], dilation: list[int],
                     groups: int, input_shape: list[int]) -> torch.Tensor:
    """Reorder a conv weight once into the blocked layout oneDNN picks for this input shape."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), padding, stride, dilation, groups,
                                                     list(input_shape))


def pack_linear_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Reorder a linear weight once into the blocked layout oneDNN picks for inputs of ``rows`` rows (any other
    row count still runs on it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def has_mkl_linear() -> bool:
    """Does this torch build have MKL's packed GEMM (``mkl::_mkl_linear``, what Inductor's freezing uses)?"""
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


def mkl_gemm_fast() -> bool:
    """Is MKL's float32 GEMM the one to run here? Only where torch has it and the CPU is Intel's (or of a vendor
    this cannot read): MKL runs its AVX-512 kernels on Intel CPUs only, and on others a generic path that oneDNN
    beats (an AMD EPYC, Zen 5: MKL at about 185 GFLOP/s on two cores, oneDNN 0.42-0.45x its time from 128 to
    512 rows, 0.79-0.85x with oneDNN capped at AVX2; bench/kernels.py's "other GEMM" column)."""
    return has_mkl_linear() and cpu_vendor() in ("GenuineIntel", None)


def pack_linear_weight_mkl(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Pack a linear weight once for MKL's GEMM on inputs of exactly ``rows`` rows (``mkl::_mkl_linear`` runs
    other row counts on the plain weight, through aten::linear)."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


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


# ---------------------------------------------------------------- int8
#
# oneDNN's int8 primitives read activations as uint8: the lowering runs every int8 tensor of the
# scheme (kernels/reference.py) shifted by 128, q_u8 = q_i8 + 128 with zero point zp + 128, which
# is the same number on the same grid. Weights stay int8, symmetric, per output channel.
# Without VNNI / AMX, oneDNN adds uint8 x int8 products in pairs into a saturating int16, exact
# for 7-bit weights only: int8_scheme() names the weights exact here, and the kernels below run
# any others on the reference (the lowering, on fp32 oneDNN).

U8_SHIFT = 128

def int8_postop(act: str, linear: bool) -> tuple[str, list, str] | None:
    """oneDNN's int8 post-op for ``act`` (conv or linear primitive); None where it has none. int8 inputs
    carry no NaN, so relu and clip are exact here (kernels/activations.py)."""
    name, params = parse_act(act)
    record = ACTS[name]
    rule = record.qlinear if linear else record.qconv
    if rule is True:
        rule = record.postop
    return rule(*params) if rule else None


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA, or DNNL_MAX_CPU_ISA; any case) under which it has no int8
# dot product, and the ones that allow only AVX-VNNI; every other value (none, ALL, AVX512_CORE_VNNI,
# the AMX ones, a name oneDNN ignores) allows any the CPU has.
_NO_DOT_CAPS = ("SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS")
_AVX_VNNI_CAPS = ("AVX2_VNNI", "AVX2_VNNI_2")


def onednn_isa_cap() -> str | None:
    """The ISA oneDNN is capped at in this process (its environment variable, upper case), or None."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def has_vnni() -> bool:
    """Can oneDNN use int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX) here? The CPU must
    have them and ONEDNN_MAX_CPU_ISA must not cap oneDNN below them."""
    flags, cap = _cpu_flags(), onednn_isa_cap()
    if cap in _NO_DOT_CAPS:
        return False
    if cap in _AVX_VNNI_CAPS:
        return "avx_vnni" in flags
    return cpu_has_int8_dot_products()


def cpu_has_int8_dot_products() -> bool:
    """Does the CPU itself have int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX), whatever
    ONEDNN_MAX_CPU_ISA says (what a library with its own kernels, such as ONNX Runtime's, can use)?"""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


_BELOW_AVX512_CAPS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")


def onednn_avx512() -> bool:
    """Can oneDNN use AVX-512 here? The CPU must have it and ONEDNN_MAX_CPU_ISA must not cap oneDNN below it."""
    return "avx512f" in _cpu_flags() and onednn_isa_cap() not in _BELOW_AVX512_CAPS


def _cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def cpu_vendor() -> str | None:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or None where it cannot be read."""
    return _cpuinfo()[0]


_VENDORS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls")


@functools.lru_cache(maxsize=1)
def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, frozenset[str]]:
    """(vendor, ISA flags) from /proc/cpuinfo; elsewhere the vendor named in platform.processor() (Windows
    writes it there) and no flags."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        named = platform.processor()
        return next((v for v in _VENDORS if v in named), None), frozenset()
    vendor = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")), None)
    flags = frozenset(flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split())
    return vendor or None, flags


def int8_scheme() -> str:
    """The int8 weight scheme (kernels/reference.py) oneDNN computes exactly on this CPU: "s8" with int8
    dot products, else "s7". Decided from the CPU and confirmed on oneDNN itself: a full-range product
    that a saturating int16 pair sum would get wrong."""
    return "s8" if has_vnni() and _full_range_is_exact() else "s7"


S7_EXACT_CODE = 64  # 2 * 255 * 64 = 32640 fits vpmaddubsw's int16 pair sum; 2 * 255 * 65 does not


def exact_here(weight: torch.Tensor) -> bool:
    """Does oneDNN multiply these int8 weight codes exactly on this CPU (any code, or |code| <= 64)?"""
    return weight.numel() == 0 or int8_scheme() == "s8" or int(weight.abs().max()) <= S7_EXACT_CODE


@functools.lru_cache(maxsize=1)
def _full_range_is_exact() -> bool:
    k = 64  # uint8 255 times int8 127, k times: 2_072_640, exact in fp32; pair-saturated: 1_048_544
    try:
        x = torch.full((1, k), 127, dtype=torch.int8)
        w = torch.full((8, k), 127, dtype=torch.int8)
        ones = torch.ones(8)
        linear = _qlinear_onednn(x, 1.0, -128, w, ones, None, "none", None, 0)
        conv = _qconv_onednn(x.view(1, k, 1, 1), 1.0, -128, w.view(8, k, 1, 1), ones, None, [1, 1], [0, 0], [1, 1],
                             1, "none", None, None, 0)
    except RuntimeError:
        return False
    expected = float(255 * 127 * k)
    return bool((linear == expected).all()) and bool((conv == expected).all())


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """fp32 -> uint8 (zero_point already shifted); round half to even, saturate. Keeps x's layout."""
    y = torch.div(x, scale)
    return y.round_().add_(zero_point).clamp_(0, 255).to(torch.uint8)  # (in place: 1.5x faster than out of place)


def dequantize_u8(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return q.to(torch.float32).sub_(zero_point).mul_(scale)


def max_pool2d_u8(x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                  return_indices=False) -> torch.Tensor:
    """Max pooling on uint8 in any layout (aten's rejects channels-last uint8; the output keeps x's layout), one
    spatial dimension at a time: the maximum of the kernel's shifted strided slices along the width, then along
    the height (a 2x2 pool on 64x64x32x32 channels-last: 0.58x the time of the maximum over the kh x kw slices
    of both at once). 0 is uint8's least value, so it pads like -inf does."""
    if return_indices:
        raise ValueError("max_pool2d_u8 returns no indices")
    (kh, kw), (ph, pw), (dh, dw) = (_pair(kernel_size), _pair(padding), _pair(dilation))
    sh, sw = _pair(stride if stride not in (None, []) else kernel_size)
    n, c, h, w = x.shape
    p, q = _pooled(h, kh, sh, ph, dh, ceil_mode), _pooled(w, kw, sw, pw, dw, ceil_mode)
    # padded on the far side too where ceil_mode's last window runs past the input
    tall = max(h + 2 * ph, (p - 1) * sh + dh * (kh - 1) + 1)
    wide = max(w + 2 * pw, (q - 1) * sw + dw * (kw - 1) + 1)
    if (tall, wide) != (h, w):
        padded = torch.empty((n, c, tall, wide), dtype=x.dtype, device=x.device, memory_format=_layout(x)).zero_()
        padded[:, :, ph:ph + h, pw:pw + w] = x
        x = padded
    out = _max_along(_max_along(x, 3, kw, sw, dw, q), 2, kh, sh, dh, p)
    if kh == 1:  # (the last step took no maximum: a view, of the input where the width's took none either)
        out = out.clone(memory_format=_layout(x))
    return out


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _pooled(size: int, k: int, s: int, pad: int, d: int, ceil: bool) -> int:
    """The pooled size, as aten computes it (ceil_mode: a last window must start inside the input or its padding
    on the near side)."""
    span = size + 2 * pad - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    return out - 1 if ceil and (out - 1) * s >= size + pad else out


def _max_along(x: torch.Tensor, dim: int, k: int, s: int, d: int, n: int) -> torch.Tensor:
    """The maximum over ``k`` windows along ``dim`` (dilation ``d``, stride ``s``, ``n`` of them): a new tensor in
    x's layout, or a view of x where k is 1."""
    out = None
    for i in range(k):
        window = x.narrow(dim, i * d, s * (n - 1) + 1)
        window = window[:, :, :, ::s] if dim == 3 else window[:, :, ::s]
        if out is None:
            out = window
        elif i == 1:
            out = torch.maximum(out, window)
        else:
            torch.maximum(out, window, out=out)
    return out


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _u8(x: torch.Tensor) -> torch.Tensor:
    return (x.to(torch.int16) + U8_SHIFT).to(torch.uint8)


def _from_u8(y: torch.Tensor) -> torch.Tensor:
    return (y.to(torch.int16) - U8_SHIFT).to(torch.int8) if y.dtype == torch.uint8 else y


def qconv2d_act(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, act, residual=None,
                out_scale=None, out_zp=0):
    """The int8 scheme's conv on oneDNN, weights packed per call (the lowering packs them once instead).
    Weights oneDNN would not multiply exactly on this CPU run the integer reference instead."""
    run = _qconv_onednn if exact_here(weight) else reference.qconv2d_act
    return run(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, act, residual, out_scale,
               out_zp)


def _qconv_onednn(x, x_scale, x_zp, weight, w_scale, bias, stride, padding, dilation, groups, act, residual,
                  out_scale, out_zp):
    xu = _u8(x).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.onednn.qconv_prepack(weight, w_scale.float(), x_scale, x_zp + U8_SHIFT, stride, padding,
                                            dilation, groups, list(x.shape))
    zeros = torch.zeros(weight.shape[0], dtype=torch.int64)
    postop = int8_postop(act, linear=False)
    if residual is None and postop is not None and out_scale is not None:
        y = torch.ops.onednn.qconv2d_pointwise(xu, x_scale, x_zp + U8_SHIFT, packed, w_scale.float(), zeros, bias,
                                               stride, padding, dilation, groups, out_scale, out_zp + U8_SHIFT, None,
                                               *postop)
        return _from_u8(y).contiguous()
    y = torch.ops.onednn.qconv2d_pointwise(xu, x_scale, x_zp + U8_SHIFT, packed, w_scale.float(), zeros, bias, stride,
                                           padding, dilation, groups, 1.0, 0, torch.float32, "none", [], "")
    y = _epilogue(y, act, residual).contiguous()
    return y if out_scale is None else torch.clamp(torch.round(y / out_scale) + out_zp, -128, 127).to(torch.int8)


def qlinear_act(x, x_scale, x_zp, weight, w_scale, bias, act, out_scale=None, out_zp=0):
    """The int8 scheme's linear on oneDNN; weights it would not multiply exactly here run the reference."""
    run = _qlinear_onednn if exact_here(weight) else reference.qlinear_act
    return run(x, x_scale, x_zp, weight, w_scale, bias, act, out_scale, out_zp)


def _qlinear_onednn(x, x_scale, x_zp, weight, w_scale, bias, act, out_scale, out_zp):
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    zeros = torch.zeros(weight.shape[0], dtype=torch.int64)
    postop = int8_postop(act, linear=True)
    if postop is not None and out_scale is not None:
        y = torch.ops.onednn.qlinear_pointwise(_u8(x), x_scale, x_zp + U8_SHIFT, packed, w_scale.float(), zeros, bias,
                                               out_scale, out_zp + U8_SHIFT, None, *postop)
        return _from_u8(y)
    y = torch.ops.onednn.qlinear_pointwise(_u8(x), x_scale, x_zp + U8_SHIFT, packed, w_scale.float(), zeros, bias,
                                           1.0, 0, torch.float32, "none", [], "")
    y = _epilogue(y, act)
    return y if out_scale is None else torch.clamp(torch.round(y / out_scale) + out_zp, -128, 127).to(torch.int8)
