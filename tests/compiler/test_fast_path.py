"""The guarded fast path: relu / clamps fused into oneDNN only on inputs that provably make no NaN or inf."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from graphopt import GraphoptError, optimize
from graphopt.compiler.core import fast_path
from graphopt.compiler.core.finite_range import SAFE, input_limit
from tests.helpers import randomize_bn, traced
from tests.zoo import ZOO


def _pair(name: str, batch: int = 2):
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    x = inputs(batch)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(fast_path, "MIN_CLAMPED_ELEMENTS", 0)
    try:
        fast = optimize(model, (x,))
    finally:
        monkey.undo()
    return model, x, fast, optimize(model, (x,), nan_checks="strict")


@pytest.mark.parametrize("name", ["seed_convnet", "resnet_blocks", "mobilenet_v2_blocks"])
def test_fused_and_separate_activations_give_the_same_bits(name):
    model, x, fast, strict = _pair(name)
    assert fast.fast_graph_module is not None and strict.fast_graph_module is None
    separate = lambda code: code.count("torch.relu_(") + code.count("torch.clamp_(")  # noqa: E731
    assert separate(fast.fast_graph_module.code) < separate(strict.code)  # the conv activations are post-ops now
    with torch.no_grad():
        for batch in (x, torch.randn((3, *x.shape[1:]))):
            assert torch.equal(fast(batch), strict(batch))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30])
def test_inputs_outside_the_limit_take_the_separate_activations(value):
    model, x, fast, _ = _pair("resnet_blocks")
    bad = x.clone()
    bad.view(-1)[5] = value
    assert not fast_path.within(fast._fast_limit, (bad,))
    with torch.no_grad():
        got, want = fast(bad), model(bad)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_the_bound_is_sound_on_a_model_built_to_overflow():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU()).eval()
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.fill_(1e18)
    x = torch.randn(1, 2, 4, 4)
    limit = input_limit(traced(model, x))
    assert limit is None or limit * (2 * 1e18) ** 2 < SAFE
    huge = torch.full((1, 2, 4, 4), 1e3)
    with torch.no_grad():
        assert bool(model(huge).isinf().any())  # (the premise: this input overflows)
    assert limit is None or not fast_path.within(limit, (huge,))


def test_an_op_without_a_bound_keeps_the_graph_strict():
    class Exp(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.exp(torch.relu(self.conv(x)))   # exp overflows: no bound

    x = torch.randn(1, 3, 8, 8)
    assert input_limit(traced(Exp().eval(), x)) is None


def test_nan_checks_is_validated():
    with pytest.raises(GraphoptError, match="nan_checks"):
        optimize(nn.Linear(2, 2).eval(), (torch.randn(1, 2),), nan_checks="loose")


def test_a_reloaded_module_runs_the_same_plan(tmp_path, monkeypatch):
    from graphopt import load

    monkeypatch.setattr(fast_path, "MIN_CLAMPED_ELEMENTS", 0)
    model, x, fast, _ = _pair("resnet_blocks")
    loaded = load(fast.save(tmp_path / "saved"))
    assert loaded.fast_graph_module is not None and loaded._fast_limit == fast._fast_limit
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
