"""Which int8 plan runs (compiler/int8/plans.py): graphopt's int8, every layer int8, in a library, or fp32.

The choice is made by timing; these tests force its outcome (engines.race returns set times) so that what they
check does not depend on the machine's speed: the plans built, the numerics check of another library's int8, the
fp32 fallback and its report, save / load.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter

import pytest
import torch

from graphopt import export_onnx, load, optimize
from graphopt.compiler.core import engines
from graphopt.compiler.core.pipeline import is_quantized
from graphopt.compiler.core.verify import sqnr
from graphopt.compiler.int8.plans import SLOWER, conv_sums, sums_of
from graphopt.kernels.signatures import QConvAct, signature_of
from tests.helpers import randomize_bn
from tests.zoo import ZOO


@pytest.fixture(autouse=True)
def _same_layers_int8_on_every_cpu(monkeypatch):
    """Which layers are large enough for int8 depends on the CPU (8x the multiply-adds without VNNI / AMX:
    compiler/int8/quantize.py S7_MACS_FACTOR); the plans tested here do not, so every CPU quantizes the layers a
    VNNI CPU would (tests/compiler/test_int8.py tests the factor itself)."""
    monkeypatch.setattr("graphopt.compiler.int8.quantize.S7_MACS_FACTOR", 1)


def _model(name: str = "resnet_blocks", batch: int = 2):
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    return randomize_bn(make()).eval(), inputs(batch), [(inputs(batch),) for _ in range(4)]


def _times(monkeypatch, **ms) -> list[set]:
    """engines.race reports ``ms`` (9 ms for anything not named); returns the candidate sets it was asked about."""
    asked = []

    def race(candidates, inputs, sizes=None):
        asked.append(set(candidates))
        return {name: ms.get(name.replace(" ", "_"), 9.0) for name in candidates}
    monkeypatch.setattr(engines, "race", race)
    return asked


def test_every_layer_int8_in_onnxruntime_when_it_measures_fastest(monkeypatch, tmp_path):
    model, x, calibration = _model()
    asked = _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=3.0, int8_every_layer=0.5, fp32=1.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert {"int8", "int8 every layer", "fp32"} in asked  # (the every-layer plan: a layer is small for oneDNN)
    report = opt.int8_report
    assert opt.engine == "onnxruntime" and is_quantized(opt.portable)
    assert report.plan.startswith("int8 every layer in onnxruntime") and "fp32 1.000 ms" in report.plan
    assert all(layer["int8"] for layer in report.layers)
    assert opt.report[-1].name == f"int8 plan: {report.plan}"
    with torch.no_grad():
        got, own, want = opt(x), opt.graph_module(x), model(x)
    assert sqnr(own, got) >= engines.INT8_AGREE_DB  # the library's int8 is graphopt's int8 graph, to rounding
    assert sqnr(want, got) >= 25.0
    residual_convs = {n.name for n in opt.portable.graph.nodes
                      if isinstance(signature_of(n), QConvAct) and signature_of(n).residual is not None}
    assert residual_convs and set(opt.int8_sums) == residual_convs
    folder = opt.save(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["engine"] == "onnxruntime" and set(manifest["engine_int8_sums"]) == residual_convs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load(folder)
    assert back.engine == "onnxruntime"
    with torch.no_grad():
        assert torch.equal(back(x), got)
        five = torch.randn(5, *x.shape[1:])  # another batch size: the same session (compiler/core/engines.py)
        assert opt._engine(five) is not None and sqnr(opt.graph_module(five), opt(five)) >= engines.INT8_AGREE_DB
        assert torch.equal(back(five), opt(five))


def test_graphopts_int8_plan_alone_when_no_layer_is_small(monkeypatch):
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    model, x, calibration = _model()
    asked = _times(monkeypatch, graphopt=1.0, onnxruntime=2.0, int8=1.0, fp32=2.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert asked[-1] == {"int8", "fp32"}
    assert opt.engine == "graphopt" and opt.int8_report.plan.startswith("int8 in graphopt")


def test_a_plan_with_no_int8_layer_is_raced_only_as_fp32(monkeypatch):
    # every layer small for oneDNN: graphopt's own plan is the fp32 graph, and must not win under the name "int8"
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 10**12)
    model, x, calibration = _model("mlp_bn_gelu_layernorm")
    asked = _times(monkeypatch, graphopt=1.0, onnxruntime=2.0, int8=0.1, int8_every_layer=3.0, fp32=1.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert asked[-1] == {"int8 every layer", "fp32"}
    report = opt.int8_report
    assert not is_quantized(opt.portable) and report.plan.startswith("fp32 in graphopt")
    assert all(not layer["int8"] for layer in report.layers)


def test_with_no_int8_layer_in_any_plan_the_fp32_module_runs_unraced(monkeypatch):
    model, x, calibration = _model("mlp_bn_gelu_layernorm")
    layers = [layer["name"] for layer in optimize(model, (x,), quantize="int8", calibration=calibration,
                                                  engines="graphopt", progress=False).int8_report.layers]
    asked = _times(monkeypatch, graphopt=1.0, onnxruntime=2.0, int8=0.1, int8_every_layer=0.1, fp32=1.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime",
                   fp32_layers=layers, progress=False)
    assert {"int8", "fp32"} not in asked and all("int8 every layer" not in names for names in asked)
    report = opt.int8_report
    assert not is_quantized(opt.portable) and opt.engine == "graphopt"
    assert report.plan == "fp32 in graphopt (no plan has an int8 layer: each layer's reason says why)"
    assert opt.report[-1].name == f"int8 plan: {report.plan}"
    assert layers and all(layer["reason"] == "asked: fp32_layers" for layer in report.layers)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_fp32_module_runs_when_every_int8_module_is_slower(monkeypatch, tmp_path):
    model, x, calibration = _model()
    _times(monkeypatch, graphopt=1.0, onnxruntime=2.0, int8=3.0, int8_every_layer=2.0, fp32=1.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    report = opt.int8_report
    assert not is_quantized(opt.portable) and report.plan.startswith("fp32 in graphopt")
    assert report.layers and all(not layer["int8"] and layer["reason"].startswith(SLOWER) for layer in report.layers)
    assert "2.000 ms" in report.layers[0]["reason"] and report.output_sqnr_db > 80.0
    assert SLOWER in report.table() and report.fallback == []
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-4)
    back = load(opt.save(tmp_path / "m"))
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


def test_engines_graphopt_quantizes_as_asked_without_measuring(monkeypatch):
    model, x, calibration = _model()
    asked = _times(monkeypatch, int8=9.0, fp32=1.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="graphopt", progress=False)
    assert asked == [] and is_quantized(opt.portable) and opt.int8_report.plan == "graphopt's int8 kernels"


def test_a_library_whose_int8_disagrees_is_rejected(monkeypatch):
    model, x, calibration = _model()
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, int8_every_layer=2.0, fp32=3.0)
    real = engines.build

    def noisy(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda *xs: run(*xs) + 0.3 * torch.randn(2, 10) * run(*xs).abs().max()
    monkeypatch.setattr(engines, "build", noisy)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert opt.engine == "graphopt" and is_quantized(opt.portable)
    assert "SQNR" in opt.engine_plan.reasons["onnxruntime"] and "int8 graph" in opt.engine_plan.reasons["onnxruntime"]


def test_a_saved_int8_plan_the_library_now_disagrees_with_loads_graphopts_graph(monkeypatch, tmp_path):
    model, x, calibration = _model()
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, int8_every_layer=2.0, fp32=3.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert opt.engine == "onnxruntime"
    folder = opt.save(tmp_path / "m")
    real = engines.build
    monkeypatch.setattr(engines, "build", lambda *a, **k: (lambda run: lambda *xs: run(*xs) * -1.0)(real(*a, **k)))
    with pytest.warns(UserWarning, match="disagrees with graphopt's int8 graph"):
        back = load(folder)
    assert back.engine == "graphopt"
    with torch.no_grad():
        assert sqnr(opt.graph_module(x), back(x)) == float("inf")


def test_int8_disagreement_names_the_output_and_the_reason():
    a = torch.randn(3, 4)
    assert engines.int8_disagreement([a], [a + 1e-4 * a]) is None
    assert "shape" in engines.int8_disagreement([a], [a[:2]])
    assert "output 1: SQNR" in engines.int8_disagreement([a, a], [a, -a])
    assert "SQNR" in engines.int8_disagreement([a], [a.masked_fill(a > 0, float("nan"))])


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y)


def test_conv_sums_are_the_convolutions_own_range_before_the_residual(monkeypatch):
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    torch.manual_seed(0)
    model, batches = _Residual().eval(), [(torch.randn(2, 3, 9, 7),), (3 * torch.randn(1, 3, 9, 7),)]
    fp32 = optimize(model, batches[0], engines="graphopt").portable
    q = optimize(model, batches[0], quantize="int8", calibration=batches, engines="graphopt", progress=False)
    ranges = conv_sums(fp32, batches, [q.portable])
    with torch.no_grad():
        parts = torch.cat([model.b(torch.relu(model.a(x))).flatten() for (x,) in batches])
    (name, (lo, hi)), = ranges.items()  # one conv with a residual (the other's output is int8: no sum)
    torch.testing.assert_close(torch.tensor([lo, hi]), torch.stack([parts.min(), parts.max()]), rtol=1e-5, atol=1e-5)
    sums = sums_of(q.portable, ranges)
    assert len(sums) == 1 and next(iter(sums.values()))[0] == pytest.approx((max(hi, 0) - min(lo, 0)) / 255)


def _int8_in_onnxruntime(monkeypatch, make: type, shape: tuple) -> tuple:
    """(a seeded ``make()``, it optimized to int8 every layer in ONNX Runtime, its example input of ``shape``)."""
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(shape)
    calibration = [(torch.randn(shape),) for _ in range(4)]
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, fp32=3.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert opt.engine == "onnxruntime"
    return model, opt, x


def _ops_run(model: bytes, path) -> list[str]:
    """The op types ONNX Runtime runs for ``model``, after its fusions (its optimized graph, saved to ``path``)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(path)).graph.node]


