"""ONNX export of the zoo, simplified and checked in ONNX Runtime at two batch sizes."""

import pytest
import torch

from compiler import export_onnx, optimize
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
