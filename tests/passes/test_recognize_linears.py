import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import optimize
from graphopt.passes import PassContext
from graphopt.passes.recognize_linears import recognize_linears
from tests.helpers import apply, close, graphopt_calls, traced


class Conv1D(nn.Module):  # Hugging Face's GPT-2 linear: W stored (in, out), through addmm on a 2-d view
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.weight, self.bias = nn.Parameter(torch.randn(n_in, n_out)), nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.n_out,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def _calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


def test_addmm_on_constants_becomes_a_linear_four_ways():
    m, x = Conv1D(12, 7).eval(), torch.randn(2, 5, 12)
    gm = traced(m, x)
    assert apply(recognize_linears, gm, x) == 1
    assert not _calls(gm, torch.addmm)
    (linear,) = _calls(gm, F.linear)
    weight = getattr(gm, linear.args[1].target)
    assert torch.equal(weight, m.weight.t()) and weight.is_contiguous()
    assert linear.args[2].target == "bias"
    close(gm(x), m(x))
    assert apply(recognize_linears, gm, x) == 0
    assert m.weight.shape == (12, 7)  # the user's module is untouched


class Product(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.w, self.b, self.b2 = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4)), \
            nn.Parameter(torch.randn(3, 4))
        self.fn = fn

    def forward(self, x, y):
        return self.fn(self, x, y)


def test_what_is_no_linear_stays_an_addmm():
    x, y = torch.randn(3, 6), torch.randn(6, 4)
    for fn in (lambda m, x, y: torch.addmm(m.b, x, y),  # the weight is a value computed at run time
               lambda m, x, y: torch.addmm(m.b2, x, m.w),  # a bias of one row each: not a linear's
               lambda m, x, y: torch.addmm(m.b, x, m.w, beta=0.5)):
        m = Product(fn).eval()
        gm = traced(m, x, y)
        assert apply(recognize_linears, gm, x, y) == 0
        assert len(_calls(gm, torch.addmm)) == 1
        close(gm(x, y), m(x, y))


def test_a_weight_read_elsewhere_is_a_miss():
    m, x, y = Product(lambda m, x, y: torch.addmm(m.b, x, m.w) + m.w.sum()).eval(), torch.randn(3, 6), torch.randn(1)
    gm = traced(m, x, y)
    ctx = PassContext((x, y))
    assert apply(recognize_linears, gm, x, y, ctx=ctx) == 0
    assert ctx.misses.counts() == {"weight read elsewhere (its transposed copy would keep both)": 1}


def test_optimize_runs_gpt2s_conv1d_as_fused_linears():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(16, 64), Conv1D(64, 16)

        def forward(self, x):
            return x + self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    m, x = MLP().eval(), torch.randn(2, 5, 16)
    opt = optimize(m, (x,), engines="graphopt")
    assert [r.rewrites for r in opt.report if r.name == "recognize_linears"] == [2]
    assert len(graphopt_calls(opt.portable, "linear_act")) == 2
    close(opt(x), m(x))
