"""Property tests: the fused conv's fake (meta) impl gives the real output shape for every
stride / padding / dilation / groups combination the reference accepts."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt.kernels.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.kernels.reference import conv_out_size


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 12))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 12))
    return (draw(st.integers(1, 2)), cin, h, w), (cout, cin // groups, kh, kw), stride, padding, dilation, groups


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_fake_conv_shape_matches_the_real_op(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    xs, ws, stride, padding, dilation, groups = case
    x, w = torch.randn(xs), torch.randn(ws)
    real = torch.ops.graphopt.conv2d_act(x, w, None, stride, padding, dilation, groups, "relu", None)
    assert real.shape == torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups).shape
    with FakeTensorMode() as mode:
        fake = torch.ops.graphopt.conv2d_act(mode.from_tensor(x), mode.from_tensor(w), None, stride, padding,
                                             dilation, groups, "relu", None)
    assert fake.shape == real.shape
    assert real.shape[2] == conv_out_size(xs[2], ws[2], stride[0], padding[0], dilation[0])
