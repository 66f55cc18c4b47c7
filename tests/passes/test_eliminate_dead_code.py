import torch
import torch.nn as nn

from graphopt.passes.eliminate_dead_code import eliminate_dead_code
from tests.helpers import apply, traced


class Dead(nn.Module):
    def forward(self, x):
        unused = torch.sigmoid(x) * 3  # noqa: F841  (dead: two nodes)
        return x + 1


def test_dead_nodes_are_erased_four_ways():
    m, x = Dead().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 2
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]
    assert torch.equal(gm(x), m(x))
    assert apply(eliminate_dead_code, gm, x) == 0


def test_inplace_op_without_users_stays():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.add_(1)  # its result is unused, but it writes y
            torch.relu_(y)
            return y

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 0
    assert torch.equal(gm(x), m(x))


def test_a_write_through_out_or_a_dunder_without_users_stays():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            torch.add(y, 1.0, out=y)  # its result is unused, but it writes y
            y.__setitem__(0, 5.0)
            return y

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 0
    assert torch.equal(gm(x), m(x))


def test_inplace_module_without_users_stays():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 2
            self.act(y)
            return y

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 0
    assert torch.equal(gm(x), m(x))


def test_unobserved_inplace_write_goes_with_its_value():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            self.conv(x).tanh_()  # written, never read
            return x * 2

    m, x = M().eval(), torch.randn(1, 3, 4, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 2
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]
    assert torch.equal(gm(x), m(x))


def test_write_through_an_inplace_module_output_stays():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 1.0
            self.act(y).add_(y)  # writes y through the module's output, which is y itself
            return y

    m, x = M().eval(), torch.randn(3, 4)
    gm = traced(m, x)
    assert apply(eliminate_dead_code, gm, x) == 0
    assert torch.equal(gm(x), m(x))
