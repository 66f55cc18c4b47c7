import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import _extract_tensor_metadata

import graphopt
from graphopt.compiler.core.capture import propagate
from graphopt.passes import PassContext
from graphopt.passes.fold_rank_checks import fold_rank_checks
from tests.helpers import apply, randomize_bn, traced


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d as timm writes it (timm/layers/norm_act.py): a subclass that fx traces through, which
    checks its input's rank before the batch norm and its activation."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.relu6(x)


class ConvBNAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), BatchNormAct2d(8)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(y))


def _checks(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is torch._assert or n.target is getattr
            or n.target == "dim" or n.target is operator.eq]


class Chain(nn.Module):
    """A rank read through every kind of step the rule follows: a broadcast with a constant and a number, a mean
    kept 4-d, a method, a module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.rand(1, 4, 1, 1) + 0.5)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        y = self.pool((x * self.scale + 1.0).relu().mean((2, 3), keepdim=True) * x)
        torch._assert(y.dim() == 4, "4-d")
        return y.sigmoid()


class CatSplit(nn.Module):
    """Pieces of a split, a cat of them, a slice and a pad (timm's MixNet, DenseNet, CSPNet, ReXNet, VoVNet)."""

    def forward(self, x):
        a, b = torch.split(x, [2, 4], dim=1)
        c, d = (b * 2).chunk(2, dim=1)
        y = F.pad(torch.cat([a, d, c], 1)[:, 1:, ...], (1, 1))
        torch._assert(y.ndim == 4, "4-d")
        return y.relu()


# (each model's rank reads, comparisons and asserts: timm's message reads the rank a second time)
CASES = {"timm's conv, batch norm and act": (ConvBNAct, (2, 3, 9, 7), 8), "a chain of rank-keeping steps":
         (Chain, (2, 4, 6, 6), 3),
         "pieces, a cat, a slice and a pad": (CatSplit, (2, 6, 5, 5), 3)}


@pytest.mark.parametrize("case", CASES)
def test_rank_checks_fold_four_ways(case):
    make, shape, folds = CASES[case]
    m, x = randomize_bn(make()).eval(), torch.randn(shape)
    gm = traced(m, x)
    assert _checks(gm)
    assert apply(fold_rank_checks, gm, x) == folds
    assert _checks(gm) == []  # nothing reads a rank, compares or asserts any more
    for batch in (shape[0], 1, 5):  # the same answers at any batch size
        y = torch.randn(batch, *shape[1:])
        assert torch.equal(gm(y), m(y))
    assert apply(fold_rank_checks, gm, x) == 0


def test_timms_batch_norms_fold_into_their_convs_once_the_checks_are_gone():
    m, x = randomize_bn(ConvBNAct()).eval(), torch.randn(2, 3, 9, 7)
    opt = graphopt.optimize(m, (x,), progress=False)
    rewrites = {r.name: r.rewrites for r in opt.report}
    assert rewrites["fold_conv_bn"] == 2 and rewrites["fuse_conv_act"] == 2
    assert not any(n.target is F.batch_norm for n in opt.graph_module.graph.nodes)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-5)


class SqueezedCheck(nn.Module):
    """squeeze() drops every size-1 dimension, the batch's at a batch of 1: the rank after it depends on the batch."""

    def forward(self, x):
        y = (x * 2).squeeze()
        torch._assert(y.dim() == 2, "expected 2-d after the squeeze")
        return y + 1


def test_a_rank_that_depends_on_the_batch_size_stays_checked_and_raises_as_eager():
    m, x = SqueezedCheck().eval(), torch.randn(1, 3, 5)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_rank_checks, gm, x, ctx=ctx) == 0
    assert list(ctx.misses.nodes) == ["rank not known at every batch size"]
    torch.testing.assert_close(gm(x), m(x))
    with pytest.raises(AssertionError, match="expected 2-d"):
        m(torch.randn(2, 3, 5))
    with pytest.raises(AssertionError, match="expected 2-d"):
        gm(torch.randn(2, 3, 5))


class OpaqueModule(nn.Conv2d):
    pass


