"""Kernel-library choice: run the graph in ONNX Runtime or OpenVINO where that measures faster than graphopt's own.

graphopt's CPU graph calls oneDNN through PyTorch, one op at a time. On some networks another installed
library's kernels are faster (ONNX Runtime's MLAS on small convnets and MLPs, where its per-op cost is
lower; OpenVINO's depthwise and 1x1 kernels on MobileNet-style networks: bench/results/). So optimize()
exports the optimized graph (the portable graph in plain aten, compiler/deploy/onnx.py), builds a session
in each installed library named by ``engines``, checks its outputs with the same numerics oracle as every
pass, times it against graphopt's own graph (interleaved, median) and keeps the fastest. The partition
is the whole graph: these libraries run every op graphopt's CPU graphs keep, and one handoff is cheapest.

Guarantees kept:
- NaN / inf as eager: another library's relu may map NaN to a number, so the engine's answer is taken
  only on calls whose inputs provably make no NaN or inf (compiler/core/finite_range.py: finite, max |x|
  under the graph's limit); any other call runs graphopt's own graph, which keeps eager's semantics. The
  exported graph computes max |x| of each input as an extra output (sum |x|, one read, where the limit
  leaves room for it: SUM_CHECK_MEAN), checked after the run (in the library, the check costs less than a
  numpy or torch reduction before it: ConvNet b1, 0.33 ms in all, paid 20-40 us for one). Where the
  bound grows past float32's range inside the graph (deep networks: EfficientNet-B0), a few intermediate
  values get limits of their own (``checked_limits``), returned and checked the same way; a call where
  one is not within its limit (NaN is not) is run again on graphopt's graph. A graph the bound analysis
  cannot cover never uses an engine.
- int8 graphs export in ONNX's QDQ form (compiler/deploy/onnx.py), which the libraries run as int8 kernels;
  they round a requantization their own way, so their outputs are checked against graphopt's int8 graph by
  SQNR (``int8_disagreement``, INT8_AGREE_DB), not bits. No NaN guard: graphopt's own int8 kernels do not keep
  eager's NaN either (a NaN has no int8 code). Which int8 plan runs at all is compiler/int8/plans.py's choice.
- At the example's shapes, and at other batch sizes in ONNX Runtime: the chosen session runs the example's
  shapes (as measured); calls at any other batch size run in a second ONNX Runtime session, over the graph
  exported with its batch free, where ONNX Runtime measured faster than graphopt's graph at the example's
  shape (compiler/core/engine_batches.py). Any other call runs graphopt's graph.
- The plan is saved (manifest.json names the engine); load() rebuilds the session from the loaded graph
  (no ONNX file is ever read from a saved folder), checks it against graphopt's graph, and runs the same plan.
- The choice is in ``opt.report`` (a row "engine: <name> (its ms; the others' ms)"), ``opt.engine`` and
  ``opt.engine_plan``, and in the dumps (engine.md, and the exported graph as engine.onnx). Where the graph
  has squeeze-excite gates, ONNX Runtime also gets a session over it with the gates spread to full size
  (compiler/deploy/onnx_layout.py; dumped as engine-onnxruntime-gates-spread.onnx), raced as one more candidate.
- Thread-safe: an ONNX Runtime session may be run from several threads; OpenVINO gets one infer request
  per thread.

Threads: a session uses torch's thread count at the time it is built (ONNX Runtime with its default
spinning pool: blocking between ops made ConvNet b64 1.6x and ResNet-18 b1 1.2x slower, measured). A
graph that runs in under ``SINGLE_THREAD_BELOW_MS`` also gets a one-thread session in each library, measured
beside the others: waking a pool costs more than it splits there (a 0.03 ms MLP: 0.023 ms on one thread,
0.039 ms on two); it is kept unless the pool's measures ``ONE_THREAD_EDGE`` times faster. The plan's
``threads`` ("torch" or "1") is saved with the engine.

``engines="graphopt"`` (or ``GRAPHOPT_ENGINES=graphopt``) keeps graphopt's own kernels only.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from graphopt.compiler.core.errors import GraphoptError, first_line

ENGINES = ("onnxruntime", "openvino")  # tried in this order; a tie keeps the earlier
MARGIN = 1.0  # another library must take at most this fraction of graphopt's time (tests move it)
THREADS = ("torch", "1")  # a session's threads: torch's count when it is built, or one
SINGLE_THREAD_BELOW_MS = 1.0  # graphs quicker than this on the pool also get a one-thread session
# ... which is kept unless the pool's measures more than this many times faster: one thread leaves the other
# cores to the rest of the process, and its time does not hang on them being free (the MLP at optimize time:
# 0.027 ms on one thread, 0.024 on the pool; in the bench's interleaved run beside other engines 0.023 and 0.036)
ONE_THREAD_EDGE = 1.15
TIMING_BUDGET_S = 1.5  # measuring stops after about this long (at least MIN_SAMPLES calls each)
ROUNDS, MIN_SAMPLES, MAX_SAMPLES, WARMUP = 5, 5, 200, 5  # (a session's first calls set up its memory)
SIZE_CALLS = 3  # a candidate's size (which decides its one-thread session and the race's block length) is the
# quickest of this many calls (the ConvNet b1's ONNX Runtime session measured over 1 ms in one call right after
# the others, 0.19 ms in the race that followed, and got no one-thread session)
# A race between two candidates this close is run again: about one race in ten measured OpenVINO running
# EfficientNet-B0 in 0.98x ONNX Runtime's time; alone in a process, interleaved, ONNX Runtime ran it 1.12x faster
CLOSE_CALL, RERACES = 1.15, 2
SETTLE_MS = 50.0  # each candidate's block starts with this long of untimed calls (compiler/workflow/timing.py)
PROBE_SEED = 0  # load()'s check of a rebuilt session runs on this seeded input
# ... scaled by the first of these at which graphopt's int8 graph stays within what a library plan's own
# quantizations (opt.int8_sums) were calibrated on (``seeded_probe``): a pruned digits ConvNet's library plan
# measured 24 dB against graphopt's graph on the probe unscaled (its last conv's float output past its calibrated
# range), 58 dB at 1/2, 57 dB on a validation digit
PROBE_SCALES = (1.0, 0.5, 0.25, 0.125)
# An input whose limit is at least this many times its number of elements is checked by sum |x| <= limit (one
# read, one ONNX node: ReduceL1) instead of max |x| <= limit (three reads, seven nodes): sum |x| >= max |x|, so
# a call it passes is within the limit, and it turns away only inputs whose mean |x| is past this (graphopt's
# graph runs those). The ConvNet b1's check: 7.6% of its call in ONNX Runtime as max |x|, 0.3% as sum |x|.
SUM_CHECK_MEAN = 2.0 ** 20


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_engines(engines: str | Sequence[str] | None) -> tuple[str, ...]:
    """The libraries optimize() may choose: "auto" (every installed one), "graphopt" (none), or a list."""
    if engines is None:
        engines = os.environ.get("GRAPHOPT_ENGINES", "auto")
    names = [e.strip() for e in engines.split(",")] if isinstance(engines, str) else list(engines)
    if names == ["auto"]:
        return tuple(e for e in ENGINES if installed(e))
    unknown = [e for e in names if e not in ENGINES + ("graphopt",)]
    if unknown:
        raise GraphoptError(f"unknown engine(s): {', '.join(map(str, unknown))}",
                            hint=f"use 'auto', 'graphopt' or a list of {', '.join(ENGINES)}")
    missing = [e for e in names if e in ENGINES and not installed(e)]
    if missing:
        raise GraphoptError(f"engine(s) not installed: {', '.join(missing)}",
                            hint="pip install them, or use engines='auto' (the installed ones)")
    return tuple(e for e in ENGINES if e in names)


def onnx_model(module: torch.nn.Module, inputs: tuple, checks: Sequence[str] = (), by_sum: Collection[str] = (),
               dynamic_batch: bool = False) -> bytes:
    """The optimized graph as ONNX, at the example's shapes (``dynamic_batch``: its batch free), returning max |v|
    of each value named in ``checks`` (sum |v| of those in ``by_sum``) after its own outputs."""
    from graphopt.compiler.core.capture import locked_tracing
    from graphopt.compiler.core.pipeline import is_quantized
    from graphopt.compiler.deploy.onnx import exportable, int8_weights, write_onnx

    buffer = io.BytesIO()
    with locked_tracing():  # (the exporter traces: one at a time, like every trace)
        write_onnx(exportable(module, checks, for_engine=True, by_sum=by_sum), inputs, buffer,
                   dynamic_batch=dynamic_batch)
    return int8_weights(buffer.getvalue()) if is_quantized(module.portable) else buffer.getvalue()


def _outputs(spec: Any, limits: Sequence[float]) -> Callable[[list], Any]:
    """A library's output arrays (the graph's, flattened, then max |v| of each checked value) -> the graph's
    output structure, as tensors sharing them; None where a checked value is not within its limit (NaN is not).
    (One output with at most one check takes no loop: OpenVINO's usual call. ONNX Runtime's usual call does all
    of this inline, in ``run_one``.)"""
    n, bounds = spec.num_leaves, tuple(float(limit) for limit in limits)
    if spec.is_leaf() and len(bounds) <= 1:
        bound = bounds[0] if bounds else None

        def one(arrays: list) -> Any:
            if bound is not None and not float(arrays[1]) <= bound:  # (NaN compares False)
                return None
            return torch.from_numpy(arrays[0])
        return one

    def convert(arrays: list) -> Any:
        if not all(float(m) <= bound for m, bound in zip(arrays[n:], bounds)):  # (NaN compares False)
            return None
        return tree_unflatten([torch.from_numpy(a) for a in arrays[:n]], spec)
    return convert


def _arrays(shapes: Sequence[tuple], any_batch: bool) -> Callable[[tuple], list | None]:
    """A call's inputs as numpy views, or None where the call is not the library's: anything but float32 CPU
    tensors of the measured ``shapes`` (``any_batch``: or of their sizes past dimension 0, with a common batch
    size of at least 1), or an input that wants grad while grad mode is on (graphopt's own path then runs it, or
    says what is wrong with it). This check and the views are all the Python a library's call adds: about 3 us
    alone, several times that right after a run of the library's spinning thread pool. (No torch op: any torch
    op between two library runs cost 20-30 us more than it takes alone, measured on a 0.3 ms ConvNet in ONNX
    Runtime.)"""
    sizes = [torch.Size(shape) for shape in shapes]

    def arrays(args: tuple) -> list | None:
        if len(args) != len(sizes):
            return None
        out, rows = [], None
        for x, size in zip(args, sizes):
            if type(x) is not torch.Tensor or x.dtype is not torch.float32 or not x.is_cpu:
                return None
            if x.shape != size and not (any_batch and x.dim() == len(size) and x.shape[1:] == size[1:]
                                        and x.shape[0] > 0):
                return None
            if any_batch and rows is not None and x.shape[0] != rows:
                return None
            rows = x.shape[0] if any_batch else None
            if x.requires_grad:
                if torch.is_grad_enabled():
                    return None
                x = x.detach()
            out.append((x if x.is_contiguous() else x.contiguous()).numpy())
        return out
    return arrays


def _threads(threads: str) -> int:
    return 1 if threads == "1" else torch.get_num_threads()


def _onnxruntime(model: bytes, spec: Any, threads: str, limits: Sequence[float], shapes: Sequence[tuple],
                 any_batch: bool, declined: list) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads(threads)
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names, wanted = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    arrays, outputs = _arrays(shapes, any_batch), _outputs(spec, limits)
    # the session's compiled run, without the Python wrapper's per-call checks of what this function builds
    # itself (3 us of a 0.03 ms MLP, measured); the wrapper's where a version has no such attribute. (A version
    # whose compiled run takes other arguments fails the first call, in optimize() or load(): graphopt runs.)
    call = getattr(getattr(session, "_sess", None), "run", None) or session.run

    def run(*args: torch.Tensor) -> Any:
        feed = arrays(args)
        if feed is None:
            return None if declined[0] is None else declined[0](*args)
        return outputs(call(wanted, dict(zip(names, feed)), None))
    if len(names) != 1 or not spec.is_leaf() or len(limits) > 1:
        return run
    # The usual call (one tensor in, one out, at most one range check) in a single Python frame, ``run`` for
    # anything else. Python right after a run of the session is several times slower than alone (its caches
    # cold, the pool spinning): each frame less was 2-4% of a 0.27 ms ConvNet, measured interleaved.
    (name,), size, bound = names, torch.Size(shapes[0]), float(limits[0]) if limits else math.inf
    rank, rest = len(size), size[1:]

    def run_one(*args: torch.Tensor) -> Any:
        if len(args) == 1:
            x = args[0]
            if (type(x) is torch.Tensor and x.dtype is torch.float32 and x.is_cpu and not x.requires_grad
                    and x.is_contiguous() and (x.shape == size or (any_batch and x.dim() == rank and x.shape[0] > 0
                                                                   and x.shape[1:] == rest))):
                got = call(wanted, {name: x.numpy()}, None)
                return torch.from_numpy(got[0]) if len(got) == 1 or float(got[1]) <= bound else None
        return run(*args)
    return run_one


def _openvino_config(threads: str) -> dict:
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": _threads(threads)}


def _openvino(model: bytes, spec: Any, threads: str, limits: Sequence[float], shapes: Sequence[tuple],
              any_batch: bool, declined: list) -> Callable:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model), "CPU", _openvino_config(threads))
    local = threading.local()  # an infer request serves one call at a time: one per thread
    arrays, outputs = _arrays(shapes, False), _outputs(spec, limits)

    def run(*args: torch.Tensor) -> Any:
        feed = arrays(args)
        if feed is None:
            return None if declined[0] is None else declined[0](*args)
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        # the request reads the input's memory in place (it holds the array until its next call); it writes
        # fresh outputs (shared ones would be overwritten by that call). Copying the input measured 7-10% of a
        # ConvNet b1 call (0.14 ms), 2% at b64, nothing past noise on the 4.5-57 ms models
        results = request.infer(feed, share_inputs=True, share_outputs=False)
        return outputs([results[o] for o in compiled.outputs])
    return run


_BUILDERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}


def build(name: str, model: bytes, spec: Any, shapes: Sequence[tuple], threads: str = "torch",
          limits: Sequence[float] = (), any_batch: bool = False, trial_every_graph: bool = False) -> Callable:
    """``name``'s session over ``model`` (exported at input ``shapes``; ``any_batch``: with its batch free, ONNX
    Runtime only) as a function of tensors: the graph's outputs, or None where the call is not the library's
    (``_arrays``) or one of the checked values (``limits``, in the order of the model's extra outputs) is not
    within its limit. A call it does not take goes to ``runner.declined[0]`` instead where one was put there
    (engine_batches.serve_other_batches). OpenVINO compiles an int8 graph (``trial_every_graph``: any graph, as
    load() asks) in a child process first, and raises where the child crashed (compiler/core/trial_build.py)."""
    if name == "openvino":  # (a crash inside OpenVINO's compile would end the user's process)
        from graphopt.compiler.core.trial_build import openvino_problem

        problem = openvino_problem(model, _openvino_config(threads), shapes, every_graph=trial_every_graph)
        if problem is not None:
            raise RuntimeError(problem)
    declined: list = [None]
    runner = _BUILDERS[name](model, spec, threads, limits, shapes, any_batch, declined)
    runner.declined = declined
    return runner


def label(name: str, threads: str, spread: bool = False) -> str:
    """How the report names a session: "onnxruntime", "onnxruntime, 1 thread", "onnxruntime, gates spread"."""
    return name + ("" if threads == "torch" else ", 1 thread") + (", gates spread" if spread else "")


@dataclass
class EnginePlan:
    """Which library runs the graph, on which calls, and the measurements that chose it."""
    engine: str  # "graphopt" where no other library runs it
    threads: str = "torch"  # the engine's session threads (THREADS)
    limit: float | None = None  # calls with finite inputs within +-limit may run the engine
    checks: dict[str, float] = field(default_factory=dict)  # ... if these values are within +-their limit
    shapes: tuple = ()  # ... and with these input shapes
    spread: bool = False  # ONNX Runtime's session is over the graph with its channel gates spread (onnx_layout.py)
    other_batches: bool = False  # calls at other batch sizes run in ONNX Runtime's free-batch session
    fixed_batch: str | None = None  # ... or why they run graphopt's graph
    measured_ms: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # library -> why it was not chosen

    @property
    def label(self) -> str:
        return label(self.engine, self.threads, self.spread)

    def summary(self) -> str:
        others = [f"{k} {v:.3f} ms" for k, v in self.measured_ms.items() if k != self.label]
        others += [f"{k}: {v}" for k, v in self.reasons.items() if k not in self.measured_ms]
        mine = f"{self.measured_ms[self.label]:.3f} ms; " if self.label in self.measured_ms else ""
        return f"engine: {self.label} ({mine}{', '.join(others)})" if mine or others else f"engine: {self.label}"

    def batch_sizes(self) -> str:
        """Who runs which batch size, in words: "openvino at batch 1; other batch sizes: onnxruntime's free-batch
        session" (or "...: graphopt's graph")."""
        if self.engine == "graphopt":
            return "graphopt's graph at any batch size"
        batch = batch_of(self.shapes)
        at = f"at batch {batch}" if batch is not None else "at the example's shapes"
        others = "onnxruntime's free-batch session" if self.other_batches else "graphopt's graph"
        return f"{self.label} {at}; other batch sizes: {others}"

    def as_dict(self) -> dict:
        batch = {"sizes": self.batch_sizes(), "fixed_because": self.fixed_batch} if self.engine != "graphopt" else None
        return {"engine": self.engine, "threads": self.threads, "gates_spread": self.spread,
                "partition": "whole graph", "input_limit": self.limit,
                "range_checks": self.checks, "shapes": [list(s) for s in self.shapes], "batch": batch,
                "measured_ms": self.measured_ms, "reasons": self.reasons}


NO_BOUND = ("no proven NaN-free input range (an op without a bound, or gains past float32's range): "
            "eager's NaN semantics need graphopt's graph (nan_checks='off' gives them up)")


def eligible(portable: torch.fx.GraphModule, inputs: tuple, outputs: list) -> str | None:
    """Why no library may run the graph, or None."""
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                             for t in inputs):
        return "the inputs are not all float32 CPU tensors"
    if not outputs or not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in outputs):
        return "the outputs are not all float32 tensors"
    return None


