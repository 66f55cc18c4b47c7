"""Loading a saved module that someone else may have written, every byte of it, hashes included.

The hashes in manifest.json catch a damaged copy, not an attacker (who recomputes them). What keeps
a hostile folder harmless is what the loader accepts at all:

  - files: only the four regular files save() writes, inside the folder (no symlinks), each within
    a size limit, read as JSON or as safetensors (never pickle, never torch.load, never code.py);
  - the graph: only the ops of compiler/deploy/registry.py, plain-identifier names, bounded
    arguments (compiler/deploy/graph_json.py);
  - the manifest: a known backend, at most MAX_INPUTS input specs of bounded rank and size;
  - running: one shape check on fake tensors (compiler/deploy/shape_check.py), then the backend's
    lowering, which runs the graph once on zeros of the saved input shapes.

Nothing of the sender's runs, no file outside the folder is read or written, and no process
state (threads, autocast, flush-denormal, grad mode, default dtype) changes. Every problem is a
LoadError naming the file and, for the graph, the node.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from graphopt.compiler.core.backend import has_triton
from graphopt.compiler.core.capture import propagate
from graphopt.compiler.core.engine_batches import serve_other_batches
from graphopt.compiler.core.engines import ENGINES, THREADS, restore
from graphopt.compiler.core.errors import LoadError
from graphopt.compiler.core.fast_path import NAN_CHECKS, fast_plan
from graphopt.compiler.core.finite_range import MAX_CHECKS
from graphopt.compiler.core.module import OptimizedModule, finalize
from graphopt.compiler.deploy.graph_json import MAX_JSON_BYTES, MAX_NAME, graph_from_json
from graphopt.compiler.deploy.save import FILES, MANIFEST_VERSION, sha256
from graphopt.compiler.deploy.shape_check import MAX_ELEMENTS, check_shapes
from graphopt.compiler.int8.scheme import warn_on_load

MAX_MANIFEST_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 64 << 30
MAX_TENSORS = 100_000
MAX_INPUTS = 64
MAX_INT8_SUMS = 4096  # int8 convs whose own sum a library's graph quantizes (engine_int8_sums)
MAX_RANK = 8
_INPUT_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_BACKENDS = ("cpu", "reference", "triton")
_HINT = "the artifact was not written by graphopt, or was altered; do not load it"


def _file(root: Path, name: str, limit: int) -> Path:
    path = root / name
    try:
        info = os.lstat(path)
    except OSError:
        raise LoadError(f"{name} is missing from {root}", hint="copy the whole folder that save() wrote") from None
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(f"{name} in {root} is not a regular file (a symlink or a device?)", hint=_HINT)
    if info.st_size > limit:
        raise LoadError(f"{name} is {info.st_size} bytes, more than a graphopt artifact's {limit}", hint=_HINT)
    return path


def _read_json(path: Path) -> Any:
    """Parsed JSON (the graph's own nesting is bounded later, node by node); LoadError for anything else."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LoadError(f"{path.name} is not valid JSON: {type(e).__name__}: {str(e)[:200]}", hint=_HINT) from e


def _input_spec(i: int, spec: Any) -> dict | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - {"batch"} != {"shape", "dtype", "device"} \
            or spec.get("batch", "fixed") != "fixed" or ("batch" in spec and not spec["shape"]):
        raise LoadError(f"manifest.json: input {i} has a malformed spec", hint=_HINT)
    shape, dtype, device = spec["shape"], spec["dtype"], spec["device"]
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ELEMENTS for d in shape)
            or math.prod(shape) > MAX_ELEMENTS):
        raise LoadError(f"manifest.json: input {i} has a shape that is not {MAX_RANK} or fewer sizes of at most "
                        f"{MAX_ELEMENTS} elements in all", hint=_HINT)
    if dtype not in _INPUT_DTYPES or device not in ("cpu", "cuda"):
        raise LoadError(f"manifest.json: input {i} has dtype {str(dtype)[:20]!r} / device {str(device)[:20]!r}, "
                        "which graphopt does not write", hint=_HINT)
    return spec


