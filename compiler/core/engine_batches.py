"""Other batch sizes: the engine's calls at a batch size other than the example's, in ONNX Runtime.

The engine (compiler/core/engines.py) is chosen, and its session built, at the example's shapes. A module
optimized at batch 1 and called at batch 8 would run those calls on graphopt's own kernels (graphopt's graph
takes any batch size), up to 2.5x slower than the library on the same model (bench/other_batch.py). So where
ONNX Runtime's session on torch's threads measured faster than graphopt's graph at the example's shape
(whichever library won there), a second ONNX Runtime session over the graph exported with its batch, dimension
0 of every input, free serves every call at another batch size (the same sizes past dimension 0):

- The example's shapes keep the session that was measured. A free-batch session is not as fast everywhere:
  the seed ConvNet's int8 graph ran 1.11-1.14x slower in it at batch 1 on two threads (the same bits), and
  OpenVINO's free-batch sessions 1.02-1.11x slower. (The memory: a second session holds its own copy of the
  weights, and ONNX Runtime's arena keeps what its largest call needed.)
- Checked like every session, against graphopt's graph: on the example (load: its seeded probe) and at the
  example's batch size + 1 (the example's rows cycled, each scaled differently, so that an export which
  repeated one row fails). Only one other batch size is checked, and none is timed.
- The same range checks (per element, so any batch size): a call whose checks fail runs graphopt's graph.
- Where the export with a free batch fails, or the session disagrees, other batch sizes run graphopt's graph,
  and the plan's ``fixed_batch`` says why; the chosen engine still runs the example's shapes.
- Routing costs nothing at the example's shapes: the chosen session hands a call it declines to the free-batch
  session (``route_other_batches``), which declines what is not its call too (graphopt's graph runs it).
"""

from __future__ import annotations

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
                        checked: tuple) -> tuple[bool, str | None]:
    """Build ONNX Runtime's free-batch session for ``opt`` (exported at ``inputs``, with the range checks
    ``checked`` = (values, limits, by_sum) of engines._checked), check it on ``probe`` and at another batch size,
    and route the calls ``example`` (the chosen session) declines to it. (True, None), or (False, why not)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import build, onnx_model

    shapes = [tuple(t.shape) for t in inputs]
    batch = batch_of(shapes)
    if batch is None:
        return False, "the inputs have no common batch size"
    values, limits, by_sum = checked
    try:
        model = onnx_model(opt, fresh(inputs), values, by_sum, dynamic_batch=True)
        others = build("onnxruntime", model, spec, shapes, "torch", limits, any_batch=True)
        for where, case in (("", probe), (f" at batch size {batch + 1}", _more_rows(probe, batch + 1))):
            problem = disagreement(opt, others, case)
            if problem is not None:
                return False, f"onnxruntime's free-batch session disagrees with graphopt's graph{where}: {problem}"
    except Exception as e:  # (graphopt's graph or the exporter cannot take another batch size)
        return False, f"onnxruntime's free-batch session failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return route_other_batches(example, others), None


def _more_rows(inputs: tuple, rows: int) -> tuple:
    """``inputs``' rows cycled to ``rows`` rows, row r scaled by 1 - r / (2 rows): rows that differ (an export
    that repeated one row fails the check), within the example's magnitudes (its range checks pass)."""
    index, scale = torch.arange(rows) % inputs[0].shape[0], 1.0 - torch.arange(rows, dtype=torch.float32) / (2 * rows)
    return tuple(t[index] * scale.view(-1, *[1] * (t.dim() - 1)) for t in inputs)


def route_other_batches(example: Callable, others: Callable) -> bool:
    """Calls ``example`` (a session from engines.build) does not take go to ``others``: calls at other batch
    sizes, and calls for no library, which ``others`` declines too (graphopt's graph runs those). No frame more
    at the example's shapes (a wrapper that compared shapes first cost 2.4% of a 12 us MLP call). A call
    ``example`` takes whose range checks fail returns None (graphopt's graph), not ``others``'s answer. False
    where ``example`` was not built by engines.build."""
    declined = getattr(example, "declined", None)
    if declined is None:
        return False
    declined[0] = others
    return True


def disagreement(opt: torch.nn.Module, runner: Callable, probe: tuple) -> str | None:
    """What is wrong with a library's answers on ``probe`` against graphopt's own graph (``opt``, no engine in it
    yet), or None: the same numbers to rounding for an fp32 graph, INT8_AGREE_DB for an int8 one."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.engines import int8_disagreement
    from graphopt.compiler.core.pipeline import is_quantized

    with torch.no_grad():
        out = runner(*fresh(probe))
        if out is None:
            return "its range checks fail"
        want, got = tree_flatten(opt(*fresh(probe)))[0], tree_flatten(out)[0]
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
