"""Kernel-library choice (compiler/core/engines.py): the whole graph in ONNX Runtime or OpenVINO where faster.

The choice is made by timing; these tests force its outcome (engines.MARGIN) so that what they check
does not depend on the machine's speed, and check everything around it: the numerics check, the NaN
guard, the shape guard, save / load, threads, the report and the dumps.
"""

from __future__ import annotations

import json
import threading
import time
import warnings

import pytest
import torch
import torch.nn as nn

from graphopt import GraphoptError, load, optimize
from graphopt.compiler.core import engines
from tests.compiler.test_range_checks import cancelling
from tests.fuzz.artifacts import process_state, same_state
from tests.helpers import randomize_bn
from tests.zoo import ZOO

LIBRARIES = [name for name in engines.ENGINES if engines.installed(name)]


@pytest.fixture
def always(monkeypatch):
    """Any library that passes the numerics check wins, however long it takes (on torch's threads: no one-thread
    session is tried)."""
    monkeypatch.setattr(engines, "MARGIN", float("inf"))
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", 0.0)


def _convnet(batch: int = 2):
    make, inputs = ZOO["resnet_blocks"]
    torch.manual_seed(0)
    return randomize_bn(make()).eval(), inputs(batch)


def _spy(opt):
    """The library's answers, call by call (None: it declined, its range checks failed)."""
    calls = []
    runner = opt._engine

    def counted(*args):
        calls.append(runner(*args))
        return calls[-1]
    opt._engine = counted
    return calls


def test_onnxruntime_is_a_dependency_and_some_library_is_installed():
    assert "onnxruntime" in LIBRARIES


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_chosen_library_runs_the_graph_with_eagers_answers(always, library):
    model, x = _convnet()
    opt = optimize(model, (x,), engines=library)
    assert opt.engine == library and opt.engine_plan.engine == library
    calls = _spy(opt)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1
    row = opt.report[-1]
    assert row.name.startswith(f"engine: {library} (") and row.rewrites == 1
    plan = opt.engine_plan.as_dict()
    assert plan["partition"] == "whole graph" and set(plan["measured_ms"]) == {"graphopt", library}
    assert plan["shapes"] == [list(x.shape)] and plan["input_limit"] > 1.0


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_librarys_answers_are_the_callers_and_its_inputs_are_only_read(always, library):
    """OpenVINO reads the input's memory in place and writes fresh outputs: a later call changes neither."""
    model, x = _convnet()
    opt = optimize(model, (x,), engines=library)
    a, b = torch.randn(x.shape), torch.randn(x.shape)
    kept = a.clone()
    with torch.no_grad():
        first = opt(a)
        was = first.clone()
        opt(b)
        a.mul_(2.0)  # (the caller reuses its input buffer)
        third = opt(a)
    assert torch.equal(first, was) and torch.equal(a, kept * 2.0)
    with torch.no_grad():
        torch.testing.assert_close(first, model(kept), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(third, model(kept * 2.0), rtol=1e-4, atol=1e-5)


def test_graphopt_keeps_the_graph_when_no_library_is_faster(monkeypatch):
    monkeypatch.setattr(engines, "MARGIN", 0.0)
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", 0.0)
    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    assert opt.engine == "graphopt" and opt._engine is None
    assert set(opt.engine_plan.measured_ms) == {"graphopt", "onnxruntime"}  # measured, and slower
    assert opt.report[-1].name.startswith("engine: graphopt (") and opt.report[-1].rewrites == 0


def test_a_quick_graph_also_gets_a_one_thread_session_and_a_reload_keeps_it(always, monkeypatch, tmp_path):
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", float("inf"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (a pool to compare with, on any machine)
    real = engines._BUILDERS["onnxruntime"]

    def pool_slowed(model, spec, threads, *rest):  # the pool session measures slower: the one-thread one wins
        run = real(model, spec, threads, *rest)
        if threads == "1":
            return run
        return lambda *args: (time.sleep(0.002), run(*args))[1]
    monkeypatch.setitem(engines._BUILDERS, "onnxruntime", pool_slowed)
    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    assert (opt.engine, opt.engine_plan.threads) == ("onnxruntime", "1")
    assert set(opt.engine_plan.measured_ms) == {"graphopt", "onnxruntime", "onnxruntime, 1 thread"}
    assert opt.report[-1].name.startswith("engine: onnxruntime, 1 thread (")
    folder = opt.save(tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["engine_threads"] == "1"
    built = []
    monkeypatch.setitem(engines._BUILDERS, "onnxruntime", lambda *a: (built.append(a[2]), real(*a))[1])
    back = load(folder)
    assert built == ["1"] and back.engine_plan.threads == "1"  # (the free-batch session: on its first call)
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))

    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", 0.0)  # a slow graph: no one-thread session at all
    assert set(optimize(model, (x,), engines="onnxruntime").engine_plan.measured_ms) == {"graphopt", "onnxruntime"}