def _limit(value: Any) -> float | None:
    """A range limit as graphopt writes one (a positive finite number), or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    return None


def _engine_limits(limits: Any) -> dict | None:
    """The saved engine plan's range limits: None, or {"inputs": limit, "checks": {value name: limit}} (their
    proof is checked against the loaded graph by compiler/core/engines.py's saved_guard)."""
    if limits is None:
        return None
    bad = LoadError("manifest.json: engine_limits is not {\"inputs\": limit, \"checks\": {value: limit}} with "
                    f"positive finite limits and at most {MAX_CHECKS} checks", hint=_HINT)
    if not isinstance(limits, dict) or set(limits) != {"inputs", "checks"} or not isinstance(limits["checks"], dict):
        raise bad
    checks = limits["checks"]
    if _limit(limits["inputs"]) is None or len(checks) > MAX_CHECKS or not all(
            isinstance(k, str) and len(k) <= MAX_NAME and _limit(v) is not None for k, v in checks.items()):
        raise bad
    return {"inputs": _limit(limits["inputs"]), "checks": {k: _limit(v) for k, v in checks.items()}}


def _engine_int8_sums(sums: Any) -> dict | None:
    """The saved engine plan's int8 sums: None, or {int8 conv name: [scale, zero point]} (compiler/int8/plans.py;
    that each names an int8 conv whose sum a library's graph quantizes, plans.summed, is checked against the
    loaded graph)."""
    if sums is None:
        return None
    if not isinstance(sums, dict) or len(sums) > MAX_INT8_SUMS or not all(
            isinstance(k, str) and len(k) <= MAX_NAME and isinstance(v, list) and len(v) == 2
            and _limit(v[0]) is not None and type(v[1]) is int and -128 <= v[1] <= 127 for k, v in sums.items()):
        raise LoadError(f"manifest.json: engine_int8_sums is not {{int8 conv: [scale, zero point]}} with positive "
                        f"finite scales, zero points in [-128, 127] and at most {MAX_INT8_SUMS} entries", hint=_HINT)
    return {k: (_limit(v[0]), v[1]) for k, v in sums.items()}


def _check_int8_sums(portable: fx.GraphModule, sums: dict) -> None:
    """Every name in the saved int8 sums is an int8 conv of the loaded graph whose own sum a library's graph
    quantizes (compiler/int8/plans.py ``summed``)."""
    from graphopt.compiler.int8.plans import summed

    convs = {n.name for n in summed(portable)}
    unknown = sorted(set(sums) - convs)
    if unknown:
        raise LoadError(f"manifest.json: engine_int8_sums names {unknown[0][:40]!r}, which is no int8 convolution "
                        "whose sum a library's int8 graph quantizes (a residual, a float output, an activation other "
                        "than a relu or a clamp from 0) in graph.json", hint=_HINT)


