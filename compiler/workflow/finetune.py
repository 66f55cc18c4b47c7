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

When a local rank fails, its peers fail too, a moment later, inside a collective ("Connection
reset by peer"), and torch.multiprocessing reports whichever process it saw exit first. So each
rank writes its own error (time, type, message, traceback) to a file before it exits, and the
parent raises the first real one: the earliest error that is not a peer's lost connection.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import traceback
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


# how a rank fails when another one died: not the error to show
_PEER_FAILURE = re.compile(r"Connection (reset|closed) by peer|Broken pipe|ECONNRESET|EPIPE|[Cc]onnection refused"
                           r"|DistNetworkError|DistBackendError|connectFullMesh failed|NCCL communicator was aborted")


def _worker(rank: int, world: int, threads: int, errors: str | None, model: nn.Module, x: torch.Tensor,
            y: torch.Tensor, epochs: int, lr: float, batch: int, seed: int, out: str, held_out: tuple | None,
            backend: str, optimizer_name: str) -> None:
    try:
        torch.set_num_threads(threads)
        # torch.multiprocessing hands tensors over in shared memory: every rank must train its own copy
        model = copy.deepcopy(model)
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world)
        try:
            _train(rank, world, model, x, y, epochs, lr, batch, seed, Path(out), held_out, optimizer_name)
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        if errors is not None:
            with contextlib.suppress(Exception):  # (failing to report must not hide the error itself)
                _record_error(Path(errors), rank, e)
        raise


def _spawned_worker(rank: int, *args) -> None:
    """A local rank started by _spawn: _worker, then, once it has finished cleanly (its checkpoints written, the
    process group destroyed), the process ends at once, without Python's and the C++ runtime's teardown. That
    teardown aborted a gloo rank now and then ("terminate called without an active exception", no Python frame
    left: 2 of 65 two-process fine-tunings; 0 of 70 since), and the parent reported the finished job as failed.
    A rank that raises still exits through torch.multiprocessing, which reports its error."""
    _worker(rank, *args)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _record_error(folder: Path, rank: int, e: BaseException) -> None:
    """This rank's error, written whole (a temporary file renamed) before the process goes."""
    text = json.dumps({"rank": rank, "time": time.time(), "type": type(e).__name__, "message": str(e),
                       "traceback": "".join(traceback.format_exception(e))})
    tmp = folder / f".rank{rank}.json"
    tmp.write_text(text)
    os.replace(tmp, folder / f"rank{rank}.json")


def _first_real_error(folder: Path) -> dict | None:
    """The error to show: the earliest that is not a peer's lost connection (else the earliest)."""
    found = []
    for path in folder.glob("rank*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return min(found, key=lambda r: (bool(_PEER_FAILURE.search(f"{r['type']}: {r['message']}")), r["time"]),
               default=None)


def _spawn(nproc: int, threads: int, args: tuple) -> None:
    """``nproc`` local ranks; a failure raises the failing rank's own error as a GraphoptError."""
    errors = Path(tempfile.mkdtemp(prefix="graphopt-finetune-errors-"))
    try:
        mp.start_processes(_spawned_worker, args=(nproc, threads, str(errors), *args), nprocs=nproc, join=True,
                           start_method="spawn")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        first = _first_real_error(errors)
        if first is None:  # (no rank got as far as recording an error: torch.multiprocessing's word is all there is)
            raise GraphoptError(f"fine-tuning failed: {str(e).strip().splitlines()[0]}",
                                hint="a rank that exits without a Python error was killed (out of memory?)") from e
        lost = _PEER_FAILURE.search(f"{first['type']}: {first['message']}")
        hint = ("no rank recorded an error of its own: one may have been killed (out of memory?)" if lost
                else "the other ranks stopped because this one did")
        cause = RuntimeError(f"rank {first['rank']}'s traceback:\n{first['traceback']}")
        raise GraphoptError(f"fine-tuning failed on rank {first['rank']} of {nproc}: {first['type']}: "
                            f"{first['message']}", hint=hint) from cause
    finally:
        shutil.rmtree(errors, ignore_errors=True)


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
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.get_num_threads(), None, *args)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        threads = max(1, torch.get_num_threads() // nproc)  # the machine's cores shared out: no oversubscription
        _spawn(nproc, threads, args)
    final = folder / f"epoch_{epochs:03d}.safetensors"
    load_state(work, final)
    work.history = json.loads((folder / "metrics.json").read_text())
    return work.eval()
