import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import optimize
from graphopt.passes import PassContext
from graphopt.passes.recognize_activations import recognize_activations
from tests.helpers import apply, close, graphopt_calls, traced

# NaN, +-inf, values whose cube (and whose product with 6) overflow float32, signed zeros, denormals: at a length
# that runs both the vectorized loop and its scalar tail
SPECIAL = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e13, -1e13, 3e38, -3e38, 1e-40, -1e-40,
                        5.0, -5.0, 20.0, -20.0, 3.0, -3.0] * 3)


class Formula(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def new_gelu(x):  # Hugging Face's NewGELUActivation, as written there
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def fast_gelu(x):  # Hugging Face's FastGELUActivation, as written there
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def hard_sigmoid(x):  # timm's hard_sigmoid
    return F.relu6(x + 3.0) / 6.0


GELU_TANH = (F.gelu, {"approximate": "tanh"})
SPELLINGS = {
    "NewGELU": (new_gelu, GELU_TANH),
    "NewGELU reordered": (lambda x: x * 0.5 * (torch.tanh((0.044715 * x * x * x + x) * 0.7978845608028654) + 1),
                          GELU_TANH),
    "NewGELU x ** 3": (lambda x: 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)).tanh()), GELU_TANH),
    "FastGELU": (fast_gelu, GELU_TANH),
    "swish": (lambda x: x * torch.sigmoid(x), (F.silu, {})),
    "swish method": (lambda x: x.sigmoid() * x, (F.silu, {})),
    "hardswish": (lambda x: x * F.relu6(x + 3.0) / 6.0, (F.hardswish, {})),
    "hardswish clamp": (lambda x: (x + 3).clamp(0, 6) * x / 6, (F.hardswish, {})),
    "hardswish hardtanh in place": (lambda x: (x * F.hardtanh(x + 3, 0.0, 6.0, inplace=True)).div(6),
                                    (F.hardswish, {})),
    "hardsigmoid": (hard_sigmoid, (F.hardsigmoid, {})),
    # an in-place op on the expression's own intermediate, its input given by keyword
    "hardswish clamp_(input=)": (lambda x: x * torch.clamp_(input=x + 3, min=0, max=6) / 6, (F.hardswish, {})),
}


def _calls(gm, fn):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is fn]


@pytest.mark.parametrize("name", SPELLINGS)
def test_an_activation_written_out_becomes_its_op_four_ways(name):
    formula, (fn, kwargs) = SPELLINGS[name]
    m, x = Formula(formula).eval(), torch.randn(2, 3, 7) * 4
    gm = traced(m, x)
    assert apply(recognize_activations, gm, x) == 1
    (op,) = _calls(gm, fn)
    assert op.kwargs == kwargs and op.args == (next(iter(gm.graph.nodes)),)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_function", "output"]  # every step gone
    close(gm(x), m(x))
    torch.testing.assert_close(gm(SPECIAL), m(SPECIAL), equal_nan=True, rtol=1e-5, atol=1e-6)  # eager's NaN / inf
    assert apply(recognize_activations, gm, x) == 0


class Negative(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, y):
        return self.fn(x, y)


NOT_ACTIVATIONS = {
    # at +inf F.gelu gives NaN, the formula inf: not the same function where it matters
    "GELU's erf form": lambda x, y: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "another constant": lambda x, y: 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0)))),
    "two inputs": lambda x, y: x * torch.sigmoid(y),
    "relu, not relu6": lambda x, y: x * F.relu(x + 3.0) / 6.0,
    "an intermediate read elsewhere": lambda x, y: (lambda s: (x * s, s))(torch.sigmoid(x)),
    "in place on the input": lambda x, y: x * x.sigmoid_(),
    "0.5 * (x * (1 + tanh(..)))": lambda x, y: 0.5 * (x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))),
    "a write into out=": lambda x, y: (x * torch.sigmoid(x, out=y), y),  # absorbing it would drop the write
    # two numbers in one sum: (x + 1e8) - 1e8 is not x in float32
    "numbers that float32 does not fold": lambda x, y: x * torch.sigmoid(x + 1e8 - 1e8),
    "another power": lambda x, y: 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 4.0)))),
}


@pytest.mark.parametrize("name", NOT_ACTIVATIONS)
def test_what_is_not_the_activation_stays_as_written(name):
    m, x, y = Negative(NOT_ACTIVATIONS[name]).eval(), torch.randn(2, 9), torch.randn(2, 9)
    gm = traced(m, x.clone(), y)
    before = [(n.op, n.target) for n in gm.graph.nodes]
    assert apply(recognize_activations, gm, x.clone(), y) == 0
    assert [(n.op, n.target) for n in gm.graph.nodes] == before
    torch.testing.assert_close(gm(x.clone(), y), m(x.clone(), y))


