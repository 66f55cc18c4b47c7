"""optimize(quantize="int8"): accuracy on the zoo, the report, the budget, calibration, deployment."""

import copy
import math
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

from graphopt import GraphoptError, InputError, load, optimize
from graphopt.compiler.core.pipeline import lower
from graphopt.compiler.core.verify import sqnr
from graphopt.compiler.int8.quantize import min_int8_macs
from graphopt.compiler.int8.scheme import check_loaded, scheme_of, warn_on_load
from graphopt.kernels import cpu
from graphopt.passes.lib.describe import describe_target
from graphopt.passes.pipeline import LOWERING, PassContext
from tests.helpers import randomize_bn
from tests.zoo import ZOO


@pytest.fixture(autouse=True)
def quantize_every_layer(monkeypatch):
    """The zoo's layers are small: quantize them all anyway (the size rule has its own test)."""
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)


def _batches(make, n, batch=4, seed=0):
    torch.manual_seed(seed)
    return [(make(batch),) for _ in range(n)]


def _int8(name, **kw):
    factory, make = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()
    kw.setdefault("calibration", _batches(make, 24))
    return model, make, optimize(model, (make(2),), quantize="int8", progress=False, **kw)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_int8_model_against_fp32_on_the_zoo(name):
    model, make, opt = _int8(name)
    state = copy.deepcopy(model.state_dict())
    x = _batches(make, 1, batch=3, seed=7)[0][0]
    with torch.no_grad():
        expected, got = model(x), opt(x)
    assert sqnr(expected, got) >= 30.0
    counts = opt.op_counts
    assert any(k.startswith("onednn.q") for k in counts), counts  # real int8 primitives, not fake-quant float
    report = opt.int8_report
    assert report.layers and all(layer["int8"] for layer in report.layers)
    assert all(layer["sqnr_db"] > 20.0 for layer in report.layers), report.table()
    assert report.output_sqnr_db >= 30.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the user's model is untouched


def test_consecutive_int8_ops_hand_int8_to_each_other():
    _, _, opt = _int8("resnet_blocks")
    code = opt.code
    counts = opt.op_counts
    assert counts["graphopt.kernels.cpu.quantize_u8"] <= 2  # the input, and the classifier after the fp32 pooling
    assert counts.get("onednn.qconv2d_pointwise.binary", 0) >= 2  # residual adds fused as int8 sums
    assert "conv2d_act" not in code


def test_lowered_int8_agrees_with_the_portable_graph():
    model, make, opt = _int8("mobilenet_v2_blocks")
    x = make(3)
    with torch.no_grad():
        assert sqnr(opt.portable(x), opt(x)) >= 35.0


def test_save_and_load_an_int8_module_bitwise(tmp_path):
    _, make, opt = _int8("resnet_blocks")
    opt.save(tmp_path / "m")
    back = load(tmp_path / "m")
    for n in (1, 5):
        x = make(n)
        assert torch.equal(back(x), opt(x))


def test_calibration_statistics_same_one_at_a_time_or_all_at_once():
    factory, make = ZOO["resnet_blocks"]
    model = randomize_bn(factory()).eval()
    torch.manual_seed(3)
    data = make(12)
    ones = optimize(model, (data[:2],), quantize="int8", calibration=[(row[None],) for row in data], progress=False)
    whole = optimize(model, (data[:2],), quantize="int8", calibration=[(data,)], progress=False)
    # every scale and zero point is a literal in the code; the statistics themselves are batch-exact
    # (tests/passes/test_observers.py), the model's own fp32 values differ by rounding between batch sizes
    pattern = re.compile(r"-?\d+\.\d+(?:e-?\d+)?")
    a, b = pattern.findall(ones.portable.code), pattern.findall(whole.portable.code)
    assert len(a) == len(b) > 10
    torch.testing.assert_close(torch.tensor([float(v) for v in a], dtype=torch.float64),
                               torch.tensor([float(v) for v in b], dtype=torch.float64), rtol=1e-5, atol=0)
    assert re.sub(pattern, "#", ones.portable.code) == re.sub(pattern, "#", whole.portable.code)


def test_budget_in_db_is_reached_by_falling_back_the_most_sensitive_layers():
    _, make, plain = _int8("resnet_blocks")
    target = plain.int8_report.output_sqnr_db + 4.0
    _, _, opt = _int8("resnet_blocks", accuracy_budget=target)
    report = opt.int8_report
    assert report.fallback, report.table()
    assert report.output_sqnr_db >= target
    fp32_layers = [layer for layer in report.layers if not layer["int8"]]
    assert [layer["name"] for layer in fp32_layers] == sorted(report.fallback, key=[
        layer["name"] for layer in fp32_layers].index)
    assert all(layer["reason"].startswith("budget") for layer in fp32_layers)
    assert "budget" in report.table()


