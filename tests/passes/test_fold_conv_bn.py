import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes import PassContext
from graphopt.passes.fold_conv_bn import fold_conv_bn
from tests.helpers import apply, close, count, randomize_bn, traced

BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)


class ConvBN(nn.Module):
    def __init__(self, dim=2, groups=1, bias=True, affine=True, cin=4, cout=8):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        self.conv, self.bn = conv(cin, cout, 3, padding=1, groups=groups, bias=bias), bn(cout, affine=affine)

    def forward(self, x):
        return self.bn(self.conv(x))


class FunctionalConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.register_buffer("m", torch.randn(6))
        self.register_buffer("v", torch.rand(6) + 0.5)
        self.g, self.b = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.batch_norm(F.conv2d(x, self.w, None, 2, 1), self.m, self.v, self.g, self.b, False, 0.1, 1e-3)


CASES = {
    "conv2d": (lambda: ConvBN(), (2, 4, 9, 7)),
    "conv1d": (lambda: ConvBN(dim=1), (2, 4, 11)),
    "conv3d": (lambda: ConvBN(dim=3), (1, 4, 5, 6, 7)),
    "grouped": (lambda: ConvBN(groups=2), (2, 4, 9, 7)),
    "depthwise": (lambda: ConvBN(groups=8, cin=8), (2, 8, 9, 7)),
    "no_bias_no_affine": (lambda: ConvBN(bias=False, affine=False), (2, 4, 9, 7)),
    "functional": (FunctionalConvBN, (2, 3, 9, 7)),
}


@pytest.mark.parametrize("case", CASES)
def test_fold_conv_bn_four_ways(case):
    make, shape = CASES[case]
    m, x = randomize_bn(make()).eval(), torch.randn(shape)
    gm = traced(m, x)
    assert apply(fold_conv_bn, gm, x) == 1                  # it fired
    assert count(gm, *BN) == 0                              # no BatchNorm left
    close(gm(x), m(x))                                      # the numbers match
    assert apply(fold_conv_bn, gm, x) == 0                  # a second run does nothing


def test_conv_with_two_users_is_not_folded():
    class M(ConvBN):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    m, x = randomize_bn(M()).eval(), torch.randn(2, 4, 8, 8)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_conv_bn, gm, x, ctx=ctx) == 0
    assert count(gm, nn.BatchNorm2d) == 1
    assert ctx.misses.nodes == {"conv output has another reader": ["bn"]}


def test_shared_conv_module_is_not_folded():
    class M(ConvBN):
        def __init__(self):
            super().__init__(cin=8)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.conv(x).relu()

    m, x = randomize_bn(M()).eval(), torch.randn(2, 8, 8, 8)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_conv_bn, gm, x, ctx=ctx) == 0
    close(gm(x), m(x))
    assert ctx.misses.nodes == {"layer called more than once": ["bn"]}


def test_tied_weight_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    m, x = randomize_bn(M()).eval(), torch.randn(2, 4, 8, 8)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_conv_bn, gm, x, ctx=ctx) == 0
    assert ctx.misses.nodes == {"weight shared with another layer": ["bn"]}


def test_bn_in_training_mode_is_not_folded():
    m, x = randomize_bn(ConvBN()).eval(), torch.randn(2, 4, 8, 8)
    gm = traced(m, x)
    gm.bn.train()
    ctx = PassContext((x,))
    assert fold_conv_bn(gm, ctx) == 0
    assert ctx.misses.nodes == {"BatchNorm in training mode": ["bn"]}


def test_bn_without_running_stats_is_not_folded():
    class M(ConvBN):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(8, track_running_stats=False)

    m, x = M().eval(), torch.randn(2, 4, 8, 8)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_conv_bn, gm, x, ctx=ctx) == 0
    close(gm(x), m(x))
    assert ctx.misses.nodes == {"BatchNorm without running statistics": ["bn"]}


def test_the_users_module_is_untouched():
    m, x = randomize_bn(ConvBN()).eval(), torch.randn(2, 4, 8, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    gm = traced(m, x)
    apply(fold_conv_bn, gm, x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_fold_through_an_explicit_pad(mode):
    class M(ConvBN):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode=mode)

    m, x = randomize_bn(M()).eval(), torch.randn(2, 4, 7, 6)
    gm = traced(m, x)
    assert apply(fold_conv_bn, gm, x) == 1
    assert count(gm, *BN) == 0 and count(gm, F.pad) == 1
    close(gm(x), m(x))
    assert apply(fold_conv_bn, gm, x) == 0
