import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from graphopt.compiler.core.capture import propagate
from graphopt.passes.remove_noops import remove_noops
from tests.helpers import apply, traced


class Fn(nn.Module):
    def __init__(self, fn, *children):
        super().__init__()
        self.fn, self.children_ = fn, nn.ModuleList(children)

    def forward(self, x):
        return self.fn(self, x)


def _reshape_by_size(y):
    return y.reshape(y.size(0), 3, 5)


NOOPS = {
    "nn.Dropout": lambda: Fn(lambda s, x: s.children_[0](x) * 2, nn.Dropout(0.3)),
    "nn.Dropout1d(inplace)": lambda: Fn(lambda s, x: s.children_[0](x * 2), nn.Dropout1d(inplace=True)),
    "F.dropout(training=False)": lambda: Fn(lambda s, x: F.dropout(x, 0.5, training=False) * 2),
    "torch.dropout(train=False) (the export route's)": lambda: Fn(lambda s, x: torch.dropout(x, 0.1, False) * 2),
    "torch.feature_alpha_dropout(train=False)":
        lambda: Fn(lambda s, x: torch.feature_alpha_dropout(x, 0.1, train=False)),
    "nn.Identity": lambda: Fn(lambda s, x: s.children_[0](x) * 2, nn.Identity()),
    "contiguous": lambda: Fn(lambda s, x: (x * 2).contiguous()),
    "to same dtype": lambda: Fn(lambda s, x: (x * 2).to(torch.float32)),
    "float on float": lambda: Fn(lambda s, x: (x * 2).float()),
    "view(-1, ...)": lambda: Fn(lambda s, x: (x * 2).view(-1, 3, 5)),
    "reshape(y.size(0), ...)": lambda: Fn(lambda s, x: _reshape_by_size(x * 2)),
}


@pytest.mark.parametrize("case", NOOPS)
def test_noop_is_removed_four_ways(case):
    m, x = NOOPS[case]().eval(), torch.randn(4, 3, 5)
    gm = traced(m, x)
    before = sum(1 for _ in gm.graph.nodes)
    assert apply(remove_noops, gm, x) == 1
    assert sum(1 for _ in gm.graph.nodes) == before - 1
    assert torch.equal(gm(x), m(x))
    assert torch.equal(gm(torch.ones(7, 3, 5)), m(torch.ones(7, 3, 5)))   # any batch size
    assert apply(remove_noops, gm, x) == 0


@pytest.mark.parametrize("fn", [lambda s, x: F.dropout(x, 0.5, training=True),
                                lambda s, x: torch.dropout(x, 0.5, True)])
def test_functional_dropout_in_training_stays(fn):
    gm = fx.symbolic_trace(Fn(fn))  # capture refuses random models
    propagate(gm, (torch.randn(4, 3, 5),))
    assert remove_noops(gm, None) == 0


KEPT = {
    "view to a fixed batch": lambda: Fn(lambda s, x: x.view(4, 3, 5)),
    "view that changes the shape": lambda: Fn(lambda s, x: x.view(-1, 15)),
    "to another dtype": lambda: Fn(lambda s, x: x.to(torch.float64)),
    "contiguous after a transpose": lambda: Fn(lambda s, x: x.transpose(1, 2).contiguous()),
}


@pytest.mark.parametrize("case", KEPT)
def test_not_a_noop_stays(case):
    m, x = KEPT[case]().eval(), torch.randn(4, 3, 5)
    gm = traced(m, x)
    assert apply(remove_noops, gm, x) == 0


def test_dropout_module_in_training_mode_stays():
    m = Fn(lambda s, x: s.children_[0](x), nn.Dropout(0.5)).eval()
    gm = traced(m, torch.randn(2, 3))
    gm.get_submodule("children_.0").train()
    assert remove_noops(gm, None) == 0
