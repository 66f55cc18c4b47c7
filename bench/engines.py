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
    from compiler import optimize

    start = time.perf_counter()
    opt = optimize(model, (x,))
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


def onnxruntime(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """ONNX Runtime on the CPU: all graph optimizations, torch's thread count, no spinning."""
    import onnxruntime as ort

    start = time.perf_counter()
    path = os.path.join(tempfile.mkdtemp(prefix="graphopt-bench-"), "model.onnx")
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(inp: torch.Tensor):
        return session.run(None, {"x": inp.numpy()})[0]

    return run, time.perf_counter() - start


ENGINES = {"eager": eager, "inductor": inductor, "onnxruntime": onnxruntime, "graphopt": graphopt}
