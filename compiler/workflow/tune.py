"""graphopt.tune: search the optimization recipe with Optuna, for latency under an accuracy budget.

    result = tune(model, (x_train, y_train), metric, budget=0.01, trials=8, out="tune-out")
    result.module, result.params, result.path

A recipe is: the prune ratio (0 = no pruning), the fine-tune learning rate and epochs after
pruning (data-parallel over ``nproc`` processes), the int8 calibration method, and which layers
stay fp32. A trial builds the recipe's int8 module and measures its median batch-1 latency
(the objective, minimized) and ``metric(module)`` (higher is better), which must reach the
fp32 model's own score minus ``budget`` (an Optuna constraint: infeasible trials guide the
sampler but never win).

After every trial that beats the best feasible one so far, the module is saved (pickle-free)
to ``out/best`` with ``out/best.json``: an interrupted study never loses a good model. The study
lives in ``storage``, SQLite in ``out/tune.db`` by default, or any database URL Optuna accepts,
so several machines can run trials of one study (same ``study_name``).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from graphopt.compiler.core.errors import GraphoptError

RATIOS = (0.0, 0.25, 0.5, 0.625, 0.75)


@dataclass
class TuneResult:
    module: nn.Module | None  # the best feasible module (loaded from ``path``), None if no trial was feasible
    params: dict | None
    latency_ms: float | None
    metric: float | None
    baseline: float
    path: Path | None
    trials: list[dict]


@torch.no_grad()
def median_latency_ms(module: Callable, x: torch.Tensor, calls: int = 30) -> float:
    for _ in range(3):
        module(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def build(model: nn.Module, params: dict, train_data: tuple, calibration: list, example: torch.Tensor,
          nproc: int = 1, seed: int = 0, progress: bool = False):
    """The recipe ``params`` applied to ``model``: prune, fine-tune, optimize to int8."""
    from graphopt import optimize
    from graphopt.compiler.workflow.finetune import finetune
    from graphopt.compiler.workflow.prune import prune

    work = model
    if params.get("prune_ratio", 0.0) > 0:
        work = prune(model.eval(), (example,), ratio=params["prune_ratio"])
        if params.get("epochs", 0) > 0:
            work = finetune(work, train_data, epochs=params["epochs"], lr=params["lr"], nproc=nproc, seed=seed)
    fp32 = [name for name, keep in params.items() if name.startswith("fp32:") and keep]
    return optimize(work.eval(), (example,), quantize="int8", calibration=calibration,
                    calibration_method=params.get("calibration_method", "histogram"),
                    fp32_layers=[name.removeprefix("fp32:") for name in fp32], progress=progress)


def tune(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], metric: Callable[[nn.Module], float],
         budget: float = 0.01, trials: int = 8, out: str | Path = "tune-out", storage: str | None = None,
         study_name: str = "graphopt", nproc: int = 1, max_epochs: int = 2, calibration_batches: int = 16,
         seed: int = 0, on_trial: Callable[[dict], None] | None = None) -> TuneResult:
    """Search recipes for ``trials`` trials; ``data`` = (x, labels) for fine-tuning and calibration."""
    import optuna

    from graphopt import load
    from graphopt.compiler.int8.calibrate import METHODS

    if trials < 1:
        raise GraphoptError(f"trials must be >= 1, got {trials}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = data
    example = x[:1]
    calibration = [(x[i:i + 1],) for i in range(min(calibration_batches, len(x)))]
    baseline = float(metric(model.eval()))
    floor = baseline - budget
    # the quantizable layers, by the names fp32_layers takes (pruning keeps module names)
    probe = build(model, {}, data, calibration[:2], example)
    layers = [layer["name"] for layer in probe.int8_report.layers if layer["int8"]]

    storage = storage or f"sqlite:///{(out / 'tune.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # constraints: Trial.set_constraint from Optuna 5, the sampler's constraints_func before it
    native = hasattr(optuna.trial.Trial, "set_constraint")
    sampler = optuna.samplers.TPESampler(seed=seed) if native else optuna.samplers.TPESampler(
        seed=seed, constraints_func=lambda t: t.user_attrs.get("constraint", [1.0]))
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", sampler=sampler,
                                load_if_exists=True)

    def objective(trial: optuna.Trial) -> float:
        params: dict[str, Any] = {"prune_ratio": trial.suggest_categorical("prune_ratio", RATIOS),
                                  "calibration_method": trial.suggest_categorical("calibration_method", METHODS),
                                  "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
                                  "epochs": trial.suggest_int("epochs", 0, max_epochs)}
        for name in layers:
            params[f"fp32:{name}"] = trial.suggest_categorical(f"fp32:{name}", (False, True))
        opt = build(model, params, data, calibration, example, nproc=nproc, seed=seed)
        latency, score = median_latency_ms(opt, example), float(metric(opt))
        feasible = score >= floor
        trial.set_user_attr("constraint", [floor - score])
        if native:
            trial.set_constraint("accuracy", floor - score)
        trial.set_user_attr("metric", score)
        trial.set_user_attr("params_count", sum(t.numel() for t in opt.portable.state_dict().values()))
        best = _best_feasible(study, exclude=trial.number)
        if feasible and (best is None or latency < best.value):
            opt.save(out / "best")
            (out / "best.json").write_text(json.dumps({"trial": trial.number, "params": params,
                                                       "latency_ms": latency, "metric": score,
                                                       "baseline": baseline, "budget": budget}, indent=1) + "\n")
        if on_trial:
            on_trial({"trial": trial.number, "latency_ms": latency, "metric": score, "feasible": feasible})
        return latency

    study.optimize(objective, n_trials=trials)
    records = [{"trial": t.number, "latency_ms": t.value, "metric": t.user_attrs.get("metric"),
                "feasible": t.user_attrs.get("constraint", [1.0])[0] <= 0, "params": t.params}
               for t in study.trials if t.value is not None]
    if not (out / "best.json").exists():
        return TuneResult(None, None, None, None, baseline, None, records)
    best = json.loads((out / "best.json").read_text())
    return TuneResult(load(out / "best"), best["params"], best["latency_ms"], best["metric"], baseline,
                      out / "best", records)


def _best_feasible(study, exclude: int):
    done = [t for t in study.get_trials(deepcopy=False)
            if t.number != exclude and t.value is not None and t.user_attrs.get("constraint", [1.0])[0] <= 0]
    return min(done, key=lambda t: t.value) if done else None
