"""``torch.compile(model, backend="graphopt")``: the same pipeline on each graph torch.compile captures.

torch.compile hands its backends parameters and buffers as graph inputs. Like Inductor's
freezing, graphopt turns them back into constants of the graph (by reference, not copied),
so that BatchNorm folding and weight-constant passes apply; change the weights, and compile
again. A graph that must stay differentiable (grad enabled and a parameter that requires it)
runs as torch.compile captured it. ``GRAPHOPT_DUMP=dir`` dumps each graph into dir/graph_NNN/.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from graphopt.compiler.core.backend import resolve_backend
from graphopt.compiler.core.capture import propagate
from graphopt.compiler.core.module import finalize
from graphopt.compiler.core.pipeline import clone, run_pipeline
from graphopt.passes.pipeline import DEFAULT_PIPELINE, LOWERING, PassContext

log = logging.getLogger("graphopt")


def _is_weight(node: fx.Node, value: Any) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = source.name() if callable(getattr(source, "name", None)) else getattr(source, "name", "")
    return "._buffers[" in str(name) or "._parameters[" in str(name)


def freeze(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int]]:
    """Turn weight placeholders into get_attr constants; returns the graph and the kept input positions."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and _is_weight(node, value):
            name = f"_frozen_{i}"
            gm.register_buffer(name, value.detach())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(name)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
        else:
            kept.append(i)
    gm.recompile()
    return gm, kept


def graphopt_backend(gm: fx.GraphModule, example_inputs: list) -> Callable:
    """The backend torch.compile calls per captured graph. graphopt never fails the user's model: on
    any internal failure (a pass error, a graph the verifier cannot check) the graph runs as
    torch.compile captured it, with a warning that says why."""
    with unset_fake_temporarily():  # torch.compile calls backends inside its fake-tensor mode
        try:
            return _compile(gm, example_inputs)
        except Exception as e:  # noqa: BLE001  (any failure of ours: the user's graph still runs)
            reason = e.message if hasattr(e, "message") else f"{type(e).__name__}: {e}"
            warnings.warn(f"graphopt: this graph runs unoptimized: {str(reason).splitlines()[0][:300]}",
                          stacklevel=2)
            return gm.forward


def _compile(gm: fx.GraphModule, example_inputs: list) -> Callable:
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
        log.info("graphopt: a graph that needs gradients runs unoptimized")
        return gm.forward
    gm, kept = freeze(clone(gm), example_inputs)  # torch.compile reads its own graph again afterwards
    inputs = tuple(example_inputs[i] for i in kept)
    propagate(gm, inputs)
    ctx = PassContext(inputs, backend=resolve_backend("auto", inputs))
    dump_root = os.environ.get("GRAPHOPT_DUMP")
    dump_dir = _next_dump_dir(dump_root) if dump_root else None  # one folder per graph torch.compile hands us
    _, gm, _ = run_pipeline(gm, ctx, DEFAULT_PIPELINE, LOWERING[ctx.backend], dump_dir=dump_dir)
    finalize(gm)

    def run(*args: Any) -> Any:
        return gm(*[args[i] for i in kept])

    return run


def _next_dump_dir(root: str) -> str:
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    n = sum(1 for p in base.glob("graph_*") if p.is_dir())
    return str(base / f"graph_{n:03d}")
