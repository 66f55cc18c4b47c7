"""The verifier never crashes and never rejects a correct pass because its reference could not run
in float64; the torch.compile backend never fails the user's model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt import PassError, optimize
from graphopt.compiler.core.verify import Oracle, first_divergence, same_bits
from graphopt.passes import REGISTRY, register
from tests.helpers import randomize_bn, traced


class CastsToFloat(nn.Module):
    """Casts to float32 inside forward (as attention blocks do before a softmax): no float64 run as a whole."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))                     # (N, 8, H, W)
        q, k = y.flatten(2).chunk(2, dim=2)                    # a node whose value is a tuple
        attn = (q.transpose(1, 2) @ self.proj.float()).softmax(-1)
        return attn.sum(1), k.mean()


def test_a_model_that_cannot_run_in_float64_still_gets_its_folds():
    model = randomize_bn(CastsToFloat()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError):
        model.double()(x.double())  # (the premise: the whole model cannot run in float64)
    model.float()
    opt = optimize(model, (x,))
    rewrites = {r.name: r.rewrites for r in opt.report}
    assert rewrites["fold_conv_bn"] == 1 and rewrites["fuse_conv_act"] == 1
    with torch.no_grad():
        for got, want in zip(opt(x), model(x)):
            torch.testing.assert_close(got, want)


def test_the_reference_says_which_nodes_ran_in_float32():
    model = randomize_bn(CastsToFloat()).eval()
    x = torch.randn(2, 3, 8, 8)
    oracle = Oracle.build(traced(model, x), (x,))
    assert oracle.ref64 is not None and oracle.narrowed
    assert "float32" in oracle.reference_name


def test_same_bits_and_the_divergence_search_take_tuples():
    a, b = torch.randn(3), torch.randn(3)
    assert same_bits((a, [b, 2]), (a.clone(), [b.clone(), 2]))
    assert not same_bits((a, b), (a, b + 1))
    assert not same_bits((a,), (a, b)) and not same_bits(a, (a,)) and not same_bits(1, 1.5)


def test_a_broken_pass_after_a_tuple_valued_node_is_a_pass_error():
    @register("fp32")
    def _test_break_chunk(gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "call_method" and node.target == "softmax":
                node.target = "log_softmax"
                return 1
        return 0

    try:
        model = randomize_bn(CastsToFloat()).eval()
        x = torch.randn(2, 3, 8, 8)
        with pytest.raises(PassError) as info:
            optimize(model, (x,), passes=["_test_break_chunk"])
        assert "softmax" in str(info.value.node)
        gm = traced(model, x)
        broken = traced(model, x)
        _test_break_chunk(broken, None)
        broken.recompile()
        assert first_divergence(gm, broken, (x,), exact=False).target == "log_softmax"
    finally:
        del REGISTRY["_test_break_chunk"]


def test_the_torch_compile_backend_runs_the_graph_unoptimized_when_graphopt_fails(monkeypatch):
    from graphopt.compiler.core import torch_compile

    def broken(*args, **kwargs):
        raise RuntimeError("an internal failure")

    monkeypatch.setattr(torch_compile, "run_pipeline", broken)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as seen, torch.no_grad():
        warnings.simplefilter("always")
        torch.testing.assert_close(torch.compile(model, backend="graphopt")(x), model(x))
    assert any("runs unoptimized" in str(w.message) and "an internal failure" in str(w.message) for w in seen)
    torch._dynamo.reset()


@pytest.mark.parametrize("stride,padding,dilation,k", [(1, 1, 1, 3), (2, 2, 1, 5), (1, 2, 2, 3), (2, 0, 1, 3)])
def test_the_float64_reference_computes_depthwise_convs_by_shifted_slices(stride, padding, dilation, k):
    from graphopt.compiler.core.verify import _depthwise64

    x = torch.randn(2, 8, 13, 11, dtype=torch.float64)
    w, b = torch.randn(8, 1, k, k, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    torch.testing.assert_close(_depthwise64(x, w, b, stride, padding, dilation),
                               torch.conv2d(x, w, b, stride, padding, dilation, 8))


def test_the_reference_of_a_depthwise_model_uses_the_fast_path(monkeypatch):
    from graphopt.compiler.core import verify

    calls = []
    original = verify._depthwise64
    monkeypatch.setattr(verify, "_depthwise64", lambda *a: calls.append(1) or original(*a))
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU()).eval()
    x = torch.randn(1, 4, 9, 9)
    oracle = Oracle.build(traced(model, x), (x,))
    assert calls and not oracle.narrowed
    torch.testing.assert_close(oracle.ref64[0], model.double()(x.double()))


def _noisy(y: torch.Tensor, db: float, seed: int) -> torch.Tensor:
    """y plus independent noise at ``db`` of SQNR against y."""
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = (y.double().pow(2).sum() / noise.pow(2).sum() / 10 ** (db / 10)).sqrt()
    return (y.double() + noise * scale).float()


def test_a_lowering_under_the_floor_passes_only_where_it_is_as_accurate_against_fp32_as_the_int8_graph():
    from graphopt.compiler.core.pipeline import INT8_LOWERING_FLOOR_DB, INT8_LOWERING_MARGIN_DB
    from graphopt.compiler.core.verify import sqnr

    m, x = nn.Linear(64, 256).eval(), torch.randn(8, 64)
    oracle = Oracle.build(traced(m, x), (x,))
    y = oracle.eager[0]
    reference = _noisy(y, 24.0, seed=1)  # an int8 graph whose own output is at 24 dB against fp32
    as_good, worse = _noisy(y, 24.2, seed=2), _noisy(y, 20.0, seed=3)  # two lowerings that round otherwise
    assert sqnr(reference, as_good) < INT8_LOWERING_FLOOR_DB  # they cannot agree to the floor
    floor, margin = INT8_LOWERING_FLOOR_DB, INT8_LOWERING_MARGIN_DB
    assert "below the floor" in oracle.int8_error([as_good], floor, [reference])  # (no margin: the floor alone)
    assert oracle.int8_error([as_good], floor, [reference], margin_db=margin) is None
    problem = oracle.int8_error([worse], floor, [reference], margin_db=margin)
    assert "below the floor" in problem and "against the fp32 model" in problem
    assert oracle.int8_error([_noisy(reference, 40.0, seed=4)], floor, [reference], margin_db=margin) is None
    broken = reference.clone()
    broken[0, 0] = float("nan")  # a reference that is itself broken passes nothing by the margin
    assert oracle.int8_error([as_good], floor, [broken], margin_db=margin) is not None


def test_the_int8_lowering_is_checked_with_the_margin_and_quantizing_without_it(monkeypatch):
    from graphopt.compiler.core.pipeline import INT8_LOWERING_MARGIN_DB

    calls, original = [], Oracle.int8_error

    def spy(self, outputs, floor_db, reference=None, margin_db=None):
        calls.append((reference is not None, margin_db))
        return original(self, outputs, floor_db, reference, margin_db=margin_db)

    monkeypatch.setattr(Oracle, "int8_error", spy)
    m = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    x = torch.randn(1, 16, 32, 32)
    optimize(m, (x,), quantize="int8", calibration=[(torch.randn(1, 16, 32, 32),) for _ in range(2)],
             engines="graphopt", progress=False)
    assert (True, INT8_LOWERING_MARGIN_DB) in calls  # the lowering, against the int8 graph
    assert (False, None) in calls  # quantize_int8 itself, against the fp32 model: the floor alone
