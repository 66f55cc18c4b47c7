"""Calibration statistics: batch-invariant, mergeable, and the three range methods."""

import pytest
import torch
import torch.nn as nn

from graphopt.compiler.int8.calibrate import BINS, METHODS, _mse_range, collect, value_range
from graphopt.kernels.reference import activation_qparams
from tests.helpers import traced


class Two(nn.Module):
    def forward(self, x):
        return torch.relu(x * 2.0) - 1.0


def _ranges(gm, batches, method):
    names = {n.name for n in gm.graph.nodes if n.op != "output"}
    stats = collect(gm, batches, names, method)
    return {n: value_range(stats, n, method) for n in sorted(names)}


@pytest.mark.parametrize("method", METHODS)
def test_statistics_do_not_depend_on_batching(method):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(24, 7, generator=g) * torch.linspace(0.1, 3.0, 7)
    data[5, 3] = 40.0  # an outlier
    gm = traced(Two(), data[:1])
    one_at_a_time = _ranges(gm, [(row[None],) for row in data], method)
    all_at_once = _ranges(gm, [(data,)], method)
    uneven = _ranges(gm, [(data[:5],), (data[5:17],), (data[17:],)], method)
    assert one_at_a_time == all_at_once == uneven


def test_minmax_is_the_observed_range_and_percentile_clips_a_rare_outlier():
    data = torch.cat([torch.linspace(-1, 1, 100001), torch.tensor([50.0])])
    gm = traced(Two(), data[None])
    assert _ranges(gm, [(data[None],)], "minmax")["x"] == (-1.0, 50.0)
    lo, hi = _ranges(gm, [(data[None],)], "percentile")["x"]
    assert -1.05 <= lo <= -0.9 and 0.9 <= hi < 1.1, (lo, hi)


def test_histogram_range_minimizes_error_better_than_minmax():
    torch.manual_seed(1)
    data = torch.distributions.Laplace(0.0, 1.0).sample((200000,))  # many samples: a long, smooth tail
    gm = traced(Two(), data[None])

    def mse(lo, hi):
        s, z = activation_qparams(lo, hi)
        q = torch.clamp(torch.round(data / s) + z, -128, 127)
        return float(((q - z) * s - data).pow(2).mean())

    assert mse(*_ranges(gm, [(data[None],)], "histogram")["x"]) < mse(*_ranges(gm, [(data[None],)], "minmax")["x"])


def _mse_range_oracle(lo, hi, counts, candidates=64):
    """The histogram search written plainly: every (low, high) candidate pair's expected squared error over every
    bin, all at once, the first least one."""
    width = (hi - lo) / counts.numel()
    centers = lo + width * (torch.arange(counts.numel(), dtype=torch.float64) + 0.5)
    keep = torch.logspace(0.0, -3.0, candidates, dtype=torch.float64)
    los, his = (min(lo, 0.0) * keep)[:, None, None], (max(hi, 0.0) * keep)[None, :, None]
    step = (his - los).clamp_min(1e-30) / 255.0
    c = centers[None, None, :]
    zp = torch.round(-128.0 - los / step).clamp(-128, 127)
    exact = (c - (torch.clamp(torch.round(c / step) + zp, -128, 127) - zp) * step) ** 2
    inside = (c >= los) & (c <= his)
    total = (torch.where(inside & (4 * width >= step), step ** 2 / 12.0, exact) * counts.double()).sum(-1)
    i, j = divmod(int(torch.argmin(total)), total.shape[1])
    return float(los.flatten()[i]), float(his.flatten()[j])


@pytest.mark.parametrize("shape", ["signed", "relu", "silu", "non-positive", "sparse", "one-sided outlier"])
def test_the_histogram_search_picks_the_plain_searchs_range(shape):
    """The search skips empty bins, searches one candidate for an end at 0 and goes a few low ends at a time: the
    same range, to the bit, as every pair against every bin at once (its sums add in another order: only a tie within
    1e-14 could choose otherwise, and none of these histograms has one)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100000, generator=g) * 2.5
    x = {"signed": x, "relu": x.relu(), "silu": torch.nn.functional.silu(x), "non-positive": -x.relu(),
         "sparse": torch.round(x) * 0.75, "one-sided outlier": torch.cat([x.abs(), torch.tensor([-40.0])])}[shape]
    lo, hi = float(x.min()), float(x.max())
    counts = torch.histc(x, BINS, lo, hi).long()
    want = _mse_range_oracle(lo, hi, counts)
    got = _mse_range(lo, hi, counts)
    assert got == want and [str(v) for v in got] == [str(v) for v in want]  # (0.0 and -0.0 apart too)
    assert got != (lo, hi)  # (the search moved an end here: a pass-through stub fails)


def test_non_finite_values_are_ignored_not_propagated():
    data = torch.tensor([[1.0, float("nan"), -2.0, float("inf")]])
    gm = traced(Two(), data)
    assert _ranges(gm, [(data,)], "minmax")["x"] == (-2.0, 1.0)


def test_unknown_method_is_refused():
    gm = traced(Two(), torch.randn(1, 3))
    with pytest.raises(ValueError, match="minmax"):
        collect(gm, [(torch.randn(1, 3),)], {"x"}, "entropy")
