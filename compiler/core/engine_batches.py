"""Other batch sizes: the engine's calls at a batch size other than the example's, in ONNX Runtime.

The engine (compiler/core/engines.py) is chosen, and its session built, at the example's shapes. A module
optimized at batch 1 and called at batch 8 would run those calls on graphopt's own kernels (graphopt's graph
takes any batch size), up to 2.5x slower than the library on the same model (bench/other_batch.py). So where
ONNX Runtime's session on torch's threads measured faster than graphopt's graph at the example's shape
(whichever library won there), a second ONNX Runtime session over the graph exported with its batch, dimension
0 of every input, free serves every call at another batch size (the same sizes past dimension 0):

- Built on the first such call (that call pays the export, the session and its check: about as long as
  optimize()'s export), not before: a module never called at another batch size holds nothing more, and
  nothing more runs beside optimize()'s measurements. (Built eagerly, the unused sessions of earlier modules
  in the process made the demo's int8 measurement pick a slower plan in 6 runs of 6: its ONNX Runtime pool
  timed 0.063 ms instead of 0.046, graphopt's own graph 0.20 instead of 0.18, for no cause found.)
- The example's shapes keep the session that was measured. A free-batch session is not as fast everywhere:
  the seed ConvNet's int8 graph ran 1.11-1.14x slower in it at batch 1 on two threads (the same bits), and
  OpenVINO's free-batch sessions 1.02-1.11x slower. (The memory: a second session holds its own copy of the
  weights, and ONNX Runtime's arena keeps what its largest call needed.)
- Checked like every session, against graphopt's own graph: on load's seeded probe input (engines.seeded_probe)
  and at the example's batch size + 1 (its rows cycled, each scaled differently, so that an export which
  repeated one row fails). Only one other batch size is checked, and none is timed.
- The same range checks (per element, so any batch size): a call whose checks fail runs graphopt's graph.
- Where the export with a free batch fails, or the session disagrees, that call and every later one at another
  batch size run graphopt's graph, a warning says why (once), and so does the plan's ``fixed_batch``.
- Routing costs nothing at the example's shapes: the chosen session hands a call it declines to the free-batch
  session through its ``declined`` cell (engines.build), which declines what is not its call too (graphopt's
  graph runs it). Thread-safe: one thread builds, a call arriving meanwhile waits.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.errors import first_line


def serve_other_batches(example: Callable, opt: torch.nn.Module, inputs: tuple, plan: Any) -> None:
    """Where ``plan`` (an EnginePlan) says so, route the calls at other batch sizes that ``example`` (the chosen
    session, from engines.build) declines to ONNX Runtime's free-batch session for ``opt``, built on the first
    such call (exported at ``inputs``, checked on a seeded probe and at another batch size). Where it cannot be
    built or disagrees, that call and the rest run graphopt's graph, the plan says why, and a warning says so
    once."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import _arrays, batch_of

    shapes = [tuple(t.shape) for t in inputs]
    declined, batched = getattr(example, "declined", None), batch_of(shapes) is not None
    fixed = any(s is not None and s.get("batch") == "fixed" for s in getattr(opt, "input_specs", ()))
    if not plan.other_batches or declined is None or not batched or fixed:
        plan.other_batches = False
        if not batched:
            plan.fixed_batch = "the inputs have no common batch size"
        elif fixed:
            plan.fixed_batch = "the graph takes the example's batch size only (torch.export kept it fixed)"
        return
    inputs, lock, takes = fresh(inputs), threading.Lock(), _arrays(shapes, any_batch=True)

    def first_call(*args: torch.Tensor) -> Any:
        if takes(args) is None:  # (not a call for a free-batch session: graphopt's graph, nothing built)
            return None
        with lock:  # (one build; a call arriving meanwhile waits for it)
            if declined[0] is first_call:
                others, why = _free_batch_session(opt, inputs, plan)
                declined[0] = others
                if why is not None:
                    plan.other_batches, plan.fixed_batch = False, why
                    warnings.warn(f"batch sizes other than the example's run graphopt's own kernels: {why}",
                                  stacklevel=4)
        run = declined[0]
        return None if run is None else run(*args)
    declined[0] = first_call


def _free_batch_session(opt: torch.nn.Module, inputs: tuple, plan: Any) -> tuple[Callable | None, str | None]:
    """ONNX Runtime's session over ``opt`` exported with its batch free (``plan``'s range checks), checked against
    graphopt's own graph on a seeded probe and at another batch size; (runner, None) or (None, why not)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import _checked, batch_of, build, disagreement, onnx_model, seeded_probe

    values, limits, by_sum = _checked(opt, plan)
    shapes = [tuple(t.shape) for t in inputs]
    batch = batch_of(shapes)
    try:
        probe = seeded_probe(opt, inputs, plan.limit)
        with torch.no_grad():
            spec = tree_flatten(opt.graph_module(*fresh(inputs)))[1]
        model = onnx_model(opt, fresh(inputs), values, by_sum, dynamic_batch=True)
        others = build("onnxruntime", model, spec, shapes, "torch", limits, any_batch=True)
        for where, case in (("", probe), (f" at batch size {batch + 1}", _more_rows(probe, batch + 1))):
            problem = disagreement(opt, others, case)
            if problem is not None:
                return None, f"onnxruntime's free-batch session disagrees with graphopt's graph{where}: {problem}"
    except Exception as e:  # (graphopt's graph or the exporter cannot take another batch size)
        return None, f"onnxruntime's free-batch session failed: {first_line(e)}"
    return others, None


def _more_rows(inputs: tuple, rows: int) -> tuple:
    """``inputs``' rows cycled to ``rows`` rows, row r scaled by 1 - r / (2 rows): rows that differ (an export
    that repeated one row fails the check), within the example's magnitudes (its range checks pass)."""
    index, scale = torch.arange(rows) % inputs[0].shape[0], 1.0 - torch.arange(rows, dtype=torch.float32) / (2 * rows)
    return tuple(t[index] * scale.view(-1, *[1] * (t.dim() - 1)) for t in inputs)
