"""Hostile saved folders: tools to build them from a real save, and a seeded mutator.

Whoever sends a saved folder controls every byte of it, hashes included, so every folder here is
re-hashed after it is changed. ``mutate`` changes one thing at random (a JSON value anywhere in
graph.json or manifest.json, a node's op or target, a safetensors header byte) and ``run_one`` loads
the result, checking what a load must never do: raise anything but LoadError, touch a file outside
the folder, or change process state. ``graphopt fuzz --artifacts N`` runs N of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

# names an attacker would reach for: each must be refused wherever it appears
GADGETS = [
    "operator.attrgetter", "operator.methodcaller", "operator.call", "operator.itemgetter", "operator.setitem",
    "builtins.eval", "builtins.exec", "builtins.open", "builtins.print", "builtins.__import__", "os.system",
    "subprocess.run", "torch.load", "torch.save", "torch.from_file", "torch.ops.aten.from_file.default",
    "torch.ops.aten._print.default", "torch.set_flush_denormal", "torch.set_num_threads", "torch.manual_seed",
    "torch.set_autocast_cpu_enabled", "torch.set_default_dtype", "torch.set_grad_enabled", "torch.set_anomaly_enabled",
    "torch.set_num_interop_threads", "torch.nn.functional.__builtins__", "torch.Tensor.__reduce_ex__",
]
METHOD_GADGETS = ["__class__", "__reduce_ex__", "_version", "tolist", "numpy", "storage", "untyped_storage", "apply_",
                  "map_", "share_memory_", "record_stream", "register_hook", "backward", "copy_", "set_"]


def rehash(folder: Path) -> None:
    """Rewrite the manifest's sha256 values, as an attacker who changed the files would."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes = manifest["sha256"]
        for name in list(hashes):
            path = folder / name
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else hashes[name]
        manifest_path.write_text(json.dumps(manifest))
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        pass  # a manifest the mutation broke stays broken


def process_state() -> dict[str, Any]:
    """What a load must leave as it found it."""
    tiny = torch.tensor([1e-39]) * torch.tensor([1.0])  # 0 under flush-denormal
    return {
        "flush_denormal": bool(tiny.item() == 0.0), "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "grad": torch.is_grad_enabled(),
        "autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": torch.get_autocast_dtype("cpu"),
        "anomaly": torch.is_anomaly_enabled(), "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(), "rng": torch.get_rng_state().clone(),
        "cwd": os.getcwd(), "env": dict(os.environ),
    }


def same_state(a: dict, b: dict) -> list[str]:
    return [k for k in a if not (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k])]


def files_outside(folder: Path, watch: Path) -> set[str]:
    """Every file under ``watch`` but outside ``folder``, with its size and mtime."""
    found = set()
    for path in watch.rglob("*"):
        if folder in path.parents or path == folder:
            continue
        try:
            info = path.lstat()
            found.add(f"{path}:{info.st_size}:{info.st_mtime_ns}")
        except OSError:
            pass
    return found


# ---------------------------------------------------------------- the mutator


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, prefix + (i,))
    return found


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    target = root
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return root


def _replacement(rng: random.Random, original: Any) -> Any:
    choices = [
        None, True, -1, 0, 1, 2 ** 31, 2 ** 63, -(2 ** 70), 1e308, float("nan"), "", "x" * 300, "a..b", "forward",
        "training", "__class__", 'x")\nopen("pwned", "w")\n_ = ("', "self", "nan", [], {}, [[[]]], {"node": "nope"},
        {"tuple": [1, 2]}, {"dict": {"__class__": 1}}, {"dtype": "float32"}, {"dtype": "object"},
        {"device": "cuda:99"}, {"slice": [None, None, 0]}, {"ellipsis": True}, rng.choice(GADGETS),
        rng.choice(METHOD_GADGETS), "torch.ones", "operator.pow", "builtins.getattr", "call_method", "get_attr",
        "placeholder", "output", [2 ** 31] * 4, [0] * 5000,
    ]
    if isinstance(original, int) and not isinstance(original, bool):
        choices += [original + 1, original - 1, -original, original * 1000]
    if isinstance(original, list) and original:
        choices += [original[:-1], original + original[:1], list(reversed(original))]
    return copy.deepcopy(rng.choice(choices))


def mutate(folder: Path, rng: random.Random) -> str:
    """Change one thing in the saved ``folder`` at random, re-hash, and say what was changed."""
    kind = rng.choice(["graph", "graph", "graph", "node", "manifest", "weights"])
    if kind in ("graph", "node", "manifest"):
        path = folder / ("manifest.json" if kind == "manifest" else "graph.json")
        data = json.loads(path.read_text())
        if kind == "node":
            node = rng.choice(data["nodes"])
            field = rng.choice(["op", "target", "name", "args", "kwargs"])
            node[field] = _replacement(rng, node.get(field))
            what = f"graph.json node {node.get('name')!r} {field}"
        else:
            where = rng.choice(_paths(data)[1:])
            original = data
            for key in where:
                original = original[key]
            data = _set(data, where, _replacement(rng, original))
            what = f"{path.name} at {'/'.join(map(str, where))}"
        path.write_text(json.dumps(data))
    else:
        path = folder / "weights.safetensors"
        raw = bytearray(path.read_bytes())
        header = int.from_bytes(raw[:8], "little")
        i = rng.randrange(0, min(len(raw), 8 + header))
        raw[i] = rng.randrange(256)
        path.write_bytes(bytes(raw))
        what = f"weights.safetensors byte {i}"
    rehash(folder)
    return what


def run_one(pristine: Path, work: Path, seed: int, example: torch.Tensor) -> str:
    """Mutate a copy of ``pristine`` and load it; returns 'refused' or 'loaded'; raises AssertionError on a breach."""
    from graphopt import LoadError, load

    folder = work / f"case-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder)
    what = mutate(folder, random.Random(seed))
    before_files, before_state = files_outside(folder, work), process_state()
    try:
        module = load(folder)
        outcome = "loaded"
    except LoadError:
        module, outcome = None, "refused"
    except Exception as e:  # noqa: BLE001  (the breach this fuzzer looks for)
        raise AssertionError(f"seed {seed}: {what}: load raised {type(e).__name__}: {e}") from e
    if module is not None:
        try:
            with torch.no_grad():
                module(example.clone())
        except Exception:  # noqa: BLE001  (a loaded graph may compute anything the sender wrote; it may fail)
            pass
    changed = same_state(before_state, process_state())
    assert not changed, f"seed {seed}: {what}: process state changed: {changed}"
    assert files_outside(folder, work) == before_files, f"seed {seed}: {what}: a file outside the folder changed"
    assert not (Path.cwd() / "pwned").exists(), f"seed {seed}: {what}: injected code ran"
    shutil.rmtree(folder, ignore_errors=True)
    return outcome