@pytest.mark.parametrize("pool_ms, own_ms, threads", [(0.50, 1.0, "1"), (0.45, 1.0, "torch"), (0.50, 0.52, "torch")])
def test_a_one_thread_session_is_kept_unless_the_pool_is_clearly_faster(always, monkeypatch, pool_ms, own_ms,
                                                                         threads):
    """One thread (0.55 ms) against the pool's 0.5 ms (within ONE_THREAD_EDGE): one thread; against 0.45: the
    pool; and the pool where graphopt's own graph (0.52) beats the one-thread session but not the pool."""
    monkeypatch.setattr(engines, "MARGIN", 1.0)
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", float("inf"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    one = 0.55
    assert one > pool_ms and (one / pool_ms < engines.ONE_THREAD_EDGE) == (pool_ms == 0.50)  # (1.10x, 1.22x)
    monkeypatch.setattr(engines, "race", lambda candidates, *_: {"graphopt": own_ms, "onnxruntime": pool_ms,
                                                                 "onnxruntime, 1 thread": one})
    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    assert (opt.engine, opt.engine_plan.threads) == ("onnxruntime", threads)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b_first, reraced", [(1.05, True), (1.30, False)])
def test_the_two_quickest_race_again_when_close_and_keep_the_median_of_their_races(monkeypatch, b_first, reraced):
    """a and b within CLOSE_CALL: both race RERACES more times (c, far behind, does not) and each keeps the
    median of its races, which reverses their order here; far apart, one race decides."""
    from graphopt.compiler.workflow import timing

    assert engines.RERACES == 2 and (b_first <= engines.CLOSE_CALL) == reraced
    races = iter([{"a": 1.0, "b": b_first, "c": 2.0}, {"a": 1.2, "b": 1.0}, {"a": 1.3, "b": 0.9}])
    entrants = []

    def scripted(fns, *args, **kwargs):
        entrants.append(sorted(fns))
        return dict(next(races))
    monkeypatch.setattr(timing, "median_ms", scripted)
    monkeypatch.setattr(timing, "call_ms", lambda fns, *a, **k: dict.fromkeys(fns, 1.0))
    ms = engines.race(dict.fromkeys("abc", lambda x: x), (torch.zeros(1),))
    if reraced:
        assert entrants == [["a", "b", "c"], ["a", "b"], ["a", "b"]]
        assert ms == {"a": 1.2, "b": 1.0, "c": 2.0}  # (a: median of 1.0, 1.2, 1.3; b: of 1.05, 1.0, 0.9)
    else:
        assert entrants == [["a", "b", "c"]] and ms == {"a": 1.0, "b": 1.30, "c": 2.0}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30])