class _Pooled(torch.nn.Module):
    """Two convs, the second's output (float: the pooling reads it) pooled into a linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_a_float_output_conv_the_pooling_and_the_classifier_run_int8_in_onnxruntime(monkeypatch, tmp_path):
    """The conv's output quantized after its relu (conv_sums, quantized_after_act): ONNX Runtime fuses it into
    QLinearConv and the pooling into QLinearGlobalAveragePool (the quantization of the classifier's input is moved
    before the flatten); the classifier, float output, int32 bias, runs as QGemm. Without the conv's quantization
    it ran as a float Conv; with a float bias the classifier ran as a float Gemm."""
    model, opt, x = _int8_in_onnxruntime(monkeypatch, _Pooled, (1, 3, 12, 12))
    floats = [n.name for n in opt.portable.graph.nodes
              if isinstance(signature_of(n), QConvAct) and signature_of(n).out_scale is None]
    assert floats and set(opt.int8_sums) == set(floats)

    def ops() -> list[str]:
        return _ops_run(engines.onnx_model(opt, (x,)), tmp_path / "optimized.onnx")
    run = ops()
    assert "Conv" not in run and run.count("QLinearConv") == 2
    assert "QLinearGlobalAveragePool" in run and "QGemm" in run
    assert not {"Gemm", "GlobalAveragePool", "Relu", "DequantizeLinear"} & set(run)
    with torch.no_grad():
        assert sqnr(opt.graph_module(x), opt(x)) >= engines.INT8_AGREE_DB
        assert sqnr(model(x), opt(x)) >= 25.0
    exported = tmp_path / "q.onnx"  # the user's file runs what the library ran
    export_onnx(opt, (x,), exported)
    in_file = _ops_run(str(exported), tmp_path / "exported.onnx")
    assert in_file.count("QLinearConv") == 2 and "QLinearGlobalAveragePool" in in_file and "QGemm" in in_file
    assert not {"Conv", "Gemm", "GlobalAveragePool", "Relu"} & set(in_file)
    sums, opt.int8_sums = opt.int8_sums, {}
    assert ops().count("Conv") == 1  # (without its sum: the float conv, float weights)
    opt.int8_sums = sums
    back = load(opt.save(tmp_path / "m"))  # the loader takes a float-output conv's sum
    assert back.engine == "onnxruntime" and back.int8_sums == opt.int8_sums
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))  # the same graph rebuilt from the saved plan


class _SqueezeExcite(torch.nn.Module):
    """EfficientNet's block: a 1x1 expand conv with SiLU (int8 output), a depthwise conv with SiLU (float output: the
    pooling and the gate's multiply read it), the squeeze-excite gate (pool, 1x1 conv with SiLU, 1x1 conv with
    sigmoid, multiply), a 1x1 project conv, a pooled head."""

    def __init__(self):
        super().__init__()
        self.expand, self.dw = torch.nn.Conv2d(8, 32, 1), torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.squeeze, self.excite = torch.nn.Conv2d(32, 8, 1), torch.nn.Conv2d(8, 32, 1)
        self.project, self.head = torch.nn.Conv2d(32, 16, 1), torch.nn.Linear(16, 10)

    def forward(self, x):
        F = torch.nn.functional
        y = F.silu(self.dw(F.silu(self.expand(x))))
        gate = torch.sigmoid(self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.project(y * gate), 1), 1))


def test_silu_and_the_squeeze_excite_gate_run_on_int8_codes_in_onnxruntime(monkeypatch, tmp_path):
    """Each SiLU and sigmoid after an int8 conv runs in ONNX Runtime as QLinearSigmoid and QLinearMul on the conv's
    quantized sum (onnx.py _act_on_codes), the block end to end in int8 as ONNX Runtime's own int8 recipe runs it.
    Before, each such conv ran as a float Conv on dequantized input and weights, and the activations in float
    between DequantizeLinear, QuantizeLinear and layout transposes."""
    model, opt, x = _int8_in_onnxruntime(monkeypatch, _SqueezeExcite, (1, 8, 10, 10))
    assert len(opt.int8_sums) == 5  # (every conv: its activation or a pooling reads its sum)
    run = Counter(_ops_run(engines.onnx_model(opt, (x,)), tmp_path / "optimized.onnx"))
    assert run["QLinearConv"] == 5 and run["QLinearSigmoid"] == 4 and run["QLinearMul"] == 4
    assert run["QLinearGlobalAveragePool"] == 2
    assert not {"Conv", "Sigmoid", "Mul", "GlobalAveragePool", "DequantizeLinear"} & set(run), run
    with torch.no_grad():
        assert sqnr(opt.graph_module(x), opt(x)) >= engines.INT8_AGREE_DB
        assert sqnr(model(x), opt(x)) >= 25.0
    back = load(opt.save(tmp_path / "m"))  # the loader takes the sums of int8-output convs with a SiLU
    assert back.engine == "onnxruntime" and back.int8_sums == opt.int8_sums
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


class _Gated(torch.nn.Module):
    """A conv with a sigmoid whose output the next conv reads in int8, then a pooled head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.b(torch.sigmoid(self.a(x))))
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_a_sigmoid_with_an_int8_output_runs_as_qlinearsigmoid_in_onnxruntime(monkeypatch, tmp_path):
    """The sigmoid's output on the next conv's input grid (not GATE_SCALE's): QLinearConv, QLinearSigmoid."""
    model, opt, x = _int8_in_onnxruntime(monkeypatch, _Gated, (1, 3, 8, 8))
    gated = [n.name for n in opt.portable.graph.nodes if isinstance(q := signature_of(n), QConvAct)
             and q.act == "sigmoid" and q.out_scale is not None]
    assert len(gated) == 1 and gated[0] in opt.int8_sums
    run = Counter(_ops_run(engines.onnx_model(opt, (x,)), tmp_path / "optimized.onnx"))
    assert run["QLinearConv"] == 2 and run["QLinearSigmoid"] == 1 and not {"Conv", "Sigmoid"} & set(run), run
    with torch.no_grad():
        assert sqnr(opt.graph_module(x), opt(x)) >= engines.INT8_AGREE_DB
        assert sqnr(model(x), opt(x)) >= 25.0


