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


def stochastic_depth(input, p, mode, training=True):
    """torchvision.ops.stochastic_depth as torchvision writes it (without its argument checks), under its name:
    torchvision wraps it for torch.fx, so a symbolic trace keeps the call. (torchvision is not a test
    dependency: its index build is for CUDA; the rule knows the function by its module and name.)"""
    if not training or p == 0.0:
        return input
    shape = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return input * noise.div_(1.0 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
fx.wrap("stochastic_depth")


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
    "torchvision's stochastic_depth(training=False)":
        lambda: Fn(lambda s, x: stochastic_depth(x * 2, 0.2, "row", False) + x),
    "torchvision's stochastic_depth(p=0)": lambda: Fn(lambda s, x: stochastic_depth(x * 2, 0.0, "batch") + x),
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


def test_stochastic_depth_in_training_stays_and_another_function_of_that_name_is_not_taken():
    gm = fx.symbolic_trace(Fn(lambda s, x: stochastic_depth(x, 0.2, "row", True)))
    assert any(n.op == "call_function" and n.target is stochastic_depth for n in gm.graph.nodes)
    propagate(gm, (torch.randn(4, 3, 5),))
    assert remove_noops(gm, None) == 0

    def other(input, p, mode, training=True):  # (the same name in another module: not torchvision's)
        return input * 2
    other.__name__ = "stochastic_depth"
    gm = fx.symbolic_trace(Fn(lambda s, x: x + 1))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_after(node):
        call = gm.graph.call_function(other, (node, 0.0, "row", False))
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    gm.recompile()
    propagate(gm, (torch.randn(4, 3, 5),))
    assert remove_noops(gm, None) == 0


def test_a_model_with_stochastic_depth_saves_and_loads(tmp_path):
    """Before the rule, the opaque call stayed in the graph: save() refused it (not an op a saved graph may
    call) and no kernel library could be proven NaN-free on it (torchvision's EfficientNet, ConvNeXt)."""
    from graphopt import load, optimize

    torch.manual_seed(0)
    model = Fn(lambda s, x: x + stochastic_depth(s.children_[0](x), 0.1, "row", s.training),
               nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())).eval()
    x = torch.randn(2, 4, 6, 6)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    assert not any(n.op == "call_function" and n.target is stochastic_depth for n in opt.portable.graph.nodes)
    opt.save(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m")(x), opt(x))
        torch.testing.assert_close(opt(x), model(x))


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
