"""Saving a module: no pickle, and atomic.

    DIR/graph.json          the portable graph (graphopt ops, torch ops), compiler/deploy/graph_json.py
    DIR/weights.safetensors every tensor the graph reads
    DIR/code.py             the generated forward, for people to read (never run by load)
    DIR/manifest.json       versions, backend, input specs, the op set, the int8 scheme (compiler/int8/scheme.py),
                            and a sha256 of every file above

The files are written into a temporary sibling folder and flushed to disk; only then does the
folder take its place, by one atomic exchange of the two names (Linux's renameat2 RENAME_EXCHANGE)
where there was an old module. A save that fails or is killed at any point leaves either the old
module or the new one, complete, and never a mix of two saves. (Where the exchange is not
available, the old folder is moved aside first: a kill between the two renames leaves it there,
under ``.NAME.old-*``.)
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphopt.compiler.core.errors import GraphoptError
from graphopt.compiler.deploy.graph_json import FORMAT_VERSION, graph_to_json, plain_names
from graphopt.compiler.deploy.inline import inline_modules
from graphopt.compiler.int8.scheme import scheme_of

FILES = ("graph.json", "weights.safetensors", "code.py")
MANIFEST_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("graphopt")
    except PackageNotFoundError:
        return "unknown"


def _tensor(module: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(portable: fx.GraphModule, path: str | os.PathLike, *, backend: str, input_specs: list, report: list,
         extra: dict | None = None) -> Path:
    """Write ``portable`` to the folder ``path``, replacing what was there only once the new one is complete."""
    from safetensors.torch import save_file

    gm = fx.GraphModule(portable, copy.deepcopy(portable.graph), "Saved")
    gm = inline_modules(gm)  # (raises before anything is written, if it cannot)
    sources = plain_names(gm)
    tensors = {name: _tensor(gm, sources[name]) for name in sources}
    graph = graph_to_json(gm)
    out = Path(path)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise GraphoptError(f"cannot save to {out}: it is a symlink or a file", hint="save into a plain folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.saving-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / "graph.json").write_text(json.dumps(graph, indent=1) + "\n")
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
        (tmp / "code.py").write_text("# The generated forward, for reading. graphopt.load never runs this file.\n"
                                     + gm.graph.python_code("self").src)
        ops = sorted({n["target"] for n in graph["nodes"] if n["op"] in ("call_function", "call_method")})
        manifest = {
            "format": "graphopt-module", "version": MANIFEST_VERSION, "graph_version": FORMAT_VERSION,
            "graphopt": _version(), "torch": torch.__version__, "backend": backend, "inputs": input_specs,
            "ops": ops, "passes": [{"name": r.name, "rewrites": r.rewrites} for r in report],
            "int8_scheme": scheme_of(portable), **(extra or {}),
            "sha256": {name: sha256(tmp / name) for name in FILES},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for name in (*FILES, "manifest.json"):
            fsync(tmp / name)
        _replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise GraphoptError(f"saving to {out} failed: {e}; the folder was left as it was",
                                hint="check the disk space and permissions of the folder") from e
        raise
    return out


def _remove_stale(out: Path) -> None:
    """Remove the temporaries of saves to ``out`` whose process was killed (never those of a live one)."""
    prefix = f".{out.name}.saving-"
    for stale in out.parent.glob(prefix + "*"):
        try:
            os.kill(int(stale.name[len(prefix):].split("-")[0]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass  # (alive, someone else's)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this file system or kernel
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _replace(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, atomically where an old ``out`` exists."""
    if not out.exists():
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # (now the old module)
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync(out.parent)
