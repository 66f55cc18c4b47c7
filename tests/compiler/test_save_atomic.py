"""A save that fails, or is killed at any point, leaves the old module or the new one, never a mix."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from graphopt import GraphoptError, load, optimize
from tests.zoo import ZOO

# saves two different modules over the same folder, again and again, until killed
_SAVER = textwrap.dedent("""
    import sys, torch
    from graphopt import optimize
    from tests.zoo import ZOO
    make, inputs = ZOO["seed_convnet"]
    mods = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        mods.append(optimize(make().eval(), (inputs(2),), check=False))
    mods[0].save(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        mods[i % 2].save(sys.argv[1])
        i += 1
""")


def _module(seed: int):
    make, inputs = ZOO["seed_convnet"]
    torch.manual_seed(seed)
    return optimize(make().eval(), (inputs(2),), check=False), inputs(3)


def test_a_save_killed_at_any_point_leaves_a_loadable_module(tmp_path):
    (a, x), (b, _) = _module(1), _module(2)
    with torch.no_grad():
        wants = [a(x), b(x)]
    folder = tmp_path / "saved"
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(folder)], stdout=subprocess.PIPE,
                                cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        loaded = load(folder)
        with torch.no_grad():
            got = loaded(x)
        assert any(torch.equal(got, want) for want in wants)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "saved"]
    assert all(name.startswith(".saved.") for name in leftovers)  # (temporaries of a killed save, hidden)
    a.save(folder)  # the next save cleans up after killed ones
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_a_failed_save_raises_and_leaves_the_old_module(tmp_path, monkeypatch):
    (a, x), (b, _) = _module(1), _module(2)
    folder = a.save(tmp_path / "saved")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(GraphoptError, match="No space left"):
        b.save(folder)
    with torch.no_grad():
        assert torch.equal(load(folder)(x), a(x))
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_saving_over_a_symlink_or_a_file_is_refused(tmp_path):
    a, _ = _module(1)
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    for target in ("file", "link"):
        with pytest.raises(GraphoptError, match="symlink or a file"):
            a.save(tmp_path / target)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "elsewhere").exists()
