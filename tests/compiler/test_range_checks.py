"""Range checks (compiler/core/finite_range.py: checked_limits, proves): where the whole-graph bound overflows
float32, limits on a few intermediate values prove every value finite segment by segment."""

from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn as nn

from graphopt import optimize
from graphopt.compiler.core.finite_range import SAFE, allowance, checked_limits, input_limit, magnitudes, proves
from graphopt.kernels.signatures import ConvAct, signature_of


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


class Cancelling(nn.Module):
    """x -> 100 x, then pairs of linears that undo each other exactly (H, then H / width) with a relu after each
    pair: eager's values stay about 100x the input's, while the sum-of-|w| bound grows width-fold per pair, past
    float32's range after about 20 pairs."""

    def __init__(self, width: int = 64, pairs: int = 20):
        super().__init__()
        self.gain = nn.Linear(width, width)
        h = _hadamard(width)
        layers: list[nn.Module] = []
        for _ in range(pairs):
            layers += [nn.Linear(width, width), nn.Linear(width, width), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        with torch.no_grad():
            self.gain.weight.copy_(100 * torch.eye(width))
            for i in range(pairs):
                self.layers[3 * i].weight.copy_(h)
                self.layers[3 * i + 1].weight.copy_(h / width)
            for linear in [self.gain, *self.layers[::3], *self.layers[1::3]]:
                linear.bias.zero_()

    def forward(self, x):
        return self.layers(self.gain(x))


def cancelling() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Cancelling().eval(), torch.randn(2, 64) * 0.01


def _portable(model: nn.Module, x: torch.Tensor):
    return optimize(model, (x,), engines="graphopt", progress=False).portable


def test_limits_on_a_few_values_prove_a_graph_whose_whole_bound_overflows():
    model, x = cancelling()
    gm = _portable(model, x)
    assert input_limit(gm) is None  # (the premise: no input bound covers the whole graph)
    limits = checked_limits(gm, magnitudes(gm, (x,)))
    assert limits is not None and limits["x"] == 256.0  # (max |x| 0.03 -> 1 -> 256x headroom)
    checks = {k: v for k, v in limits.items() if k != "x"}
    assert 1 <= len(checks) <= 3 and all(v == 1024.0 for v in checks.values())  # (seen about 3: 3 * 256 -> 1024)
    assert proves(gm, limits)
    for name in checks:  # every check is needed
        assert not proves(gm, {k: v for k, v in limits.items() if k != name})
    assert not proves(gm, {**limits, next(iter(checks)): float(SAFE)})  # a limit the next segment cannot carry
    assert not proves(gm, {**limits, "no_such_value": 1.0})
    assert not proves(gm, {k: v for k, v in limits.items() if k != "x"})  # every input needs a limit
    assert checked_limits(gm, magnitudes(gm, (x,)), checkable=lambda node: False) is None


def test_the_checked_values_hold_on_the_example_and_fail_past_their_limit():
    model, x = cancelling()
    gm = _portable(model, x)
    limits = checked_limits(gm, magnitudes(gm, (x,)))
    seen = magnitudes(gm, (x,))
    assert all(seen[k] <= v for k, v in limits.items())
    big = x.clone()
    big[0, 0] = 100.0  # within the input's limit (256); 100x that after the first linear
    seen = magnitudes(gm, (big,))
    assert seen["x"] <= limits["x"] and any(seen[k] > v for k, v in limits.items() if k != "x")


def test_a_capped_activation_does_not_hide_an_overflow_inside_its_op():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU6()).eval()
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    x = torch.randn(1, 2, 4, 4)
    gm = _portable(model, x)
    assert any(isinstance(signature_of(n), ConvAct) for n in gm.graph.nodes)  # (relu6 fused into the conv)
    limit = input_limit(gm)
    assert limit is not None and limit * 2e30 < SAFE  # (relu6's cap of 6 must not stand for the sum before it)


