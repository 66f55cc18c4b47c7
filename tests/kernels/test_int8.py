"""The int8 kernels against the scheme's reference (kernels/reference.py) and a fake-quant oracle.

The weights are quantized with the scheme this CPU's oneDNN computes exactly (s8 with VNNI / AMX,
s7 without); ``test_the_kernels_pass_under_avx2`` runs this file again with oneDNN capped at AVX2,
so both schemes' kernels are tested on any x86 machine, against the same floors.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graphopt.compiler.core.verify import sqnr
from graphopt.kernels import cpu, reference
from graphopt.kernels.activations import EXAMPLES
from graphopt.kernels.reference import SCHEMES, activation_qparams, weight_qparams

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


def _weights(weight):
    """The weights as optimize() would quantize them for this CPU."""
    return weight_qparams(weight, SCHEMES[cpu.int8_scheme()])

# (N, C, H, W, K, R, stride, padding, dilation, groups): odd sizes, depthwise, dilated, 1x1
CONVS = [
    (1, 3, 7, 9, 5, 3, 1, 1, 1, 1),
    (2, 6, 11, 13, 10, 3, 2, 1, 1, 2),
    (3, 8, 9, 9, 8, 3, 1, 2, 2, 8),
    (1, 17, 5, 6, 33, 1, 1, 0, 1, 1),
    (2, 4, 15, 4, 7, 5, 2, 2, 1, 1),
]
ACTS = list(EXAMPLES)


def _int8_conv_case(case, seed=0):
    n, c, h, w, k, r, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c // groups, r, r, generator=g) * 0.3
    bias = torch.randn(k, generator=g)
    x_scale, x_zp = activation_qparams(float(x.min()), float(x.max()))
    wq, w_scale = _weights(weight)
    xq = reference.quantize(x, x_scale, x_zp)
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2, groups)
    return xq, x_scale, x_zp, wq, w_scale, bias, geometry


def _fake_quant_conv(xq, x_scale, x_zp, wq, w_scale, bias, geometry, act, residual=None):
    """The same arithmetic in fp64 on dequantized tensors: what int8 should approximate to fp rounding."""
    x = (xq.double() - x_zp) * x_scale
    w = wq.double() * w_scale.double().view(-1, 1, 1, 1)
    y = F.conv2d(x, w, bias.double(), *geometry)
    return reference.apply_act(y if residual is None else y + residual.double(), act)


@pytest.mark.parametrize("case", CONVS, ids=str)
def test_reference_integer_core_is_exact(case):
    xq, x_scale, x_zp, wq, w_scale, bias, (stride, padding, dilation, groups) = _int8_conv_case(case)
    # the integer accumulation, independently: int64 im2col, per group
    n, c, h, w = xq.shape
    k, cg, r, s = wq.shape
    cols = F.unfold(xq.double() - x_zp, (r, s), dilation, padding, stride).round().long()  # (N, C*R*S, L)
    cols = cols.view(n, groups, cg * r * s, -1)
    wg = wq.long().view(groups, k // groups, cg * r * s)
    acc = torch.einsum("gkj,ngjl->ngkl", wg, cols).reshape(n, k, -1)
    y = reference.qconv2d_act(xq, x_scale, x_zp, wq, torch.ones(k), None, stride, padding, dilation, groups, "none",
                              None, None, 0)
    expected = acc.double() * x_scale
    torch.testing.assert_close(y.double().reshape(n, k, -1), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_cpu_qconv_matches_fake_quant(case, act):
    xq, x_scale, x_zp, wq, w_scale, bias, geometry = _int8_conv_case(case)
    expected = _fake_quant_conv(xq, x_scale, x_zp, wq, w_scale, bias, geometry, act)
    got = cpu.qconv2d_act(xq, x_scale, x_zp, wq, w_scale, bias, *geometry, act, None, None, 0)
    assert got.dtype == torch.float32
    assert sqnr(expected, got) >= 60.0
    ref = reference.qconv2d_act(xq, x_scale, x_zp, wq, w_scale, bias, *geometry, act, None, None, 0)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_cpu_qconv_int8_output_and_residual(case, act):
    xq, x_scale, x_zp, wq, w_scale, bias, geometry = _int8_conv_case(case, seed=1)
    shape = reference.qconv2d_act(xq, x_scale, x_zp, wq, w_scale, bias, *geometry, "none", None, None, 0).shape
    residual = torch.randn(shape)
    fake = _fake_quant_conv(xq, x_scale, x_zp, wq, w_scale, bias, geometry, act, residual)
    out_scale, out_zp = activation_qparams(float(fake.min()), float(fake.max()))
    got = cpu.qconv2d_act(xq, x_scale, x_zp, wq, w_scale, bias, *geometry, act, residual, out_scale, out_zp)
    ref = reference.qconv2d_act(xq, x_scale, x_zp, wq, w_scale, bias, *geometry, act, residual, out_scale, out_zp)
    assert got.dtype == ref.dtype == torch.int8
    diff = (got.int() - ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01  # requantization rounding only
    assert sqnr(fake, reference.dequantize(got, out_scale, out_zp)) >= 30.0  # one int8 step of noise


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "tanh", "sigmoid", "leaky_relu:0.1"])
@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (2, 3, 64)])
def test_cpu_qlinear_matches_fake_quant(shape, act):
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(*shape, generator=g), torch.randn(13, shape[-1], generator=g), torch.randn(13)
    x_scale, x_zp = activation_qparams(float(x.min()), float(x.max()))
    xq, (wq, w_scale) = reference.quantize(x, x_scale, x_zp), _weights(weight)
    fake = reference.apply_act(F.linear((xq.double() - x_zp) * x_scale, wq.double() * w_scale.double()[:, None],
                                        bias.double()), act)
    got = cpu.qlinear_act(xq, x_scale, x_zp, wq, w_scale, bias, act, None, 0)
    assert sqnr(fake, got) >= 60.0
    out_scale, out_zp = activation_qparams(float(fake.min()), float(fake.max()))
    q = cpu.qlinear_act(xq, x_scale, x_zp, wq, w_scale, bias, act, out_scale, out_zp)
    ref = reference.qlinear_act(xq, x_scale, x_zp, wq, w_scale, bias, act, out_scale, out_zp)
    assert int((q.int() - ref.int()).abs().max()) <= 1


def test_saturation_at_the_int8_limits():
    y = torch.tensor([-1e9, -200.0, -128.6, -128.4, -0.5, 0.5, 1.5, 126.6, 127.4, 300.0, 1e9])
    assert reference.requantize(y, 1.0, 0).tolist() == [-128, -128, -128, -128, 0, 0, 2, 127, 127, 127, 127]
    # and through a kernel: outputs far outside the output range clamp, they do not wrap
    xq = torch.full((1, 2, 3, 3), 127, dtype=torch.int8)
    wq = torch.full((4, 2, 1, 1), 127, dtype=torch.int8)
    ones = torch.ones(4)
    big = cpu.qconv2d_act(xq, 1.0, 0, wq, ones, None, [1, 1], [0, 0], [1, 1], 1, "none", None, 1.0, 0)
    small = cpu.qconv2d_act(xq, 1.0, 0, -wq, ones, None, [1, 1], [0, 0], [1, 1], 1, "none", None, 1.0, 0)
    assert torch.all(big == 127) and torch.all(small == -128)
    assert torch.equal(cpu.quantize_u8(torch.tensor([-1e9, 1e9]), 1.0, 128), torch.tensor([0, 255], dtype=torch.uint8))


def test_an_all_zero_weight_channel_keeps_a_positive_scale():
    weight = torch.randn(4, 3, 3, 3)
    weight[2] = 0
    wq, scale = weight_qparams(weight)
    assert torch.all(scale > 0) and torch.all(wq[2] == 0)
    assert torch.equal(wq[0].abs().max(), torch.tensor(127, dtype=torch.int8))
    xq = torch.randint(-128, 127, (1, 3, 5, 5), dtype=torch.int8)
    y = cpu.qconv2d_act(xq, 0.1, 0, wq, scale, None, [1, 1], [1, 1], [1, 1], 1, "none", None, None, 0)
    assert torch.all(y[:, 2] == 0) and y.isfinite().all()


@pytest.mark.parametrize("value", [0.0, 3.5, -2.0, 1e-20])
def test_a_constant_activation_keeps_a_positive_scale(value):
    scale, zp = activation_qparams(value, value)
    assert scale > 0 and -128 <= zp <= 127
    x = torch.full((10,), value)
    back = reference.dequantize(reference.quantize(x, scale, zp), scale, zp)
    torch.testing.assert_close(back, x, atol=scale / 2 + 1e-12, rtol=0)
    # zero is always exact: zero padding of a quantized convolution must stay zero
    assert reference.dequantize(reference.quantize(torch.zeros(1), scale, zp), scale, zp).item() == 0.0


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("args", [(3, 2, 1, 1), (2, None, 0, 1), (3, 1, 1, 2), ((2, 3), (1, 2), (1, 1), 1),
                                  (3, 2, 0, 1, True), (2, 2, 0, 1, True), ((3, 2), (2, 3), (1, 0), (2, 1), True),
                                  (1, 1, 0, 1), ((1, 3), (2, 1), 0, 1), ((3, 1), 1, (1, 0), 1), (1, 2, 0, 1, True),
                                  (2, 3, 1, 1, True), (3, 3, 1, 1, True)])  # (ceil_mode's last window dropped)
def test_max_pool_u8_matches_aten_in_any_layout_and_keeps_the_layout(layout, args):
    x = torch.randint(0, 256, (2, 5, 11, 13), dtype=torch.uint8).contiguous(memory_format=layout)
    got = cpu.max_pool2d_u8(x, *args)
    assert torch.equal(got, F.max_pool2d(x.float(), *args).to(torch.uint8))
    assert got.is_contiguous(memory_format=layout)
    assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # (never a view of the input)


def test_max_pool_u8_returns_no_indices():
    with pytest.raises(ValueError, match="indices"):
        cpu.max_pool2d_u8(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), 2, return_indices=True)


def test_seven_bit_weights_stay_within_63_and_keep_their_scale():
    weight = torch.randn(6, 5, 3, 3)
    weight[4] = 0
    q8, s8 = weight_qparams(weight, 8)
    q7, s7 = weight_qparams(weight, 7)
    assert int(q7.abs().max()) == 63 and torch.equal(q7[4], torch.zeros_like(q7[4]))
    torch.testing.assert_close(s7[:4], s8[:4] * 127 / 63)
    assert s7[4] == 1.0
    torch.testing.assert_close(q7.float() * s7.view(-1, 1, 1, 1), weight, atol=float(s7.max()) / 2, rtol=0)
    with pytest.raises(ValueError, match="bits"):
        weight_qparams(weight, 4)


def test_8_bit_weights_are_exact_on_any_cpu():
    """The issue's case (5x256 @ 256x13, full-range activations): 27.8 dB on AVX2 with oneDNN's int8; a CPU
    without VNNI runs 8-bit weights through the reference, one with VNNI through oneDNN."""
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(5, 256, generator=g), torch.randn(13, 256, generator=g), torch.randn(13)
    x_scale, x_zp = activation_qparams(float(x.min()), float(x.max()))
    xq, (wq, w_scale) = reference.quantize(x, x_scale, x_zp), weight_qparams(weight, 8)
    fake = F.linear((xq.double() - x_zp) * x_scale, wq.double() * w_scale.double()[:, None], bias.double())
    assert sqnr(fake, cpu.qlinear_act(xq, x_scale, x_zp, wq, w_scale, bias, "none", None, 0)) >= 60.0
    conv = cpu.qconv2d_act(xq.view(5, 256, 1, 1), x_scale, x_zp, wq.view(13, 256, 1, 1), w_scale, bias, [1, 1], [0, 0],
                           [1, 1], 1, "none", None, None, 0)
    assert sqnr(fake, conv.view(5, 13)) >= 60.0


def test_the_scheme_follows_onednn_isa_cap(monkeypatch):
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, vnni in [(None, True), ("avx2", False), ("AVX512_CORE", False), ("AVX2_VNNI", False),
                      ("AVX512_CORE_VNNI", True), ("ALL", True)]:
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu.has_vnni() is vnni, cap
        if not vnni:
            assert cpu.int8_scheme() == "s7"  # (whatever oneDNN itself does in this process)


@pytest.mark.parametrize("flags, cap, avx512", [({"avx2"}, None, False), ({"avx2", "avx512f"}, None, True),
                                                ({"avx2", "avx512f"}, "avx2", False),
                                                ({"avx2", "avx512f"}, "AVX2_VNNI", False),
                                                ({"avx2", "avx512f"}, "AVX512_CORE", True)])
def test_onednns_avx512_follows_the_cpu_and_its_isa_cap(monkeypatch, flags, cap, avx512):
    """(The fp32 linear lowering keeps oneDNN's GELU-tanh post-op only with AVX-512: passes/lower_to_onednn.py.)"""
    monkeypatch.setattr(cpu, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu.onednn_avx512() is avx512


@pytest.mark.skipif(not X86 or cpu.onednn_isa_cap() is not None, reason="needs an x86 CPU and no ISA cap already")
def test_the_scheme_is_s8_with_vnni_and_s7_under_avx2():
    assert cpu.int8_scheme() == ("s8" if cpu.has_vnni() else "s7")
    out = subprocess.run([sys.executable, "-c", "from graphopt.kernels import cpu; print(cpu.int8_scheme())"],
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "s7", out.stderr[-2000:]


@pytest.mark.skipif(not X86 or cpu.onednn_isa_cap() is not None, reason="needs an x86 CPU and no ISA cap already")
def test_the_kernels_pass_under_avx2():
    """This file again in a fresh process with oneDNN capped at AVX2 (set before torch loads oneDNN): the
    int8 kernels of a CPU without VNNI, against the same references and floors."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not under_avx2 and not s7_under_avx2"],
                         cwd=root, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
