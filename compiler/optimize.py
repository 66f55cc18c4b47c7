"""optimize(): trace a model, run the pass pipeline with every change verified, lower it for a backend.

    opt = optimize(model, (x,))       # trace, run the pass pipeline, verify, lower
    opt(x)                            # eager's answers, faster
    opt.code, opt.report              # what it runs, and what each pass did
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from graphopt.compiler.core.backend import resolve_backend
from graphopt.compiler.core.capture import capture, normalize_inputs
from graphopt.compiler.core.engine_batches import serve_other_batches
from graphopt.compiler.core.engines import choose, int8_disagreement, resolve_engines
from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.core.fast_path import NAN_CHECKS, fast_plan
from graphopt.compiler.core.module import OptimizedModule, finalize, input_specs
from graphopt.compiler.core.pipeline import PassManager, PassRecord, count_nodes, lower
from graphopt.passes.pipeline import DEFAULT_PIPELINE, LOWERING, PassContext


def optimize(model: nn.Module, example_inputs: Any, quantize: str | None = None,
             calibration: Iterable | None = None, passes: list[str] | None = None, backend: str = "auto",
             dump_dir: str | os.PathLike | None = None, check: bool = True, *,
             calibration_method: str = "histogram", accuracy_budget: Any = None,
             fp32_layers: Iterable[str] = (), progress: bool = True, nan_checks: str = "fast",
             engines: str | Sequence[str] | None = None) -> OptimizedModule:
    """Trace ``model`` on ``example_inputs``, optimize its graph and return a module with the same answers.

    The model is never modified. Every pass that changes the graph is checked against the
    captured model (``check=True``); ``dump_dir`` (or ``GRAPHOPT_DUMP``) keeps a dump per pass.

    ``quantize="int8"`` calibrates on ``calibration`` (an iterable of input tuples) with
    ``calibration_method`` ("minmax", "percentile" or "histogram") and runs convolutions and
    linears in int8; ``accuracy_budget`` (an output SQNR floor in dB, or ``(metric, tolerance)``)
    returns the most sensitive layers to fp32 until it holds; ``fp32_layers`` (module names) stay
    fp32 regardless. ``opt.int8_report`` says what happened, layer by layer. On the CPU with kernel libraries
    to measure (``engines``), graphopt's int8 plan, the plan with every layer int8 and the fp32 module are
    timed, and the fastest runs: the fp32 one where every int8 module is slower (compiler/int8/plans.py;
    ``opt.int8_report.plan`` says which).

    ``nan_checks="fast"`` (the default) also builds a graph with relu / relu6 / hardtanh fused into
    oneDNN, which the module runs on inputs that provably make no NaN or inf (compiler/core/fast_path.py):
    eager's results either way. ``"strict"`` keeps only the graph with separate activations (and no other
    kernel library). ``"off"`` gives up eager's NaN / inf results on inputs that hold NaN or inf or overflow:
    the fused graph and the chosen library run on every call, unchecked (the one mode that may differ
    from eager there, and only there).

    ``engines="auto"`` (the default, or ``GRAPHOPT_ENGINES``) also measures the optimized graph in every
    installed kernel library (ONNX Runtime, OpenVINO) and runs it in the fastest where that is faster than
    graphopt's own kernels, on inputs that provably make no NaN (compiler/core/engines.py); ``opt.engine``
    and the report's last row say which. ``"graphopt"`` keeps graphopt's own kernels only.
    """
    if nan_checks not in NAN_CHECKS:
        raise GraphoptError(f"unknown nan_checks={nan_checks!r}", hint="use 'fast' (the default), 'strict' or 'off'")
    if quantize not in (None, "int8"):
        raise GraphoptError(f"unknown quantize={quantize!r}", hint="use quantize='int8', or None for fp32")
    inputs = normalize_inputs(example_inputs)
    engine_names = resolve_engines(engines)
    backend = resolve_backend(backend, inputs)
    if quantize is not None:
        from graphopt.compiler.int8.quantize import check_batches

        calibration = check_batches(calibration, inputs)  # before any work: bad data fails fast
    start = time.perf_counter()
    # graphopt's copy (the user's model keeps its own) holds weights that do not require grad, as a loaded module's
    # are: aten::linear on a non-contiguous 3-d input sums in another order with a weight that does, even under
    # no_grad (the optimized module is for inference; prune's capture keeps them for fine-tuning)
    gm = capture(model, inputs).requires_grad_(False)
    fixed_batch = gm.meta.get("fixed_batch", [])
    captured = PassRecord(f"capture ({gm.meta['capture_route']})", seconds=time.perf_counter() - start,
                          nodes_after=count_nodes(gm))
    ctx = PassContext(inputs, backend=backend)
    dump_dir = dump_dir or os.environ.get("GRAPHOPT_DUMP") or None
    manager = PassManager(list(DEFAULT_PIPELINE if passes is None else passes), check=check,
                          dump_dir=str(dump_dir) if dump_dir else None)
    portable, report = manager.run(gm, ctx)
    report.insert(0, captured)
    if quantize == "int8":
        from graphopt.compiler.int8.quantize import quantize as quantize_int8

        fp32 = portable
        portable, records, int8_report = quantize_int8(fp32, ctx, manager, calibration, calibration_method,
                                                       accuracy_budget, progress=progress, fp32_layers=fp32_layers)
        build = lambda graph, rows, sums: _module(graph, ctx, manager, report + rows, inputs,  # noqa: E731
                                                  nan_checks, engine_names, sums, fixed_batch)
        if backend != "cpu" or not engine_names or nan_checks == "strict":
            opt = build(portable, records, {})
        else:
            from graphopt.compiler.int8.plans import fastest

            # (the second plan's int8 pass is checked like the first, and not dumped over it)
            again = lambda: quantize_int8(fp32, ctx, PassManager([], check=check), calibration,  # noqa: E731
                                          calibration_method, accuracy_budget, progress=False,
                                          fp32_layers=fp32_layers, small_fp32=False, calibrated=int8_report)
            opt, int8_report = fastest(build, fp32, (portable, records, int8_report), again, inputs, calibration)
        if manager.dumper:
            (manager.dumper.root / "int8.md").write_text(int8_report.table() + "\n")
        opt.int8_report = int8_report
        return opt
    opt = _module(portable, ctx, manager, report, inputs, nan_checks, engine_names, fixed_batch=fixed_batch)
    opt.int8_report = None
    return opt


def _module(portable, ctx: PassContext, manager: PassManager, report: list, inputs: tuple, nan_checks: str,
            engine_names: Sequence[str], int8_sums: dict | None = None, fixed_batch: Sequence[int] = ()
            ) -> OptimizedModule:
    """The optimized module of the portable graph: lowered for ctx.backend, its guarded fast graph, and the
    fastest kernel library where one is measured faster (``int8_sums``: compiler/int8/plans.py conv_sums)."""
    backend = ctx.backend
    lowered, lowering_report = lower(portable, ctx, LOWERING[backend], check=manager.check, manager=manager)
    opt = OptimizedModule(finalize(lowered), report + lowering_report, input_specs(inputs, fixed_batch), backend,
                          portable=finalize(portable))
    opt.nan_checks = nan_checks
    opt.int8_sums = dict(int8_sums or {})
    fast = fast_plan(portable, ctx, nan_checks)
    if fast is not None:
        fast_lowered, fast_report = lower(portable, fast[0], LOWERING[backend], check=manager.check, manager=manager)
        opt.report += [dataclasses.replace(r, name=f"{r.name} (fused clamps)") for r in fast_report]
        opt.use_fast_path(finalize(fast_lowered), fast[1])
    if backend == "cpu" and engine_names and nan_checks != "strict":
        _choose_engine(opt, portable, ctx, manager, engine_names)
    return opt


def _choose_engine(opt: OptimizedModule, portable, ctx: PassContext, manager: PassManager, names) -> None:
    """Measure the graph in other kernel libraries and keep the fastest (compiler/core/engines.py)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.pipeline import is_quantized
    from graphopt.compiler.core.verify import Oracle

    start = time.perf_counter()
    if is_quantized(portable):  # another library's int8 agrees with graphopt's to rounding, not bits
        with torch.no_grad():
            want = tree_flatten(opt(*fresh(ctx.example_inputs)))[0]
        check = lambda got: int8_disagreement(want, got)  # noqa: E731
    else:
        check = (manager.oracle or Oracle.build(portable, ctx.example_inputs)).fp32_error
    dump = manager.dumper.root if manager.dumper else None
    plan, runner = choose(opt, ctx.example_inputs, names, check, dump_dir=dump, guarded=opt.nan_checks == "fast")
    if runner is not None:
        serve_other_batches(runner, opt, ctx.example_inputs, plan)
    opt.use_engine(plan, runner)
    record = PassRecord(plan.summary(), rewrites=int(runner is not None), seconds=time.perf_counter() - start,
                        nodes_before=count_nodes(opt.graph_module), nodes_after=count_nodes(opt.graph_module),
                        misses={f"{name}: {why}": 1 for name, why in plan.reasons.items()})
    opt.report.append(record)
    if manager.dumper:
        manager.dumper.report([record])
        (dump / "engine.md").write_text(f"# {plan.summary()}\n\n{plan.batch_sizes()}\n\n"
                                        f"```json\n{json.dumps(plan.as_dict(), indent=1)}\n```\n")
