"""Recipe tuning with Optuna: the best feasible model is saved after every trial; studies resume, also
after kill -9 at any point."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from graphopt import GraphoptError, load
from graphopt.compiler.workflow.tune import recipe_key, tune

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    model = Net().eval()
    held_out = torch.randn(32, 1, 8, 8, generator=g)
    with torch.no_grad():
        reference = model(held_out).argmax(1)

    def agreement(m):  # higher is better: how often the module agrees with the fp32 model
        with torch.no_grad():
            return float((m(held_out).argmax(1) == reference).float().mean())
    return model, (x, y), agreement


@pytest.fixture(autouse=True)
def quantize_every_layer(monkeypatch):
    monkeypatch.setattr("graphopt.compiler.int8.quantize.MIN_INT8_MACS", 0)


def test_the_best_feasible_model_is_saved_after_every_trial_and_the_study_resumes(tmp_path):
    model, data, metric = _setup()
    seen = []

    def after(record):
        best_file = tmp_path / "best.json"
        feasible = [r for r in seen + [record] if r["feasible"]]
        if feasible:  # after this trial, best.json is the fastest feasible trial so far
            best = json.loads(best_file.read_text())
            assert best["latency_ms"] == pytest.approx(min(r["latency_ms"] for r in feasible))
            assert (tmp_path / best["path"] / "manifest.json").exists()
        seen.append(record)

    result = tune(model, data, metric, budget=1.0, trials=3, out=tmp_path, max_epochs=1, calibration_batches=4,
                  on_trial=after)
    assert len(seen) == 3 and all(r["feasible"] for r in seen)  # a budget of 1.0 admits everything
    assert result.module is not None and result.path == tmp_path / json.loads((tmp_path / "best.json").read_text())[
        "path"]
    assert sorted(p.name for p in tmp_path.glob("best-*")) == [result.path.name]  # older bests are removed
    assert result.latency_ms == min(r["latency_ms"] for r in seen)
    with torch.no_grad():
        assert result.module(data[0][:2]).shape == (2, 4)
    assert (tmp_path / "tune.db").exists()
    again = tune(model, data, metric, budget=1.0, trials=1, out=tmp_path, max_epochs=1, calibration_batches=4)
    assert len(again.trials) == 4  # the same study, one more trial
    recipes = [recipe_key(t["params"]) for t in again.trials]
    assert len(set(recipes)) == len(recipes)  # the resumed run did not replay the first run's recipes


def test_an_impossible_budget_saves_nothing(tmp_path):
    model, data, metric = _setup()
    result = tune(model, data, lambda m: 1.0 if m is model else 0.0, budget=0.5, trials=2, out=tmp_path,
                  max_epochs=1, calibration_batches=4)
    assert result.module is None and result.path is None and not (tmp_path / "best.json").exists()
    assert len(result.trials) == 2 and not any(t["feasible"] for t in result.trials)


def test_bad_trials_are_refused(tmp_path):
    model, data, metric = _setup()
    with pytest.raises(GraphoptError, match="trials"):
        tune(model, data, metric, trials=0, out=tmp_path)


# A tune() run in its own process, made quick (minmax calibration only, no fine-tuning) and made to find a
# new best in every trial (a latency that only falls), so that every trial saves; it kills itself with
# SIGKILL at its KILL_AT-th os.fsync (the durable steps of save() and of best.json), or is killed from outside.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    import graphopt.compiler.int8.calibrate as calibrate
    import graphopt.compiler.int8.quantize as quantize
    import graphopt.compiler.workflow.tune as tune
    from tests.compiler.test_tune import _quick, _setup

    _quick(calibrate, quantize, tune)
    kill_at, calls, fsync = int(os.environ.get("KILL_AT", "0")), [0], os.fsync

    def killing_fsync(fd):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fsync(fd)

    os.fsync = killing_fsync
    model, data, metric = _setup()
    print("tuning", flush=True)
    tune.tune(model, data, metric, budget=1.0, trials=2, out=sys.argv[2], max_epochs=0, calibration_batches=2)
""")


def _quick(calibrate, quantize, tune_module):
    """Patch a process's graphopt for the kill test (called in the child, and by monkeypatch here)."""
    calibrate.METHODS = ("minmax",)
    quantize.MIN_INT8_MACS = 0
    build = tune_module.build
    tune_module.build = lambda model, params, *a, **kw: build(model, {"calibration_method": "minmax", **params}, *a,
                                                               **kw)
    tune_module.median_latency_ms = lambda module, x, calls=30: 1e10 - time.time()


