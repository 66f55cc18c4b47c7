"""ONNX export of the zoo, simplified and checked in ONNX Runtime at two batch sizes."""

import pytest
import torch

from graphopt import export_onnx, optimize
from tests.helpers import randomize_bn
from tests.zoo import ZOO

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")


@pytest.mark.parametrize("name", ZOO)
def test_export_of_the_zoo_runs_in_onnxruntime(name, tmp_path):
    import onnxruntime as ort

    make, inputs = ZOO[name]
    model = randomize_bn(make()).eval()
    opt = optimize(model, (inputs(2),))
    result = export_onnx(opt, (inputs(2),), tmp_path / "m.onnx")
    assert result["max_abs_error"] < 1e-2
    assert sum(result["ops_after"].values()) <= sum(result["ops_before"].values())
    assert not any(op.startswith("graphopt") for op in result["ops_after"])   # standard ONNX ops only
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for n in (2, 5):                                                          # the traced batch and another
        x = inputs(n)
        got = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-3, atol=1e-4)


def test_plain_models_export_too(tmp_path):
    make, inputs = ZOO["seed_convnet"]
    result = export_onnx(make().eval(), (inputs(1),), tmp_path / "plain.onnx")
    assert result["ops_after"]["Conv"] == 2


class _Encoder(torch.nn.Module):
    """A pre-norm transformer block: attention exports through its functional path."""

    def __init__(self, d=32, cross=False):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, d))
        self.cross = cross  # (keys and values from the block's input: decompose_attention leaves it the module)

    def forward(self, x):
        y = self.ln1(x)
        kv = x if self.cross else y
        x = x + self.attn(y, kv, kv, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def test_self_attention_exports_and_saves(tmp_path):
    from graphopt import load

    model, x = _Encoder().eval(), torch.randn(2, 7, 32)
    opt = optimize(model, (x,))
    assert export_onnx(opt, (x,), tmp_path / "enc.onnx")["max_abs_error"] < 1e-3
    with torch.no_grad():
        assert torch.equal(load(opt.save(tmp_path / "saved"))(x), opt(x))


def test_cross_attention_exports_and_saving_it_is_refused_clearly(tmp_path):
    """Self-attention is written out as linears and saves (tests/passes/test_decompose_attention.py); a cross-
    attention stays torch's module, whose fused fast path no functional call gives bit for bit."""
    from graphopt import GraphoptError

    model, x = _Encoder(cross=True).eval(), torch.randn(2, 7, 32)
    opt = optimize(model, (x,))
    result = export_onnx(opt, (x,), tmp_path / "enc.onnx")
    assert result["max_abs_error"] < 1e-3 and "MatMul" in result["ops_after"]
    with pytest.raises(GraphoptError, match="MultiheadAttention") as refused:
        opt.save(tmp_path / "saved")
    assert refused.value.module == "attn" and "export_onnx" in refused.value.hint   # says what to do instead
    assert "test_onnx.py" in refused.value.source and "self.attn(" in refused.value.source
    assert not (tmp_path / "saved").exists()                                  # nothing half-written


@pytest.mark.parametrize("name", ["resnet_blocks", "mobilenet_v2_blocks", "seed_convnet"])
def test_int8_exports_as_qdq_with_int8_weights(name, tmp_path, monkeypatch):
    import onnx
    import onnxruntime as ort

    from graphopt.compiler.core.verify import sqnr

    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    make, inputs = ZOO[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).eval()
    opt = optimize(model, (inputs(2),), quantize="int8", calibration=[(inputs(4),) for _ in range(8)], progress=False)
    result = export_onnx(opt, (inputs(2),), tmp_path / "q.onnx")
    ops = result["ops_after"]
    layers = sum(layer["int8"] for layer in opt.int8_report.layers)
    assert ops["DequantizeLinear"] >= 2 * layers and ops["QuantizeLinear"] >= layers  # activations and weights
    proto = onnx.load(str(tmp_path / "q.onnx"))
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8) == layers  # every int8 weight is stored as int8 (4x smaller), read through DequantizeLinear
    assert all(n.input[0] not in {t.name for t in proto.graph.initializer} for n in proto.graph.node
               if n.op_type == "QuantizeLinear")  # no weight is quantized at run time
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    runs = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QGemm" in runs and "Gemm" not in runs  # every int8 linear, the classifier too (int32 bias), in int8
    for n in (2, 5):
        x = inputs(n)
        got = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
        with torch.no_grad():
            assert sqnr(opt(x), got) >= 35.0  # graphopt's int8 and ONNX Runtime's agree
            assert sqnr(model(x), got) >= 30.0


def test_export_leaves_a_train_mode_model_as_it_was(tmp_path):
    make, inputs = ZOO["seed_convnet"]
    model = randomize_bn(make()).train()
    model.bn2.eval()  # a mixed model: each module's mode must come back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, (inputs(2),), tmp_path / "train.onnx")
    assert {name: m.training for name, m in model.named_modules()} == modes and model.training
    for k, v in model.state_dict().items():  # weights and BN statistics alike
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def _gemm_model(x_dequantized: bool = True, trans_b: int = 1):
    """x [1, 16] -> Gemm(x, DequantizeLinear(int8 w, per channel), float bias) -> y [1, 5], as ONNX."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (5, 16)).astype(np.int8)
    inits = [numpy_helper.from_array(w if trans_b else w.T.copy(), "w"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, 5).astype(np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(5, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
             numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "bias")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=0 if trans_b else 1)]
    if x_dequantized:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"])]
    nodes.append(helper.make_node("Gemm", ["xd" if x_dequantized else "x", "wd", "bias"], ["y"], transB=trans_b))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(proto, x, tmp_path):
    """(y, the op types ONNX Runtime runs after its fusions)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    return y, [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def test_an_int8_gemms_bias_becomes_int32_and_onnxruntime_runs_one_int8_kernel(tmp_path):
    import onnx
    from onnx import numpy_helper

    from graphopt.compiler.deploy.onnx import _int32_biases

    x = torch.randn(1, 16)
    proto = _gemm_model()
    want, before = _run(proto, x, tmp_path)
    assert "Gemm" in before and "QGemm" not in before  # (a float bias: the weights dequantized on every call)
    assert _int32_biases(proto) == 1
    dq = next(n for n in proto.graph.node if n.output[0] == proto.graph.node[-1].input[2])
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and values[dq.input[0]].dtype.name == "int32"
    torch.testing.assert_close(torch.tensor(values[dq.input[1]]), torch.tensor(values["w_scale"]) * 0.05)  # x * w
    onnx.checker.check_model(proto)
    got, after = _run(proto, x, tmp_path)
    assert "QGemm" in after and "Gemm" not in after and "DequantizeLinear" not in after
    step = float((torch.tensor(values["w_scale"]) * 0.05).max())
    torch.testing.assert_close(got, want, rtol=0.0, atol=step)  # the bias moved by under half a step; rounding
    assert _int32_biases(proto) == 0  # idempotent: the bias is no float initializer any more


@pytest.mark.parametrize("case", ["float input", "transposed weight"])
def test_a_gemm_that_is_not_int8_keeps_its_float_bias(case, tmp_path):
    from graphopt.compiler.deploy.onnx import _int32_biases

    proto = _gemm_model(x_dequantized=case != "float input", trans_b=0 if case == "transposed weight" else 1)
    assert _int32_biases(proto) == 0
    assert proto.graph.node[-1].input[2] == "bias"
