"""Which kernels a graph runs on: the one place a backend name is checked and "auto" resolved."""

from __future__ import annotations

import importlib.util
import os

import torch

from graphopt.compiler.core.errors import GraphoptError

BACKENDS = ("auto", "cpu", "triton", "reference")


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, inputs: tuple) -> str:
    """"auto" -> cpu (oneDNN) for CPU tensors, triton for CUDA tensors when Triton is installed, else reference."""
    if backend not in BACKENDS:
        raise GraphoptError(f"unknown backend {backend!r}", hint=f"use one of {', '.join(BACKENDS)}")
    device = next((t.device.type for t in inputs if isinstance(t, torch.Tensor)), "cpu")
    if backend == "auto":
        return "cpu" if device == "cpu" else ("triton" if device == "cuda" and has_triton() else "reference")
    if backend == "triton":
        if not has_triton():
            raise GraphoptError("backend='triton' needs the triton package", hint="pip install 'graphopt[triton]'")
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise GraphoptError(f"backend='triton' runs on CUDA tensors, got {device} tensors",
                                hint="move the model and inputs to a GPU, or set TRITON_INTERPRET=1 to run the "
                                     "kernels in Triton's interpreter (slow; for testing)")
    if backend == "cpu" and device != "cpu":
        raise GraphoptError(f"backend='cpu' needs CPU inputs, got {device} tensors", hint="use backend='auto'")
    return backend