@pytest.mark.parametrize("needed", [1, 5, 12, 23, 40])
def test_the_budget_returns_the_fewest_sensitive_layers_in_logarithmically_many_builds(needed):
    """``_hold_budget`` over 40 layers of known sensitivity (the metric sums the returned layers' gains): the
    ``needed`` most sensitive return to fp32, no more, in 1 + 40 + about 2 log2(needed) builds (one a layer
    before: 1 + 40 + needed)."""
    from types import SimpleNamespace

    from graphopt.compiler.int8.quantize import _hold_budget

    gain = {f"layer{i}": i + 1 for i in range(40)}  # layer39 the most sensitive
    built = []

    class Quantizer:
        layers, fp32 = [SimpleNamespace(name=n) for n in gain], frozenset(gain)

        def build(self, skip):
            built.append(frozenset(skip))
            return frozenset(skip)

        def runnable(self, module):
            return module

    floor = sum(sorted(gain.values())[-needed:])
    metric = lambda returned: float(sum(gain[n] for n in returned))  # noqa: E731
    skip, reasons = _hold_budget(Quantizer(), (metric, metric(gain) - floor), SimpleNamespace(budget="a test"), set())
    assert skip == {f"layer{i}" for i in range(40 - needed, 40)} and set(reasons) == skip
    assert len(built) <= 1 + 40 + 2 * math.ceil(math.log2(needed)) + 1


def test_budget_as_a_user_metric_with_a_tolerance():
    factory, make = ZOO["seed_convnet"]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()
    held_out = make(16)
    with torch.no_grad():
        labels = model(held_out).argmax(1)

    def agreement(m):
        with torch.no_grad():
            return float((m(held_out).argmax(1) == labels).float().mean())

    opt = optimize(model, (make(2),), quantize="int8", calibration=_batches(make, 8), progress=False,
                   accuracy_budget=(agreement, 0.0))
    assert agreement(opt) == 1.0


def test_a_met_budget_changes_nothing():
    _, _, opt = _int8("seed_convnet", accuracy_budget=5.0)
    assert opt.int8_report.fallback == [] and all(layer["int8"] for layer in opt.int8_report.layers)


@pytest.mark.parametrize("calibration, error, match", [
    (None, GraphoptError, "needs calibration data"),
    ([], GraphoptError, "calibration is empty"),
    (5, GraphoptError, "iterable of input tuples"),
    ([(torch.randn(2, 1, 31, 32),)], InputError, "batch 0, input 0"),
    ([(torch.randn(2, 1, 32, 32),), (torch.randn(2, 1, 32, 32), torch.randn(1))], InputError, "batch 1 has 2 inputs"),
    ([(torch.full((2, 1, 32, 32), float("nan")),)], InputError, "NaN"),
    ([(torch.randn(0, 1, 32, 32),)] * 3, GraphoptError, "all empty"),
    ([(torch.randn(2, 1, 32, 32).double(),)], InputError, "float64"),
])
def test_bad_calibration_data_gets_a_clear_error(calibration, error, match):
    factory, make = ZOO["seed_convnet"]
    with pytest.raises(error, match=match) as info:
        optimize(factory().eval(), (make(2),), quantize="int8", calibration=calibration, progress=False)
    assert info.value.hint


def test_unknown_quantize_and_method_are_refused():
    factory, make = ZOO["seed_convnet"]
    with pytest.raises(GraphoptError, match="unknown quantize"):
        optimize(factory().eval(), (make(2),), quantize="int4")
    with pytest.raises(GraphoptError, match="calibration_method"):
        optimize(factory().eval(), (make(2),), quantize="int8", calibration=_batches(make, 1),
                 calibration_method="entropy", progress=False)


@pytest.mark.parametrize("method", ["minmax", "percentile", "histogram"])
def test_every_calibration_method_gives_a_usable_model(method):
    model, make, opt = _int8("resnet_blocks", calibration_method=method)
    x = make(2)
    with torch.no_grad():
        assert sqnr(model(x), opt(x)) >= 28.0
    assert opt.int8_report.method == method


def test_dumps_show_the_int8_graph(tmp_path):
    _int8("seed_convnet", dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith("_quantize_int8.py") for n in names), names
    assert any(n.endswith("_lower_int8_onednn.py") for n in names), names
    assert "qconv2d_act" in next(tmp_path.glob("*_quantize_int8.py")).read_text()
    assert "| conv" in (tmp_path / "int8.md").read_text()


def test_a_constant_input_quantizes_without_a_zero_scale():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    x = torch.zeros(1, 2, 6, 6)
    opt = optimize(model, (x,), quantize="int8", calibration=[(x,)] * 3, progress=False)
    with torch.no_grad():
        got, expected = opt(x), model(x)
    assert got.isfinite().all()
    torch.testing.assert_close(got, expected, atol=float(expected.abs().max()) / 50 + 1e-6, rtol=0)