def _manifest(root: Path) -> dict:
    if root.is_symlink() or not root.is_dir():
        raise LoadError(f"{root} is not a folder saved by OptimizedModule.save")
    manifest = _read_json(_file(root, "manifest.json", MAX_MANIFEST_BYTES))
    if not isinstance(manifest, dict) or manifest.get("format") != "graphopt-module":
        raise LoadError("manifest.json is not a graphopt manifest", hint=_HINT)
    if manifest.get("version") != MANIFEST_VERSION:
        raise LoadError(f"manifest.json has version {str(manifest.get('version'))[:16]}; this graphopt reads "
                        f"{MANIFEST_VERSION}", hint="save the model again with this version of graphopt")
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict) or set(hashes) != set(FILES):
        raise LoadError("manifest.json does not list a sha256 for every file", hint=_HINT)
    limits = {"graph.json": MAX_JSON_BYTES, "weights.safetensors": MAX_WEIGHTS_BYTES, "code.py": MAX_JSON_BYTES}
    for name in FILES:
        if sha256(_file(root, name, limits[name])) != hashes[name]:
            raise LoadError(f"{name} does not match its sha256 in manifest.json",
                            hint="the file was changed after it was saved; do not load it")
    backend, inputs = manifest.get("backend"), manifest.get("inputs")
    if backend not in _BACKENDS:
        raise LoadError(f"manifest.json names the backend {str(backend)[:20]!r}; graphopt has {', '.join(_BACKENDS)}",
                        hint=_HINT)
    if backend == "triton" and not has_triton():
        raise LoadError("this module was saved for graphopt's Triton kernels and triton is not installed",
                        hint="pip install 'graphopt[triton]' on a machine with a CUDA GPU")
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_INPUTS:
        raise LoadError(f"manifest.json has no list of 1 to {MAX_INPUTS} input specs", hint=_HINT)
    if manifest.setdefault("nan_checks", "fast") not in NAN_CHECKS:
        raise LoadError(f"manifest.json names the NaN checks {str(manifest['nan_checks'])[:20]!r}; graphopt has "
                        f"{', '.join(NAN_CHECKS)}", hint=_HINT)
    engine = manifest.setdefault("engine", "graphopt")
    if engine not in ("graphopt",) + ENGINES:
        raise LoadError(f"manifest.json names the engine {str(engine)[:20]!r}; graphopt knows "
                        f"{', '.join(('graphopt',) + ENGINES)}", hint=_HINT)
    if manifest.setdefault("engine_threads", "torch") not in THREADS:
        raise LoadError(f"manifest.json names the engine threads {str(manifest['engine_threads'])[:20]!r}; graphopt "
                        f"has {', '.join(THREADS)}", hint=_HINT)
    for flag in ("engine_other_batches", "engine_gates_spread"):
        if not isinstance(manifest.setdefault(flag, False), bool):
            raise LoadError(f"manifest.json: {flag} is not true or false", hint=_HINT)
    if manifest["engine_gates_spread"] and engine != "onnxruntime":
        raise LoadError(f"manifest.json: engine_gates_spread is set for the engine {engine!r}; only onnxruntime's "
                        "graph has its gates spread", hint=_HINT)
    manifest["engine_limits"] = _engine_limits(manifest.get("engine_limits"))
    manifest["engine_int8_sums"] = _engine_int8_sums(manifest.get("engine_int8_sums"))
    manifest["inputs"] = [_input_spec(i, s) for i, s in enumerate(inputs)]
    if sum(math.prod(s["shape"]) for s in manifest["inputs"] if s is not None) > MAX_ELEMENTS:
        raise LoadError(f"manifest.json: the inputs hold more than {MAX_ELEMENTS} elements in all", hint=_HINT)
    return manifest


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if len(names) > MAX_TENSORS:
                raise LoadError(f"{path.name} holds {len(names)} tensors (at most {MAX_TENSORS})", hint=_HINT)
            # copies in torch's own (aligned) memory: kernels pick their code path, and so the summation
            # order, by alignment, and a reloaded module must give the same bits as the one that was saved
            return {k: f.get_tensor(k).clone() for k in names}
    except LoadError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise LoadError(f"{path.name} is not a safetensors file: {str(e)[:200]}", hint=_HINT) from e


