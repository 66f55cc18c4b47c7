"""Data-parallel fine-tuning (torch.distributed, gloo) and data-parallel calibration."""

import json
import os
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from graphopt import GraphoptError
from graphopt.compiler.core.capture import capture
from graphopt.compiler.int8.calibrate import collect, value_range
from graphopt.compiler.workflow.finetune import _free_port, finetune


class Small(nn.Module):
    """No batch norm, no dropout: 1 and N processes compute the same thing."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_two_processes_match_one_on_the_same_data_order(tmp_path):
    torch.manual_seed(0)
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    one = finetune(model, (x, y), epochs=2, lr=0.05, nproc=1, batch=32, optimizer="sgd", out=tmp_path / "one")
    two = finetune(model, (x, y), epochs=2, lr=0.05, nproc=2, batch=32, optimizer="sgd", out=tmp_path / "two")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, before[name])  # it did train
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert [h["world_size"] for h in two.history] == [2, 2]
    for a, b in zip(one.history, two.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "epoch_001.safetensors", "epoch_002.safetensors", "metrics.json"]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text()) == two.history


def test_adam_fine_tune_on_two_processes_learns_and_reports_held_out_accuracy(tmp_path):
    torch.manual_seed(0)
    x, y = _data(128)
    tuned = finetune(Small(), (x, y), epochs=3, lr=3e-3, nproc=2, batch=32, held_out=(x, y), out=tmp_path)
    assert tuned.history[-1]["loss"] < tuned.history[0]["loss"]
    assert 0.0 <= tuned.history[-1]["accuracy"] <= 1.0 and not tuned.training


def test_zero_epochs_returns_a_copy_and_bad_arguments_are_refused():
    from graphopt import GraphoptError

    model, (x, y) = Small(), _data(8)
    same = finetune(model, (x, y), epochs=0)
    assert same is not model and all(torch.equal(a, b) for a, b in zip(same.parameters(), model.parameters()))
    with pytest.raises(GraphoptError, match="nproc"):
        finetune(model, (x, y), nproc=0)
    with pytest.raises(GraphoptError, match="optimizer"):
        finetune(model, (x, y), optimizer="lion")
    with pytest.raises(GraphoptError, match="one non-zero length"):
        finetune(model, (x, y[:3]))


class Calibrated(nn.Module):
    def forward(self, x):
        return torch.relu(x) * 3.0


def _calibrate_rank(rank: int, world: int, port: int, batches: list, method: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gm = capture(Calibrated().eval(), (batches[0][0],))
        names = {n.name for n in gm.graph.nodes if n.op != "output"}
        stats = collect(gm, batches[rank::world], names, method)  # each rank sees only its share
        ranges = {n: value_range(stats, n, method) for n in sorted(names)}
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(ranges, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["minmax", "histogram"])
def test_observer_statistics_are_all_reduced_across_ranks(tmp_path, method):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=g) * (i + 1),) for i in range(6)]
    mp.start_processes(_calibrate_rank, args=(2, _free_port(), batches, method, str(tmp_path)), nprocs=2,
                       start_method="spawn")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    gm = capture(Calibrated().eval(), (batches[0][0],))
    names = {n.name for n in gm.graph.nodes if n.op != "output"}
    alone = collect(gm, batches, names, method)  # one process seeing everything
    expected = {n: list(value_range(alone, n, method)) for n in sorted(names)}
    assert rank0 == rank1 == expected


class FailsOnRank1(Small):
    """Rank 1 hits a real error and, as a real process may, takes a while to exit; rank 0 then fails the way a
    peer of a dead rank does. The multiprocessing join sees rank 0 exit first."""

    def forward(self, x):
        if dist.get_rank() == 1:
            threading.Thread(target=time.sleep, args=(3.0,)).start()  # (not a daemon: the exit waits for it)
            raise ValueError("a bad batch that only rank 1 sees")
        time.sleep(0.5)
        raise ConnectionResetError(104, "Connection reset by peer")


def test_the_failing_ranks_own_error_is_raised_not_its_peers_connection_reset(tmp_path):
    x, y = _data(16)
    with pytest.raises(GraphoptError, match="rank 1 of 2.*ValueError: a bad batch that only rank 1 sees") as e:
        finetune(FailsOnRank1(), (x, y), epochs=1, nproc=2, batch=8, out=tmp_path)
    assert "Connection reset" not in str(e.value)
    assert "only rank 1 sees" in str(e.value.__cause__)  # the rank's traceback, for --debug