@pytest.mark.parametrize("library", LIBRARIES)
def test_inputs_that_could_make_nan_run_graphopts_graph(always, value, library):
    model, x = _convnet()
    opt = optimize(model, (x,), engines=library)
    calls = _spy(opt)
    bad = x.clone()
    bad.view(-1)[7] = value
    with torch.no_grad():
        got, want = opt(bad), model(bad)
    assert len(calls) == 1 and calls[0] is None  # (its input check, in the library's run, failed)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_an_input_with_room_in_its_limit_is_checked_by_its_sum_and_a_tight_one_by_its_max(always):
    import onnx

    model, x = _convnet()  # (no exp in it: an astronomical input limit)
    opt = optimize(model, (x,), engines="onnxruntime")
    names, limits, by_sum = engines._checked(opt, opt.engine_plan)
    assert names == ["x"] and by_sum == {"x"} and limits[0] >= engines.SUM_CHECK_MEAN * x.numel()
    ops = [n.op_type for n in onnx.load_from_string(engines.onnx_model(opt, (x,), names, by_sum)).graph.node]
    assert ops.count("ReduceL1") == 1 and "ReduceMax" not in ops
    calls = _spy(opt)
    huge = torch.full_like(x, 2 * limits[0] / x.numel())  # sum |x| past the limit, max |x| far within it
    assert float(huge.abs().max()) < limits[0] < float(huge.abs().sum())
    with torch.no_grad():
        torch.testing.assert_close(opt(huge), model(huge), rtol=1e-4, atol=1e-5 * float(model(huge).abs().max()))
    assert calls == [None]  # (the library's sum check turned it away: graphopt's graph answered)

    tight, y = cancelling()  # (input limit 256 on 128 values: max |x|)
    opt = optimize(tight, (y,), engines="onnxruntime")
    assert engines._checked(opt, opt.engine_plan)[2] == set()


def _logged(monkeypatch) -> list:
    """Every call a library's session answers or declines, as (library, free batch or not, batch size), in order."""
    log = []
    for library, real in list(engines._BUILDERS.items()):
        def builder(model, spec, threads, limits, shapes, any_batch, *rest, real=real, library=library):
            run = real(model, spec, threads, limits, shapes, any_batch, *rest)
            return lambda *args: (log.append((library, any_batch, args[0].shape[0])), run(*args))[1]
        monkeypatch.setitem(engines._BUILDERS, library, builder)
    return log


def _calls(opt, model, batches: list[int], shape: torch.Size) -> None:
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, *shape[1:])
            torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


