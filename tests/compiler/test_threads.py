"""optimize() from several threads at once, and eager models running in other threads meanwhile."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from graphopt import CaptureError, optimize
from tests.helpers import randomize_bn
from tests.zoo import ZOO


def _run_threads(targets: list, seconds: float = 60.0) -> list[BaseException]:
    errors: list[BaseException] = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  (collected and reported by the test)
                errors.append(e)
        return run

    threads = [threading.Thread(target=guard(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_concurrent_optimize_calls_all_succeed_with_eager_answers():
    names = ["seed_convnet", "resnet_blocks", "mlp_bn_gelu_layernorm", "functional_only"]
    models = {name: randomize_bn(ZOO[name][0]()).eval() for name in set(names)}
    results = {}

    def job(i, name):
        def run():
            for _ in range(3):
                x = ZOO[name][1](2)
                opt = optimize(models[name], (x,))
                with torch.no_grad():
                    torch.testing.assert_close(opt(x), models[name](x), rtol=1e-4, atol=1e-5)
            results[i] = True
        return run

    errors = _run_threads([job(i, n) for i, n in enumerate(names)], seconds=300)
    assert not errors, errors[0]
    assert len(results) == len(names)


def test_eager_forwards_in_other_threads_are_untouched_while_tracing():
    make, inputs = ZOO["resnet_blocks"]
    traced_model = randomize_bn(make()).eval()
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = other(x)
    hooks = []
    other[0].register_forward_hook(lambda m, i, o: hooks.append(1))  # hooks still run in the other thread
    stop = threading.Event()
    calls = [0]

    def serve():
        while not stop.is_set():
            with torch.no_grad():
                torch.testing.assert_close(other(x), want)
            calls[0] += 1

    def optimize_some():
        try:
            for _ in range(4):
                optimize(traced_model, (inputs(2),), check=False)
        finally:
            stop.set()

    errors = _run_threads([serve, serve, optimize_some], seconds=300)
    assert not errors, errors[0]
    assert calls[0] > 0 and len(hooks) == calls[0]


def test_eager_forwards_in_other_threads_are_untouched_while_a_module_is_inlined():
    """Saving and the library sessions' export inline leaf modules by tracing them (compiler/deploy/inline.py):
    a module called in another thread meanwhile runs as usual (it raised fx's "module is not installed as a
    submodule" when a free-batch session was built while other threads called the model)."""
    import torch.fx as fx

    from graphopt.compiler.deploy.inline import inline_modules

    other, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4)
    with torch.no_grad():
        want = other(x)
    errors, got = [], []

    def serve():
        try:
            with torch.no_grad():
                got.append(other(x))
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            errors.append(e)

    class Leaf(nn.Module):
        def forward(self, v):  # (runs while it is traced for inlining: another thread calls a module meanwhile)
            thread = threading.Thread(target=serve)
            thread.start()
            thread.join(60)
            return v * 2

    class Outer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Leaf)

    root = nn.Sequential(Leaf())
    gm = inline_modules(fx.GraphModule(root, Outer().trace(root)))
    assert not errors, errors[0]
    torch.testing.assert_close(got[0], want)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    torch.testing.assert_close(gm(x), 2 * x)


def test_a_module_name_python_cannot_spell_is_a_capture_error():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module('a"b', nn.Linear(3, 3))

        def forward(self, x):
            return getattr(self, 'a"b')(x).relu()

    with pytest.raises(CaptureError, match="plain identifier"):
        optimize(M().eval(), (torch.randn(2, 3),))