def test_small_layers_stay_fp32_on_the_cpu_and_the_report_says_why(monkeypatch):
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 1 << 20)
    least = min_int8_macs(cpu.int8_scheme())  # 1 << 20 with VNNI / AMX, 8 << 20 without
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 16 * 16, 10)).eval()
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16)
    opt = optimize(model, (x,), quantize="int8", calibration=[(torch.randn(1, 1, 16, 16),) for _ in range(4)],
                   progress=False)
    runs = {layer["node"]: layer for layer in opt.int8_report.layers}
    small = [layer for layer in runs.values() if not layer["int8"]]
    big = [layer for layer in runs.values() if layer["int8"]]
    # 1x8x16x16x9 = 18k, 64x16x16x72 = 1.2M, 64x64x9x256 = 9.4M, 10x16384 = 164k
    assert len(big) == sum(m >= least for m in (18_432, 1_179_648, 9_437_184, 163_840)), opt.int8_report.table()
    assert len(small) + len(big) == 4
    assert all(layer["reason"].startswith("small") for layer in small)
    assert not any(math.isnan(layer["sqnr_db"]) for layer in runs.values())  # fp32 layers are measured too
    assert opt.int8_report.fallback == []
    with torch.no_grad():
        assert sqnr(model(x), opt(x)) >= 30.0


def test_fp32_layers_stay_fp32_and_unknown_names_are_refused():
    _, make, plain = _int8("resnet_blocks")
    names = [layer["name"] for layer in plain.int8_report.layers]
    _, _, opt = _int8("resnet_blocks", fp32_layers=[names[0], names[-1]])
    kept = {layer["name"]: layer for layer in opt.int8_report.layers}
    assert not kept[names[0]]["int8"] and kept[names[0]]["reason"] == "asked: fp32_layers"
    assert kept[names[1]]["int8"]
    with pytest.raises(GraphoptError, match="no quantizable layer: nope"):
        _int8("resnet_blocks", fp32_layers=["nope"])


def test_a_cpu_without_vnni_gets_seven_bit_weights_and_a_warning_once(monkeypatch):
    from graphopt.compiler.int8.quantize import _warn_no_dot_product

    monkeypatch.setattr("graphopt.kernels.cpu.has_vnni", lambda: False)
    _warn_no_dot_product.cache_clear()  # (an earlier test in this process may have said it)
    with pytest.warns(UserWarning, match="VNNI"):
        model, make, opt = _int8("seed_convnet", calibration=_batches(ZOO["seed_convnet"][1], 8))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _int8("seed_convnet", calibration=_batches(ZOO["seed_convnet"][1], 8))
    assert not [w for w in said if "VNNI" in str(w.message)]  # once per process, not at every optimize()
    report = opt.int8_report
    assert report.scheme == "s7" and "scheme s7" in report.table() and scheme_of(opt.portable) == "s7"
    weights = [t for _, t in opt.portable.named_buffers() if t.dtype == torch.int8]
    assert weights and max(int(t.abs().max()) for t in weights) == 63
    x = make(3)
    with torch.no_grad():
        assert sqnr(model(x), opt(x)) >= 30.0 and sqnr(opt.portable(x), opt(x)) >= 60.0  # oneDNN == the reference


def test_the_report_and_the_graph_name_the_scheme():
    _, _, opt = _int8("resnet_blocks")
    scheme = cpu.int8_scheme()
    assert opt.int8_report.scheme == scheme == scheme_of(opt.portable)
    assert opt.int8_report.as_dict()["scheme"] == scheme and f"scheme {scheme}" in opt.int8_report.table()
    assert check_loaded(scheme) is None  # it runs exactly where it was made
    fp32 = optimize(ZOO["resnet_blocks"][0]().eval(), (ZOO["resnet_blocks"][1](2),))
    assert scheme_of(fp32.portable) is None


def test_8_bit_weights_on_a_cpu_without_vnni_run_fp32_and_say_so(monkeypatch):
    """An s8 module lowered where int8 saturates: each int8 layer becomes the fp32 layer on its dequantized
    weights (the same numbers to fp32 rounding), with a warning for the loader to give."""
    _, make, opt = _int8("resnet_blocks")
    portable, made_with = opt.portable, scheme_of(opt.portable)
    monkeypatch.setattr(cpu, "has_vnni", lambda: False)
    if made_with == "s8":
        with pytest.warns(UserWarning, match="scheme s8"):
            assert "fp32 speed" in warn_on_load(portable)
    else:  # (made on a CPU without VNNI: s7 runs exactly everywhere)
        assert warn_on_load(portable) is None
    x = make(3)
    lowered, _ = lower(portable, PassContext((x,)), LOWERING["cpu"], check=False)
    counts = Counter(describe_target(n) for n in lowered.graph.nodes)
    assert any(k.startswith("onednn.q") for k in counts) == (made_with == "s7"), counts
    with torch.no_grad():
        assert sqnr(portable(x), lowered(x)) >= 50.0


