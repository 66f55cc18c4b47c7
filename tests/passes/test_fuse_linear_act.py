import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.passes.fuse_linear_act import fuse_linear_act
from tests.helpers import apply, close, graphopt_calls, traced


@pytest.mark.parametrize("act,expected", [(nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.SiLU(), "silu"),
                                          (nn.Tanh(), "tanh"), (nn.Identity(), "none")])
@pytest.mark.parametrize("shape", [(5, 12), (2, 3, 12), (12,)])
def test_linear_act_four_ways(act, expected, shape):
    m, x = nn.Sequential(nn.Linear(12, 7), act).eval(), torch.randn(shape)
    gm = traced(m, x)
    assert apply(fuse_linear_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "linear_act")
    assert fused.args[3] == expected
    close(gm(x), m(x))
    assert apply(fuse_linear_act, gm, x) == 0


def test_functional_linear_without_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return F.leaky_relu(F.linear(x, self.w), 0.1)

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(fuse_linear_act, gm, x) == 1
    (fused,) = graphopt_calls(gm, "linear_act")
    assert fused.args[2] is None and fused.args[3] == "leaky_relu:0.1"
    close(gm(x), m(x))


def test_linear_output_read_twice_keeps_the_act_apart():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return torch.relu(y) - y

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    apply(fuse_linear_act, gm, x)
    assert [n.args[3] for n in graphopt_calls(gm, "linear_act")] == ["none"]
    close(gm(x), m(x))
