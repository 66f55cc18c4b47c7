"""What the ``graphopt`` command reads: model files (path/to/file.py:ClassName), input shapes, saved
folders and calibration data. Each malformed one is a UsageError or GraphoptError that says what,
where and what to do (compiler/ui/cli_errors.py prints it as one line)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.ui.cli_errors import UsageError


def load_class(spec: str) -> type[torch.nn.Module]:
    """'path/to/file.py:ClassName' -> the class (the file runs, as with python path/to/file.py)."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        if not Path(spec).exists():
            raise UsageError(f"no such folder or model file {spec!r}", source=spec,
                             hint="give a folder written by save / --out, or path/to/file.py:ClassName")
        raise UsageError(f"expected path/to/file.py:ClassName, got {spec!r}", source=spec,
                         hint="name the model class after a colon, e.g. model.py:Net")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if module_spec is None or not Path(path).is_file():
        raise UsageError(f"no such model file {path!r}", source=path, hint="check the path to the .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise GraphoptError(f"running {path} failed: {type(e).__name__}: {e}", source=path,
                            hint="fix the model file (python it alone to see the traceback), or add --debug") from e
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.nn.Module)
                       and v.__module__ == module.__name__)
        raise UsageError(f"{path} defines no nn.Module class {name!r}", source=spec,
                         hint=f"it defines {', '.join(found)}" if found else "define the model class in that file")
    return cls


def model_from_file(spec: str) -> torch.nn.Module:
    """The model class of ``spec``, constructed with no arguments, in eval mode."""
    cls = load_class(spec)
    try:
        return cls().eval()
    except Exception as e:
        raise GraphoptError(f"constructing {cls.__name__}() failed: {type(e).__name__}: {e}", source=spec,
                            hint="the class must be constructible with no arguments") from e


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"bad input shape {text!r}: expected positive sizes separated by commas",
                         source="--input-shape", hint="e.g. --input-shape 1,3,224,224")
    return dims


def calibration_batches(path: str, n_inputs: int, batch: int) -> list[tuple]:
    """Calibration batches from a safetensors file (read without pickle): input_0, ... split along dim 0."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise UsageError(f"no such calibration file {path!r}", source="--calibration",
                         hint="give a .safetensors file holding input_0 (, input_1, ...)")
    try:
        tensors = load_file(path)
    except Exception as e:  # (safetensors raises its own error type for a malformed file)
        raise GraphoptError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}", source=path,
                            hint="write it with safetensors.torch.save_file") from e
    names = [f"input_{i}" for i in range(n_inputs)]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise UsageError(f"{path} has no {', '.join(missing)}", source="--calibration",
                         hint=f"it has {', '.join(sorted(tensors)) or 'no tensors'}; name them input_0, input_1, ...")
    chunks = [tensors[n].split(batch) for n in names]
    return list(zip(*chunks))


def load_any(source: str, shapes: list[str] | None):
    """A saved folder (compiler.load) or path/to/file.py:ClassName, with example inputs."""
    from graphopt import load

    if Path(source).is_dir():
        module = load(source)
        specs = module.input_specs
        shapes = shapes or [",".join(map(str, s["shape"])) for s in specs]
        return module, tuple(torch.randn(*shape(s)) for s in shapes)
    if not shapes:
        load_class(source)  # (a missing file or class is the first thing to say)
        raise UsageError("--input-shape is needed for a model file", source=source, hint="e.g. --input-shape 1,3,32,32")
    dims = [shape(s) for s in shapes]
    return model_from_file(source), tuple(torch.randn(*d) for d in dims)
