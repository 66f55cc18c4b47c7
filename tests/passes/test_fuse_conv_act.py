import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.kernels.activations import ACTIVATIONS
from graphopt.kernels.reference import parse_act
from graphopt.kernels.signatures import ConvAct as ConvActArgs
from graphopt.passes.fuse_conv_act import fuse_conv_act
from tests.helpers import apply, close, graphopt_calls, traced

# (spelling, act string the fused op must carry)
ACTS = {
    "nn.ReLU": (nn.ReLU(), "relu"),
    "nn.ReLU(inplace)": (nn.ReLU(inplace=True), "relu"),
    "F.relu": (F.relu, "relu"),
    "torch.relu": (torch.relu, "relu"),
    "relu_ method": (lambda y: y.relu_(), "relu"),
    "relu6": (F.relu6, "relu6"),
    "hardtanh": (lambda y: F.hardtanh(y, -0.5, 0.5), "hardtanh:-0.5:0.5"),
    "clamp": (lambda y: torch.clamp(y, min=0.0, max=2.0), "hardtanh:0.0:2.0"),
    "clamp min only": (lambda y: y.clamp(min=-1.0), "hardtanh:-1.0:inf"),
    "silu": (F.silu, "silu"),
    "gelu": (F.gelu, "gelu"),
    "gelu tanh": (nn.GELU(approximate="tanh"), "gelu:tanh"),
    "hardswish": (nn.Hardswish(), "hardswish"),
    "sigmoid": (torch.sigmoid, "sigmoid"),
    "tanh_ method": (lambda y: y.tanh_(), "tanh"),
    "leaky_relu": (nn.LeakyReLU(0.2), "leaky_relu:0.2"),
}


class ConvAct(nn.Module):
    def __init__(self, act, stride=1, groups=1, dilation=1):
        super().__init__()
        self.conv, self.act = nn.Conv2d(4, 8, 3, stride, dilation, dilation, groups), act

    def forward(self, x):
        return self.act(self.conv(x))


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, y):
        return self.fn(y)


def test_every_activation_has_a_spelling_here():
    assert {parse_act(act)[0] for _, act in ACTS.values()} == set(ACTIVATIONS) - {"none"}


@pytest.mark.parametrize("spelling", ACTS)
def test_conv_act_four_ways(spelling):
    fn, act = ACTS[spelling]
    m, x = ConvAct(fn if isinstance(fn, nn.Module) else Wrap(fn)), torch.randn(2, 4, 9, 7)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "conv2d_act")
    sig = ConvActArgs.from_node(fused)
    assert sig.act == act and sig.residual is None
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    close(gm(x), m(x))
    assert apply(fuse_conv_act, gm, x) == 0


@pytest.mark.parametrize("stride,groups,dilation", [(2, 1, 1), (1, 2, 1), (1, 4, 2), (3, 1, 2)])
def test_conv_geometry_is_carried(stride, groups, dilation):
    m, x = ConvAct(nn.ReLU(), stride, groups, dilation), torch.randn(2, 4, 13, 10)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 1
    close(gm(x), m(x))


RESIDUALS = {
    "y + r": lambda y, r: y + r,
    "r + y": lambda y, r: r + y,
    "y += r": lambda y, r: operator.iadd(y, r),
    "torch.add": lambda y, r: torch.add(y, r),
    "y.add_(r)": lambda y, r: y.add_(r),
}


@pytest.mark.parametrize("spelling", RESIDUALS)
@pytest.mark.parametrize("with_act", [True, False])
def test_residual_add_is_fused(spelling, with_act):
    add = RESIDUALS[spelling]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            y = add(self.conv(x), x * 0.5)
            return F.relu(y) if with_act else y

    m, x = M().eval(), torch.randn(2, 8, 6, 5)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "conv2d_act")
    assert fused.args[8] is not None and fused.args[7] == ("relu" if with_act else "none")
    close(gm(x), m(x))
    assert apply(fuse_conv_act, gm, x) == 0


def test_broadcasting_add_is_not_a_residual():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.shift = nn.Conv2d(4, 8, 3, padding=1), nn.Parameter(torch.randn(1, 8, 1, 1))

        def forward(self, x):
            return F.relu(self.conv(x) + self.shift)

    m, x = M().eval(), torch.randn(2, 4, 6, 6)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "conv2d_act")
    assert fused.args[8] is None and fused.args[7] == "none"  # the conv alone; add and relu stay
    close(gm(x), m(x))


def test_conv_with_two_users_keeps_its_epilogue_apart():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return F.relu(y), y * 2

    m, x = M().eval(), torch.randn(2, 4, 6, 6)
    gm = traced(m, x)
    apply(fuse_conv_act, gm, x)
    (fused,) = graphopt_calls(gm, "conv2d_act")
    assert fused.args[7] == "none"
    close(gm(x), m(x))


def test_inplace_add_into_a_value_read_later_is_not_fused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            r = x * 1.5
            s = r.add_(self.conv(x))  # writes r, which is read again below
            return r * s

    m, x = M().eval(), torch.randn(2, 8, 5, 5)
    gm = traced(m, x)
    apply(fuse_conv_act, gm, x)
    assert all(n.args[8] is None for n in graphopt_calls(gm, "conv2d_act"))
    close(gm(x), m(x))


def test_input_written_between_conv_and_act_blocks_the_fusion():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            x = x * 1.0
            y = self.conv(x)
            x.relu_()  # the conv read x before this write
            return F.relu(y) + x

    m, x = M().eval(), torch.randn(2, 4, 6, 6)
    gm = traced(m, x)
    apply(fuse_conv_act, gm, x)
    close(gm(x), m(x))


def test_shared_conv_module_fuses_at_each_call_site():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return F.relu(self.conv(x)) + torch.sigmoid(self.conv(x * 2))

    m, x = M().eval(), torch.randn(2, 4, 6, 6)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 2
    assert sorted(n.args[7] for n in graphopt_calls(gm, "conv2d_act")) == ["relu", "sigmoid"]
    close(gm(x), m(x))


def test_conv1d_and_asymmetric_same_padding_are_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv1d(3, 3, 3), nn.Conv2d(3, 3, 4, padding="same")

        def forward(self, x):
            return F.relu(self.c1(x.flatten(2))).sum() + F.relu(self.c2(x)).sum()

    m, x = M().eval(), torch.randn(2, 3, 6, 6)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 0


def test_reflect_padded_conv_fuses_after_its_pad():
    m = ConvAct(nn.ReLU())
    m.conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
    m, x = m.eval(), torch.randn(2, 4, 9, 7)
    gm = traced(m, x)
    assert apply(fuse_conv_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "conv2d_act")
    assert fused.args[0].target is F.pad and fused.args[4] == [0, 0]
    close(gm(x), m(x))
    assert apply(fuse_conv_act, gm, x) == 0
