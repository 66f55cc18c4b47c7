"""The fused ops against their references composed from plain aten ops, over odd shapes."""

import pytest
import torch
import torch.nn.functional as F

import graphopt.kernels.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.kernels import cpu, reference
from graphopt.kernels.activations import EXAMPLES
from graphopt.kernels.reference import ACTIVATIONS, apply_act, parse_act

ACTS = [*EXAMPLES, "hardtanh:0.0:inf"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# (N, C, H, W, K, kernel, stride, padding, dilation, groups)
CONV_SHAPES = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1),
    (2, 3, 7, 5, 17, 3, 1, 1, 1, 1),
    (1, 8, 17, 9, 8, 3, 2, 1, 1, 8),      # depthwise, stride 2
    (3, 6, 11, 13, 9, 5, 1, 2, 2, 3),     # grouped, dilated
    (1, 4, 127, 3, 7, (1, 3), (2, 1), (0, 1), 1, 1),
]


def _conv_case(shape, dtype):
    n, c, h, w, k, kernel, stride, padding, dilation, groups = shape
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c // groups, kh, kw, dtype=dtype) * 0.3
    bias = torch.randn(k, dtype=dtype)
    return x, weight, bias, pair(stride), pair(padding), pair(dilation), groups


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv2d_act_op_matches_composed_aten(shape, act, with_residual):
    x, w, b, stride, padding, dilation, groups = _conv_case(shape, torch.float32)
    y = F.conv2d(x, w, b, stride, padding, dilation, groups)
    r = torch.randn_like(y) if with_residual else None
    want = apply_act(y + r if r is not None else y, act)
    got = torch.ops.graphopt.conv2d_act(x, w, b, stride, padding, dilation, groups, act, r)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(reference.conv2d_act(x, w, b, stride, padding, dilation, groups, act, r), want,
                               **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conv2d_act_dtypes(dtype):
    x, w, b, stride, padding, dilation, groups = _conv_case(CONV_SHAPES[1], dtype)
    got = cpu.conv2d_act(x, w, None, stride, padding, dilation, groups, "silu", None)
    want = reference.conv2d_act(x, w, None, stride, padding, dilation, groups, "silu", None)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 17), (2, 5, 127, 33), (129, 64, 1)])
@pytest.mark.parametrize("act", ACTS)
def test_linear_act_op_matches_composed_aten(shape, act):
    *lead, k_in, k_out = shape
    x, w = torch.randn(*lead, k_in) if lead else torch.randn(k_in), torch.randn(k_out, k_in) * 0.3
    b = torch.randn(k_out)
    want = apply_act(F.linear(x, w, b), act)
    torch.testing.assert_close(torch.ops.graphopt.linear_act(x, w, b, act), want, **TOL[torch.float32])
    torch.testing.assert_close(torch.ops.graphopt.linear_act(x, w, None, act), apply_act(F.linear(x, w), act),
                               **TOL[torch.float32])


def test_nan_and_inf_propagate_through_every_activation():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 2.0]])
    eye = torch.eye(6)
    for act in ACTS:
        want = apply_act(F.linear(x, eye), act)
        got = torch.ops.graphopt.linear_act(x, eye, None, act)
        torch.testing.assert_close(got, want, equal_nan=True, msg=act)


def test_fake_impls_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, b, stride, padding, dilation, groups = _conv_case(CONV_SHAPES[4], torch.float32)
    real = torch.ops.graphopt.conv2d_act(x, w, b, stride, padding, dilation, groups, "relu", None)
    with FakeTensorMode() as mode:
        fx_, fw, fb = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(b)
        fake = torch.ops.graphopt.conv2d_act(fx_, fw, fb, stride, padding, dilation, groups, "relu", None)
        lin = torch.ops.graphopt.linear_act(mode.from_tensor(torch.randn(2, 3, 5)), mode.from_tensor(torch.randn(4, 5)),
                                            None, "none")
    assert fake.shape == real.shape and lin.shape == (2, 3, 4)


def test_opcheck():
    x, w, b, stride, padding, dilation, groups = _conv_case(CONV_SHAPES[2], torch.float32)
    torch.library.opcheck(torch.ops.graphopt.conv2d_act.default, (x, w, b, stride, padding, dilation, groups,
                                                                  "relu6", None))
    torch.library.opcheck(torch.ops.graphopt.linear_act.default, (torch.randn(3, 5), torch.randn(4, 5), None, "gelu"))


def test_activation_strings():
    assert set(ACTS) <= {a for a in ACTS if parse_act(a)}
    assert "relu" in ACTIVATIONS
    for bad in ("swish", "hardtanh:1", "leaky_relu:x", "gelu:erf"):
        with pytest.raises(ValueError):
            parse_act(bad)