def test_x_times_hard_sigmoid_keeps_its_grouping():
    # x * (relu6(x + 3) / 6) is finite at 3e38, where F.hardswish ((x * relu6(x + 3)) / 6) is inf: only the
    # hard sigmoid inside it is rewritten
    m, x = Formula(lambda x: x * hard_sigmoid(x)).eval(), torch.randn(3, 7)
    gm = traced(m, x)
    assert apply(recognize_activations, gm, x) == 1
    assert not _calls(gm, F.hardswish) and len(_calls(gm, F.hardsigmoid)) == 1
    torch.testing.assert_close(gm(SPECIAL), m(SPECIAL), equal_nan=True, rtol=1e-5, atol=1e-6)
    assert apply(recognize_activations, gm, x) == 0


def test_an_input_written_in_place_inside_the_expression_is_a_miss():
    class M(nn.Module):
        def forward(self, x):
            s = torch.sigmoid(x)
            x.add_(1.0)
            return x * s

    m, x = M().eval(), torch.randn(3, 5)
    gm = traced(m, x.clone())
    ctx = PassContext((x.clone(),))
    assert apply(recognize_activations, gm, x.clone(), ctx=ctx) == 0
    assert ctx.misses.counts() == {"a value is written in place inside the expression": 1}
    torch.testing.assert_close(gm(x.clone()), m(x.clone()))


WRITES = {  # each writes x between the sigmoid and the product, reaching it another way
    "through ravel": lambda x: x.ravel().add_(1.0),
    "through out=": lambda x: torch.add(x, 1.0, out=x),
    "through __setitem__": lambda x: x.__setitem__(0, 5.0),
    "by keyword": lambda x: nn.init.constant_(tensor=x, val=0.3),
    "through x.cpu()": lambda x: x.cpu().mul_(2.0),
}


@pytest.mark.parametrize("name", WRITES)
def test_any_write_inside_the_expression_is_a_miss(name):
    def f(x):
        s = torch.sigmoid(x)
        WRITES[name](x)
        return x * s

    m, x = Formula(f).eval(), torch.randn(4, 8)
    gm = traced(m, x.clone())
    ctx = PassContext((x.clone(),))
    assert apply(recognize_activations, gm, x.clone(), ctx=ctx) == 0
    assert ctx.misses.counts() == {"a value is written in place inside the expression": 1}
    torch.testing.assert_close(gm(x.clone()), m(x.clone()))


def test_a_chain_of_powers_is_read_in_linear_time():
    def f(x):  # (((x ** 3) ** 3) ...): expanding each power as a product would grow 3^20 terms
        y = x
        for _ in range(20):
            y = y ** 3
        return x * torch.sigmoid(y)

    m, x = Formula(f).eval(), torch.rand(2, 3)
    gm = traced(m, x)
    assert apply(recognize_activations, gm, x) == 0


def test_a_long_chain_of_silus_is_all_rewritten():
    def f(x):
        for _ in range(300):
            x = x * torch.sigmoid(x)
        return x

    m, x = Formula(f).eval(), torch.randn(2, 3)
    gm = traced(m, x)
    assert apply(recognize_activations, gm, x) == 300
    assert len(_calls(gm, F.silu)) == 300
    close(gm(x), m(x))


def test_only_float32_is_rewritten():
    m, x = Formula(lambda x: x * torch.sigmoid(x)).eval(), torch.randn(4, 6, dtype=torch.float64)
    gm = traced(m, x)
    assert apply(recognize_activations, gm, x) == 0


def test_optimize_fuses_gpt2s_written_out_gelu_into_the_linear():
    class MLP(nn.Module):  # GPT-2's MLP block with NewGELUActivation's code
        def __init__(self):
            super().__init__()
            self.fc, self.proj = nn.Linear(16, 64), nn.Linear(64, 16)

        def forward(self, x):
            return self.proj(new_gelu(self.fc(x)))

    m, x = MLP().eval(), torch.randn(2, 5, 16)
    opt = optimize(m, (x,), engines="graphopt")
    assert [n.args[3] for n in graphopt_calls(opt.portable, "linear_act")] == ["gelu:tanh", "none"]
    assert [r.rewrites for r in opt.report if r.name == "recognize_activations"] == [1]
    close(opt(x), m(x))
    bad = torch.randn(2, 5, 16)
    bad[0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    torch.testing.assert_close(opt(bad), m(bad), equal_nan=True, rtol=1e-4, atol=1e-5)


def test_two_formulas_with_the_same_steps_are_both_recognized_before_cse_merges_them():
    m = Formula(lambda x: F.relu6(x + 3.0) / 6.0 + x * F.relu6(x + 3.0) / 6.0).eval()
    x = torch.randn(4, 8)
    opt = optimize(m, (x,), engines="graphopt")
    assert [r.rewrites for r in opt.report if r.name == "recognize_activations"] == [2]
    assert len(_calls(opt.portable, F.hardsigmoid)) == len(_calls(opt.portable, F.hardswish)) == 1
    close(opt(x), m(x))