def _holder(graph: fx.Graph, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A module holding exactly the tensors the graph reads, as buffers under their dotted names."""
    holder = nn.Module()
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target not in weights:
            raise LoadError(f"weights.safetensors has no tensor {node.target!r}, which graph.json node "
                            f"{node.name!r} reads", hint=_HINT)
        *parents, leaf = node.target.split(".")
        owner = holder
        for part in parents:
            child = owner._modules.get(part)
            if child is None:
                if part in owner._buffers:
                    raise LoadError(f"graph.json reads {node.target!r}, under a tensor's name", hint=_HINT)
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if leaf in owner._modules:
            raise LoadError(f"graph.json reads {node.target!r}, a name that is also a folder of tensors", hint=_HINT)
        owner.register_buffer(leaf, weights[node.target])
    return holder


def load(path: str | os.PathLike) -> OptimizedModule:
    """Rebuild an OptimizedModule saved with ``.save(path)``; LoadError for anything graphopt did not write."""
    from graphopt.compiler.core.pipeline import PassManager, clone
    from graphopt.passes.pipeline import LOWERING, PassContext

    root = Path(path)
    manifest = _manifest(root)
    graph = graph_from_json(_read_json(root / "graph.json"))
    weights = _weights(root / "weights.safetensors")
    portable = fx.GraphModule(_holder(graph, weights), graph, "Loaded")
    specs = manifest["inputs"]
    if manifest["backend"] == "cpu" and any(s is not None and s["device"] != "cpu" for s in specs):
        raise LoadError("manifest.json: a module for the CPU backend with inputs on another device", hint=_HINT)
    inputs = tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) if s is not None else None
                   for s in specs)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise LoadError(f"graph.json takes {len(placeholders)} inputs, manifest.json describes {len(inputs)}",
                        hint=_HINT)
    check_shapes(portable, inputs)
    if any(s is not None and s["device"] == "cuda" for s in specs):
        if not torch.cuda.is_available():
            raise LoadError("this module was saved for a CUDA GPU and this machine has none",
                            hint="load it on a machine with a GPU, or save it from a CPU model")
        inputs = tuple(t.cuda() if t is not None else None for t in inputs)
    ctx = PassContext(inputs, backend=manifest["backend"])
    # (8-bit int8 weights on a CPU whose int8 would saturate on them: graphopt's lowering runs them in fp32, and no
    # library's int8 runs them either)
    saturates = warn_on_load(portable, manifest["backend"])
    try:
        propagate(portable, inputs)  # (shapes on every node, for the lowering; bounded by the check above)
        lowered, report = PassManager(LOWERING[manifest["backend"]], check=False).run(clone(portable), ctx)
        fast = fast_plan(portable, ctx, manifest["nan_checks"])  # the plan optimize() made: core/fast_path.py
        if fast is not None:
            fused, _ = PassManager(LOWERING[manifest["backend"]], check=False).run(clone(portable), fast[0])
    except Exception as e:
        raise LoadError(f"the saved graph could not be lowered for {manifest['backend']}: {str(e)[:300]}",
                        hint=_HINT) from e
    module = OptimizedModule(finalize(lowered), report, specs, manifest["backend"], portable=finalize(portable))
    module.nan_checks = manifest["nan_checks"]
    if manifest["engine_int8_sums"]:
        _check_int8_sums(portable, manifest["engine_int8_sums"])
        module.int8_sums = manifest["engine_int8_sums"]
    if fast is not None:
        module.use_fast_path(finalize(fused), fast[1])
    if manifest["engine"] != "graphopt" and saturates is not None:
        warnings.warn(f"{root.name}: running graphopt's own kernels, not {manifest['engine']}: its int8 weights "
                      "(scheme s8) would saturate in this CPU's int8 arithmetic", stacklevel=2)
    elif manifest["engine"] != "graphopt":
        plan, runner, why = restore(manifest["engine"], module, inputs, guarded=manifest["nan_checks"] == "fast",
                                    threads=manifest["engine_threads"], limits=manifest["engine_limits"],
                                    other_batches=manifest["engine_other_batches"],
                                    spread=manifest["engine_gates_spread"])
        if why is not None:
            warnings.warn(f"{root.name}: running graphopt's own kernels, not {manifest['engine']}: {why}",
                          stacklevel=2)
        if runner is not None:
            serve_other_batches(runner, module, inputs, plan)
        module.use_engine(plan, runner)
    return module
