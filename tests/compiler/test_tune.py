"""Recipe tuning with Optuna: the best feasible model is saved after every trial; studies resume."""

import json

import pytest
import torch
import torch.nn as nn

from graphopt import GraphoptError
from graphopt.compiler.workflow.tune import tune


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
            assert (tmp_path / "best" / "manifest.json").exists()
        seen.append(record)

    result = tune(model, data, metric, budget=1.0, trials=3, out=tmp_path, max_epochs=1, calibration_batches=4,
                  on_trial=after)
    assert len(seen) == 3 and all(r["feasible"] for r in seen)  # a budget of 1.0 admits everything
    assert result.module is not None and result.path == tmp_path / "best"
    assert result.latency_ms == min(r["latency_ms"] for r in seen)
    with torch.no_grad():
        assert result.module(data[0][:2]).shape == (2, 4)
    assert (tmp_path / "tune.db").exists()
    again = tune(model, data, metric, budget=1.0, trials=1, out=tmp_path, max_epochs=1, calibration_batches=4)
    assert len(again.trials) == 4  # the same study, one more trial


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
