"""Bad input answered with clear errors; nothing half-done escapes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import CaptureError, GraphoptError, InputError, PassError, optimize
from graphopt.passes import REGISTRY, register
from tests.helpers import close


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if y.sum() > 0:  # depends on the data
            return y * 2
        return y


def test_control_flow_gives_capture_error_with_source_line():
    with pytest.raises(CaptureError) as info:
        optimize(DataDependent().eval(), (torch.randn(1, 3, 8, 8),))
    text = str(info.value)
    assert "test_errors.py" in text and "if y.sum() > 0" in text
    assert "torch.compile" in text                           # the hint names the way through
    assert info.value.__cause__ is not None                  # the original exception is chained


def test_control_flow_runs_through_torch_compile_backend():
    m, x = DataDependent().eval(), torch.randn(2, 3, 8, 8)
    compiled = torch.compile(m, backend="graphopt")
    with torch.no_grad():
        close(compiled(x), m(x))
        close(compiled(-x), m(-x))


def test_training_mode_is_refused_with_eval_hint():
    with pytest.raises(CaptureError, match="training mode") as info:
        optimize(DataDependent(), (torch.randn(1, 3, 8, 8),))
    assert "model.eval()" in str(info.value)


def test_wrong_inputs_at_call_time():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    opt = optimize(m, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(InputError, match="4-d"):
        opt(torch.randn(3, 8, 8, 8, 1))
    with pytest.raises(InputError, match="float64"):
        opt(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(InputError, match="expected 1 inputs"):
        opt(torch.randn(1, 3, 8, 8), torch.randn(1))


def test_example_inputs_that_do_not_fit_the_model():
    m = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(CaptureError, match="fails on the example inputs"):
        optimize(m, (torch.randn(1, 5, 8, 8),))


def test_unknown_pass_and_backend():
    m = nn.Linear(3, 3).eval()
    with pytest.raises(GraphoptError, match="unknown pass"):
        optimize(m, (torch.randn(2, 3),), passes=["no_such_pass"])
    with pytest.raises(GraphoptError, match="unknown backend"):
        optimize(m, (torch.randn(2, 3),), backend="tpu")


def test_trace_that_loses_aliasing_is_refused():
    class M(nn.Module):
        def forward(self, x):
            r = x * 1.5
            s = r
            r += x  # in place in eager mode; symbolic tracing records r = r + x
            return r * s

    with pytest.raises(CaptureError, match="does not give the model's own results"):
        optimize(M().eval(), (torch.randn(3),))


@pytest.fixture
def broken_pass():
    @register("fp32")
    def _test_break_relu(gm, ctx):
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is F.relu:
                node.target = F.silu  # a wrong answer that still runs
                n += 1
        return n

    yield "_test_break_relu"
    del REGISTRY["_test_break_relu"]


def test_pass_error_names_pass_history_and_first_wrong_node(broken_pass):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.relu(self.fc(x)) * 2

    model = M().eval()
    with pytest.raises(PassError) as info:
        optimize(model, (torch.randn(3, 4),), passes=["remove_noops", broken_pass])
    err = info.value
    assert err.pass_name == broken_pass and err.passes_before == ["remove_noops"]
    assert "relu" in str(err.node) and "return F.relu(self.fc(x)) * 2" in str(err)


def test_passes_that_raise_become_pass_errors():
    @register("exact")
    def _test_raise(gm, ctx):
        raise RuntimeError("boom")

    try:
        with pytest.raises(PassError, match="boom"):
            optimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), passes=["_test_raise"])
    finally:
        del REGISTRY["_test_raise"]


def test_nan_and_inf_propagate_like_eager():
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    x = torch.randn(1, 2, 6, 6)
    x[0, 0, 2, 2], x[0, 1, 4, 4] = float("nan"), float("inf")
    opt = optimize(m, (x,))
    with torch.no_grad():
        torch.testing.assert_close(opt(x), m(x), equal_nan=True)


def test_nested_outputs_keep_their_structure():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return {"features": y, "pooled": (y.mean((2, 3)), [y.amax((2, 3))])}

    m, x = M().eval(), torch.randn(2, 3, 6, 6)
    opt = optimize(m, (x,))
    got, want = opt(x), m(x)
    assert set(got) == {"features", "pooled"} and isinstance(got["pooled"][1], list)
    close(got["features"], want["features"])
    close(got["pooled"][1][0], want["pooled"][1][0])


def test_parameter_shared_between_two_layers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.b(torch.relu(self.bn(self.a(x))))

    m = M().eval()
    m.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(4, 6)
    opt = optimize(m, (x,))
    close(opt(x), m(x))
    assert torch.equal(m.a.weight, m.b.weight) and m.a.weight is m.b.weight   # still tied, untouched


def test_unsupported_ops_are_left_as_they_are_and_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            spectrum = torch.fft.rfft2(F.relu(self.conv(x)))
            return spectrum.abs().cumsum(-1).flip(1)

    m, x = M().eval(), torch.randn(1, 2, 6, 6)
    opt = optimize(m, (x,))
    close(opt(x), m(x))
    counts = opt.op_counts
    assert any("rfft2" in op for op in counts) and any("cumsum" in op for op in counts)


def test_wrong_device_is_a_clear_error():
    opt = optimize(nn.Linear(3, 3).eval(), (torch.randn(2, 3),))
    with pytest.raises(InputError, match="on cpu"):
        opt(torch.randn(2, 3, device="meta"))


def test_a_pass_that_leaves_dead_nodes_is_caught():
    @register("exact")
    def _test_leave_dead(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.sigmoid, (out.args[0],))
        return 1

    try:
        with pytest.raises(PassError, match="left unused nodes behind"):
            optimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), passes=["_test_leave_dead"])
    finally:
        del REGISTRY["_test_leave_dead"]


def test_a_nondeterministic_pass_is_caught():
    import itertools

    counter = itertools.count()

    @register("exact")
    def _test_flaky(gm, ctx):  # names its new node differently on every run
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            node = gm.graph.call_function(torch.mul, (out.args[0], 1.0))
        node.name = f"copy_{next(counter)}"
        out.replace_input_with(out.args[0], node)
        return 1

    try:
        with pytest.raises(PassError, match="not deterministic"):
            optimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), passes=["_test_flaky"])
    finally:
        del REGISTRY["_test_flaky"]


def test_a_submodule_left_in_training_mode_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].train()  # eval() on the model, then one layer back to training: batch statistics at inference
    with pytest.raises(CaptureError, match="submodule 1 is in training mode"):
        optimize(model, (torch.randn(2, 3, 8, 8),))
    assert model[1].training and not model.training  # (the user's model untouched)


def test_an_exceptions_first_line_names_its_type_even_with_no_message():
    """Every reason and message quoting a caught exception goes through first_line: a bare MemoryError broke the
    engine choice when a line was taken from its empty message."""
    from graphopt.compiler.core.errors import first_line

    assert first_line(MemoryError()) == "MemoryError"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(RuntimeError("compile failed\nat node 3"), width=7) == "RuntimeError: compile"