def test_an_int8_output_conv_before_another_activation_runs_as_an_int8_conv_in_onnxruntime(monkeypatch, tmp_path):
    """A hardswish (no int8 form in ONNX Runtime) after an int8-output conv: the conv's sum quantized (QLinearConv),
    the activation in float between DequantizeLinear and QuantizeLinear; before, a float Conv."""
    make, inputs = ZOO["mobilenet_v2_blocks"]
    model, opt, x = _int8_in_onnxruntime(monkeypatch, lambda: randomize_bn(make()), tuple(inputs(1).shape))
    other = {n.name for n in opt.portable.graph.nodes if isinstance(q := signature_of(n), QConvAct)
             and q.out_scale is not None and q.act.startswith("hardswish")}
    assert other and other <= set(opt.int8_sums)
    assert "Conv" not in _ops_run(engines.onnx_model(opt, (x,)), tmp_path / "optimized.onnx")
    with torch.no_grad():
        assert sqnr(opt.graph_module(x), opt(x)) >= engines.INT8_AGREE_DB
        assert sqnr(model(x), opt(x)) >= 25.0


@pytest.mark.parametrize("act, fused", [("none", True), ("relu", True), ("relu6", True), ("hardtanh:0.0:4.0", True),
                                        ("hardtanh:0.0:inf", True), ("hardtanh:-1.0:1.0", False), ("silu", False),
                                        ("sigmoid", False), ("gelu", False), ("hardswish", False)])
