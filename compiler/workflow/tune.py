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
and ``out/best.json`` names it: an interrupted study never loses a good model. The study lives in
``storage``, SQLite in ``out/tune.db`` by default, or any database URL Optuna accepts, so several
machines can run trials of one study (same ``study_name``; each with its own ``out``).

Under kill -9 at any point, ``out/best.json``, when present, names a complete saved module and
describes it (recipe, latency, metric, and the sha256 of its manifest.json):

    1. the new best is saved to a fresh folder ``out/best-<trial>`` (save() is atomic itself)
    2. ``out/best.json`` is replaced atomically (temporary file, fsync, os.replace) to name it
    3. the ``best-*`` folders best.json does not name are removed (also at the start of a run:
       what a kill between 1 and 2 or 2 and 3 left)

So the best model is ``out/<best.json's "path">`` (``TuneResult.path``), not a fixed folder: two
files cannot change in one atomic step, and graphopt.load refuses a symlinked folder.

Resuming: trials left RUNNING by a process that is gone (this host, its pid dead or reused) are
marked FAIL when a run starts, and their recipe queued to run once more; those of other machines
are failed by Optuna's heartbeat once stale (``GRACE_S``). A recipe that completed is not run
again: the sampler is seeded with ``seed`` plus the number of trials already in the study (a
resumed run does not replay the first one's draws), and a trial whose recipe equals a completed
one (``recipe_key``) is pruned before it builds anything and another is proposed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.deploy.save import sha256
from graphopt.compiler.workflow import tune_state
from graphopt.compiler.workflow.timing import median_ms
from graphopt.compiler.workflow.tune_state import (
    fail_interrupted,
    publish_best,
    read_best,
    remove_stale,
    this_process,
)

RATIOS = (0.0, 0.25, 0.5, 0.625, 0.75)
HEARTBEAT_S = 30  # (a RUNNING trial with no heartbeat for tune_state.GRACE_S seconds was interrupted)
MAX_DUPLICATES = 50  # proposals of already-tried recipes one run prunes before it stops early


@dataclass
class TuneResult:
    module: nn.Module | None  # the best feasible module (loaded from ``path``), None if no trial was feasible
    params: dict | None
    latency_ms: float | None
    metric: float | None
    baseline: float
    path: Path | None
    trials: list[dict]


def median_latency_ms(module: Callable, x: torch.Tensor, calls: int = 30) -> float:
    """A trial's objective: ``module``'s median batch-1 latency (timing.median_ms, one callable)."""
    return median_ms({"module": module}, (x,), rounds=calls)["module"]


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
    from graphopt.compiler.int8.plans import SLOWER

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
    layers = [layer["name"] for layer in probe.int8_report.layers
              if layer["int8"] or (layer["reason"] or "").startswith(SLOWER)]

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # (heartbeats are "experimental" in Optuna)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        db = optuna.storages.RDBStorage(storage or f"sqlite:///{(out / 'tune.db').resolve()}",
                                        heartbeat_interval=HEARTBEAT_S, grace_period=tune_state.GRACE_S)
        study = optuna.create_study(study_name=study_name, storage=db, direction="minimize", load_if_exists=True)
    fail_interrupted(study)
    remove_stale(out, read_best(out))
    # constraints: Trial.set_constraint from Optuna 5, the sampler's constraints_func before it
    native = hasattr(optuna.trial.Trial, "set_constraint")
    start = seed + len(study.get_trials(deepcopy=False))  # a resumed run draws other recipes than the first
    study.sampler = optuna.samplers.TPESampler(seed=start) if native else optuna.samplers.TPESampler(
        seed=start, constraints_func=lambda t: t.user_attrs.get("constraint", [1.0]))
    me = this_process()

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", me)
        params: dict[str, Any] = {"prune_ratio": trial.suggest_categorical("prune_ratio", RATIOS),
                                  "calibration_method": trial.suggest_categorical("calibration_method", METHODS),
                                  "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
                                  "epochs": trial.suggest_int("epochs", 0, max_epochs)}
        for name in layers:
            params[f"fp32:{name}"] = trial.suggest_categorical(f"fp32:{name}", (False, True))
        tried = {recipe_key(t.params): t.number for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
        if recipe_key(params) in tried:
            trial.set_user_attr("duplicate_of", tried[recipe_key(params)])
            raise optuna.TrialPruned(f"the recipe of trial {tried[recipe_key(params)]}")
        opt = build(model, params, data, calibration, example, nproc=nproc, seed=seed)
        latency, score = median_latency_ms(opt, example), float(metric(opt))
        feasible = score >= floor
        trial.set_user_attr("constraint", [floor - score])
        if native:
            trial.set_constraint("accuracy", floor - score)
        trial.set_user_attr("metric", score)
        trial.set_user_attr("params_count", sum(t.numel() for t in opt.portable.state_dict().values()))
        best, current = _best_feasible(study, exclude=trial.number), read_best(out)
        bars = [b for b in (best and best.value, current and current["latency_ms"]) if b is not None]
        if feasible and all(latency < b for b in bars):
            publish_best(out, opt, {"trial": trial.number, "params": params, "latency_ms": latency, "metric": score,
                                    "baseline": baseline, "budget": budget})
        if on_trial:
            on_trial({"trial": trial.number, "latency_ms": latency, "metric": score, "feasible": feasible})
        return latency

    completed: list[int] = []

    def enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            completed.append(trial.number)
        if len(completed) >= trials:
            study.stop()

    study.optimize(objective, n_trials=trials + MAX_DUPLICATES, callbacks=[enough])
    records = [{"trial": t.number, "latency_ms": t.value, "metric": t.user_attrs.get("metric"),
                "feasible": t.user_attrs.get("constraint", [1.0])[0] <= 0, "params": t.params}
               for t in study.trials if t.value is not None]
    best = read_best(out)
    if best is None:
        return TuneResult(None, None, None, None, baseline, None, records)
    path = out / best["path"]
    module = load(path)
    if best.get("manifest_sha256") not in (None, sha256(path / "manifest.json")):
        raise GraphoptError(f"{out / 'best.json'} does not describe {path}: its manifest's sha256 differs",
                            hint="the folder was changed after tune() saved it; run tune() again")
    return TuneResult(module, best["params"], best["latency_ms"], best["metric"], baseline, path, records)


def recipe_key(params: dict) -> tuple:
    """What a recipe does, for telling repeats apart: lr and epochs only where they act (a pruned model is
    fine-tuned; nothing else is), lr to 2 significant digits."""
    p = dict(params)
    if p.get("prune_ratio", 0.0) == 0.0 or p.get("epochs", 0) == 0:
        p.pop("lr", None)
        if p.get("prune_ratio", 0.0) == 0.0:
            p.pop("epochs", None)
    if "lr" in p:
        p["lr"] = float(f"{p['lr']:.2g}")
    return tuple(sorted(p.items()))


def _best_feasible(study, exclude: int):
    done = [t for t in study.get_trials(deepcopy=False)
            if t.number != exclude and t.value is not None and t.user_attrs.get("constraint", [1.0])[0] <= 0]
    return min(done, key=lambda t: t.value) if done else None
