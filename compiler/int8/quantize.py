"""int8: calibrate, quantize, measure each layer, and hold the accuracy budget.

    ranges  = calibrate(fp32 graph, batches, method)          passes/observers.py, over the user's batches
    scheme  = the weights' range this machine computes exactly    compiler/int8/scheme.py: s8, or s7 on CPUs
              without VNNI / AMX
    int8    = quantize_int8 pass (checked like every pass)    passes/quantize_int8.py
    report  = SQNR of every quantized layer and of the output, against the fp32 graph, on the
              first EVAL_BATCHES calibration batches
    budget  = while the budget fails: return the most sensitive int8 layer to fp32, where a
              layer's sensitivity is the output SQNR gained by keeping it (alone) in fp32, measured

``accuracy_budget`` is an output SQNR floor in dB, or ``(metric, tolerance)`` where
``metric(module) -> float`` is higher-is-better (say, accuracy on held-out data) and the int8
module may lose at most ``tolerance`` of the fp32 module's score.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from graphopt.compiler.core.capture import fresh
from graphopt.compiler.core.errors import GraphoptError, InputError
from graphopt.compiler.core.pipeline import INT8_PASS_FLOOR_DB, PassManager, clone, lower
from graphopt.compiler.core.verify import record_values, sqnr_db, sqnr_terms
from graphopt.compiler.int8.calibrate import METHODS, collect, value_range
from graphopt.compiler.int8.scheme import choose
from graphopt.kernels.ops import OPS
from graphopt.kernels.signatures import signature_of
from graphopt.passes.pipeline import LOWERING, PassContext
from graphopt.passes.quantize_int8 import candidates

EVAL_BATCHES = 4
_LAYER_OPS = {OPS[name] for name in ("conv2d_act", "linear_act", "qconv2d_act", "qlinear_act")}
# On the CPU, an oneDNN int8 call costs about 20 us more than its fp32 counterpart whatever its size
# (README: int8), so a layer below MIN_INT8_MACS multiply-adds per call (at the traced shape) runs
# faster in fp32 and stays there, unless keeping it fp32 would mean quantizing its output again
# for the int8 layer that reads it, and that output (after max pooling, flatten, ...) has
# MIN_INT8_REQUANTIZE elements or more: quantizing costs about 0.45 ns an element, so from there
# on the extra quantize costs more than the int8 call. Deterministic on purpose: no timing decides
# a graph. MIN_INT8_MACS = 0 quantizes every layer.
MIN_INT8_MACS = 1 << 20
MIN_INT8_REQUANTIZE = 1 << 15
# Without VNNI / AMX (scheme s7), oneDNN's int8 takes three instructions (vpmaddubsw, vpmaddwd, vpaddd)
# for 32 multiply-adds where fp32 takes one FMA for 8, so int8 pays off only on larger layers. Measured
# under ONEDNN_MAX_CPU_ISA=AVX2 (1 thread; chains of 4 layers, int8 against the optimized fp32, medians
# of interleaved rounds): 3x3 convs break even at 2-9M multiply-adds per call (0.90x at 9.4M, 0.6x from
# 38M), batch-1 linears at about 16M (1.07x at 1M, 0.97x at 16.8M); with VNNI the same convs run 0.5x
# from 38M and linears 0.6x at 1M. So an s7 layer needs S7_MACS_FACTOR times MIN_INT8_MACS.
S7_MACS_FACTOR = 8


def min_int8_macs(scheme: str) -> int:
    """The multiply-adds per call from which a layer runs int8 on the CPU, for the scheme it would use."""
    return MIN_INT8_MACS * (S7_MACS_FACTOR if scheme == "s7" else 1)


def requantized_elements(gm: fx.GraphModule, node: fx.Node, layers: set[fx.Node]) -> int:
    """How many elements would be quantized again if ``node`` stayed fp32 and its int8 readers did not."""
    from graphopt.passes.quantize_int8 import passes_int8_through

    value = node
    while len(value.users) == 1 and passes_int8_through(gm, next(iter(value.users))):
        value = next(iter(value.users))
    if not any(u in layers and signature_of(u).x is value for u in value.users):
        return 0
    meta = value.meta.get("tensor_meta")
    return meta.shape.numel() if meta is not None else 0


def macs(node: fx.Node) -> int:
    """Multiply-adds of one call of a fused conv / linear, from the traced shapes."""
    sig = signature_of(node)
    x, w = sig.x.meta.get("tensor_meta"), node.meta.get("tensor_meta")
    weight_shape = sig.weight.meta.get("tensor_meta")
    if x is None or w is None or weight_shape is None:
        return 0
    out, kernel = w.shape, weight_shape.shape  # conv: (N, K, P, Q) and (K, C/g, R, S); linear: (..., N), (N, K)
    per_output = 1
    for d in kernel[1:]:
        per_output *= d
    total = 1
    for d in out:
        total *= d
    return total * per_output


@dataclass
class Int8Report:
    method: str
    batches: int
    calibration_seconds: float
    vnni: bool
    budget: str | None
    scheme: str = "s8"  # the weights' range (compiler/int8/scheme.py)
    output_sqnr_db: float = float("nan")
    layers: list[dict] = field(default_factory=list)  # name, node, op, int8, sqnr_db, reason
    fallback: list[str] = field(default_factory=list)  # layer names returned to fp32, in order
    plan: str = "graphopt's int8 kernels"  # what runs: optimize() measures the int8 plans against the fp32 one
    ranges: dict = field(default_factory=dict, repr=False)  # calibration's {node: (lo, hi)}, for a second plan

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "ranges"}

    def table(self) -> str:
        weights = {"s8": "8-bit weights", "s7": "7-bit weights: this CPU has no VNNI / AMX"}.get(self.scheme, "")
        rows = [f"int8: scheme {self.scheme} ({weights}); {self.method} calibration on {self.batches} batches "
                f"({self.calibration_seconds:.1f} s); output SQNR {self.output_sqnr_db:.1f} dB"
                + (f"; budget {self.budget}" if self.budget else ""), f"runs: {self.plan}",
                "", "| layer | op | runs in | SQNR dB | why fp32 |", "|---|---|---|---:|---|"]
        for layer in self.layers:
            rows.append(f"| {layer['name']} | {layer['op']} | {'int8' if layer['int8'] else 'fp32'} | "
                        f"{layer['sqnr_db']:.1f} | {layer['reason'] or ''} |")
        return "\n".join(rows)


def check_batches(calibration: Iterable | None, example_inputs: tuple) -> list[tuple]:
    """The calibration batches as a list of input tuples like the example inputs, or a clear error."""
    if calibration is None:
        raise GraphoptError("quantize='int8' needs calibration data",
                            hint="pass calibration=[(x1,), (x2,), ...]: a few dozen batches like the real inputs")
    try:
        batches = [b if isinstance(b, (tuple, list)) else (b,) for b in calibration]
    except TypeError as e:
        raise GraphoptError(f"calibration must be an iterable of input tuples, got {type(calibration).__name__}",
                            hint="pass calibration=[(x1,), (x2,), ...]") from e
    if not batches:
        raise GraphoptError("calibration is empty", hint="pass at least one batch; a few dozen is typical")
    for i, batch in enumerate(batches):
        if len(batch) != len(example_inputs):
            raise InputError(f"calibration batch {i} has {len(batch)} inputs, the example inputs {len(example_inputs)}",
                             hint="each batch is a tuple of the model's inputs, like example_inputs")
        for j, (t, ex) in enumerate(zip(batch, example_inputs)):
            if not isinstance(ex, torch.Tensor):
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != ex.dim() or t.dtype != ex.dtype \
                    or t.device != ex.device or t.shape[1:] != ex.shape[1:]:
                got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise InputError(f"calibration batch {i}, input {j}: expected {tuple(ex.shape)} {ex.dtype} on "
                                 f"{ex.device} (any batch size), got {got}",
                                 hint="calibration batches must look like the example inputs")
            if t.is_floating_point() and not bool(t.isfinite().all()):
                raise InputError(f"calibration batch {i}, input {j} holds NaN or inf",
                                 hint="calibrate on real, finite data: a NaN would make every range meaningless")
    tensors = [t for batch in batches for t in batch if isinstance(t, torch.Tensor)]
    if tensors and all(t.dim() > 0 and t.shape[0] == 0 for t in tensors):
        raise GraphoptError(f"calibration holds {len(batches)} batch(es), all empty (batch size 0): nothing to measure "
                            "the activation ranges on",
                            hint="pass batches with at least one sample each; a few dozen batches is typical")
    return batches


def observed_nodes(gm: fx.GraphModule) -> set[str]:
    """What calibration measures: the input and the output of every op the int8 pass can quantize."""
    names = set()
    for node in candidates(gm):
        names |= {node.name, signature_of(node).x.name}
    return names


def calibrate(gm: fx.GraphModule, batches: list[tuple], method: str, progress: bool = True
              ) -> dict[str, tuple[float, float]]:
    """{node name: (lo, hi)} for the nodes the int8 pass needs, over ``batches``."""
    if method not in METHODS:
        raise GraphoptError(f"unknown calibration_method {method!r}", hint=f"use one of {', '.join(METHODS)}")
    names = observed_nodes(gm)
    passes = 1 if method == "minmax" else 2
    with _progress(progress, f"calibrating ({method})", passes * len(batches)) as advance:
        stats = collect(gm, batches, names, method, progress=advance)
    ranges = {}
    for name in sorted(names):
        found = value_range(stats, name, method)
        if found is not None:
            ranges[name] = found
    return ranges


class _progress:
    """A rich progress bar on stderr (nothing when ``show`` is false); ``with`` gives the advance function."""

    def __init__(self, show: bool, label: str, total: int):
        self.show, self.label, self.total = show, label, total

    def __enter__(self) -> Callable[[], None] | None:
        if not self.show:
            return None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self.show:
            self.bar.stop()


# Without an accuracy budget, int8 still never fails a model it can run: layers return to fp32, most
# sensitive first, until the output SQNR is this far above the int8 check's floor (core/pipeline.py)
AUTO_FLOOR_DB = INT8_PASS_FLOOR_DB + 5.0


def _budget_text(budget: Any) -> str | None:
    if budget is None:
        return f"none given: layers return to fp32 only below {AUTO_FLOOR_DB:.0f} dB output SQNR"
    if isinstance(budget, (int, float)):
        return f"output SQNR >= {float(budget):.1f} dB"
    return f"metric within {budget[1]} of fp32"


def _output_sqnr(reference: list[list], module: Callable, batches: list[tuple]) -> float:
    signal = noise = 0.0
    with torch.no_grad():
        for ref, batch in zip(reference, batches):
            out = module(*fresh(batch))
            out = out if isinstance(out, (tuple, list)) else (out,)
            for r, o in zip(ref, out):
                if isinstance(r, torch.Tensor) and r.is_floating_point():
                    s, n = sqnr_terms(r, o)
                    signal, noise = signal + s, noise + n
    return sqnr_db(signal, noise)


class Quantizer:
    """Builds int8 graphs from one calibrated fp32 graph, with any set of layers kept in fp32."""

    def __init__(self, fp32: fx.GraphModule, ctx: PassContext, ranges: dict, batches: list[tuple],
                 scheme: str = "s8"):
        self.fp32, self.ctx, self.ranges, self.scheme = fp32, ctx, ranges, scheme
        self.eval = batches[:EVAL_BATCHES]
        with torch.no_grad():
            self.reference = [_as_list(fp32(*fresh(b))) for b in self.eval]
        self.layers = [n for n in candidates(fp32) if n.name in ranges and signature_of(n).x.name in ranges]

    def build(self, skip: set[str], *, check: bool = False, manager: PassManager | None = None) -> fx.GraphModule:
        ctx = PassContext(self.ctx.example_inputs, backend=self.ctx.backend,
                          int8_ranges=self.ranges, int8_skip=frozenset(skip), int8_scheme=self.scheme)
        pm = manager or PassManager(["quantize_int8"], check=check)
        gm, records = pm.run(clone(self.fp32), ctx, oracle=pm.oracle)
        self.records = records
        return gm

    def runnable(self, gm: fx.GraphModule) -> fx.GraphModule:
        """The graph lowered to the backend (unchecked): what the budget and the user's metric run."""
        return lower(gm, self.ctx, LOWERING[self.ctx.backend], check=False)[0]

    def output_sqnr(self, module: Callable) -> float:
        return _output_sqnr(self.reference, module, self.eval)

    def layer_sqnr(self, gm: fx.GraphModule) -> dict[str, float]:
        """{fp32 node name: SQNR of that layer's output in ``gm`` against the fp32 graph}, over the eval batches."""
        signal: dict[str, float] = {}
        noise: dict[str, float] = {}
        for batch in self.eval:
            old, new = record_values(self.fp32, batch), record_values(gm, batch)
            for node in gm.graph.nodes:
                # a layer kept in fp32 has its own name; a quantized one replaces the fp32 node
                key = node.name if node.name in old else (node.meta.get("replaces") or [None])[-1]
                if key not in old or node.name not in new or node.target not in _LAYER_OPS:
                    continue
                ref, val = old[key], new[node.name]
                if not isinstance(ref, torch.Tensor) or not isinstance(val, torch.Tensor):
                    continue
                if val.dtype == torch.int8:
                    q = signature_of(node)
                    val = (val.float() - q.out_zp) * q.out_scale
                if ref.shape != val.shape or not ref.is_floating_point():
                    continue
                s, n = sqnr_terms(ref, val)
                signal[key], noise[key] = signal.get(key, 0.0) + s, noise.get(key, 0.0) + n
        return {k: sqnr_db(signal[k], noise[k]) for k in signal}


