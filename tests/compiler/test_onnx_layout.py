"""ONNX Runtime's graph (compiler/deploy/onnx_layout.py): channel gates spread to full size, the same bits.

Fired, structure (the Resize that feeds the gate, and fewer layout conversions in ONNX Runtime's own optimized
graph), numbers (bit for bit against the graph as exported), idempotent, and the graphs it must leave alone;
then optimize() racing the spread session against the plain one, and load() rebuilding the winner."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from graphopt import load, optimize
from graphopt.compiler.core import engines
from graphopt.compiler.deploy.onnx_layout import spread_channel_gates


class SqueezeExcite(nn.Module):
    """EfficientNet's block in miniature: a conv, SiLU, the squeeze-excite gate on its output, a projection."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.expand = nn.Conv2d(3, channels, 3, padding=1)
        self.reduce, self.restore = nn.Conv2d(channels, 8, 1), nn.Conv2d(8, channels, 1)
        self.project = nn.Conv2d(channels, 16, 1)

    def forward(self, x):
        h = nn.functional.silu(self.expand(x))
        gate = torch.sigmoid(self.restore(nn.functional.silu(self.reduce(nn.functional.adaptive_avg_pool2d(h, 1)))))
        return self.project(h * gate)


@pytest.fixture(scope="module")
def exported():
    """graphopt's engine graph of SqueezeExcite (as optimize() hands it to a library) and an input."""
    torch.manual_seed(0)
    model, x = SqueezeExcite().eval(), torch.randn(2, 3, 11, 9)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    return engines.onnx_model(opt, (x,)), x


