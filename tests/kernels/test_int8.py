"""The int8 kernels against the scheme's reference (kernels/reference.py) and a fake-quant oracle."""

import pytest
import torch
import torch.nn.functional as F

from graphopt.compiler.core.verify import sqnr
from graphopt.kernels import cpu, reference
from graphopt.kernels.reference import activation_qparams, weight_qparams

# (N, C, H, W, K, R, stride, padding, dilation, groups): odd sizes, depthwise, dilated, 1x1
CONVS = [
    (1, 3, 7, 9, 5, 3, 1, 1, 1, 1),
    (2, 6, 11, 13, 10, 3, 2, 1, 1, 2),
    (3, 8, 9, 9, 8, 3, 1, 2, 2, 8),
    (1, 17, 5, 6, 33, 1, 1, 0, 1, 1),
    (2, 4, 15, 4, 7, 5, 2, 2, 1, 1),
]
ACTS = ["none", "relu", "relu6", "hardtanh:-1.0:2.0", "hardswish", "silu", "gelu", "sigmoid", "leaky_relu:0.1"]


def _int8_conv_case(case, seed=0):
    n, c, h, w, k, r, stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c // groups, r, r, generator=g) * 0.3
    bias = torch.randn(k, generator=g)
    x_scale, x_zp = activation_qparams(float(x.min()), float(x.max()))
    wq, w_scale = weight_qparams(weight)
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
    xq, (wq, w_scale) = reference.quantize(x, x_scale, x_zp), weight_qparams(weight)
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


def test_max_pool_u8_matches_aten_in_any_layout():
    x = torch.randint(0, 256, (2, 5, 11, 13), dtype=torch.uint8)
    for layout in (torch.contiguous_format, torch.channels_last):
        for args in [(3, 2, 1, 1), (2, None, 0, 1), (3, 1, 1, 2), ((2, 3), (1, 2), (1, 1), 1)]:
            got = cpu.max_pool2d_u8(x.contiguous(memory_format=layout), *args)
            assert torch.equal(got, F.max_pool2d(x.float(), *args).to(torch.uint8))