def _as_list(out: Any) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def layer_name(node: fx.Node) -> str:
    """The name a quantizable op goes by in reports and in ``fp32_layers``: its module's, else the node's."""
    return node.meta.get("layer") or node.meta.get("module") or node.name


@functools.cache
def _warn_no_dot_product() -> None:
    """Says once per process what int8 does on a CPU without int8 dot-product instructions (each int8 report says
    it too: ``scheme`` and ``vnni``). Python's own once-per-place record does not hold it back: any change to the
    warning filters (graphopt's ONNX export makes one) resets that record, so the demo's tuning loop printed it
    at every trial. (A first call under a filter that ignores it, or two threads' first calls at once, make it
    said never, or twice.)"""
    warnings.warn("this CPU has no int8 dot-product instructions (VNNI / AMX) for oneDNN: int8 uses 7-bit weights "
                  "(scheme s7, exact here), and the layers too small for int8 to pay off without them stay fp32",
                  stacklevel=4)


def quantize(fp32: fx.GraphModule, ctx: PassContext, manager: PassManager, calibration: Iterable | None,
             method: str, budget: Any, progress: bool = True, fp32_layers: Iterable[str] = (), *,
             small_fp32: bool = True, calibrated: Int8Report | None = None) -> tuple[fx.GraphModule, list, Int8Report]:
    """The int8 graph of ``fp32`` (the optimized fp32 graph), its pass records and the int8 report.

    ``small_fp32``: layers too small for oneDNN's int8 to pay off stay fp32 (MIN_INT8_MACS); False quantizes them
    too (the plan for another library's int8 kernels, whose fixed cost is lower). ``calibrated``: the report of an
    earlier plan of the same graph and batches, whose ranges are used again."""
    batches = check_batches(calibration, ctx.example_inputs)
    scheme = choose(ctx.backend)
    if ctx.backend == "cpu":
        from graphopt.kernels.cpu import has_vnni

        vnni = has_vnni()
        if scheme != "s8":
            _warn_no_dot_product()
    else:
        vnni = False
    if calibrated is None:
        start = time.perf_counter()
        ranges = calibrate(fp32, batches, method, progress=progress)
        seconds = time.perf_counter() - start
    else:
        ranges, seconds = calibrated.ranges, calibrated.calibration_seconds
    report = Int8Report(method, len(batches), seconds, vnni, _budget_text(budget), scheme, ranges=ranges)
    q = Quantizer(fp32, ctx, ranges, batches, scheme)
    reasons: dict[str, str] = {}
    asked = set(fp32_layers)
    unknown = asked - {layer_name(n) for n in q.layers}
    if unknown:
        raise GraphoptError(f"fp32_layers names no quantizable layer: {', '.join(sorted(unknown))}",
                            hint="use the names in opt.int8_report.layers: "
                                 + ", ".join(sorted({layer_name(n) for n in q.layers})))
    for node in q.layers:
        if layer_name(node) in asked:
            reasons[node.name] = "asked: fp32_layers"
    if ctx.backend == "cpu" and small_fp32:
        layers, least = set(q.layers), min_int8_macs(scheme)
        where = "" if scheme == "s8" else " on a CPU without VNNI / AMX"
        for node in q.layers:
            if node.name not in reasons and macs(node) < least \
                    and requantized_elements(fp32, node, layers) < MIN_INT8_REQUANTIZE:
                reasons[node.name] = (f"small: {macs(node):,} multiply-adds per call; int8 runs slower than fp32 "
                                      f"below {least:,}{where}")
    skip = set(reasons)
    budget_skip, budget_reasons = _hold_budget(q, AUTO_FLOOR_DB if budget is None else budget, report, skip)
    skip |= budget_skip
    reasons.update(budget_reasons)
    final = PassManager(["quantize_int8"], check=manager.check, dumper=manager.dumper)
    gm = q.build(skip, manager=final)
    layer_db = q.layer_sqnr(gm)
    names = {n.name: layer_name(n) for n in q.layers}
    for node in q.layers:
        report.layers.append({"name": names[node.name], "node": node.name, "op": _op_name(node),
                              "int8": node.name not in skip, "sqnr_db": layer_db.get(node.name, float("nan")),
                              "reason": reasons.get(node.name)})
    report.fallback = [names[n] for n in reasons if reasons[n].startswith("budget")]
    report.output_sqnr_db = q.output_sqnr(q.runnable(gm))
    return gm, q.records, report


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "_opname", node.target)).removesuffix("_act")