INT8_AGREE_DB = 35.0  # another library's int8 kernels may round a requantization the other way: SQNR, not bits


def int8_disagreement(want: list, got: list) -> str | None:
    """None if another library's outputs ``got`` match graphopt's int8 outputs ``want`` to INT8_AGREE_DB, else why."""
    from graphopt.compiler.core.verify import sqnr

    for i, (w, o) in enumerate(zip(want, got, strict=True)):
        if w.shape != o.shape:
            return f"output {i} has shape {tuple(o.shape)}, graphopt's {tuple(w.shape)}"
        db = sqnr(w, o)
        if not db >= INT8_AGREE_DB:
            return f"output {i}: SQNR {db:.1f} dB against graphopt's int8 graph (< {INT8_AGREE_DB:.0f} dB)"
    return None


def _checkable(node: torch.fx.Node) -> bool:
    """May a value be range-checked? Only where its name survives save and load (compiler/deploy/save.py inlines
    modules and renames what the loader would refuse)."""
    from graphopt.compiler.deploy.graph_json import is_plain

    return node.op in ("call_function", "call_method") and is_plain(node.name)


Guard = tuple[float | None, dict[str, float], str | None]  # (input limit, {value: limit}, why none if limit is None)


def guard(portable: torch.fx.GraphModule, inputs: tuple) -> Guard:
    """The input limit and the range checks under which no value of the graph can be NaN or inf: the
    whole-graph bound where it covers the example with ``allowance``'s headroom; range checks otherwise."""
    from graphopt.compiler.core.finite_range import allowance, checked_limits, input_limit, magnitudes

    limit = input_limit(portable)
    largest = max((float(t.detach().abs().max()) for t in inputs if t.numel()), default=0.0)
    if limit is not None and limit >= allowance(largest):
        return limit, {}, None
    limits = checked_limits(portable, magnitudes(portable, inputs), _checkable)
    if limits is None:
        return limit, {}, None if limit is not None else NO_BOUND
    inputs_at = {n.name for n in portable.graph.nodes if n.op == "placeholder"}
    return limits[next(iter(inputs_at))], {k: v for k, v in limits.items() if k not in inputs_at}, None


