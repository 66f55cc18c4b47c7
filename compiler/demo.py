"""The main job: train the seed ConvNet on scikit-learn's bundled digits, optimize it, and
compare accuracy and latency before and after.

Digits are 8x8 greyscale images, upsampled to 32x32 for the seed model; the split is fixed
and seeded, so every run sees the same data.
"""

from __future__ import annotations

import json
import statistics
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


@torch.no_grad()
def median_latency_ms(engines: dict[str, Callable], x: torch.Tensor, rounds: int = 20, per_round: int = 10) -> dict:
    """Median per-call latency of each engine, taking turns in interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for fn in engines.values():
        for _ in range(3):
            fn(x)
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run_demo(out: str | Path, epochs: int = 8, quick: bool = False, seed: int = 0) -> dict:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from compiler import optimize

    console = Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    if quick:
        epochs, x_train, y_train = 1, x_train[:512], y_train[:512]
    model = ConvNet()
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task(f"training on {len(x_train)} digits", total=epochs * len(x_train))
        train(model, x_train, y_train, epochs, seed=seed, progress=lambda n: bar.advance(task, n))

    start = time.perf_counter()
    opt = optimize(model, (x_test[:1],), dump_dir=out / "dumps")
    optimize_s = time.perf_counter() - start
    latency = median_latency_ms({"fp32": model, "optimized": opt}, x_test[:1], rounds=5 if quick else 20)
    params = sum(p.numel() for p in model.parameters())
    opt_params = sum(t.numel() for t in opt.state_dict().values())
    stages = [
        {"name": "fp32", "accuracy": accuracy(model, x_test, y_test), "latency_ms": latency["fp32"], "params": params},
        {"name": "optimized", "accuracy": accuracy(opt, x_test, y_test), "latency_ms": latency["optimized"],
         "params": opt_params, "optimize_s": optimize_s},
    ]
    result = {"stages": stages, "epochs": epochs, "train_size": len(x_train), "test_size": len(x_test),
              "threads": torch.get_num_threads()}
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title="graphopt demo: seed ConvNet on digits (batch-1 latency, median)")
    for col in ("stage", "test accuracy", "latency ms", "params"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for s in stages:
        table.add_row(s["name"], f"{s['accuracy']:.4f}", f"{s['latency_ms']:.3f}", f"{s['params']:,}")
    console.print(table)
    console.print(f"optimize() took {optimize_s:.2f} s; dumps in {out / 'dumps'}; results in {out / 'demo.json'}")
    return result