def test_onnx_runtime_runs_any_batch_size_and_other_shapes_run_graphopts_graph(always, monkeypatch, tmp_path):
    log = _logged(monkeypatch)
    model, x = _convnet(batch=2)
    opt = optimize(model, (x,), engines="onnxruntime")
    plan = opt.engine_plan
    assert plan.other_batches and plan.fixed_batch is None
    assert plan.as_dict()["batch"] == {"sizes": "onnxruntime at batch 2; other batch sizes: onnxruntime's free-batch "
                                                "session", "fixed_because": None}
    assert not [call for call in log if call[1]]  # (no free-batch session yet: built on the first call for one)
    calls = _spy(opt)
    log.clear()
    _calls(opt, model, [2, 1], x.shape)
    # the measured session at the example's shape; at batch 1 it declines, the free-batch session is built and
    # checked (on the example, at batch 3) and answers
    assert log == [("onnxruntime", False, 2), ("onnxruntime", False, 1), ("onnxruntime", True, 2),
                   ("onnxruntime", True, 3), ("onnxruntime", True, 1)]
    log.clear()
    _calls(opt, model, [3, 17, 2], x.shape)
    assert log == [("onnxruntime", False, 3), ("onnxruntime", True, 3), ("onnxruntime", False, 17),
                   ("onnxruntime", True, 17), ("onnxruntime", False, 2)]
    assert all(call is not None for call in calls) and len(calls) == 5
    with torch.no_grad():
        wider = torch.randn(2, x.shape[1], x.shape[2] + 2, x.shape[3])
        torch.testing.assert_close(opt(wider), model(wider), rtol=1e-4, atol=1e-5)
        empty = torch.randn(0, *x.shape[1:])
        assert opt(empty).shape[0] == 0
    assert calls[-2:] == [None, None]  # (the libraries declined both: not their shapes)
    folder = opt.save(tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["engine_other_batches"] is True
    back, five = load(folder), torch.randn(5, *x.shape[1:])
    assert back.engine_plan.other_batches
    calls = _spy(back)
    with torch.no_grad():
        assert torch.equal(back(five), opt(five)) and torch.equal(back(x), opt(x))
    assert all(call is not None for call in calls)


def test_the_free_batch_session_is_built_once_when_threads_call_at_once(always, monkeypatch):
    built = []
    real = engines.build
    monkeypatch.setattr(engines, "build", lambda *a, **k: (built.append(k.get("any_batch", False)), real(*a, **k))[1])
    model, x = _convnet(batch=2)
    opt = optimize(model, (x,), engines="onnxruntime")
    built.clear()
    inputs = [torch.randn(3, *x.shape[1:]) for _ in range(4)]
    results = [None] * 4

    def call(i):
        with torch.no_grad():
            results[i] = opt(inputs[i])
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [True]
    with torch.no_grad():
        for got, x3 in zip(results, inputs):
            torch.testing.assert_close(got, model(x3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool_ms, others", [(0.5, "onnxruntime's free-batch session"), (1.2, "graphopt's graph")])
def test_a_one_thread_session_runs_the_examples_batch_and_the_pool_the_others_if_it_measured_faster(
        always, monkeypatch, tmp_path, pool_ms, others):
    """A one-thread session was chosen for a quick call at the example's batch size; other batch sizes run in ONNX
    Runtime's free-batch session where its pool measured faster than graphopt's graph (1.0 ms), else in graphopt's
    graph."""
    monkeypatch.setattr(engines, "MARGIN", 1.0)
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", float("inf"))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(engines, "race", lambda candidates, *_: {"graphopt": 1.0, "onnxruntime": pool_ms,
                                                                 "onnxruntime, 1 thread": 0.5})
    log = _logged(monkeypatch)
    model, x = _convnet(batch=3)
    opt = optimize(model, (x,), engines="onnxruntime")
    pooled = pool_ms < 1.0
    assert (opt.engine_plan.threads, opt.engine_plan.other_batches) == ("1", pooled)
    assert opt.engine_plan.batch_sizes() == f"onnxruntime, 1 thread at batch 3; other batch sizes: {others}"
    assert pooled or opt.engine_plan.fixed_batch.startswith("onnxruntime did not measure faster")
    folder = opt.save(tmp_path / "m")
    back = load(folder)
    for module in (opt, back):
        _calls(module, model, [2], x.shape)  # (builds the free-batch session, where there is one)
        log.clear()
        _calls(module, model, [3, 1, 4], x.shape)
        free = (lambda batch: [("onnxruntime", True, batch)]) if pooled else (lambda batch: [])
        assert log == [("onnxruntime", False, 3), ("onnxruntime", False, 1), *free(1), ("onnxruntime", False, 4),
                       *free(4)]
        # (the one-thread session declines other batch sizes and hands them to the free-batch session, or,
        # without one, to graphopt's graph)


@pytest.mark.skipif("openvino" not in LIBRARIES, reason="OpenVINO is not installed")
def test_openvino_runs_the_examples_shapes_and_onnx_runtime_the_other_batch_sizes(always, monkeypatch, tmp_path):
    monkeypatch.setattr(engines, "MARGIN", 1.0)
    monkeypatch.setattr(engines, "race", lambda candidates, *_: {"graphopt": 1.0, "onnxruntime": 0.6,
                                                                 "openvino": 0.5})
    log = _logged(monkeypatch)
    model, x = _convnet(batch=2)
    opt = optimize(model, (x,), engines=["onnxruntime", "openvino"])
    assert opt.engine_plan.batch_sizes() == "openvino at batch 2; other batch sizes: onnxruntime's free-batch session"
    folder = opt.save(tmp_path / "m")
    back = load(folder)
    for module in (opt, back):
        _calls(module, model, [3], x.shape)  # (builds the free-batch session)
        log.clear()
        _calls(module, model, [2, 1, 5], x.shape)
        assert log == [("openvino", False, 2), ("openvino", False, 1), ("onnxruntime", True, 1),
                       ("openvino", False, 5), ("onnxruntime", True, 5)]  # (OpenVINO hands them on)


def _broadcast(monkeypatch) -> None:
    """Free-batch sessions whose answers at a batch size other than 1 are the first row repeated."""
    real = engines.build

    def build(*args, any_batch=False, **kwargs):
        runner = real(*args, any_batch=any_batch, **kwargs)
        if not any_batch:
            return runner
        return lambda x: (lambda y: y if y is None or x.shape[0] == 1 else y[:1].expand_as(y).clone())(runner(x))
    monkeypatch.setattr(engines, "build", build)


class _BatchOfOne(nn.Module):
    """A graph that only takes its example's batch of one: view(1, -1) before the linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).view(1, -1))


@pytest.mark.parametrize("fault", ["broadcast", "export", "graphopt's graph"])
def test_a_free_batch_session_that_fails_or_disagrees_leaves_other_batch_sizes_to_graphopts_graph(
        always, monkeypatch, tmp_path, fault):
    """A free-batch session whose answers at another batch size are one row repeated (rows that differ even on the
    example's batch of one: the check's rows must differ too), an exporter that cannot free the batch, or a graph
    that takes no other batch size: the first call at another batch size warns and runs graphopt's graph, as do
    the later ones; the chosen session still runs the example's shapes, and the plan says why."""
    if fault == "broadcast":
        _broadcast(monkeypatch)
        model, x = _convnet(batch=1)
    elif fault == "export":
        real_export = engines.onnx_model

        def export(*args, dynamic_batch=False, **kwargs):
            if dynamic_batch:
                raise RuntimeError("no dynamic axes here")
            return real_export(*args, **kwargs)
        monkeypatch.setattr(engines, "onnx_model", export)
        model, x = _convnet(batch=1)
    else:
        torch.manual_seed(0)
        model, x = _BatchOfOne().eval(), torch.randn(1, 1, 8, 8)
    opt = optimize(model, (x,), engines="onnxruntime")
    calls = _spy(opt)
    why = {"broadcast": "onnxruntime's free-batch session disagrees with graphopt's graph at batch size 2",
           "export": "onnxruntime's free-batch session failed: RuntimeError: no dynamic axes here",
           "graphopt's graph": "onnxruntime's free-batch session failed: "}[fault]
    three = torch.randn(3, *x.shape[1:])
    with torch.no_grad(), pytest.warns(UserWarning, match="batch sizes other than the example's run graphopt's own "
                                                          "kernels: " + why.replace("(", r"\(")):
        if fault == "graphopt's graph":
            with pytest.raises(RuntimeError):  # (graphopt's graph takes no other batch size either)
                opt(three)
        else:
            torch.testing.assert_close(opt(three), model(three), rtol=1e-4, atol=1e-5)
    plan = opt.engine_plan
    assert opt.engine == "onnxruntime" and not plan.other_batches
    assert plan.batch_sizes() == "onnxruntime at batch 1; other batch sizes: graphopt's graph"
    assert plan.fixed_batch.startswith(why) and plan.as_dict()["batch"]["fixed_because"] == plan.fixed_batch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # (once)
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)
        if fault != "graphopt's graph":
            torch.testing.assert_close(opt(three), model(three), rtol=1e-4, atol=1e-5)
    assert calls[0] is None and calls[1] is not None and calls[2:] in ([], [None])