def saved_guard(portable: torch.fx.GraphModule, saved: dict | None) -> Guard:
    """A loaded plan's guard: ``saved`` ({"inputs": limit, "checks": {value: limit}}, validated by load()) if it
    proves the loaded graph NaN-free. (A folder saved before range checks: the whole-graph bound.)"""
    from graphopt.compiler.core.finite_range import input_limit, proves

    if saved is None:
        limit = input_limit(portable)
        return limit, {}, None if limit is not None else NO_BOUND
    inputs_at = [n.name for n in portable.graph.nodes if n.op == "placeholder"]
    if not proves(portable, {**dict.fromkeys(inputs_at, saved["inputs"]), **saved["checks"]}):
        return None, {}, "manifest.json's range limits do not prove the loaded graph NaN-free"
    return saved["inputs"], dict(saved["checks"]), None


def _checked(opt: torch.nn.Module, plan: EnginePlan) -> tuple[list[str], list[float], set[str]]:
    """The values the library's run returns a bound of, their limits (every input, then plan.checks; none
    unguarded), and the inputs checked by ``sum |x|`` (SUM_CHECK_MEAN) instead of ``max |x|``."""
    if plan.limit is None:
        return [], [], set()
    inputs = [n.name for n in opt.portable.graph.nodes if n.op == "placeholder"]
    by_sum = {name for name, shape in zip(inputs, plan.shapes) if plan.limit >= SUM_CHECK_MEAN * math.prod(shape)}
    return inputs + list(plan.checks), [plan.limit] * len(inputs) + list(plan.checks.values()), by_sum