class SubclassCheck(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = OpaqueModule(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4-d")
        return y


def test_a_rank_through_an_unknown_module_stays():
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda mod, name: isinstance(mod, nn.Conv2d)  # the subclass stays one call
    m, x = SubclassCheck().eval(), torch.randn(2, 3, 4, 4)
    gm = fx.GraphModule(m, tracer.trace(m))
    propagate(gm, (x,))
    assert apply(fold_rank_checks, gm, x) == 0
    assert any(n.target is torch._assert for n in gm.graph.nodes)


class WrongRank(nn.Module):
    def forward(self, x):
        torch._assert(x.ndim == 3, "expected 3-d")
        return x + 1


def test_a_check_decided_false_stays_and_raises_as_eager():
    gm = fx.symbolic_trace(WrongRank())
    x = torch.randn(2, 3, 4, 4)
    next(iter(gm.graph.nodes)).meta["tensor_meta"] = _extract_tensor_metadata(x)
    assert fold_rank_checks(gm, PassContext((x,))) == 2  # the read and the comparison; the assert stays
    gm.recompile()
    assert [n.args[0] for n in gm.graph.nodes if n.target is torch._assert] == [False]
    with pytest.raises(AssertionError, match="expected 3-d"):
        gm(x)


class Unknown(nn.Module):
    """A rank read after a step whose rank the rule does not know."""

    def __init__(self, step):
        super().__init__()
        self.step = step
        self.register_buffer("bound", torch.zeros(1, 1, 1, 1))
        self.register_buffer("row", torch.ones(5))

    def forward(self, x):
        y = self.step(self, x)
        torch._assert(y.dim() == y.dim(), "never false")
        return y * 2


STEPS = {
    "a mean that drops its dimensions": lambda s, x: x.mean((1, 2)),
    "a clamp to a tensor bound (it broadcasts)": lambda s, x: torch.clamp(x, min=s.bound),
    "a linear on a 1-d weight (it drops a dimension)": lambda s, x: F.linear(x, s.row),
    "a reshape": lambda s, x: x.reshape(-1, 5),
    "an integer index": lambda s, x: x[0],
}


@pytest.mark.parametrize("case", STEPS)
def test_a_rank_after_a_step_the_rule_does_not_know_stays(case):
    m, x = Unknown(STEPS[case]).eval(), torch.randn(2, 3, 5)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_rank_checks, gm, x, ctx=ctx) == 0
    assert list(ctx.misses.nodes) == ["rank not known at every batch size"]
    assert any(n.target is torch._assert for n in gm.graph.nodes)


class SqueezeInPlace(nn.Module):
    def forward(self, x):
        y = x * 2
        y.squeeze_()
        torch._assert(y.dim() == 2, "expected 2-d after the squeeze")
        return y


class SumInto(nn.Module):
    """A write through ``out=`` resizes its target: a 4-d value becomes 2-d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y, z = self.conv(x), x * 2
        torch.sum(z, (2, 3), out=y)
        torch._assert(y.dim() == 2, "expected 2-d after the sum")
        return y + 1


def test_a_write_through_out_keeps_every_check():
    m, x = SumInto().eval(), torch.randn(2, 3, 4, 4)
    ctx = PassContext((x,))
    with pytest.warns(UserWarning, match="resized"):  # (torch warns that it resizes y, at each run)
        gm = traced(m, x)
        assert apply(fold_rank_checks, gm, x, ctx=ctx) == 0
    assert list(ctx.misses.nodes)[0].startswith("the graph changes a rank in place")


def test_a_rank_changed_in_place_keeps_every_check():
    m, x = SqueezeInPlace().eval(), torch.randn(1, 3, 5)
    gm, ctx = traced(m, x), PassContext((x,))
    assert apply(fold_rank_checks, gm, x, ctx=ctx) == 0
    assert list(ctx.misses.nodes)[0].startswith("the graph changes a rank in place")
    with pytest.raises(AssertionError, match="expected 2-d"):
        gm(torch.randn(2, 3, 5))


class PositionCheck(nn.Module):
    """A weight read for its rank and again for its value (ViT-style position embeddings)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 4, 8))

    def forward(self, x):
        torch._assert(self.pos.ndim == 3, f"expected a 3-d embedding, got {self.pos.ndim}-d")
        return torch.relu(x + self.pos)


def test_what_only_the_check_read_goes_with_it_and_the_pipeline_accepts_the_graph():
    m, x = PositionCheck().eval(), torch.randn(2, 4, 8)
    opt = graphopt.optimize(m, (x,), engines="graphopt", progress=False)  # (the driver refuses dead nodes left)
    assert {r.name: r.rewrites for r in opt.report}["fold_rank_checks"] == 4
    assert not any(n.target is torch._assert or n.target is getattr for n in opt.portable.graph.nodes)
    torch.testing.assert_close(opt(x), m(x))
