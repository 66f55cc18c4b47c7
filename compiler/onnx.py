"""ONNX export: the fp32 graph to ONNX, simplified with onnx-simplifier, checked by onnx.checker and
run in ONNX Runtime against PyTorch before the file is kept.

graphopt's fused ops export as the standard ops they stand for (Conv + Add + Relu, Gemm + ...):
the portable graph is lowered to kernels/reference.py first, which is plain aten.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from compiler.errors import GraphoptError


def _portable_reference(model: nn.Module) -> nn.Module:
    """The graph to export: plain aten, leaf modules inlined (attention through its functional path,
    which the exporter can write; its fused fast path it cannot)."""
    from compiler.codegen import OptimizedModule, finalize
    from compiler.pass_manager import clone
    from compiler.serialize import inline_modules
    from passes.lower_to_reference import lower_to_reference

    if not isinstance(model, OptimizedModule):
        return model
    gm = clone(model.portable)
    lower_to_reference(gm, None)
    try:
        inline_modules(gm, attention=True)
    except GraphoptError:
        gm = clone(model.portable)  # a module that does not inline: export it as it is
        lower_to_reference(gm, None)
    return finalize(gm)


class _Exportable(nn.Module):
    """A plain module around the graph (the TorchScript exporter mistakes an fx graph for its own)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _check_inputs(inputs: tuple, batch: int | None) -> list[tuple]:
    """The inputs the export is checked on: the example, negatives, large values, and another batch size."""
    g = torch.Generator().manual_seed(0)
    cases = [inputs, tuple(-t.abs() - 1 for t in inputs),
             tuple(torch.randn(t.shape, generator=g) * 100 for t in inputs)]
    if batch is not None:
        cases.append(tuple(torch.randn((batch, *t.shape[1:]), generator=g) for t in inputs))
    return cases


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, simplify: bool = True,
                dynamic_batch: bool = True, opset: int = 17, rtol: float = 1e-3, atol: float = 1e-4) -> dict:
    """Export, simplify, check and cross-run; returns op counts before/after simplification and max errors."""
    import onnx
    import onnxruntime as ort

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    module = _Exportable(_portable_reference(model)).eval()
    path = Path(path)
    names = [f"input_{i}" for i in range(len(inputs))]
    with torch.no_grad():
        outputs = tree_flatten(module(*inputs))[0]
    out_names = [f"output_{i}" for i in range(len(outputs))]
    axes = {n: {0: "batch"} for n in names + out_names} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter: the graph is plain aten by now, and it handles a dynamic batch simply
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=out_names, dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    proto = onnx.load(str(path))
    before = Counter(n.op_type for n in proto.graph.node)
    if simplify:
        import onnxsim

        proto, ok = onnxsim.simplify(proto)
        if not ok:
            raise GraphoptError("onnx-simplifier could not validate the simplified model", hint="simplify=False")
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    after = Counter(n.op_type for n in proto.graph.node)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    other_batch = inputs[0].shape[0] + 3 if dynamic_batch and inputs[0].dim() > 0 else None
    for case in _check_inputs(inputs, other_batch):
        with torch.no_grad():
            want = tree_flatten(module(*case))[0]
        got = session.run(None, {n: t.numpy() for n, t in zip(names, case)})
        for w, o in zip(want, got):
            torch.testing.assert_close(torch.from_numpy(o), w.detach(), rtol=rtol, atol=atol * max(1.0, float(
                w.abs().max())), msg=lambda m: f"ONNX Runtime disagrees with PyTorch on {path.name}: {m}")
            errors.append(float((torch.from_numpy(o) - w).abs().max()))
    return {"path": str(path), "ops_before": dict(before), "ops_after": dict(after), "max_abs_error": max(errors)}
