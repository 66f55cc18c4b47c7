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
- Checked like every session, against graphopt's own graph: on the example (load: its seeded probe) and at
  the example's batch size + 1 (the example's rows cycled, each scaled differently, so that an export which
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
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten


def batch_of(shapes: Sequence[tuple]) -> int | None:
    """The inputs' common batch size (dimension 0, at least 1), or None where they have none (a 0-d input,
    sizes that differ, an empty batch)."""
    sizes = {shape[0] if len(shape) else None for shape in shapes}
    batch = next(iter(sizes)) if len(sizes) == 1 else None
    return batch or None


def serve_other_batches(example: Callable, opt: torch.nn.Module, inputs: tuple, probe: tuple, spec: Any,
                        checked: tuple, plan: Any) -> bool:
    """Route the calls at other batch sizes that ``example`` (the chosen session, from engines.build) declines to
    ONNX Runtime's free-batch session for ``opt``, built on the first such call (exported at ``inputs``, with the
    range checks ``checked`` = (values, limits, by_sum) of engines._checked; checked on ``probe`` and at another
    batch size). Where it cannot be built or disagrees, that call and the rest run graphopt's graph, ``plan``
    (the EnginePlan) says why, and a warning says so once. False where no call can be routed."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import _arrays

    shapes = [tuple(t.shape) for t in inputs]
    if batch_of(shapes) is None:
        plan.fixed_batch = "the inputs have no common batch size"
        return False
    declined = getattr(example, "declined", None)
    if declined is None:
        return False
    inputs, probe, lock, takes = fresh(inputs), fresh(probe), threading.Lock(), _arrays(shapes, any_batch=True)

    def first_call(*args: torch.Tensor) -> Any:
        if takes(args) is None:  # (not a call for a free-batch session: graphopt's graph, nothing built)
            return None
        with lock:  # (one build; a call arriving meanwhile waits for it)
            if declined[0] is first_call:
                others, why = _free_batch_session(opt, inputs, probe, spec, checked)
                declined[0] = others
                if why is not None:
                    plan.other_batches, plan.fixed_batch = False, why
                    warnings.warn(f"batch sizes other than the example's run graphopt's own kernels: {why}",
                                  stacklevel=4)
        run = declined[0]
        return None if run is None else run(*args)
    declined[0] = first_call
    return True


def _free_batch_session(opt: torch.nn.Module, inputs: tuple, probe: tuple, spec: Any, checked: tuple
                        ) -> tuple[Callable | None, str | None]:
    """ONNX Runtime's session over ``opt`` exported with its batch free, checked against graphopt's own graph on
    ``probe`` and at another batch size; (runner, None) or (None, why not)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import build, onnx_model

    values, limits, by_sum = checked
    batch = batch_of([tuple(t.shape) for t in inputs])
    try:
        model = onnx_model(opt, fresh(inputs), values, by_sum, dynamic_batch=True)
        others = build("onnxruntime", model, spec, [tuple(t.shape) for t in inputs], "torch", limits, any_batch=True)
        for where, case in (("", probe), (f" at batch size {batch + 1}", _more_rows(probe, batch + 1))):
            problem = disagreement(opt, others, case)
            if problem is not None:
                return None, f"onnxruntime's free-batch session disagrees with graphopt's graph{where}: {problem}"
    except Exception as e:  # (graphopt's graph or the exporter cannot take another batch size)
        return None, f"onnxruntime's free-batch session failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return others, None


def _more_rows(inputs: tuple, rows: int) -> tuple:
    """``inputs``' rows cycled to ``rows`` rows, row r scaled by 1 - r / (2 rows): rows that differ (an export
    that repeated one row fails the check), within the example's magnitudes (its range checks pass)."""
    index, scale = torch.arange(rows) % inputs[0].shape[0], 1.0 - torch.arange(rows, dtype=torch.float32) / (2 * rows)
    return tuple(t[index] * scale.view(-1, *[1] * (t.dim() - 1)) for t in inputs)


def disagreement(opt: torch.nn.Module, runner: Callable, probe: tuple) -> str | None:
    """What is wrong with a library's answers on ``probe`` against graphopt's own graph (``opt.graph_module``, never
    the engine), or None: the same numbers to rounding for an fp32 graph, INT8_AGREE_DB for an int8 one."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import int8_disagreement
    from graphopt.compiler.core.pipeline import is_quantized

    with torch.no_grad():
        out = runner(*fresh(probe))
        if out is None:
            return "its range checks fail"
        want, got = tree_flatten(opt.graph_module(*fresh(probe)))[0], tree_flatten(out)[0]
    if len(want) != len(got):
        return f"{len(got)} outputs, graphopt's graph {len(want)}"
    if is_quantized(opt.portable):
        return int8_disagreement(want, got)
    for i, (w, o) in enumerate(zip(want, got)):
        try:
            torch.testing.assert_close(o, w, rtol=1e-4, atol=1e-5 * max(1.0, float(w.abs().max())))
        except AssertionError as e:
            return f"output {i}: {str(e).strip().splitlines()[0][:120]}"
    return None
