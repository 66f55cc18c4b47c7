"""The Triton kernels against the reference, in Triton's interpreter on CPU tensors (no GPU needed),
over odd shapes, every activation, residuals, groups and every edge of the tiles (16 here)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # (tests/conftest.py sets it first for the whole run)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import graphopt.kernels.triton as kt  # noqa: E402
from graphopt.kernels import reference  # noqa: E402
from graphopt.kernels.activations import EXAMPLES  # noqa: E402

ACTS = list(EXAMPLES)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-4, atol=1e-4)}

# (N, C, H, W, K, (R, S), stride, padding, dilation, groups): odd sizes, 1, tile +- 1, non-square
CONVS = [
    (1, 1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (2, 3, 7, 5, 17, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (1, 8, 9, 11, 8, (3, 3), (2, 2), (1, 1), (1, 1), 8),      # depthwise, stride 2
    (1, 6, 13, 6, 15, (3, 1), (1, 2), (1, 0), (2, 1), 3),     # grouped, dilated, non-square filter
    (1, 17, 4, 4, 16, (1, 1), (1, 1), (0, 0), (1, 1), 1),     # reduction of 17 = tile + 1
    (3, 5, 3, 17, 7, (5, 5), (1, 1), (2, 2), (1, 1), 1),      # 5x5, output rows 3*3*17 = 153
    (1, 2, 127, 3, 3, (3, 3), (1, 1), (1, 1), (1, 1), 1),     # 127 rows: many tiles, a ragged last one
]


def _conv_case(case, dtype=torch.float32):
    n, c, h, w, k, (r, s), stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(k, c // groups, r, s, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(k, generator=g, dtype=dtype)
    return x, weight, bias, list(stride), list(padding), list(dilation), groups


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv2d_act_matches_reference(case, with_residual):
    x, w, b, stride, padding, dilation, groups = _conv_case(case)
    y_ref = reference.conv2d_act(x, w, b, stride, padding, dilation, groups, "none", None)
    r = torch.randn_like(y_ref) if with_residual else None
    for act in (ACTS if case is CONVS[1] else ["relu", "silu"]):
        want = reference.conv2d_act(x, w, b, stride, padding, dilation, groups, act, r)
        got = kt.conv2d_act(x, w, b, stride, padding, dilation, groups, act, r)
        torch.testing.assert_close(got, want, **TOL[torch.float32], msg=lambda m: f"{act}: {m}")


def test_conv2d_act_without_bias_and_in_float64():
    x, w, b, stride, padding, dilation, groups = _conv_case(CONVS[3], torch.float64)
    want = reference.conv2d_act(x, w, None, stride, padding, dilation, groups, "gelu", None)
    got = kt.conv2d_act(x, w, None, stride, padding, dilation, groups, "gelu", None)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 17), (2, 5, 16, 15), (17, 33, 1), (16, 16, 16), (2, 127, 3)])
@pytest.mark.parametrize("act", ACTS)
def test_linear_act_matches_reference(shape, act):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g) * 0.3, torch.randn(n, generator=g)
    torch.testing.assert_close(kt.linear_act(x, w, b, act), reference.linear_act(x, w, b, act), **TOL[torch.float32])
    torch.testing.assert_close(kt.linear_act(x, w, None, act), reference.linear_act(x, w, None, act),
                               **TOL[torch.float32])


def test_nan_and_inf_propagate_like_eager():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 2.0]])
    eye = torch.eye(6)
    for act in ACTS:
        if act.startswith("gelu") or act in ("silu", "hardswish", "tanh"):
            continue  # inf * 0 forms: eager itself differs by code path (README: guarantees)
        torch.testing.assert_close(kt.linear_act(x, eye, None, act), reference.linear_act(x, eye, None, act),
                                   equal_nan=True, msg=lambda m: f"{act}: {m}")


def test_prepared_weight_gives_the_same_answer():
    from graphopt.kernels.triton.conv2d_act import prepare_weight

    x, w, b, stride, padding, dilation, groups = _conv_case(CONVS[3])
    plain = kt.conv2d_act(x, w, b, stride, padding, dilation, groups, "relu", None)
    prepared = kt.conv2d_act(x, w, b, stride, padding, dilation, groups, "relu", None,
                             w_gemm=prepare_weight(w, groups))
    assert torch.equal(plain, prepared)


def test_optimize_with_the_triton_backend_end_to_end():
    from graphopt import optimize
    from tests.helpers import randomize_bn
    from tests.zoo import ZOO

    make, inputs = ZOO["resnet_blocks"]
    model = randomize_bn(make()).eval()
    x = inputs(1)
    opt = optimize(model, (x,), backend="triton")
    assert "kernels_triton" in opt.code or "triton" in opt.code
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-4)
    assert any(r.name == "lower_to_triton" and r.rewrites == 11 for r in opt.report)


# ---------------------------------------------------------------- int8

def _q(shape, g, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, dtype=torch.int8, generator=g)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 17), (17, 33, 16), (2, 5, 40, 9)])
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "silu", "gelu"])
@pytest.mark.parametrize("out_scale", [None, 0.05])
def test_qlinear_act_is_exact_against_the_integer_reference(shape, act, out_scale):
    *lead, k, n = shape
    g = torch.Generator().manual_seed(2)
    x, w = _q((*lead, k), g), _q((n, k), g, -127)
    w_scale, bias = torch.rand(n, generator=g) * 0.01 + 1e-3, torch.randn(n, generator=g)
    got = kt.qlinear_act(x, 0.02, 5, w, w_scale, bias, act, out_scale, -3)
    want = reference.qlinear_act(x, 0.02, 5, w, w_scale, bias, act, out_scale, -3)
    if out_scale is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert got.dtype == torch.int8 and (got.int() - want.int()).abs().max() <= 1   # +-1 LSB


@pytest.mark.parametrize("case", CONVS[1:4])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("out_scale", [None, 0.1])
def test_qconv2d_act_is_exact_against_the_integer_reference(case, with_residual, out_scale):
    n, c, h, w, k, (r, s), stride, padding, dilation, groups = case
    g = torch.Generator().manual_seed(3)
    x, weight = _q((n, c, h, w), g), _q((k, c // groups, r, s), g, -127)
    w_scale, bias = torch.rand(k, generator=g) * 0.01 + 1e-3, torch.randn(k, generator=g)
    args = (list(stride), list(padding), list(dilation), groups)
    y = reference.qconv2d_act(x, 0.03, -9, weight, w_scale, bias, *args, "none")
    residual = torch.randn(y.shape, generator=g) if with_residual else None
    got = kt.qconv2d_act(x, 0.03, -9, weight, w_scale, bias, *args, "relu", residual, out_scale, 2)
    want = reference.qconv2d_act(x, 0.03, -9, weight, w_scale, bias, *args, "relu", residual, out_scale, 2)
    if out_scale is None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert (got.int() - want.int()).abs().max() <= 1


def test_int8_saturation_zero_channel_constant_input_and_ties():
    g = torch.Generator().manual_seed(4)
    x, w = _q((4, 16), g), _q((8, 16), g, -127)
    w[3] = 0                                                         # an all-zero weight channel
    w_scale, bias = torch.full((8,), 0.5), torch.zeros(8)
    tiny = kt.qlinear_act(x, 1.0, 0, w, w_scale, bias, "none", 1e-3, 0)  # everything saturates
    assert set(tiny[:, [0, 1, 2, 4]].unique().tolist()) <= {-128, 127} and (tiny[:, 3] == 0).all()
    const = torch.full((4, 16), 7, dtype=torch.int8)                  # a constant input
    torch.testing.assert_close(kt.qlinear_act(const, 0.1, 7, w, w_scale, bias, "none"), torch.zeros(4, 8))
    ints = torch.arange(-9, 10, dtype=torch.int8).reshape(-1, 1)      # y / 2 lands on every .5 tie
    got = kt.qlinear_act(ints, 1.0, 0, torch.ones(1, 1, dtype=torch.int8), torch.ones(1), None, "none", 2.0, 0)
    assert torch.equal(got, torch.round(ints.float() / 2).to(torch.int8))  # round half to even, as torch


def test_optimize_int8_with_the_triton_backend_end_to_end():
    from graphopt import optimize
    from graphopt.compiler.core.verify import sqnr
    from tests.helpers import randomize_bn
    from tests.zoo import ZOO

    make, inputs = ZOO["resnet_blocks"]
    model = randomize_bn(make()).eval()
    x = inputs(1)
    opt = optimize(model, (x,), backend="triton", quantize="int8", calibration=[(inputs(1),) for _ in range(2)],
                   progress=False)
    assert "kernels_triton_qconv2d_act" in opt.code and "kernels_triton_qlinear_act" in opt.code
    with torch.no_grad():
        assert sqnr(model(x), opt(x)) >= 30.0
        assert sqnr(opt.portable(x), opt(x)) >= 35.0  # the Triton int8 kernels against the reference
