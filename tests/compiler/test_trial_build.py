"""A library that crashes on a graph in its trial process is a rejected candidate; the user's process goes on."""

import pytest
import torch

from graphopt import optimize
from graphopt.compiler.core import engines, trial_build
from tests.helpers import randomize_bn
from tests.zoo import ZOO

pytestmark = pytest.mark.skipif(not engines.installed("openvino"), reason="OpenVINO is not installed")

CRASH = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
FAIL = "import sys; sys.exit('RuntimeError: no kernel for this node')"


@pytest.fixture
def fresh_trials(monkeypatch):
    monkeypatch.setattr(trial_build, "_SEEN", {})
    monkeypatch.setattr(engines, "MARGIN", float("inf"))  # (OpenVINO wins wherever it builds and agrees)
    monkeypatch.setattr(engines, "SINGLE_THREAD_BELOW_MS", 0.0)


def _convnet():
    make, inputs = ZOO["resnet_blocks"]
    torch.manual_seed(0)
    return randomize_bn(make()).eval(), inputs(2)


@pytest.mark.parametrize("child, reason", [(CRASH, "RuntimeError: it crashed (signal 11, SIGSEGV)"),
                                           (FAIL, "RuntimeError: its trial process failed on this graph: "
                                                  "RuntimeError: no kernel for this node")])
def test_a_library_whose_trial_process_crashes_or_fails_is_not_built_here(fresh_trials, monkeypatch, child, reason):
    monkeypatch.setattr(trial_build, "_CHILD", child)
    monkeypatch.setattr(trial_build, "_int8", lambda model: True)  # (an fp32 graph stands in: quicker)
    model, x = _convnet()
    opt = optimize(model, (x,), engines="openvino")
    assert opt.engine == "graphopt"
    assert opt.engine_plan.reasons["openvino"].startswith("could not build its session: " + reason)
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-4, atol=1e-5)


def test_an_int8_graph_is_tried_once_in_a_child_and_an_fp32_graph_not_at_all(fresh_trials, monkeypatch):
    model, x = _convnet()
    opt = optimize(model, (x,), engines="openvino")
    assert opt.engine == "openvino" and trial_build._SEEN == {}  # (fp32: no trial)
    calibration = [(torch.randn_like(x),) for _ in range(4)]
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)
    optimize(model, (x,), quantize="int8", calibration=calibration, engines="openvino", progress=False)
    assert trial_build._SEEN and set(trial_build._SEEN.values()) == {None}  # (each int8 graph ran in its child)
    tried = dict(trial_build._SEEN)
    monkeypatch.setattr(trial_build, "_CHILD", CRASH)  # the same graphs again: the results kept, no child
    optimize(model, (x,), quantize="int8", calibration=calibration, engines="openvino", progress=False)
    assert trial_build._SEEN == tried


def test_load_tries_any_saved_openvino_graph_in_a_child_first(fresh_trials, monkeypatch, tmp_path):
    """A saved folder may come from anyone: a graph that crashes OpenVINO must not end the loading process."""
    from graphopt import load

    model, x = _convnet()
    opt = optimize(model, (x,), engines="openvino")
    assert opt.engine == "openvino" and trial_build._SEEN == {}  # (fp32 in optimize(): no trial)
    folder = opt.save(tmp_path / "saved")
    monkeypatch.setattr(trial_build, "_CHILD", CRASH)
    saved_crash = r"not openvino: openvino could not run it as saved: RuntimeError: it crashed \(signal 11, SIGSEGV\)"
    with pytest.warns(UserWarning, match=saved_crash):
        loaded = load(folder)
    assert loaded.engine == "graphopt" and len(trial_build._SEEN) == 1
    with torch.no_grad():
        assert torch.equal(loaded(x), opt.graph_module(x))


def test_a_trial_that_hangs_is_a_reason_and_is_tried_again_next_time(fresh_trials, monkeypatch):
    monkeypatch.setattr(trial_build, "_CHILD", "import time; time.sleep(60)")
    monkeypatch.setattr(trial_build, "TRIAL_TIMEOUT_S", 1.0)
    monkeypatch.setattr(trial_build, "_int8", lambda model: True)
    model, x = _convnet()
    opt = optimize(model, (x,), engines="openvino")
    assert opt.engine_plan.reasons["openvino"] == ("could not build its session: RuntimeError: its trial process took "
                                                   "over 1 s on this graph")
    assert trial_build._SEEN == {}  # (not kept: a busy machine may have been the cause)