def test_only_a_relu_or_a_clamp_from_0_runs_inside_onnxruntimes_int8_conv(act, fused):
    from graphopt.compiler.deploy.onnx import fused_in_int8_conv

    assert fused_in_int8_conv(act) is fused


@pytest.mark.parametrize("lo, hi", [(-20.0, 6.0), (-0.1, 3.0), (0.5, 9.0), (-4.0, -1.0), (-3.0, 0.0), (-1.6, 0.2),
                                    (-0.0019, 0.0019)])
def test_a_silus_float_output_grid_holds_every_silu_of_its_sums_grid(lo, hi):
    from graphopt.compiler.deploy.onnx import GATE_SCALE, silu_grid
    from graphopt.kernels.reference import activation_qparams

    scale, zp = activation_qparams(lo, hi)
    values = scale * (torch.arange(-128, 128, dtype=torch.float64) - zp)  # every value of the sum's grid
    out_scale, out_zp = silu_grid((scale, zp))
    gate = torch.round(torch.sigmoid(values) / GATE_SCALE) * GATE_SCALE  # the sigmoid on its grid, as the graph
    silu = torch.cat([torch.nn.functional.silu(values), values * gate, values * (gate + GATE_SCALE).clamp(max=1)])
    lowest, highest = out_scale * (-128 - out_zp), out_scale * (127 - out_zp)
    assert float(silu.min()) >= lowest - out_scale / 2 and float(silu.max()) <= highest + out_scale / 2
    # and no coarser than those products need, from the least of them (or 0) to the sum's top (or 0): on a narrow
    # sum (+-0.0019) SiLU's global minimum (-0.28) as the bottom made it 75 times the sum's own grid
    span = max(float(values[-1]), 0.0) - min(float(silu.min()), 0.0)
    assert out_scale <= span / 255 * 1.01


