"""The main job: train the seed ConvNet on scikit-learn's bundled digits, optimize it, and
compare accuracy and latency before and after.

Digits are 8x8 greyscale images, upsampled to 32x32 for the seed model; the split is fixed
and seeded, so every run sees the same data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvNet(nn.Module):
    """The seed model, for 1x32x32 inputs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 8 * 8, 256), nn.Linear(256, classes)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 32, 32) -> (N, classes)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); x as (N, 1, 32, 32) float32 normalized, 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3, batch: int = 64,
          seed: int = 0, progress: Callable | None = None) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if progress:
                progress(len(idx))
    return model.eval()


@torch.no_grad()
def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def _plot(stages: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, stage in enumerate(stages):
        ax.scatter(stage["latency_ms"], stage["accuracy"] * 100, s=40)
        ax.annotate(stage["name"], (stage["latency_ms"], stage["accuracy"] * 100), textcoords="offset points",
                    xytext=(6, 6 if i % 2 == 0 else -12))  # alternate above / below: neighbours often overlap
    ax.set_xlabel("latency, batch 1, median (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("graphopt demo: seed ConvNet on digits, per stage")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: str | Path, epochs: int = 8, quick: bool = False, seed: int = 0, nproc: int = 2,
             trials: int = 8, prune_ratio: float = 0.5, budget: float = 0.01) -> dict:
    """The whole story on digits: train, then fp32 -> optimized -> int8 -> pruned (+ fine-tuned) -> tuned."""
    import shutil

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from graphopt import load, optimize
    from graphopt.compiler.core.engines import SETTLE_MS
    from graphopt.compiler.workflow.finetune import finetune
    from graphopt.compiler.workflow.prune import prune
    from graphopt.compiler.workflow.timing import median_ms
    from graphopt.compiler.workflow.tune import tune

    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    finetune_epochs, tune_epochs = 2, 2
    if quick:
        epochs, finetune_epochs, tune_epochs, trials = 1, 1, 1, min(trials, 2)
        x_train, y_train = x_train[:512], y_train[:512]
    # tuning picks recipes on a validation split of the training data; the test split only reports
    cut = int(0.85 * len(x_train))
    x_fit, y_fit, x_val, y_val = x_train[:cut], y_train[:cut], x_train[cut:], y_train[cut:]
    example = x_test[:1]
    calibration = [(x_fit[i:i + 8],) for i in range(0, min(len(x_fit), 8 * 32), 8)]  # 32 batches of 8

    model = ConvNet()
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task(f"training on {len(x_train)} digits", total=epochs * len(x_train))
        train(model, x_train, y_train, epochs, seed=seed, progress=lambda n: bar.advance(task, n))

    timings: dict[str, float] = {}
    start = time.perf_counter()
    optimized = optimize(model, (example,), dump_dir=out / "dumps")
    timings["optimize_s"] = time.perf_counter() - start
    console.print("int8: calibrating on 32 batches")
    start = time.perf_counter()
    int8 = optimize(model, (example,), quantize="int8", calibration=calibration, dump_dir=out / "dumps-int8")
    timings["int8_optimize_s"] = time.perf_counter() - start

    console.print(f"pruning {prune_ratio:.0%} of the channels, fine-tuning on {nproc} process(es)")
    start = time.perf_counter()
    pruned_model = prune(model, (example,), ratio=prune_ratio)
    pruned_model = finetune(pruned_model, (x_train, y_train), epochs=finetune_epochs, lr=1e-3, nproc=nproc,
                            seed=seed, out=out / "finetune", held_out=(x_test, y_test))
    pruned = optimize(pruned_model, (example,))
    timings["prune_finetune_s"] = time.perf_counter() - start

    console.print(f"tuning the recipe: {trials} Optuna trials (latency, accuracy >= fp32 - {budget:.0%} on validation)")
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("tuning", total=trials)
        result = tune(model, (x_fit, y_fit), lambda m: accuracy(m, x_val, y_val), budget=budget, trials=trials,
                      out=out / "tune", nproc=nproc, max_epochs=tune_epochs, seed=seed,
                      on_trial=lambda r: bar.advance(task))
    timings["tune_s"] = time.perf_counter() - start
    tuned_path = None
    if result.path is not None:
        shutil.rmtree(out / "tuned", ignore_errors=True)
        shutil.copytree(result.path, out / "tuned")
        tuned_path = "tuned"
        tuned = load(out / "tuned")
    else:  # no recipe met the budget: the tuned stage is the int8 model, and says so
        console.print("[yellow]no tuned recipe met the accuracy budget; the tuned stage repeats int8[/yellow]")
        tuned = int8

    engines = {"fp32": model, "optimized": optimized, "int8": int8, "pruned": pruned, "tuned": tuned}
    # settled blocks, as optimize() times its candidates (compiler/workflow/timing.py): four library sessions take
    # turns here, and one's pool still spinning from its block would land on the next one's timed calls
    latency = median_ms(engines, (example,), rounds=5 if quick else 20, per_round=10, settle_ms=SETTLE_MS)

    def n_params(m: nn.Module) -> int:
        state = m.portable.state_dict() if hasattr(m, "portable") else m.state_dict()
        return sum(t.numel() for k, t in state.items() if not k.endswith(("running_mean", "running_var",
                                                                          "num_batches_tracked")))

    stages = []
    for name, m in engines.items():
        stages.append({"name": name, "accuracy": accuracy(m, x_test, y_test), "latency_ms": latency[name],
                       "params": n_params(m), "kernels": getattr(m, "engine", "eager")})
    stages[1]["optimize_s"] = timings["optimize_s"]
    stages[2].update(optimize_s=timings["int8_optimize_s"], output_sqnr_db=int8.int8_report.output_sqnr_db,
                     int8_layers=sum(layer["int8"] for layer in int8.int8_report.layers))
    stages[3].update(world_size=nproc, ratio=prune_ratio, finetune_epochs=finetune_epochs,
                     seconds=timings["prune_finetune_s"])
    stages[4].update(path=tuned_path, recipe=result.params, trials=len(result.trials), budget=budget,
                     validation_baseline=result.baseline, validation_accuracy=result.metric, seconds=timings["tune_s"])
    out_json = {"stages": stages, "epochs": epochs, "train_size": len(x_train), "test_size": len(x_test),
                "threads": torch.get_num_threads(), "quick": quick}
    (out / "demo.json").write_text(json.dumps(out_json, indent=2) + "\n")
    try:
        _plot(stages, out / "demo.png")
    except ImportError:
        console.print("matplotlib not installed: no plot")

    table = Table(title="graphopt demo: seed ConvNet on digits (batch-1 latency, median)")
    for col in ("stage", "test accuracy", "latency ms", "vs fp32", "params", "kernels"):
        table.add_column(col, justify="left" if col in ("stage", "kernels") else "right")
    for s in stages:
        table.add_row(s["name"], f"{s['accuracy']:.4f}", f"{s['latency_ms']:.3f}",
                      f"{s['latency_ms'] / stages[0]['latency_ms']:.2f}x", f"{s['params']:,}", s["kernels"])
    console.print(table)
    console.print(f"results in {out / 'demo.json'} and {out / 'demo.png'}; dumps in {out / 'dumps'}; "
                  f"tuned model in {out / (tuned_path or '-')}")
    return out_json
