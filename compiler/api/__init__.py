"""graphopt: a graph optimizer for PyTorch models.

    import graphopt
    opt = graphopt.optimize(model, (x,))   # trace, run the pass pipeline, verify, lower
    opt(x)                                 # eager's answers, faster
    opt.code, opt.report                   # what it runs, and what each pass did

This file is ``graphopt/__init__.py`` (pyproject maps it here, so that the repository keeps only its
three source folders); the package's subpackages are those folders: ``graphopt.compiler`` (the
driver), ``graphopt.passes`` and ``graphopt.kernels``. Importing ``graphopt`` is light: the names below
are imported on first use, and the workflow parts (prune, finetune, tune, ONNX export) only when
called, so ``import graphopt`` pulls in neither torch.distributed nor Optuna nor ONNX.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from graphopt.compiler.core import errors  # light (no torch): the error classes, also as graphopt.errors

sys.modules[__name__ + ".errors"] = errors

# public name -> the module that defines it
_EXPORTS = {
    "optimize": "graphopt.compiler.optimize",
    "OptimizedModule": "graphopt.compiler.core.module",
    "PassManager": "graphopt.compiler.core.pipeline",
    "PassRecord": "graphopt.compiler.core.pipeline",
    "capture": "graphopt.compiler.core.capture",
    "load": "graphopt.compiler.deploy.load",
    "export_onnx": "graphopt.compiler.deploy.onnx",
    "prune": "graphopt.compiler.workflow.prune",
    "finetune": "graphopt.compiler.workflow.finetune",
    "tune": "graphopt.compiler.workflow.tune",
    "GraphoptError": "graphopt.compiler.core.errors",
    "CaptureError": "graphopt.compiler.core.errors",
    "PassError": "graphopt.compiler.core.errors",
    "InputError": "graphopt.compiler.core.errors",
    "LoadError": "graphopt.compiler.core.errors",
}

__all__ = sorted([*_EXPORTS, "errors"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
