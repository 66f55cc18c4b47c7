import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.compiler.core.capture import propagate
from graphopt.passes.fold_constants import fold_constants
from tests.helpers import apply, traced


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * (self.w.exp() * 2 + torch.ones(4))


def test_constant_subgraph_is_folded_four_ways():
    m, x = Scaled().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(fold_constants, gm, x) == 1
    ops = [n.op for n in gm.graph.nodes]
    assert ops == ["placeholder", "get_attr", "call_function", "output"]
    assert torch.equal(gm(x), m(x))
    assert apply(fold_constants, gm, x) == 0


def test_input_dependent_nodes_stay():
    class M(nn.Module):
        def forward(self, x):
            return x.exp() * 2

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(fold_constants, gm, x) == 0


def test_random_constants_are_not_folded():
    class M(nn.Module):
        def forward(self, x):
            return x + torch.rand(4)

    gm = fx.symbolic_trace(M())  # (capture would refuse it: its output differs from call to call)
    propagate(gm, (torch.randn(3, 4),))
    assert fold_constants(gm, None) == 0


def test_constant_written_in_place_each_call_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            c = self.w * 2
            c.add_(x.sum())  # a fresh c each call, then written
            return c

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(fold_constants, gm, x) == 0
    assert torch.equal(gm(x), m(x)) and torch.equal(gm(x), m(x))