def test_a_load_whose_free_batch_session_disagrees_keeps_the_engine_at_the_examples_shape(always, monkeypatch,
                                                                                          tmp_path):
    model, x = _convnet(batch=1)
    folder = optimize(model, (x,), engines="onnxruntime").save(tmp_path / "m")
    _broadcast(monkeypatch)
    back = load(folder)
    calls = _spy(back)
    with pytest.warns(UserWarning, match="batch sizes other than the example's run graphopt's own kernels: "
                                         "onnxruntime's free-batch session disagrees"):
        _calls(back, model, [3], x.shape)
    assert back.engine == "onnxruntime" and not back.engine_plan.other_batches
    _calls(back, model, [1, 3], x.shape)
    assert calls[0] is None and calls[1] is not None and calls[2] is None


def test_a_library_with_wrong_answers_is_rejected_by_the_numerics_check(always, monkeypatch):
    real = engines.build

    def off_by_a_little(*args, **kwargs):
        runner = real(*args, **kwargs)
        return lambda *xs: runner(*xs) * 1.001
    monkeypatch.setattr(engines, "build", off_by_a_little)
    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    assert opt.engine == "graphopt"
    assert "rejected by the numerics check" in opt.engine_plan.reasons["onnxruntime"]
    assert any("numerics check" in reason for reason in opt.report[-1].misses)