def _session(model: bytes, optimized: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _run(model: bytes, x: torch.Tensor) -> np.ndarray:
    session = _session(model)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_a_channel_gate_is_spread_to_the_values_size_and_gives_the_same_bits(exported):
    model, x = exported
    spread, gates = spread_channel_gates(model)
    assert gates == 1
    graph = onnx.load_from_string(spread).graph
    (resize,) = [n for n in graph.node if n.op_type == "Resize"]
    (mul,) = [n for n in graph.node if n.op_type == "Mul" and resize.output[0] in n.input]
    scales = numpy_helper.to_array(next(t for t in graph.initializer if t.name == resize.input[2]))
    assert scales.tolist() == [1, 1, 11, 9]
    assert {a.name: helper.get_attribute_value(a) for a in resize.attribute} == {
        "mode": b"nearest", "coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor"}
    onnx.checker.check_model(onnx.load_from_string(spread))
    np.testing.assert_array_equal(_run(spread, x), _run(model, x))
    assert spread_channel_gates(spread) == (spread, 0)  # idempotent: a spread gate is no gate


def test_onnx_runtime_keeps_the_gated_value_in_its_blocked_layout(exported, tmp_path):
    model, _ = exported
    counts = {}
    for name, graph in (("as exported", model), ("spread", spread_channel_gates(model)[0])):
        _session(graph, str(tmp_path / f"{name}.onnx"))
        counts[name] = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
    if counts["as exported"]["ReorderInput"] == 0:
        pytest.skip("ONNX Runtime put no convolution in its blocked layout on this CPU")
    assert counts["spread"]["ReorderInput"] < counts["as exported"]["ReorderInput"]
    assert counts["spread"]["ReorderOutput"] < counts["as exported"]["ReorderOutput"]


def _gate_graph(full=(2, 32, 5, 5), gate=None, constant_gate: str | None = None, opset=17, extra=(),
                conv=True, gate_first=False, dtype=TensorProto.FLOAT) -> bytes:
    """X * gate: X a 1x1 convolution's output (``conv``) or the input; the gate GlobalAveragePool(X) -> Sigmoid,
    or of shape ``gate``: a second input, or a constant (``constant_gate``: an initializer or a Constant node)."""
    nodes, inits = [], []
    numpy_type = helper.tensor_dtype_to_np_dtype(dtype)
    inputs = [helper.make_tensor_value_info("i" if conv else "x", dtype, list(full))]
    if conv:  # x = a 1x1 convolution of the input
        inits.append(numpy_helper.from_array(np.ones((full[1], full[1], 1, 1), numpy_type), "w"))
        nodes.append(helper.make_node("Conv", ["i", "w"], ["x"]))
    if gate is None:
        nodes += [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Sigmoid", ["p"], ["g"])]
    elif constant_gate == "initializer":
        inits.append(numpy_helper.from_array(np.ones(gate, np.float32), "g"))
    elif constant_gate == "node":
        nodes.append(helper.make_node("Constant", [], ["g"], value=numpy_helper.from_array(np.ones(gate, np.float32))))
    else:
        inputs.append(helper.make_tensor_value_info("g", dtype, list(gate)))
    nodes += [helper.make_node("Mul", ["g", "x"] if gate_first else ["x", "g"], ["y"]), *extra]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()


@pytest.mark.parametrize("gate", [None, (2, 32, 1, 1)])
@pytest.mark.parametrize("gate_first", [False, True])
def test_a_computed_gate_or_one_given_as_an_input_is_spread_on_either_side_of_the_mul(gate, gate_first):
    model = _gate_graph(gate=gate, gate_first=gate_first)
    spread, gates = spread_channel_gates(model)
    assert gates == 1
    (mul,) = [n for n in onnx.load_from_string(spread).graph.node if n.op_type == "Mul"]
    (resize,) = [n for n in onnx.load_from_string(spread).graph.node if n.op_type == "Resize"]
    assert list(mul.input) == ([resize.output[0], "x"] if gate_first else ["x", resize.output[0]])


def _run_graph(model: bytes, feeds: dict) -> np.ndarray:
    return _session(model).run(None, feeds)[0]


def test_a_gate_two_muls_read_is_spread_for_each_and_names_already_taken_are_not_reused():
    x = numpy_helper.from_array(np.ones((32, 32, 1, 1), np.float32), "w")
    taken = numpy_helper.from_array(np.ones(1, np.float32), "y__scales")  # (the name the first Resize would take)
    nodes = [helper.make_node("Conv", ["i", "w"], ["x"]), helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Sigmoid", ["p"], ["g"]), helper.make_node("Mul", ["x", "g"], ["y"]),
             helper.make_node("Mul", ["g", "y"], ["z"]), helper.make_node("Add", ["z", "y__scales"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.FLOAT, [2, 32, 5, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 32, 5, 5])], [x, taken])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    spread, gates = spread_channel_gates(model)
    assert gates == 2
    proto = onnx.load_from_string(spread)
    onnx.checker.check_model(proto)
    names = [t.name for t in proto.graph.initializer]
    assert len(names) == len(set(names)) and numpy_helper.to_array(
        next(t for t in proto.graph.initializer if t.name == "y__scales")).shape == (1,)
    feeds = {"i": np.random.default_rng(0).standard_normal((2, 32, 5, 5)).astype(np.float32)}
    np.testing.assert_array_equal(_run_graph(spread, feeds), _run_graph(model, feeds))


@pytest.mark.parametrize("why, graph", [
    ("a constant gate (ONNX Runtime folds it into a convolution)",
     lambda: _gate_graph(gate=(2, 32, 1, 1), constant_gate="initializer")),
    ("a Constant node's gate", lambda: _gate_graph(gate=(2, 32, 1, 1), constant_gate="node")),
    ("a free batch", lambda: _gate_graph(full=("batch", 32, 5, 5))),
    ("a 1x1 value", lambda: _gate_graph(full=(2, 32, 1, 1))),
    ("a gate over the batch, not per sample", lambda: _gate_graph(gate=(1, 32, 1, 1))),
    ("a spatial mask, not a channel gate", lambda: _gate_graph(gate=(2, 1, 5, 5))),
    ("an opset before Resize's optional roi", lambda: _gate_graph(opset=12)),
    ("a float64 graph", lambda: _gate_graph(dtype=TensorProto.DOUBLE)),
    ("no convolution (no blocked layout)", lambda: _gate_graph(conv=False)),
    ("an int8 (QDQ) graph", lambda: _gate_graph(extra=[helper.make_node("QuantizeLinear", ["y", "s"], ["q"])])),
])
def test_graphs_without_a_computed_per_channel_gate_are_left_as_they_are(why, graph):
    model = graph()
    assert spread_channel_gates(model) == (model, 0), why


@pytest.fixture
def forced(monkeypatch):
    """The race's outcome set by its labels (lower wins), on torch's threads."""
    monkeypatch.setattr(engines, "MARGIN", 1.0)
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", 0.0)

    def outcome(ms: dict):
        monkeypatch.setattr(engines, "race", lambda candidates, *_: {k: ms[k] for k in candidates})
    return outcome


@pytest.mark.parametrize("spread_ms, plain_ms, chosen", [(0.5, 0.6, "onnxruntime, gates spread"),
                                                         (0.7, 0.6, "onnxruntime"),
                                                         (0.5, 1.2, "onnxruntime, gates spread")])
def test_onnx_runtime_over_the_spread_graph_races_as_one_more_session_and_a_reload_keeps_the_winner(
        forced, monkeypatch, tmp_path, spread_ms, plain_ms, chosen):
    """... and other batch sizes go to ONNX Runtime's free-batch session (never spread) only where its plain
    session measured faster than graphopt's graph."""
    forced({"graphopt": 1.0, "onnxruntime": plain_ms, "onnxruntime, gates spread": spread_ms})
    torch.manual_seed(0)
    model, x = SqueezeExcite().eval(), torch.randn(2, 3, 11, 9)
    opt = optimize(model, (x,), engines="onnxruntime", dump_dir=tmp_path / "d", progress=False)
    assert set(opt.engine_plan.measured_ms) == {"graphopt", "onnxruntime", "onnxruntime, gates spread"}
    assert opt.engine_plan.label == chosen and opt.engine == "onnxruntime"
    assert opt.report[-1].name.startswith(f"engine: {chosen} (")
    assert opt.engine_plan.other_batches is (plain_ms < 1.0)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    dumped = onnx.load(str(tmp_path / "d" / "engine-onnxruntime-gates-spread.onnx")).graph
    assert [n.op_type for n in dumped.node].count("Resize") == 1
    assert "Resize" not in [n.op_type for n in onnx.load(str(tmp_path / "d" / "engine.onnx")).graph.node]

    spread = chosen.endswith("gates spread")
    folder = opt.save(tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["engine_gates_spread"] is spread
    real, built = engines._BUILDERS["onnxruntime"], []
    monkeypatch.setitem(engines._BUILDERS, "onnxruntime",
                        lambda model, *a: (built.append(_has_resize(model)), real(model, *a))[1])
    back = load(folder)
    assert built == [spread] and back.engine_plan.label == chosen
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))


def _has_resize(model: bytes) -> bool:
    return "Resize" in [n.op_type for n in onnx.load_from_string(model).graph.node]


def test_a_manifest_that_spreads_gates_a_graph_does_not_have_loads_the_plain_session(forced, monkeypatch, tmp_path):
    forced({"graphopt": 1.0, "onnxruntime": 0.6})
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU()).eval(), torch.randn(2, 3, 11, 9)
    folder = optimize(model, (x,), engines="onnxruntime", progress=False).save(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine_gates_spread"] = True
    (folder / "manifest.json").write_text(json.dumps(manifest))
    back = load(folder)
    assert back.engine_plan.label == "onnxruntime" and not back.engine_plan.spread
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_graph_without_gates_gets_no_second_onnx_runtime_session(forced, tmp_path):
    forced({"graphopt": 1.0, "onnxruntime": 0.6})  # (a spread session in the race would be a KeyError)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU()).eval(), torch.randn(2, 3, 11, 9)
    opt = optimize(model, (x,), engines="onnxruntime", dump_dir=tmp_path / "d", progress=False)
    assert opt.engine_plan.label == "onnxruntime"
    assert not (tmp_path / "d" / "engine-onnxruntime-gates-spread.onnx").exists()


def test_a_graph_onnxs_shape_inference_cannot_read_is_left_as_it_is(monkeypatch):
    from onnx import shape_inference

    def refuse(*args, **kwargs):
        raise onnx.shape_inference.InferenceError("no")
    monkeypatch.setattr(shape_inference, "infer_shapes", refuse)
    model = _gate_graph()
    assert spread_channel_gates(model) == (model, 0)


@pytest.mark.parametrize("constant_gate", ["initializer", "node"])
def test_a_graph_whose_every_mul_reads_a_constant_is_left_as_it_is_without_shape_inference(constant_gate,
                                                                                            monkeypatch):
    from onnx import shape_inference

    calls = []
    real = shape_inference.infer_shapes
    monkeypatch.setattr(shape_inference, "infer_shapes", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _gate_graph(gate=(2, 32, 1, 1), constant_gate=constant_gate)  # (a range check's sum * 0 is such a Mul)
    assert spread_channel_gates(model) == (model, 0)
    assert calls == []
    assert spread_channel_gates(_gate_graph())[1] == 1 and calls == [1]  # (a computed gate: inferred, spread)


def test_graphopts_range_check_on_a_resnet_block_exports_its_mul_by_a_constant():
    """The check's Mul (max |x| + 0 * sum x, compiler/deploy/onnx.py) reads a constant in the exported graph,
    so a graph without gates skips shape inference."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval(), \
        torch.randn(1, 3, 8, 8)
    opt = optimize(model, (x,), engines="graphopt", progress=False)
    names = [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"]
    proto = onnx.load_from_string(engines.onnx_model(opt, (x,), names))
    constant = {t.name for t in proto.graph.initializer}
    constant |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    muls = [n for n in proto.graph.node if n.op_type == "Mul"]
    assert muls and all(constant.intersection(n.input) for n in muls)