def test_the_library_graph_quantizes_each_residual_sum_before_an_int8_add(monkeypatch):
    import onnx

    model, x, calibration = _model()
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, int8_every_layer=2.0, fp32=3.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert opt.int8_sums

    def int8_adds() -> int:  # Add(DequantizeLinear(QuantizeLinear(Conv)), residual): QLinearConv, then the add
        proto = onnx.load_from_string(engines.onnx_model(opt, (x,)))
        made = {o: n for n in proto.graph.node for o in n.output}

        def chain(name: str, *ops: str) -> bool:
            for op in ops:
                if name not in made or made[name].op_type != op:
                    return False
                name = made[name].input[0]
            return True
        return sum(n.op_type == "Add" and any(chain(i, "DequantizeLinear", "QuantizeLinear", "Conv") for i in n.input)
                   for n in proto.graph.node)
    assert int8_adds() == len(opt.int8_sums)
    sums, opt.int8_sums = opt.int8_sums, {}
    assert int8_adds() == 0  # (without them: the float conv with its residual, float weights)
    opt.int8_sums = sums


def test_saved_int8_sums_that_wreck_the_answers_load_graphopts_graph(monkeypatch, tmp_path):
    model, x, calibration = _model()
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, int8_every_layer=2.0, fp32=3.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    folder = opt.save(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine_int8_sums"] = {k: [1e-6, 0] for k in manifest["engine_int8_sums"]}  # every sum clipped
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="disagrees with graphopt's int8 graph"):
        back = load(folder)
    assert back.engine == "graphopt"
    with torch.no_grad():
        assert torch.equal(back(x), opt.graph_module(x))