class _Softmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=-1)


def test_range_checks_run_a_deep_graph_in_the_library_and_a_failed_check_reruns_graphopts(always, tmp_path):
    model, x = cancelling()  # (its whole-graph bound overflows: only range checks let a library run it)
    opt = optimize(model, (x,), engines="onnxruntime")
    plan = opt.engine_plan
    assert opt.engine == "onnxruntime" and plan.limit == 256.0 and 1 <= len(plan.checks) <= 3
    assert plan.as_dict()["range_checks"] == plan.checks
    returned = _spy(opt)
    big = x.clone()
    big[0, 0] = 100.0  # within the input's limit; its checked values are not
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
        assert returned[-1] is not None  # the library answered
        torch.testing.assert_close(opt(big), model(big), rtol=1e-5, atol=1e-3)
        assert len(returned) == 2 and returned[-1] is None  # it declined, and graphopt's graph answered
        nan = x.clone()
        nan[1, 3] = float("nan")
        assert torch.equal(opt(nan).isnan(), model(nan).isnan())
        assert len(returned) == 3 and returned[-1] is None  # (the input check, in the library's run)

    folder = opt.save(tmp_path / "m")
    saved = json.loads((folder / "manifest.json").read_text())["engine_limits"]
    assert saved == {"inputs": 256.0, "checks": plan.checks}
    back = load(folder)
    assert back.engine == "onnxruntime" and back.engine_plan.checks == plan.checks
    with torch.no_grad():
        assert torch.equal(back(x), opt(x)) and torch.equal(back(big), opt(big))


@pytest.mark.parametrize("tamper", ["no checks", "a check too loose", "a larger input limit"])
def test_saved_range_limits_that_prove_nothing_load_graphopts_graph(always, tmp_path, tamper):
    model, x = cancelling()
    folder = optimize(model, (x,), engines="onnxruntime").save(tmp_path / "m")
    manifest = json.loads((folder / "manifest.json").read_text())
    limits = manifest["engine_limits"]
    if tamper == "no checks":
        limits["checks"] = {}
    elif tamper == "a check too loose":
        limits["checks"] = {k: 1e30 for k in limits["checks"]}
    else:
        limits["inputs"] = 1e30
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="do not prove"):
        back = load(folder)
    assert back.engine == "graphopt"
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-5)


def test_graphs_without_a_nan_bound_and_integer_inputs_keep_graphopts_kernels(always):
    opt = optimize(_Softmax().eval(), (torch.randn(2, 8),), engines="onnxruntime")
    assert opt.engine == "graphopt" and "NaN" in opt.engine_plan.reasons["onnxruntime"]

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.e(ids)
    e = optimize(Embed().eval(), (torch.tensor([[1, 2, 3]]),), engines="onnxruntime")
    assert e.engine == "graphopt" and "float32" in e.engine_plan.reasons["onnxruntime"]


