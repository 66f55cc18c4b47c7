import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.compiler.core.capture import propagate
from graphopt.passes.eliminate_common_subexpressions import eliminate_common_subexpressions as cse
from tests.helpers import apply, traced


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + self.conv(x) + (x + 1) * (x + 1)


def test_repeated_work_is_merged_four_ways():
    m, x = Twice().eval(), torch.randn(2, 3, 6, 6)
    gm = traced(m, x)
    assert apply(cse, gm, x) == 2
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module") == 1
    assert torch.equal(gm(x), m(x))
    assert apply(cse, gm, x) == 0


def test_reads_around_an_inplace_write_are_not_merged():
    class M(nn.Module):
        def forward(self, x):
            y = x * 1
            a = y + 1
            y.add_(5)
            b = y + 1
            return a, b

    m, x = M().eval(), torch.randn(3)
    gm = traced(m, x)
    assert apply(cse, gm, x) == 0
    for got, want in zip(gm(x), m(x)):
        assert torch.equal(got, want)


def test_random_calls_are_not_merged():
    class M(nn.Module):
        def forward(self, x):
            return x + torch.rand(3), x + torch.rand(3)

    gm = fx.symbolic_trace(M())
    propagate(gm, (torch.randn(3),))
    assert cse(gm, None) == 0