def _plan(opt: torch.nn.Module, inputs: tuple, guarding: Callable[[], Guard] | None
          ) -> tuple[EnginePlan, Any, str | None]:
    """graphopt's own plan for ``opt`` (an OptimizedModule without an engine yet), its output structure, and why
    no library may run it (None where one may). ``guarding`` gives the plan's guard (None: unguarded; an int8
    graph is never guarded: graphopt's own int8 kernels do not keep eager's NaN either)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.pipeline import is_quantized

    with torch.no_grad():
        outputs, spec = tree_flatten(opt(*fresh(inputs)))
    plan = EnginePlan("graphopt", shapes=tuple(tuple(t.shape) for t in inputs))
    reason = eligible(opt.portable, inputs, outputs)
    if reason is None and guarding is not None and not is_quantized(opt.portable):
        plan.limit, plan.checks, reason = guarding()
    return plan, spec, reason


def choose(opt: torch.nn.Module, inputs: tuple, names: Sequence[str], check: Callable[[list], str | None],
           dump_dir: Any = None, guarded: bool = True) -> tuple[EnginePlan, Callable | None]:
    """Measure ``opt`` (an OptimizedModule, graphopt's own graph) against each library in ``names``; (the plan,
    the chosen library's runner or None).

    ``check`` is the numerics oracle: flattened outputs on ``inputs`` -> None, or what is wrong with them."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.workflow.timing import call_ms

    plan, spec, reason = _plan(opt, inputs, (lambda: guard(opt.portable, fresh(inputs))) if guarded else None)
    if reason is not None:
        plan.reasons = {name: reason for name in names}
        return plan, None
    checked, limits, by_sum = _checked(opt, plan)
    try:
        model = onnx_model(opt, fresh(inputs), checked, by_sum)
    except Exception as e:  # an op the exporter cannot write: graphopt runs it
        plan.reasons = {name: f"the ONNX export failed: {first_line(e)}"
                        for name in names}
        return plan, None
    spread_model = _spread(model) if "onnxruntime" in names else None
    if dump_dir is not None:
        (dump_dir / "engine.onnx").write_bytes(model)
        if spread_model is not None:  # (what ONNX Runtime's session with its gates spread is built over)
            (dump_dir / "engine-onnxruntime-gates-spread.onnx").write_bytes(spread_model)
    runners: dict[tuple[str, str, bool], Callable] = {}  # (library, threads, gates spread) -> runner

    def add(name: str, threads: str, spread: bool = False) -> None:
        try:
            runner = build(name, spread_model if spread else model, spec, plan.shapes, threads, limits)
        except Exception as e:  # (build's trial: a library that crashes on the graph in a child process)
            plan.reasons[label(name, threads, spread)] = f"could not build its session: {first_line(e, 200)}"
            return
        try:
            with torch.no_grad():
                out = runner(*fresh(inputs))
            problem = "its range checks fail on the example" if out is None else check(tree_flatten(out)[0])
        except Exception as e:
            problem = first_line(e)
        if problem is None:
            runners[name, threads, spread] = runner
        else:
            plan.reasons[label(name, threads, spread)] = f"rejected by the numerics check: {problem}"

    for name in names:
        add(name, "torch")
    if spread_model is not None:  # both graphs race: the spread one measured 0.94-1.0x on EfficientNet-B0 and
        add("onnxruntime", "torch", True)  # 1.0-1.1x on another squeeze-excite network (onnx_layout.py)
    if not runners:
        return plan, None
    sizes = call_ms({"graphopt": opt, **{label(*k): r for k, r in runners.items()}}, fresh(inputs), warmup=WARMUP,
                    calls=SIZE_CALLS)
    if torch.get_num_threads() > 1:
        for name, threads, spread in list(runners):
            if sizes[label(name, threads, spread)] < SINGLE_THREAD_BELOW_MS:
                add(name, "1", spread)
    plan.measured_ms = race({"graphopt": opt, **{label(*k): r for k, r in runners.items()}}, inputs, sizes)

    faster = [k for k in runners if plan.measured_ms[label(*k)] <= MARGIN * plan.measured_ms["graphopt"]]
    if not faster:
        return plan, None

    def cost(key: tuple[str, str, bool]) -> float:  # (a one-thread session wins within ONE_THREAD_EDGE of the pool's)
        ms = plan.measured_ms[label(*key)]
        return ms / ONE_THREAD_EDGE if key[1] == "1" else ms
    plan.engine, plan.threads, plan.spread = best = min(faster, key=cost)
    # (engine_batches.serve_other_batches routes them, in a session over the graph as exported: a free batch is
    # never spread, onnx_layout._gated; so it is the plain session that must have measured faster)
    plan.other_batches = ("onnxruntime", "torch", False) in faster
    if not plan.other_batches:
        plan.fixed_batch = "onnxruntime did not measure faster than graphopt's graph at the example's shape"
    return plan, runners[best]


def _spread(model: bytes) -> bytes | None:
    """``model`` with its channel gates spread (compiler/deploy/onnx_layout.py), or None where it has none or the
    rewrite fails (then ONNX Runtime gets only the graph as exported)."""
    from graphopt.compiler.deploy.onnx_layout import spread_channel_gates

    try:
        spread, gates = spread_channel_gates(model)
    except Exception:
        return None
    return spread if gates else None


def race(candidates: dict[str, Callable], inputs: tuple, sizes: dict[str, float] | None = None) -> dict[str, float]:
    """Each candidate's median ms on ``inputs``, timed interleaved for about TIMING_BUDGET_S (``sizes``: ms per call
    already measured for some of them). Where the two quickest are within CLOSE_CALL of each other, those two
    race RERACES more times (in about one more TIMING_BUDGET_S), and each keeps the median of its races."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.workflow.timing import call_ms, median_ms

    sizes = dict(sizes or {})
    sizes |= call_ms({k: r for k, r in candidates.items() if k not in sizes}, fresh(inputs), warmup=WARMUP,
                     calls=SIZE_CALLS)

    def timed(entrants: dict[str, Callable], budget_s: float) -> dict[str, float]:
        one_round = max(sum(sizes[k] for k in entrants) / 1e3, 1e-6)
        samples = int(min(MAX_SAMPLES, max(MIN_SAMPLES, budget_s / one_round)))
        # blocks of calls in turn: each library's thread pool wakes once per block (as it would in use), not per call
        return median_ms(entrants, fresh(inputs), rounds=ROUNDS, per_round=max(1, samples // ROUNDS), warmup=0,
                         settle_ms=SETTLE_MS)

    ms = timed(candidates, TIMING_BUDGET_S)
    if len(ms) > 1:
        first, second = sorted(ms, key=ms.get)[:2]
        if ms[second] <= CLOSE_CALL * ms[first]:  # (the re-races share one more TIMING_BUDGET_S)
            pair = {k: candidates[k] for k in (first, second)}
            runs = [ms] + [timed(pair, TIMING_BUDGET_S / RERACES) for _ in range(RERACES)]
            ms |= {k: statistics.median(run[k] for run in runs) for k in (first, second)}
    return ms


def restore(name: str, opt: torch.nn.Module, inputs: tuple, guarded: bool = True, threads: str = "torch",
            limits: dict | None = None, other_batches: bool = False, spread: bool = False
            ) -> tuple[EnginePlan | None, Callable | None, str | None]:
    """The saved plan on load: rebuild ``name``'s session (on ``threads``, with the saved range ``limits``; ONNX
    Runtime's with its gates ``spread``) from ``opt``'s loaded graph and check it against graphopt's own graph on
    a seeded input; ``other_batches``: the plan says ONNX Runtime's free-batch session runs other batch sizes
    (engine_batches.serve_other_batches).
    (plan, runner, None), or (None, None, why graphopt's graph runs)."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.core.pipeline import is_quantized

    if not installed(name):
        return None, None, f"it was saved to run in {name}, which is not installed here"
    plan, spec, reason = _plan(opt, inputs, (lambda: saved_guard(opt.portable, limits)) if guarded else None)
    if reason is not None:
        return None, None, reason
    values, bounds, by_sum = _checked(opt, plan)  # (``limits`` is the saved form of the same)
    try:
        probe = seeded_probe(opt, inputs, plan.limit)
        model = onnx_model(opt, fresh(inputs), values, by_sum)
        spread_model = _spread(model) if spread and name == "onnxruntime" else None
        spread = spread_model is not None  # (no gates to spread in the graph loaded: the session over it as it is)
        # (a saved graph may come from anyone: OpenVINO tries any of them in a child first)
        runner = build(name, spread_model or model, spec, plan.shapes, threads, bounds, trial_every_graph=True)
        problem = disagreement(opt, runner, probe)
    except Exception as e:
        return None, None, f"{name} could not run it as saved: {first_line(e, 160)}"
    if problem is not None:
        graph = "graphopt's int8 graph" if is_quantized(opt.portable) else "graphopt's graph"
        return None, None, f"{name} disagrees with {graph} on load's seeded probe input: {problem}"
    plan.engine, plan.threads, plan.spread = name, threads, spread
    plan.other_batches = other_batches  # (engine_batches routes them)
    return plan, runner, None


def batch_of(shapes: Sequence[tuple]) -> int | None:
    """The inputs' common batch size (dimension 0, at least 1), or None where they have none (a 0-d input,
    sizes that differ, an empty batch)."""
    sizes = {shape[0] if len(shape) else None for shape in shapes}
    batch = next(iter(sizes)) if len(sizes) == 1 else None
    return batch or None


def seeded_probe(opt: torch.nn.Module, inputs: tuple, limit: float | None) -> tuple:
    """Inputs like ``inputs`` for a check of a rebuilt session of ``opt``: seeded (PROBE_SEED) normal values within
    the engine's input ``limit``.

    An int8 plan that runs in a library quantizes a few values graphopt's int8 graph keeps float (``opt.int8_sums``,
    compiler/int8/plans.py), on the range calibration saw: past it the library saturates by design and graphopt's
    graph does not, and a random input can go past it where the user's data did not. So for such a plan the probe
    is scaled down by the first of PROBE_SCALES at which graphopt's graph with those quantizations applied (the
    graph the library is given, run in torch) agrees with graphopt's graph (int8_disagreement); where none does
    (sums that clip what calibration would not have), the smallest, and the check says what is wrong."""
    from graphopt.compiler.core.capture import fresh
    from graphopt.compiler.deploy.onnx import exportable

    g, bound = torch.Generator().manual_seed(PROBE_SEED), limit or 1.0
    probe = tuple(torch.randn(t.shape, generator=g).clamp(-bound, bound) for t in inputs)
    if not getattr(opt, "int8_sums", None):
        return probe
    as_given = exportable(opt, for_engine=True)
    with torch.no_grad():
        for scale in PROBE_SCALES:
            scaled = tuple(t * scale for t in probe)
            want, got = tree_flatten(opt.graph_module(*fresh(scaled)))[0], tree_flatten(as_given(*fresh(scaled)))[0]
            if int8_disagreement(want, got) is None:
                break
    return scaled


def disagreement(opt: torch.nn.Module, runner: Callable, probe: tuple) -> str | None:
    """What is wrong with a library's answers on ``probe`` against graphopt's own graph (``opt.graph_module``, never
    the engine), or None: the same numbers to rounding for an fp32 graph, INT8_AGREE_DB for an int8 one."""
    from graphopt.compiler.core.capture import fresh
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
