"""Calibration: the value range of every activation the int8 lowering quantizes.

Statistics never depend on how the data is batched (one batch at a time or all at once give
identical ranges) and add up across processes, so data-parallel calibration quantizes every rank
identically (``all_reduce``):

    pass 1  min and max of each observed tensor                          (all-reduce: MIN, MAX)
    pass 2  for percentile / histogram: a histogram of BINS bins over      (all-reduce: SUM)
            exactly [min, max] of pass 1, so the bin edges are fixed before any data is counted

Range from the statistics, by ``method``:

    minmax      [min, max]
    percentile  the PERCENTILE-th and (100 - PERCENTILE)-th percentiles, read off the histogram
    histogram   the [lo, hi] that minimizes the expected squared error of int8 quantization over
                the histogram: each bin's center quantized and clipped on that grid (step^2 / 12
                instead for a bin as wide as a step), searched over ends pulled towards 0

Every range is widened to contain 0 (zero padding must stay exact) and never collapses to a
zero width, so no scale is ever 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

METHODS = ("minmax", "percentile", "histogram")
BINS = 2048
PERCENTILE = 99.99
_CANDIDATES = 64  # per side, for the histogram search
_ROWS = 4  # low ends searched at a time


@dataclass
class Stats:
    """Per observed node: min, max and (pass 2) histogram counts over [min, max]."""

    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)
    hist: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def all_reduce(self, part: str) -> None:
        """Combine ``part`` ("ranges" or "hist") over every process of the default torch.distributed
        group, in place; nothing to do outside torch.distributed. Every rank must observe the same
        nodes (the same graph), which the ranges' all-reduce makes sure of before any histogram."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if part == "ranges":
            names = sorted(self.lo)
            lo = torch.tensor([self.lo[n] for n in names], dtype=torch.float64)
            hi = torch.tensor([self.hi[n] for n in names], dtype=torch.float64)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            self.lo, self.hi = dict(zip(names, lo.tolist())), dict(zip(names, hi.tolist()))
        else:
            for n in sorted(self.hist):
                dist.all_reduce(self.hist[n], op=dist.ReduceOp.SUM)


class _Observing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str], see: Callable[[str, torch.Tensor], None]):
        super().__init__(gm)
        self.names, self.see = names, see

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.see(n.name, out.detach())
        return out


def _run(gm: fx.GraphModule, batches: Iterable, names: set[str], see, progress: Callable | None) -> int:
    count = 0
    with torch.no_grad():
        for batch in batches:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            _Observing(gm, names, see).run(*inputs)
            count += 1
            if progress is not None:
                progress()
    return count


def collect(gm: fx.GraphModule, batches: list, names: set[str], method: str,
            progress: Callable | None = None, reduce: bool = True) -> Stats:
    """Observe the nodes ``names`` of ``gm`` over ``batches`` (a list of input tuples)."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, not {method!r}")
    stats = Stats()

    def see_range(name: str, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # (NaN or inf somewhere: look at the finite values only)
            finite = t[t.isfinite()]
            if finite.numel() == 0:
                return
            lo, hi = float(finite.min()), float(finite.max())
        stats.lo[name] = min(stats.lo.get(name, lo), lo)
        stats.hi[name] = max(stats.hi.get(name, hi), hi)

    stats.batches = _run(gm, batches, names, see_range, progress)
    if reduce:
        stats.all_reduce("ranges")
    if method == "minmax":
        return stats

    def see_hist(name: str, t: torch.Tensor) -> None:
        if name not in stats.lo:
            return
        lo, hi = stats.lo[name], stats.hi[name]
        values = t if bool(t.isfinite().all()) else t[t.isfinite()]
        counts = torch.histc(values.float(), BINS, lo, hi if hi > lo else lo + 1.0).long()
        stats.hist[name] = stats.hist[name] + counts if name in stats.hist else counts

    _run(gm, batches, names, see_hist, progress)
    if reduce:
        stats.all_reduce("hist")
    return stats


def _percentile_range(lo: float, hi: float, counts: torch.Tensor, pct: float) -> tuple[float, float]:
    edges = torch.linspace(lo, hi, counts.numel() + 1, dtype=torch.float64)
    cdf = counts.double().cumsum(0) / max(int(counts.sum()), 1)
    low_bin = int(torch.searchsorted(cdf, (100.0 - pct) / 100.0))
    high_bin = int(torch.searchsorted(cdf, pct / 100.0))
    return float(edges[min(low_bin, counts.numel())]), float(edges[min(high_bin + 1, counts.numel())])


def _mse_range(lo: float, hi: float, counts: torch.Tensor) -> tuple[float, float]:
    width = (hi - lo) / counts.numel()
    # candidates: each end pulled towards 0 (always inside the quantized range) by a log-spaced factor; an end
    # already at 0 (a ReLU's output) has the one candidate
    keep = torch.logspace(0.0, -3.0, _CANDIDATES, dtype=torch.float64)
    los = (min(lo, 0.0) * keep)[: 1 if lo >= 0 else None]
    his = (max(hi, 0.0) * keep)[: 1 if hi <= 0 else None]
    full = torch.nonzero(counts).flatten()  # (empty bins add nothing)
    c = (lo + width * (full.double() + 0.5))[None, None, :]  # their centers
    n = counts[full].double()
    totals = []
    # a few low ends at a time, in place (rows x highs x bins stays in the cache): a signed tensor's search took
    # 0.02 s where all the pairs against all the bins at once took 0.3 s (26 s of EfficientNet-B0's int8 optimize)
    for first in range(0, los.numel(), _ROWS):
        low = los[first:first + _ROWS, None, None]  # (R, 1, 1) against his[None, :, None]: (1, H, 1)
        step = (his[None, :, None] - low).clamp_min(1e-30) / 255.0
        zp = torch.round(-128.0 - low / step).clamp(-128, 127)
        grid = torch.div(c, step).round_().add_(zp).clamp_(-128, 127).sub_(zp).mul_(step)  # each center on it
        err = torch.sub(c, grid, out=grid).square_()  # its error, clipping included
        # a bin much narrower than a step: its center's own rounding error; else the uniform step^2 / 12
        uniform = (c >= low) & (c <= his[None, :, None]) & (4 * width >= step)
        totals.append(torch.where(uniform, step ** 2 / 12.0, err) @ n)  # (R, H)
    total = torch.cat(totals)
    i, j = divmod(int(torch.argmin(total)), total.shape[1])
    return float(los[i]), float(his[j])


def value_range(stats: Stats, name: str, method: str, pct: float = PERCENTILE) -> tuple[float, float] | None:
    if name not in stats.lo:
        return None
    lo, hi = stats.lo[name], stats.hi[name]
    if method == "percentile" and hi > lo:
        lo, hi = _percentile_range(lo, hi, stats.hist[name], pct)
    elif method == "histogram" and hi > lo:
        lo, hi = _mse_range(lo, hi, stats.hist[name])
    return lo, hi