class _Edges(torch.nn.Module):
    """An fp32 conv that finds edges (its filters sum to zero), an int8 one after it with a float output (the fp32
    head reads it: too small for int8), as in the digits ConvNet once pruned."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.Conv2d(16, 32, 3, padding=1)
        self.head = torch.nn.Linear(32 * 8 * 8, 10)
        with torch.no_grad():
            self.a.weight -= self.a.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.b(torch.relu(self.a(x)))), 4)
        return self.head(torch.flatten(y, 1))


def _smooth() -> torch.Tensor:
    return torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4), size=(32, 32), mode="bilinear").clamp(-1, 1)


def test_a_library_plan_calibrated_on_smooth_images_loads_in_its_library(monkeypatch, tmp_path):
    """The float-output conv's quantization (after its relu) is calibrated on smooth images, where the edges it
    reads are small; load's seeded probe is noise, where they are not: on the probe as it is the library saturates
    there and graphopt's graph does not (under INT8_AGREE_DB), so the probe is scaled down to where graphopt's graph
    stays within that range, and the saved plan loads in its library, the same answers as before the save (it
    loaded graphopt's graph, with a warning, before)."""
    torch.manual_seed(0)
    model, x = _Edges().eval(), _smooth()
    calibration = [(_smooth(),) for _ in range(4)]
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, fp32=3.0)
    opt = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime", progress=False)
    assert opt.engine == "onnxruntime" and len(opt.int8_sums) == 1
    unscaled = engines.seeded_probe(torch.nn.Identity(), (x,), None)  # (no int8_sums: the probe as it is)
    with torch.no_grad():
        assert sqnr(opt.graph_module(*unscaled), opt(*unscaled)) < engines.INT8_AGREE_DB  # (why it is scaled)
        probe = engines.seeded_probe(opt, (x,), None)
        scale = float(probe[0].abs().max() / unscaled[0].abs().max())
        assert scale in engines.PROBE_SCALES[1:]
        torch.testing.assert_close(probe[0], unscaled[0] * scale)
        assert sqnr(opt.graph_module(*probe), opt(*probe)) >= engines.INT8_AGREE_DB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = load(opt.save(tmp_path / "m"))
    assert back.engine == "onnxruntime"
    three = torch.cat([_smooth() for _ in range(3)])  # another batch size: the free-batch session, checked the same
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(back(x), opt(x))
        assert back._engine(three) is not None and back.engine_plan.other_batches
        assert sqnr(back.graph_module(three), back(three)) >= engines.INT8_AGREE_DB


@pytest.mark.skipif(__import__("graphopt.kernels.cpu", fromlist=["x"]).int8_scheme() != "s8",
                    reason="needs a CPU with VNNI / AMX to make an s8 module")
def test_a_library_int8_plan_with_8_bit_weights_loads_graphopts_graph_on_a_cpu_without_vnni(monkeypatch, tmp_path):
    from graphopt.kernels import cpu

    model, x, calibration = _model()
    _times(monkeypatch, graphopt=2.0, onnxruntime=1.0, int8=1.0, int8_every_layer=2.0, fp32=3.0)
    folder = optimize(model, (x,), quantize="int8", calibration=calibration, engines="onnxruntime",
                      progress=False).save(tmp_path / "m")
    monkeypatch.setattr(cpu, "has_vnni", lambda: False)  # (a library's int8 would saturate on 8-bit weights too)
    with pytest.warns(UserWarning, match="would saturate"):
        back = load(folder)
    assert back.engine == "graphopt"
    with torch.no_grad():
        assert sqnr(model(x), back(x)) >= 25.0