@pytest.mark.skipif(cpu.int8_scheme() != "s8" or cpu.onednn_isa_cap() is not None,
                    reason="needs a CPU with VNNI / AMX to make an s8 module")
def test_an_s8_module_saved_here_runs_on_an_avx2_cpu(tmp_path):
    from safetensors.torch import save_file

    _, make, opt = _int8("resnet_blocks")
    x = make(3)
    with torch.no_grad():
        save_file({"x": x, "y": opt(x)}, str(tmp_path / "io.safetensors"))
    opt.save(tmp_path / "m")
    script = "\n".join([
        "import warnings, torch",
        "from safetensors.torch import load_file",
        "from graphopt import load",
        "from graphopt.compiler.core.verify import sqnr",
        "from graphopt.compiler.int8.scheme import warn_on_load",
        f"io = load_file({str(tmp_path / 'io.safetensors')!r})",
        f"back = load({str(tmp_path / 'm')!r})",
        "with warnings.catch_warnings(record=True) as seen:",
        "    warnings.simplefilter('always')",
        "    warn_on_load(back.portable)",
        "with torch.no_grad():",
        "    print(len(seen), sqnr(io['y'], back(io['x'])))",
    ])
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    warned, db = out.stdout.split()[-2:]
    assert int(warned) == 1 and float(db) >= 50.0, out.stdout


def test_resnet_at_16x16_with_fp32_residuals_into_int8_convs():
    """An fp32 layer's output summed into an int8 conv (oneDNN's sum post-op) must be channels-last: at 16x16
    this graph used to fail with "For post op sum, accum tensor must be contiguous"."""
    factory, _ = ZOO["resnet_blocks"]
    torch.manual_seed(0)
    model = randomize_bn(factory()).eval()

    def make(n):
        return torch.randn(n, 3, 16, 16)

    opt = optimize(model, (make(2),), quantize="int8", calibration=[(make(4),) for _ in range(8)], progress=False,
                   fp32_layers=["stem.0", "layer2.conv1", "layer2.downsample.0"])
    assert opt.op_counts.get("onednn.qconv2d_pointwise.binary", 0) >= 1
    x = make(3)
    with torch.no_grad():
        assert sqnr(model(x), opt(x)) >= 30.0 and sqnr(opt.portable(x), opt(x)) >= 40.0


class ResidualOnItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        return self.c3(torch.relu(self.c2(a) + a))  # c2 reads a and sums into it: oneDNN must write a copy


def test_a_conv_summing_into_its_own_input_gets_a_copy():
    torch.manual_seed(0)
    model = ResidualOnItsInput().eval()
    batches = [(torch.randn(2, 3, 12, 12),) for _ in range(4)]
    opt = optimize(model, batches[0], quantize="int8", calibration=batches, progress=False)
    assert opt.op_counts.get("onednn.qconv2d_pointwise.binary", 0) == 1
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        assert sqnr(opt.portable(x), opt(x)) >= 40.0 and sqnr(model(x), opt(x)) >= 30.0


class _Outlier(torch.nn.Module):
    """One input channel of the second conv is 10^4 times larger than the rest and has zero weights: with
    per-tensor int8 activations it sets the scale, and every channel that matters rounds to 0."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.register_buffer("gain", torch.ones(1, 16, 1, 1))
        self.gain[0, 0] = 1e4
        with torch.no_grad():
            self.conv2.weight[:, 0] = 0.0
        self.head = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)) * self.gain)))


def test_int8_without_a_budget_returns_sensitive_layers_to_fp32_instead_of_failing(monkeypatch):
    from graphopt.compiler.core.verify import sqnr
    from graphopt.compiler.int8.quantize import AUTO_FLOOR_DB

    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    torch.manual_seed(0)
    model = _Outlier().eval()
    x = torch.randn(2, 3, 16, 16)
    q = optimize(model, (x,), quantize="int8", calibration=[(torch.randn(2, 3, 16, 16),) for _ in range(6)],
                 calibration_method="minmax", progress=False)
    assert q.int8_report.fallback, "a layer should have gone back to fp32"
    assert all(layer["reason"].startswith("budget") for layer in q.int8_report.layers
               if layer["name"] in q.int8_report.fallback)
    assert q.int8_report.output_sqnr_db >= AUTO_FLOOR_DB
    with torch.no_grad():
        assert sqnr(model(x), q(x)) >= AUTO_FLOOR_DB
