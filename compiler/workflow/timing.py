"""Latency: the median milliseconds per call of several callables, timed on the same inputs.

    median_ms({"eager": model, "graphopt": opt}, (x,), rounds=20, per_round=10)  ->  {"eager": 1.9, "graphopt": 0.8}

Every latency graphopt reports (``graphopt run``, the demo, ``tune``'s objective, bench/models.py and
bench/kernels.py on the CPU) comes from here, so they all measure the same thing.

- Warm-up first: each callable runs ``warmup`` times untimed (lazy initialisation, oneDNN's primitive
  caches, the allocator growing to its working set would otherwise land in the first timings).
- Interleaved rounds: each round runs every callable ``per_round`` times in turn. A machine's speed drifts
  (frequency scaling, heat, a neighbour's burst of load); timing A to the end and then B would put the
  drift on one of them, while taking turns spreads it over all alike, so their ratio holds.
- Settled blocks (``settle_ms``): a callable's block starts with that long of untimed calls. An engine
  with its own thread pool (torch's OpenMP, ONNX Runtime's, OpenVINO's) leaves its threads spinning for
  a while after its last call, on the cores the next callable's first calls need; serving one model
  has no such neighbour, so those calls measure the handover, not the engine.
- Medians of per-call times: latency has a long right tail (a preempted thread, a page fault); the mean
  follows the tail, the median is the typical call.
- Under ``torch.no_grad()``: inference latency, with no autograd graph recorded.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import torch


@torch.no_grad()
def call_ms(fns: Mapping[str, Callable[..., Any]], inputs: tuple = (), warmup: int = 1, calls: int = 1,
            timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Name -> milliseconds of the quickest of ``calls`` calls after ``warmup`` untimed ones: a rough size, to
    choose how many calls ``median_ms`` should time (not a measurement to report). The quickest, because
    another engine's thread pool or a burst of other work on the machine only ever makes a call slower."""
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn(*inputs)
        quickest = float("inf")
        for _ in range(calls):
            start = timer()
            fn(*inputs)
            quickest = min(quickest, timer() - start)
        out[name] = quickest * 1e3
    return out


@torch.no_grad()
def median_ms(fns: Mapping[str, Callable[..., Any]], inputs: tuple = (), rounds: int = 20, per_round: int = 1,
              warmup: int = 3, timer: Callable[[], float] = time.perf_counter, settle_ms: float = 0.0
              ) -> dict[str, float]:
    """Name -> median milliseconds of one call ``fn(*inputs)``, over ``rounds * per_round`` timed calls each.

    ``timer`` is the clock in seconds (as in ``timeit``); a test can pass a fake one.
    """
    if rounds < 1 or per_round < 1:
        raise ValueError(f"rounds and per_round must be at least 1 (got {rounds}, {per_round})")
    for fn in fns.values():
        for _ in range(warmup):
            fn(*inputs)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle_ms > 0:
                end = timer() + settle_ms / 1e3
                fn(*inputs)
                while timer() < end:
                    fn(*inputs)
            for _ in range(per_round):
                start = timer()
                fn(*inputs)
                times[name].append(timer() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
