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


class ViewThenAct(nn.Module):
    """Hugging Face's GPT-2 Conv1D and MLP: the GEMM on 2-d rows, a view back to 3-d, then the activation."""

    def __init__(self, reshape, act):
        super().__init__()
        self.fc, self.reshape, self.act = nn.Linear(12, 16), reshape, act

    def forward(self, x):
        return self.act(self.reshape(self.fc(x.view(-1, 12)), (2, 3, 16)))


RESHAPES = {"view": lambda y, shape: y.view(shape), "view(*sizes)": lambda y, shape: y.view(*shape),
            "reshape": lambda y, shape: y.reshape(shape), "torch.reshape": torch.reshape}


@pytest.mark.parametrize("reshape", RESHAPES.values(), ids=RESHAPES.keys())
@pytest.mark.parametrize("act,expected", [(nn.GELU(approximate="tanh"), "gelu:tanh"), (nn.ReLU(), "relu"),
                                          (nn.ReLU(inplace=True), "relu"),
                                          (lambda y: F.silu(y), "silu")], ids=["gelu-tanh", "relu", "relu_", "silu"])
def test_an_activation_after_a_view_of_the_linear_moves_before_it_and_fuses(reshape, act, expected):
    m, x = ViewThenAct(reshape, act).eval(), torch.randn(2, 3, 12)
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    gm = traced(m, x)
    assert apply(fuse_linear_act, gm, x) == 1                                     # fired
    (fused,) = graphopt_calls(gm, "linear_act")
    assert fused.args[3] == expected                                              # the activation is fused
    (view,) = fused.users                                                         # ... and the view follows it
    assert view.op in ("call_method", "call_function") and list(view.users)[0].op == "output"
    assert view.meta["tensor_meta"].shape == (2, 3, 16) and fused.meta["tensor_meta"].shape == (6, 16)
    with torch.no_grad():
        close(gm(x), m(x), equal_nan=True)                                        # numbers, NaN and inf included
    assert apply(fuse_linear_act, gm, x) == 0                                     # idempotent


@pytest.mark.parametrize("case", ["view read twice", "linear read twice", "view(dtype)", "transpose", "softmax",
                                  "act of two values", "input written before the view"])
def test_an_activation_after_a_view_stays_where_anything_else_sees_the_values(case):
    """The activation moves only where the view is the linear's one reader and the activation the view's, on a
    reshape (not a transpose, not a bit cast), and only for an elementwise activation of that one value."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 16)

        def forward(self, x):
            y = self.fc(x)
            if case == "view read twice":
                v = y.view(2, 3, 16)
                return F.relu(v), v
            if case == "linear read twice":
                return F.relu(y.view(2, 3, 16)), y
            if case == "view(dtype)":
                return F.relu(y.view(torch.float32))
            if case == "transpose":
                return F.relu(y.transpose(0, 1))
            if case == "softmax":
                return F.softmax(y.view(2, 3, 16), dim=-1)
            if case == "input written before the view":
                x.mul_(2)
                return F.relu(y.view(2, 3, 16))
            return torch.maximum(y.view(2, 3, 16), x.sum() * torch.ones(2, 3, 16))

    m, x = M().eval(), torch.randn(6, 12)
    gm = traced(m, x.clone())

    def rest(g):  # every call but the linear, in order
        fused = graphopt_calls(g, "linear_act")
        return [(n.op, n.target) for n in g.graph.nodes
                if n.op in ("call_method", "call_function") and n not in fused]

    before = rest(gm)
    assert apply(fuse_linear_act, gm, x.clone()) == 1                             # the linear fuses on its own
    (fused,) = graphopt_calls(gm, "linear_act")
    assert fused.args[3] == "none"                                                # the activation stays apart
    assert not any(u.op == "output" for u in fused.users) or case == "linear read twice"
    assert rest(gm) == before                                                     # nothing else moved
    with torch.no_grad():
        close(gm(x.clone()), m(x.clone()))  # (one case writes its input)


@pytest.mark.parametrize("act", [nn.Identity(), nn.ReLU()], ids=["none", "relu"])
def test_a_linear_whose_input_is_written_after_it_still_fuses(act):
    """Nothing runs between a linear and itself: a write to its input after the linear (and its activation)
    does not stop the fusion (it did: the check ran on to the end of the graph)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(12, 16), act

        def forward(self, x):
            y = self.act(self.fc(x))
            x.mul_(2)
            return y, x

    m, x = M().eval(), torch.randn(6, 12)
    gm = traced(m, x.clone())
    assert apply(fuse_linear_act, gm, x.clone()) == 1
    (fused,) = graphopt_calls(gm, "linear_act")
    assert fused.args[3] == ("relu" if isinstance(act, nn.ReLU) else "none")
    with torch.no_grad():
        close(gm(x.clone()), m(x.clone()))
    assert apply(fuse_linear_act, gm, x.clone()) == 0
