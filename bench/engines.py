"""The engines the bench compares, each built from the same eval-mode model and example input.

Every builder returns (callable, seconds it took to build). A peer that cannot be built here
(a package missing) is skipped with its reason, never faked.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable

import torch
import torch.nn as nn


def eager(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    return model, 0.0


def graphopt(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """optimize() as a user calls it: the kernel library (its own, ONNX Runtime, OpenVINO) chosen by measurement."""
    from graphopt import optimize

    start = time.perf_counter()
    opt = optimize(model, (x,), engines="auto")
    elapsed = time.perf_counter() - start
    opt.bench_note = {"engine": opt.engine_plan.label, "measured_ms_at_optimize": opt.engine_plan.measured_ms,
                      "reasons": opt.engine_plan.reasons, "range_checks": len(opt.engine_plan.checks)}
    return opt, elapsed


def graphopt_own(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """graphopt's own kernels only (oneDNN through PyTorch): what its passes and lowering achieve by themselves."""
    from graphopt import optimize

    start = time.perf_counter()
    opt = optimize(model, (x,), engines="graphopt")
    return opt, time.perf_counter() - start


def inductor(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """torch.compile with Inductor and freezing (weights as constants, as graphopt treats them)."""
    import torch._inductor.config as config

    config.freezing = True
    torch._dynamo.reset()
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    return compiled, time.perf_counter() - start


def onnxruntime(model: nn.Module, x: torch.Tensor, dynamic_batch: bool = False) -> tuple[Callable, float]:
    """ONNX Runtime on the CPU, as a user who exports to it gets it (_ort_runner); ``dynamic_batch``: exported with
    its batch free, as a user who serves several batch sizes does."""

    start = time.perf_counter()
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-bench-"), "model.onnx")
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                          dynamic_axes=axes)
    return _ort_runner(path), time.perf_counter() - start


def _ort_runner(path: str) -> Callable:
    """An ONNX Runtime session on the CPU with its defaults (all graph optimizations, a spinning thread pool) and
    torch's thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(inp: torch.Tensor):
        return session.run(None, {"x": inp.numpy()})[0]

    return run


def openvino(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """OpenVINO on the CPU: converted from the PyTorch model, latency hint, torch's thread count."""
    import openvino as ov

    start = time.perf_counter()
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=x)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    compiled = ov.Core().compile_model(converted, "CPU", config)
    request = compiled.create_infer_request()

    def run(inp: torch.Tensor):
        return request.infer([inp.numpy()])[compiled.output(0)]

    return run, time.perf_counter() - start


def graphopt_nan_off(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """optimize(..., nan_checks="off"): the user gives up eager's NaN / inf results on NaN / inf / overflowing
    inputs, so the fused graph and the chosen library run on every call (not in the default engine list)."""
    from graphopt import optimize

    start = time.perf_counter()
    opt = optimize(model, (x,), engines="auto", nan_checks="off")
    elapsed = time.perf_counter() - start
    opt.bench_note = {"engine": opt.engine_plan.label, "measured_ms_at_optimize": opt.engine_plan.measured_ms}
    return opt, elapsed


ENGINES = {"eager": eager, "inductor": inductor, "onnxruntime": onnxruntime, "openvino": openvino,
           "graphopt_own": graphopt_own, "graphopt": graphopt, "graphopt_nan_off": graphopt_nan_off}
DEFAULT_ENGINES = [e for e in ENGINES if e != "graphopt_nan_off"]


# ---------------------------------------------------------------- int8: each builder also gets the calibration
# batches (a list of input tensors), the same for every engine


def graphopt_int8(model: nn.Module, x: torch.Tensor, calibration: list) -> tuple[Callable, float]:
    from graphopt import optimize

    start = time.perf_counter()
    opt = optimize(model, (x,), quantize="int8", calibration=[(c,) for c in calibration], progress=False)
    elapsed = time.perf_counter() - start
    opt.bench_note = {"calibration_s": opt.int8_report.calibration_seconds, "plan": opt.int8_report.plan}
    return opt, elapsed


def torchao_fx_int8(model: nn.Module, x: torch.Tensor, calibration: list) -> tuple[Callable, float]:
    """torch.ao FX graph mode post-training static int8 with the x86 backend's default qconfig (oneDNN / FBGEMM)."""
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    start = time.perf_counter()
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_fx(prepared), time.perf_counter() - start


def torchao_dynamic_int8(model: nn.Module, x: torch.Tensor, calibration: list) -> tuple[Callable, float]:
    """torch.ao dynamic quantization of the linear layers (int8 weights, activations quantized per call): the
    usual recipe for transformers on the CPU. Convolutions stay fp32."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    torch.backends.quantized.engine = "x86"
    start = time.perf_counter()
    quantized = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return quantized, time.perf_counter() - start


def onnxruntime_int8(model: nn.Module, x: torch.Tensor, calibration: list) -> tuple[Callable, float]:
    """ONNX Runtime static QDQ int8: per-channel int8 weights, uint8 activations, MinMax calibration; on a CPU
    without int8 dot-product instructions 7-bit weights (``reduce_range``, ONNX Runtime's advice there: its
    uint8 x int8 kernel then adds pairs of products in 16 bits, which saturate with 8-bit weights). Read off the
    CPU's own flags: ONNX Runtime's kernels do not heed ONEDNN_MAX_CPU_ISA."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from graphopt.kernels.cpu import cpu_has_int8_dot_products

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": c.numpy()} for c in calibration])

        def get_next(self):
            return next(self.items, None)

    start = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="graphopt-bench-")
    fp32, int8 = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), fp32, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    seven_bit = not cpu_has_int8_dot_products()
    quantize_static(fp32, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=seven_bit)
    return _ort_runner(int8), time.perf_counter() - start


INT8_ENGINES = {"graphopt": graphopt, "graphopt_int8": graphopt_int8, "torchao_fx_int8": torchao_fx_int8,
                "torchao_dynamic_int8": torchao_dynamic_int8, "onnxruntime_int8": onnxruntime_int8}