def _hold_budget(q: Quantizer, budget: Any, report: Int8Report, fixed: set[str]) -> tuple[set[str], dict[str, str]]:
    """Return layers to fp32, most sensitive first, until the budget holds (or nothing is left in int8)."""
    if isinstance(budget, (int, float)):
        floor = float(budget)

        def score(module) -> float:
            return q.output_sqnr(module)
        unit = "dB output SQNR"
    elif isinstance(budget, (tuple, list)) and len(budget) == 2 and callable(budget[0]):
        metric, tolerance = budget
        floor = float(metric(q.fp32)) - float(tolerance)
        score, unit = metric, "metric"
    else:
        raise GraphoptError(f"accuracy_budget must be an SQNR floor in dB or (metric, tolerance), got {budget!r}",
                            hint="accuracy_budget=35.0, or accuracy_budget=(accuracy_on_my_data, 0.01)")
    skip: set[str] = set()
    current = score(q.runnable(q.build(fixed)))
    if current >= floor:
        return skip, {}
    gains = {}
    for node in q.layers:
        if node.name not in fixed:
            gains[node.name] = score(q.runnable(q.build(fixed | {node.name}))) - current
    order = sorted(gains, key=lambda n: (-gains[n], n))
    # the fewest of the most sensitive layers whose return to fp32 meets the floor (the score grows with each
    # layer returned): 1, 2, 4, ... of them until it holds, then a bisection between the last two counts, about
    # 2 log2(k) builds for k layers (one build per layer ran past 4 minutes on torchvision's EfficientNet-B0,
    # random weights, 82 layers)
    scores = {0: current}

    def returned(k: int) -> float:
        if k not in scores:
            scores[k] = score(q.runnable(q.build(fixed | set(order[:k]))))
        return scores[k]
    failed, k = 0, min(1, len(order))
    while returned(k) < floor and k < len(order):
        failed, k = k, min(2 * k, len(order))
    if returned(k) < floor:
        warnings.warn(f"the accuracy budget ({report.budget}) is not met even with every layer in fp32", stacklevel=4)
    else:
        lo = failed + 1
        while lo < k:
            mid = (lo + k) // 2
            lo, k = (lo, mid) if returned(mid) >= floor else (mid + 1, k)
    reasons = {name: f"budget: {unit} {current:.3g} < {floor:.3g}; the {k} layers whose fp32 gains most return to "
                     f"fp32: {returned(k):.3g} (keeping this one fp32 alone gains {gains[name]:+.3g})"
               for name in order[:k]}
    return set(order[:k]), reasons
