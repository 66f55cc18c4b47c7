"""The one latency timer: warm-up, interleaved rounds, a median per callable."""

import pytest
import torch

from graphopt.compiler.workflow.timing import call_ms, median_ms


class FakeClock:
    """A clock that only moves when a timed callable says how long it took."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_callable_gets_its_own_median_of_per_call_times():
    clock = FakeClock()
    took = {"a": iter([0.5, 0.5, 0.001, 0.003, 0.002, 9.0]), "b": iter([0.5, 0.5, 0.010, 0.030, 0.020, 0.9])}

    def timed(name):
        def fn():
            clock.now += next(took[name])
        return fn

    ms = median_ms({"a": timed("a"), "b": timed("b")}, rounds=4, warmup=2, timer=clock)
    # the warm-up calls (0.5 s) are not timed; of the rest, the median and not the mean (9 s and 0.9 s are outliers)
    assert ms.keys() == {"a", "b"}
    torch.testing.assert_close(ms["a"], 2.5)  # median of 1, 3, 2, 9000 ms
    torch.testing.assert_close(ms["b"], 25.0)  # median of 10, 30, 20, 900 ms


def test_callables_take_turns_in_rounds_after_their_warm_up():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    median_ms(fns, rounds=3, per_round=2, warmup=1)
    assert calls == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 3


def test_each_block_starts_with_untimed_calls_for_settle_ms():
    clock = FakeClock()
    calls = []
    # each call takes 4 ms, except that a block's first calls are slow (a neighbour's threads still spinning)
    def timed(name):
        def fn():
            calls.append(name)
            first = len(calls) < 2 or calls[-2] != name
            clock.now += 0.050 if first else 0.004
        return fn

    ms = median_ms({"a": timed("a"), "b": timed("b")}, rounds=3, per_round=3, warmup=0, timer=clock, settle_ms=10)
    assert ms == pytest.approx({"a": 4.0, "b": 4.0})  # (unsettled, a third of the samples would be 50 ms)
    assert calls == (["a"] + ["a"] * 3 + ["b"] + ["b"] * 3) * 3  # one untimed call already takes past 10 ms
    unsettled = median_ms({"a": timed("a"), "b": timed("b")}, rounds=3, per_round=2, warmup=0, timer=clock)
    assert unsettled["a"] > 4.0  # (the premise: half the samples are first calls, and the median is their top)


def test_every_call_gets_the_same_inputs_without_autograd():
    x, y = torch.randn(2, 3, requires_grad=True), torch.randn(3)
    seen = []

    def fn(*args):
        seen.append(args)
        out = args[0] * 2
        assert not out.requires_grad  # under torch.no_grad()
        return out

    ms = median_ms({"f": fn}, (x, y), rounds=5, warmup=3)
    assert len(seen) == 8 and all(a[0] is x and a[1] is y for a in seen)
    assert ms["f"] > 0


def test_rounds_must_time_something():
    with pytest.raises(ValueError, match="at least 1"):
        median_ms({"f": lambda: None}, rounds=0)
    assert median_ms({}, rounds=2) == {}


def test_call_ms_times_one_call_after_the_warm_up():
    clock = FakeClock()
    took = {"a": iter([5.0, 5.0, 0.002]), "b": iter([5.0, 5.0, 0.030])}

    def timed(name):
        def fn():
            clock.now += next(took[name])
        return fn

    ms = call_ms({"a": timed("a"), "b": timed("b")}, warmup=2, timer=clock)
    assert ms == {"a": pytest.approx(2.0), "b": pytest.approx(30.0)}  # (the 5 s warm-up calls not counted)


def test_call_ms_of_several_calls_is_the_quickest():
    clock = FakeClock()
    took = iter([5.0, 0.050, 0.002, 0.010])  # (a call slowed by something else on the machine, then two not)

    def fn():
        clock.now += next(took)

    assert call_ms({"f": fn}, warmup=1, calls=3, timer=clock) == {"f": pytest.approx(2.0)}
