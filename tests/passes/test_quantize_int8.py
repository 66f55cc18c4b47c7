"""quantize_int8: fired, structure, numbers, idempotent, and where it must not apply."""

from operator import getitem

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.compiler.core.capture import propagate
from graphopt.compiler.core.pipeline import PassManager
from graphopt.compiler.core.verify import sqnr
from graphopt.compiler.int8.quantize import calibrate
from graphopt.kernels.ops import OPS
from graphopt.passes.pipeline import DEFAULT_PIPELINE, PassContext
from graphopt.passes.quantize_int8 import quantize_int8
from tests.helpers import randomize_bn, traced
from tests.zoo import ResNetish


def _fp32(model, x):
    gm = traced(model, x)
    gm, _ = PassManager(DEFAULT_PIPELINE).run(gm, PassContext((x,)))
    return gm


def _quantize(gm, x, batches, skip=()):
    ctx = PassContext((x,), int8_ranges=calibrate(gm, batches, "minmax", progress=False), int8_skip=frozenset(skip))
    n = quantize_int8(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    propagate(gm, (x,))
    return n, ctx


def _calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OPS[name]]


class Chain(nn.Module):
    """conv -> relu -> maxpool -> conv (+ residual) -> flatten -> linear, and an fp32 reader (sigmoid)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        a = F.max_pool2d(torch.relu(self.c1(x)), 2)
        b = torch.relu(self.c2(a) + a)
        return self.fc(b.flatten(1)), torch.sigmoid(self.fc(b.flatten(1)))


def _data(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def test_fires_and_chains_int8_between_ops():
    x = torch.randn(2, 3, 8, 8)
    gm = _fp32(Chain().eval(), x)
    n, _ = _quantize(gm, x, _data((2, 3, 8, 8)))
    assert n == 3  # two convs, one linear (CSE made the two fc calls one)
    assert len(_calls(gm, "conv2d_act")) == len(_calls(gm, "linear_act")) == 0
    quantize, = _calls(gm, "quantize")  # the only fp32 -> int8 conversion: at the input
    assert quantize.args[0].op == "placeholder"
    c1, c2 = _calls(gm, "qconv2d_act")
    fc, = _calls(gm, "qlinear_act")
    assert c1.args[-2] is not None and c2.args[-2] is not None  # int8 out: their readers take int8
    assert fc.args[-2] is None  # fp32 out: read by the output and by sigmoid
    pool = c2.args[0]
    assert pool.target is F.max_pool2d and pool.meta["tensor_meta"].dtype == torch.int8
    residual = c2.args[11]
    assert residual.target is OPS["dequantize"] and residual.args[0] is pool  # int8 residual, read as fp32
    assert fc.args[0].meta["tensor_meta"].dtype == torch.int8  # flatten passed int8 through


def test_numbers_against_fp32():
    model, x = randomize_bn(ResNetish()).eval(), torch.randn(2, 3, 17, 15)
    gm = _fp32(model, x)
    with torch.no_grad():
        expected = gm(x)
    _quantize(gm, x, _data((4, 3, 17, 15), n=24))
    with torch.no_grad():
        got = gm(x)
    assert got.dtype == torch.float32 and sqnr(expected, got) >= 30.0


def test_idempotent():
    x = torch.randn(2, 3, 8, 8)
    gm = _fp32(Chain().eval(), x)
    n, ctx = _quantize(gm, x, _data((2, 3, 8, 8)))
    code = gm.code
    assert n > 0 and quantize_int8(gm, ctx) == 0 and gm.code == code


def test_skipped_layers_stay_fp32_and_the_rest_adapts():
    x = torch.randn(2, 3, 8, 8)
    gm = _fp32(Chain().eval(), x)
    skip = [n.name for n in gm.graph.nodes if n.target is OPS["conv2d_act"]][1:]  # the second conv
    n, _ = _quantize(gm, x, _data((2, 3, 8, 8)), skip=skip)
    assert n == 2 and len(_calls(gm, "conv2d_act")) == 1
    c1, = _calls(gm, "qconv2d_act")
    assert c1.args[-2] is None  # its reader (maxpool -> fp32 conv) no longer takes int8
    fc, = _calls(gm, "qlinear_act")
    assert fc.args[0].target is OPS["quantize"]


def test_does_nothing_without_calibration_ranges():
    x = torch.randn(2, 3, 8, 8)
    gm = _fp32(Chain().eval(), x)
    code = gm.code
    assert quantize_int8(gm, PassContext((x,))) == 0 and gm.code == code


class RuntimeWeight(nn.Module):
    def forward(self, x, w):
        return F.conv2d(x, w)


def test_leaves_convs_with_runtime_weights_alone():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    gm = traced(RuntimeWeight(), x, w)
    gm, _ = PassManager(DEFAULT_PIPELINE).run(gm, PassContext((x, w)))
    ranges = calibrate(gm, [(x, w)], "minmax", progress=False)
    assert quantize_int8(gm, PassContext((x, w), int8_ranges=ranges)) == 0


def test_leaves_non_float32_alone():
    model, x = nn.Sequential(nn.Conv2d(3, 4, 3)).double().eval(), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    gm = _fp32(model, x)
    ranges = {n.name: (-1.0, 1.0) for n in gm.graph.nodes}
    assert quantize_int8(gm, PassContext((x,), int8_ranges=ranges)) == 0


@pytest.mark.parametrize("ceil_mode", [True])
def test_ceil_mode_pooling_does_not_pass_int8_through(ceil_mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=ceil_mode), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 9, 9)
    gm = _fp32(model, x)
    _quantize(gm, x, _data((1, 3, 9, 9)))
    first, _ = _calls(gm, "qconv2d_act")
    assert first.args[-2] is None  # fp32 into the pooling, quantized again after it


class MixedReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y), torch.sigmoid(y)


def test_an_op_read_by_int8_and_fp32_writes_fp32_and_is_quantized_once_for_the_int8_reader():
    x = torch.randn(1, 3, 7, 7)
    gm = _fp32(MixedReaders().eval(), x)
    n, _ = _quantize(gm, x, _data((1, 3, 7, 7)))
    c1, c2 = _calls(gm, "qconv2d_act")
    assert n == 2 and c1.args[-2] is None
    assert c2.args[0].target is OPS["quantize"] and c2.args[0].args[0] is c1


@pytest.mark.parametrize("scheme, widest", [("s8", 127), ("s7", 63)])
def test_the_scheme_sets_the_weights_range(scheme, widest):
    x = torch.randn(2, 3, 8, 8)
    gm = _fp32(Chain().eval(), x)
    with torch.no_grad():
        expected = gm(x)
    ranges = calibrate(gm, _data((2, 3, 8, 8)), "minmax", progress=False)
    assert quantize_int8(gm, PassContext((x,), int8_ranges=ranges, int8_scheme=scheme)) == 3
    gm.recompile()
    weights = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_int8")]
    codes = [int(getattr(gm, n.target).abs().max()) for n in weights]
    assert len(codes) == 3 and max(codes) == widest
    with torch.no_grad():
        got = gm(x)
    assert sqnr(expected[0], got[0]) >= 30.0


class _Pools(nn.Module):
    def __init__(self, ceil_mode: bool, return_indices: bool):
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=ceil_mode, return_indices=return_indices)

        self.indices = return_indices

    def forward(self, x):
        return self.pool(x)[0] if self.indices else self.pool(x)


@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("ceil_mode, return_indices", [(False, False), (True, False), (False, True)])
def test_the_int8_lowering_runs_a_pooling_on_the_uint8_kernel_with_its_ceil_mode_and_not_one_with_indices(
        module, ceil_mode, return_indices):
    """(lower_int8_onednn's max pooling, on a graph whose pooling reads an int8 value.)"""
    from graphopt.kernels import cpu
    from graphopt.passes.lower_int8_onednn import _max_pool

    x = torch.randint(-128, 128, (2, 3, 10, 9), dtype=torch.int8)
    gm = torch.fx.symbolic_trace(_Pools(ceil_mode, return_indices).eval())
    if not module:  # the functional spelling
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(F.max_pool2d, (node.args[0], 3, 2), {"ceil_mode": ceil_mode,
                                                                                 "return_indices": return_indices})
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        gm.recompile()
    propagate(gm, (x,))
    (pool,) = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function") and n.target is not getitem]
    assert _max_pool(gm, pool) is not return_indices
    gm.graph.eliminate_dead_code()
    gm.recompile()
    if not return_indices:
        assert any(n.target is cpu.max_pool2d_u8 for n in gm.graph.nodes)
        shifted = (x.to(torch.int16) + 128).to(torch.uint8)  # (what the lowered graph's poolings read)
        want = F.max_pool2d(shifted.float(), 3, 2, ceil_mode=ceil_mode).to(torch.uint8)
        assert torch.equal(gm(shifted), want)