def _trials(out):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="graphopt", storage=f"sqlite:///{out / 'tune.db'}").get_trials()


def _check_best(out):
    """best.json, when present, names a complete module that loads, has the manifest it records, and is
    what the recipe it records builds (int8 exactly where the recipe does not keep a layer fp32)."""
    if not (out / "best.json").exists():
        return None
    best = json.loads((out / "best.json").read_text())
    folder = out / best["path"]
    module = load(folder)
    assert hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() == best["manifest_sha256"]
    ops = " ".join(json.loads((folder / "manifest.json").read_text())["ops"])
    assert ("qconv2d_act" in ops) == (not best["params"]["fp32:conv"])
    assert ("qlinear_act" in ops) == (not best["params"]["fp32:fc"])
    assert _trials(out)[best["trial"]].params == best["params"]
    with torch.no_grad():
        assert module(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    return best


def test_kill_9_at_any_point_keeps_best_json_and_its_model_consistent_and_resume_fails_killed_trials(
        tmp_path, monkeypatch):
    import graphopt.compiler.int8.calibrate as calibrate
    import graphopt.compiler.int8.quantize as quantize
    import graphopt.compiler.workflow.tune as tune_module

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "out"
    rng = random.Random(13)
    # kill points, seeded: a moment after the child started tuning, then fsyncs of its second trial's save of
    # a new best (1-7: 4 files, the rename into place, best.json's temporary file, best.json's replacement):
    # one inside save(), one in the steps from the renamed folder to the new best.json
    points = [("delay", rng.uniform(0.2, 2.5)), ("fsync", 7 + rng.randint(1, 4)), ("fsync", 7 + rng.randint(5, 7))]
    killed = 0
    for kind, at in points:
        env = {**os.environ, "KILL_AT": str(at if kind == "fsync" else 0)}
        child = subprocess.Popen([sys.executable, str(script), str(ROOT), str(out)], env=env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if kind == "delay":
            assert child.stdout.readline().strip() == "tuning"
            time.sleep(at)
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=300)
        child.stdout.close()
        killed += child.returncode == -signal.SIGKILL
        _check_best(out)  # after every kill: consistent (or not there yet)
    assert killed == len(points)
    running = [t.number for t in _trials(out) if t.state.name == "RUNNING"]
    assert running  # the last kill left its trial RUNNING...

    for module, name, value in ((calibrate, "METHODS", ("minmax",)), (quantize, "MIN_INT8_MACS", 0)):
        monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(tune_module, "build", tune_module.build)  # (recorded, so that teardown undoes _quick)
    monkeypatch.setattr(tune_module, "median_latency_ms", tune_module.median_latency_ms)
    _quick(calibrate, quantize, tune_module)
    model, data, metric = _setup()
    result = tune(model, data, metric, budget=1.0, trials=1, out=out, max_epochs=0, calibration_batches=2)
    trials = _trials(out)
    assert all(trials[n].state.name == "FAIL" for n in running)  # ...and the resumed run marked it FAILED
    assert not [t for t in trials if t.state.name == "RUNNING"]
    done = [recipe_key(t.params) for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == len(set(done)) >= 1  # no recipe ran to completion twice
    best = _check_best(out)
    assert best is not None and result.path == out / best["path"]
    assert sorted(p.name for p in out.glob("best-*")) == [best["path"]]  # what the kills left was cleaned up
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_recipe_is_told_apart_by_what_it_does():
    base = {"prune_ratio": 0.0, "calibration_method": "minmax", "lr": 1e-3, "epochs": 2, "fp32:fc": False}
    assert recipe_key(base) == recipe_key({**base, "lr": 2e-3, "epochs": 0})      # nothing is fine-tuned
    pruned = {**base, "prune_ratio": 0.5}
    assert recipe_key(pruned) != recipe_key({**pruned, "lr": 2e-3})
    assert recipe_key(pruned) == recipe_key({**pruned, "lr": 1.001e-3})            # 2 significant digits
    assert recipe_key({**pruned, "epochs": 0}) == recipe_key({**pruned, "epochs": 0, "lr": 3e-3})
    assert recipe_key(base) != recipe_key({**base, "fp32:fc": True})