def test_save_and_load_run_the_same_plan_with_the_same_bits(always, tmp_path):
    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    folder = opt.save(tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["engine"] == "onnxruntime"
    assert not list(folder.glob("*.onnx"))  # load exports its own graph: no model file is ever read
    before = process_state()
    back = load(folder)
    assert same_state(before, process_state()) == []  # (rebuilding the session changes no process state)
    assert back.engine == "onnxruntime"
    calls = _spy(back)
    with torch.no_grad():
        assert torch.equal(back(x), opt(x))
    assert len(calls) == 1


def test_a_load_without_the_library_warns_and_runs_graphopts_graph(always, tmp_path, monkeypatch):
    model, x = _convnet()
    folder = optimize(model, (x,), engines="onnxruntime").save(tmp_path / "m")
    monkeypatch.setattr(engines, "installed", lambda name: False)
    with pytest.warns(UserWarning, match="not installed"):
        back = load(folder)
    assert back.engine == "graphopt"
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_graphopt_plan_loads_without_warnings(tmp_path):
    model, x = _convnet()
    folder = optimize(model, (x,), engines="graphopt").save(tmp_path / "m")
    assert json.loads((folder / "manifest.json").read_text())["engine"] == "graphopt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(folder).engine == "graphopt"


def test_the_engine_may_run_in_several_threads_at_once(always):
    model, x = _convnet()
    opt = optimize(model, (x,), engines=LIBRARIES)
    assert opt.engine != "graphopt"
    inputs = [torch.randn(x.shape) for _ in range(4)]
    with torch.no_grad():
        want = [model(i) for i in inputs]
    errors = []

    def work(i):
        try:
            for _ in range(5):
                with torch.no_grad():
                    torch.testing.assert_close(opt(inputs[i]), want[i], rtol=1e-4, atol=1e-5)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_the_choice_is_in_the_dumps(always, tmp_path):
    model, x = _convnet()
    optimize(model, (x,), engines="onnxruntime", dump_dir=tmp_path / "d")
    assert (tmp_path / "d" / "engine.md").read_text().startswith("# engine: onnxruntime")
    assert (tmp_path / "d" / "engine.onnx").stat().st_size > 0
    assert "engine: onnxruntime" in (tmp_path / "d" / "report.md").read_text()


def test_engine_names_are_checked(monkeypatch):
    assert engines.resolve_engines("graphopt") == ()
    assert engines.resolve_engines("auto") == tuple(LIBRARIES)
    assert engines.resolve_engines(["openvino", "onnxruntime"])[0] == "onnxruntime"  # (always in ENGINES' order)
    monkeypatch.setenv("GRAPHOPT_ENGINES", "onnxruntime")
    assert engines.resolve_engines(None) == ("onnxruntime",)
    with pytest.raises(GraphoptError, match="unknown engine"):
        engines.resolve_engines("tvm")
    monkeypatch.setattr(engines, "installed", lambda name: False)
    with pytest.raises(GraphoptError, match="not installed"):
        engines.resolve_engines("onnxruntime")


def test_nan_checks_off_runs_the_library_on_every_call_and_strict_on_none(always, tmp_path, monkeypatch):
    from graphopt.compiler.core import fast_path

    monkeypatch.setattr(fast_path, "MIN_CLAMPED_ELEMENTS", 0)  # (so that "fast" would build the fused graph)
    model, x = _Softmax().eval(), torch.randn(2, 8)  # (no proven NaN-free range: the guarded mode keeps graphopt)
    off = optimize(model, (x,), engines="onnxruntime", nan_checks="off")
    assert off.engine == "onnxruntime" and off.engine_plan.limit is None
    calls = _spy(off)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with torch.no_grad():
        off(bad)
        torch.testing.assert_close(off(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 2  # unchecked, as the user asked
    folder = off.save(tmp_path / "off")
    assert json.loads((folder / "manifest.json").read_text())["nan_checks"] == "off"
    back = load(folder)
    assert back.nan_checks == "off" and back.engine == "onnxruntime" and back.engine_plan.limit is None

    convnet, y = _convnet()
    strict = optimize(convnet, (y,), engines="onnxruntime", nan_checks="strict")
    assert strict.engine == "graphopt" and strict.engine_plan is None and strict.fast_graph_module is None
    assert not any(r.name.startswith("engine:") for r in strict.report)
    assert optimize(convnet, (y,), engines="graphopt").fast_graph_module is not None
    folder = strict.save(tmp_path / "strict")
    assert load(folder).fast_graph_module is None  # (the reload makes the same plan: no fused graph either)


def test_the_engine_path_keeps_the_input_checks(always):
    from graphopt import InputError

    model, x = _convnet()
    opt = optimize(model, (x,), engines="onnxruntime")
    calls = _spy(opt)
    with pytest.raises(InputError, match="requires grad"):
        opt(x.clone().requires_grad_())
    with pytest.raises(InputError, match="float64"):
        opt(x.double())
    with pytest.raises(InputError, match="expected 1 inputs"):
        opt(x, x)
    assert calls == [None, None, None]  # (the library declined each: graphopt's checks said why)
    with torch.no_grad():
        opt(x.clone().requires_grad_())  # (under no_grad, an input that requires grad is fine)
    assert len(calls) == 4 and isinstance(calls[-1], torch.Tensor)


@pytest.mark.parametrize("library", LIBRARIES)
def test_inputs_off_the_usual_path_still_get_the_librarys_answer(always, library):
    """A non-contiguous input, or one that requires grad under no_grad, is not the one-frame call (ONNX Runtime's
    run_one): the library's general path takes it, with the same answer as the contiguous tensor's."""
    model, x = _convnet()
    opt = optimize(model, (x,), engines=library)
    calls = _spy(opt)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # (x's values and shape, other strides)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    with torch.no_grad():
        want = opt(x)
        assert torch.equal(opt(strided), want) and torch.equal(opt(x.clone().requires_grad_()), want)
    assert len(calls) == 3 and all(isinstance(c, torch.Tensor) for c in calls)


class _TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, a, b):
        y = torch.relu(self.fc(a) + b)
        return y, {"twice": y * 2.0}


@pytest.mark.parametrize("public_run", [False, True], ids=["compiled-run", "public-run"])
def test_several_inputs_and_outputs_and_a_session_without_its_compiled_run(always, public_run, monkeypatch):
    """The ONNX Runtime runner calls the session's compiled run; where a version has none, its public run."""
    import onnxruntime as ort

    if public_run:
        session = ort.InferenceSession

        class Public:  # the public API only
            def __init__(self, *args, **kwargs):
                self._inner = session(*args, **kwargs)

            def get_inputs(self):
                return self._inner.get_inputs()

            def get_outputs(self):
                return self._inner.get_outputs()

            def run(self, names, feed, options=None):
                calls.append(len(feed))
                return self._inner.run(names, feed, options)
        calls = []
        monkeypatch.setattr(ort, "InferenceSession", Public)
    torch.manual_seed(0)
    model, a, b = _TwoInTwoOut().eval(), torch.randn(3, 8), torch.randn(3, 8)
    opt = optimize(model, (a, b), engines="onnxruntime")
    assert opt.engine == "onnxruntime", opt.engine_plan.reasons
    seen = _spy(opt)
    with torch.no_grad():
        torch.testing.assert_close(opt(a, b), model(a, b), rtol=1e-5, atol=1e-6)
        assert seen[-1] is not None
        a5, b5 = torch.randn(5, 8), torch.randn(5, 8)  # another batch size, the same for both inputs
        torch.testing.assert_close(opt(a5, b5), model(a5, b5), rtol=1e-5, atol=1e-6)
        assert seen[-1] is not None
        b1 = torch.randn(1, 8)  # batch sizes that differ (b broadcasts): graphopt's graph
        torch.testing.assert_close(opt(a5, b1), model(a5, b1), rtol=1e-5, atol=1e-6)
        assert seen[-1] is None
    if public_run:
        assert calls and set(calls) == {2}


@pytest.mark.parametrize("seed", range(9000, 9008))
def test_random_programs_in_the_library_keep_eagers_answers_nan_and_bits(always, seed, monkeypatch):
    """The program fuzzer's checks (eager's answers, another batch, determinism, reload bits) with the library
    chosen wherever it may run (half of these programs), plus eager's NaN positions on an input holding a NaN."""
    from tests.fuzz import generator, runner

    monkeypatch.setenv("GRAPHOPT_ENGINES", "onnxruntime")  # (the fuzzer's optimize() calls take the default)
    spec = generator.generate(seed)
    assert runner.check_case(spec, seed, each_pass=False) == []
    model, x = runner.build(spec, seed)
    opt = optimize(model, (x,), engines="onnxruntime")
    bad = x.clone()
    bad.view(-1)[0] = float("nan")
    with torch.no_grad():
        for want, got in zip(runner._flat(model(bad.clone())), runner._flat(opt(bad.clone())), strict=True):
            assert torch.equal(want.isnan(), got.isnan())
