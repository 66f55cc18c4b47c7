"""graphopt.finetune: the seed's training loop (Adam, cross-entropy), data-parallel with torch.distributed.

    tuned = finetune(model, (x, y), epochs=2, lr=1e-3, nproc=2)    # model untouched; tuned.history per epoch

Each of ``nproc`` processes holds a DistributedDataParallel replica (gloo on the CPU, NCCL on
GPUs) and reads its share of every global batch through a DistributedSampler: with ``batch``
the global batch size, rank r takes samples r, r + nproc, ... of it, so the averaged gradient
is the single-process gradient of the same batch and 1 and N processes train alike (batch norm
excepted: each replica normalizes over its own share, as DDP does). Rank 0 writes a
safetensors checkpoint after every epoch (and ``metrics.json``: loss averaged over all ranks,
accuracy on held-out data if given).

Under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in the environment) the calling process is one
rank and joins the job as launched, across machines too; otherwise ``nproc`` local processes
are started with torch.multiprocessing.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from graphopt.compiler.core.errors import GraphoptError

# Adam is the seed's; its first steps move each weight by about lr * sign(gradient), so rounding
# differences between 1 and N processes flip a few near-zero gradients' steps. SGD shows the
# data-parallel equivalence to the last bits (tests/compiler/test_finetune.py).
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


def load_state(model: nn.Module, path: Path) -> nn.Module:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model


def _worker(rank: int, world: int, threads: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
            lr: float, batch: int, seed: int, out: str, held_out: tuple | None, backend: str,
            optimizer_name: str) -> None:
    torch.set_num_threads(threads)
    # torch.multiprocessing hands tensors over in shared memory: every rank must train its own copy
    model = copy.deepcopy(model)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        _train(rank, world, model, x, y, epochs, lr, batch, seed, Path(out), held_out, optimizer_name)
    finally:
        dist.destroy_process_group()


def _train(rank: int, world: int, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
           batch: int, seed: int, out: Path, held_out: tuple | None, optimizer_name: str) -> None:
    torch.manual_seed(seed)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if dist.get_backend() == "nccl" else None
    model = model.to(device) if device is not None else model
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device is not None else None)
    optimizer = OPTIMIZERS[optimizer_name](ddp.parameters(), lr=lr)
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=max(1, batch // world), sampler=sampler)
    history = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        total = torch.zeros(2, dtype=torch.float64)
        for xb, yb in loader:
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp(xb), yb)
            loss.backward()
            optimizer.step()
            total += torch.tensor([float(loss.detach()) * len(yb), len(yb)], dtype=torch.float64)
        dist.all_reduce(total)  # (gloo and NCCL alike: CPU tensors go through gloo; see _backend)
        record = {"epoch": epoch + 1, "loss": float(total[0] / total[1]), "world_size": world}
        if rank == 0:
            if held_out is not None:
                model.eval()
                with torch.no_grad():
                    hx, hy = held_out
                    record["accuracy"] = float((model(hx.to(device) if device else hx).argmax(1).cpu() == hy)
                                               .float().mean())
            history.append(record)
            save_state(model, out / f"epoch_{epoch + 1:03d}.safetensors")
            (out / "metrics.json").write_text(json.dumps(history, indent=1) + "\n")
        dist.barrier()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def finetune(model: nn.Module, train_data: tuple[torch.Tensor, torch.Tensor], epochs: int = 1, lr: float = 1e-3,
             nproc: int = 1, batch: int = 64, seed: int = 0, out: str | os.PathLike | None = None,
             held_out: tuple[torch.Tensor, torch.Tensor] | None = None, optimizer: str = "adam") -> nn.Module:
    """Fine-tune a copy of ``model`` on ``train_data`` = (x, labels) over ``nproc`` processes; returns it in eval mode.

    ``out`` keeps the checkpoints (``epoch_NNN.safetensors``) and ``metrics.json``; the returned
    module's ``history`` is that list of per-epoch metrics."""
    if optimizer not in OPTIMIZERS:
        raise GraphoptError(f"unknown optimizer {optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    if nproc < 1 or epochs < 0:
        raise GraphoptError(f"nproc must be >= 1 and epochs >= 0 (got nproc={nproc}, epochs={epochs})")
    x, y = train_data
    if len(x) != len(y) or len(x) == 0:
        raise GraphoptError(f"train_data must be (inputs, labels) of one non-zero length, got {len(x)} and {len(y)}")
    work = copy.deepcopy(model).cpu()
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graphopt-finetune-"))
    folder.mkdir(parents=True, exist_ok=True)
    if epochs == 0:
        work.history = []
        return work.eval()
    args = (work, x, y, epochs, lr, batch, seed, str(folder), held_out, _backend(), optimizer)
    if _under_torchrun():
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.get_num_threads(), *args)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        threads = max(1, torch.get_num_threads() // nproc)  # the machine's cores shared out: no oversubscription
        mp.start_processes(_worker, args=(nproc, threads, *args), nprocs=nproc, join=True, start_method="spawn")
    final = folder / f"epoch_{epochs:03d}.safetensors"
    load_state(work, final)
    work.history = json.loads((folder / "metrics.json").read_text())
    return work.eval()