@pytest.mark.parametrize("poison", [None, "nan", "inf", "-inf", "both infs"])
def test_the_exported_magnitude_is_max_abs_or_nan(poison):
    """What the library returns for a checked value: max |v| exactly on finite values; NaN where v holds a NaN or
    an inf of either sign (ONNX Runtime's ReduceMax alone skips NaN), so the check fails on them."""
    import onnxruntime as ort

    from graphopt.compiler.core import engines

    model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU()).eval(), torch.randn(3, 6)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    inputs = [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"]
    session = ort.InferenceSession(engines.onnx_model(opt, (x,), inputs), providers=["CPUExecutionProvider"])
    x = x.clone()
    if poison == "both infs":
        x[0, 0], x[2, 1] = float("inf"), -float("inf")
    elif poison is not None:
        x[1, 2] = float(poison)
    out, magnitude = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    if poison is None:
        assert float(magnitude) == float(x.abs().max())
    else:
        assert np.isnan(magnitude)  # (the check, float(m) <= limit, fails on it)


@pytest.mark.parametrize("poison", [None, "nan", "inf", "-inf", "both infs", "past float32"])
def test_the_exported_sum_bound_is_sum_abs_or_not_finite(poison):
    """The one-read form of an input's check (engines.SUM_CHECK_MEAN): sum |v|, at least max |v|, on finite
    values; NaN or inf where v holds a NaN or an inf, or where the sum passes float32's range."""
    import onnx
    import onnxruntime as ort

    from graphopt.compiler.core import engines

    model, x = nn.Sequential(nn.Linear(6, 5), nn.ReLU()).eval(), torch.randn(3, 6)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    inputs = [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"]
    proto = engines.onnx_model(opt, (x,), inputs, by_sum=inputs)
    ops = [n.op_type for n in onnx.load_from_string(proto).graph.node]
    assert "ReduceL1" in ops and "ReduceMax" not in ops and "ReduceMin" not in ops
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    x = x.clone()
    if poison == "both infs":
        x[0, 0], x[2, 1] = float("inf"), -float("inf")
    elif poison == "past float32":
        x[0, 0], x[2, 1] = 3e38, -3e38
    elif poison is not None:
        x[1, 2] = float(poison)
    out, bound = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    if poison is None:
        torch.testing.assert_close(float(bound), float(x.abs().sum()), rtol=1e-6, atol=0.0)
        assert float(bound) >= float(x.abs().max())
    else:
        assert not np.isfinite(bound)  # (the check, float(b) <= limit, fails on it)


class ResidualCancelling(nn.Module):
    """Cancelling's pairs as residual blocks, h + relu(H (H / width) h): the bound grows (width + 1)-fold a block
    on the residual stream, past float32's range after about 16 blocks, while eager's values at most double."""

    def __init__(self, width: int = 64, blocks: int = 20):
        super().__init__()
        h = _hadamard(width)
        self.pairs = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))
                                   for _ in range(blocks))
        with torch.no_grad():
            for pair in self.pairs:
                pair[0].weight.copy_(h)
                pair[1].weight.copy_(h / width)
                pair[0].bias.zero_()
                pair[1].bias.zero_()

    def forward(self, x):
        for pair in self.pairs:
            x = x + torch.relu(pair(x))
        return x


def test_on_a_residual_network_the_checks_sit_on_the_residual_stream():
    """A check on a block's inner value leaves the bound the skip connection carries, and the next block
    overflows again; a check on the stream (a value every later one depends on through it alone) restarts the
    whole bound: one check covers what the inner values needed one per block for."""
    torch.manual_seed(0)
    model, x = ResidualCancelling().eval(), torch.randn(2, 64)
    gm = _portable(model, x)
    assert input_limit(gm) is None
    limits = checked_limits(gm, magnitudes(gm, (x,)))
    assert limits is not None and proves(gm, limits)
    checks = [k for k in limits if k != "x"]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert len(checks) == 1 and nodes[checks[0]].target in (operator.add, torch.add), checks


class Branches(nn.Module):
    """d = H x, then c (H / width) d times (H / width) H d: two branches that meet in a product. The product's
    bound overflows; d dominates it, but held to its own limit d still leaves the product past float32's
    range (the branches' gains alone), while one check on the large branch covers it."""

    def __init__(self, c: float = 1e23, width: int = 64):
        super().__init__()
        h = _hadamard(width)
        self.d, self.a, self.b1, self.b = (nn.Linear(width, width) for _ in range(4))
        with torch.no_grad():
            for linear, weight in ((self.d, h), (self.a, c * h / width), (self.b1, h), (self.b, h / width)):
                linear.weight.copy_(weight)
                linear.bias.zero_()

    def forward(self, x):
        d = self.d(x)
        return self.a(d) * self.b(self.b1(d))


def test_a_dominator_that_leaves_the_overflow_where_it_was_is_not_preferred():
    torch.manual_seed(0)
    model, x = Branches().eval(), torch.randn(2, 64)
    gm = _portable(model, x)
    assert input_limit(gm) < allowance(float(x.abs().max()))  # (the premise: the whole bound does not cover x)
    limits = checked_limits(gm, magnitudes(gm, (x,)))
    assert limits is not None and proves(gm, limits)
    assert len(limits) == 2, limits  # (the input and one value: checking d first would take two)
